//! `dynamo graph up graphs/agg.toml` end to end: the official `openai` Python client, a
//! conformance run of malformed and hostile requests through the real pipeline, client
//! disconnects that must free KV blocks, and a worker killed mid-stream.

use std::process::Command;
use std::time::{Duration, Instant};

use dynamo_tests::{model_cached, python, workspace, Graph};
use futures::StreamExt;

fn agg() -> std::path::PathBuf {
    workspace().join("graphs/agg.toml")
}

fn need_model() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh (scripts/test.sh does)"
    );
}

/// Active KV blocks of every engine, from the frontend's /metrics.
async fn active_blocks(client: &reqwest::Client, url: &str) -> Option<u64> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("dynamo_engine_kv_blocks{") && l.contains("state=\"active\""))
        .collect();
    if lines.is_empty() {
        return None;
    }
    Some(
        lines
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// Wait (bounded) until no engine holds a block.
async fn wait_no_active_blocks(client: &reqwest::Client, url: &str) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        last = active_blocks(client, url).await;
        if last == Some(0) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

#[test]
fn the_openai_python_client_streams_and_not() {
    need_model();
    let g = Graph::up(&agg(), &["worker.engine=mocker", "worker.speedup=inf"]);
    let out = Command::new(python())
        .arg(workspace().join("tests/python/test_openai.py"))
        .arg(&g.url)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("8 passed, 0 failed"), "{stdout}");
}

struct Case {
    name: &'static str,
    body: Vec<u8>,
    path: &'static str,
    status: u16,
    /// The OpenAI error `param`, when the error names one.
    param: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: &str,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        body: body.as_bytes().to_vec(),
        path,
        status,
        param,
    }
}

const CHAT: &str = "/v1/chat/completions";
const COMPL: &str = "/v1/completions";

fn cases() -> Vec<Case> {
    let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
    let with = |extra: &str| format!(r#"{{"model":"smollm2",{msg},{extra}}}"#);
    let mut invalid_utf8 = br#"{"model":"smollm2","messages":[{"role":"user","content":""#.to_vec();
    invalid_utf8.extend([0xff, 0xfe, 0xfd]);
    invalid_utf8.extend(br#""}]}"#);
    let long_prompt = format!(
        r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "word ".repeat(9000)
    );
    vec![
        case(
            "bad JSON",
            CHAT,
            r#"{"model":"smollm2","messages":["#,
            400,
            None,
        ),
        case("empty body", CHAT, "", 400, None),
        case("array body", CHAT, "[1,2]", 400, None),
        case(
            "missing model",
            CHAT,
            &format!("{{{msg}}}"),
            400,
            Some("model"),
        ),
        case(
            "model is a number",
            CHAT,
            &format!(r#"{{"model":7,{msg}}}"#),
            400,
            Some("model"),
        ),
        case(
            "unknown model",
            CHAT,
            &format!(r#"{{"model":"gpt-17",{msg}}}"#),
            404,
            Some("model"),
        ),
        case(
            "missing messages",
            CHAT,
            r#"{"model":"smollm2"}"#,
            400,
            Some("messages"),
        ),
        case(
            "empty messages",
            CHAT,
            r#"{"model":"smollm2","messages":[]}"#,
            400,
            Some("messages"),
        ),
        case(
            "bad role",
            CHAT,
            r#"{"model":"smollm2","messages":[{"role":"wizard","content":"hi"}]}"#,
            400,
            None,
        ),
        case(
            "content is a number",
            CHAT,
            r#"{"model":"smollm2","messages":[{"role":"user","content":5}]}"#,
            400,
            None,
        ),
        case(
            "negative max_tokens",
            CHAT,
            &with(r#""max_tokens":-1"#),
            400,
            Some("max_tokens"),
        ),
        case(
            "zero max_tokens",
            CHAT,
            &with(r#""max_tokens":0"#),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens a string",
            CHAT,
            &with(r#""max_tokens":"10""#),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens beyond the context",
            CHAT,
            &with(r#""max_tokens":100000"#),
            400,
            None,
        ),
        case(
            "temperature 5",
            CHAT,
            &with(r#""temperature":5"#),
            400,
            Some("temperature"),
        ),
        case("top_p 0", CHAT, &with(r#""top_p":0"#), 400, Some("top_p")),
        case(
            "presence_penalty 3",
            CHAT,
            &with(r#""presence_penalty":3"#),
            400,
            Some("presence_penalty"),
        ),
        case("n = 2", CHAT, &with(r#""n":2"#), 400, Some("n")),
        case(
            "stop with five strings",
            CHAT,
            &with(r#""stop":["a","b","c","d","e"]"#),
            400,
            Some("stop"),
        ),
        case(
            "stop an object",
            CHAT,
            &with(r#""stop":{"x":1}"#),
            400,
            Some("stop"),
        ),
        case(
            "unknown field",
            CHAT,
            &with(r#""frobnicate":true"#),
            400,
            Some("frobnicate"),
        ),
        case(
            "stream a string",
            CHAT,
            &with(r#""stream":"yes""#),
            400,
            Some("stream"),
        ),
        case(
            "seed a float",
            CHAT,
            &with(r#""seed":1.5"#),
            400,
            Some("seed"),
        ),
        case(
            "prompt longer than the context",
            CHAT,
            &long_prompt,
            400,
            None,
        ),
        case(
            "completions without prompt",
            COMPL,
            r#"{"model":"smollm2"}"#,
            400,
            Some("prompt"),
        ),
        case(
            "completions negative token id",
            COMPL,
            r#"{"model":"smollm2","prompt":[1,-2]}"#,
            400,
            Some("prompt"),
        ),
        case(
            "completions token id outside the vocabulary",
            COMPL,
            r#"{"model":"smollm2","prompt":[1,999999999]}"#,
            400,
            None,
        ),
        Case {
            name: "invalid UTF-8",
            body: invalid_utf8,
            path: CHAT,
            status: 400,
            param: None,
        },
    ]
}

fn too_large_with_curl(url: &str) -> Option<String> {
    let dir = std::env::temp_dir().join(format!("dynamo-huge-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("body.json");
    let mut huge = br#"{"model":"smollm2","messages":[{"role":"user","content":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 5 * 1024 * 1024));
    huge.extend(br#""}]}"#);
    std::fs::write(&file, huge).ok()?;
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!("{url}{CHAT}"))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string(),
        Err(e) => return Some(format!("5 MiB body: curl did not run: {e}")),
    };
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    if code.trim() == "413" && body.contains("\"error\"") {
        None
    } else {
        Some(format!("5 MiB body: got {code} {body}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_leak_nothing() {
    need_model();
    let g = Graph::up(&agg(), &["worker.engine=mocker", "worker.speedup=inf"]);
    let client = reqwest::Client::new();
    let cases = cases();
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for c in &cases {
        let resp = client
            .post(format!("{}{}", g.url, c.path))
            .header("content-type", "application/json")
            .body(c.body.clone())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: no answer: {e:?}", c.name));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.unwrap_or_default())
                .unwrap_or(serde_json::Value::Null);
        let err = &body["error"];
        let ok = status == c.status
            && err["message"].as_str().is_some_and(|m| !m.is_empty())
            && err["type"].is_string()
            && c.param
                .is_none_or(|p| err["param"].as_str().is_some_and(|q| q.starts_with(p)));
        if !ok {
            failures.push(format!("{}: got {status} {body}", c.name));
        }
    }
    // A 5 MiB body: the server answers 413 before reading it all and closes, which some
    // clients report as a broken pipe; curl reads the early answer, as a user would see it.
    failures.extend(too_large_with_curl(&g.url));
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len() + 1,
        failures.join("\n")
    );

    // Clients that leave mid-stream: the request is cancelled down to the engine.
    for _ in 0..5 {
        let resp = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(r#"{"model":"smollm2","messages":[{"role":"user","content":"tell me a long story"}],"max_tokens":4000,"stream":true,"ignore_eos":true}"#)
            .send()
            .await
            .expect("stream starts");
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let first = tokio::time::timeout(Duration::from_secs(10), body.next()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "no first chunk");
        drop(body);
    }
    // Still serving, and no engine holds a block any more.
    let ok = client
        .post(format!("{}{CHAT}", g.url))
        .header("content-type", "application/json")
        .body(r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#)
        .send()
        .await
        .expect("serves");
    assert_eq!(ok.status(), 200);
    assert_eq!(
        wait_no_active_blocks(&client, &g.url).await,
        Some(0),
        "KV blocks leaked"
    );
    let metrics = client
        .get(format!("{}/metrics", g.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(metrics.contains("status=\"400\""), "400s are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_gives_a_clean_error_and_comes_back() {
    need_model();
    // Real-time mocker: ~6 ms per token, so a 2,000-token answer streams for seconds.
    let mut g = Graph::up(&agg(), &["worker.engine=mocker", "worker.speedup=1.0"]);
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}{CHAT}", g.url))
        .header("content-type", "application/json")
        .body(r#"{"model":"smollm2","messages":[{"role":"user","content":"go on forever"}],"max_tokens":2000,"stream":true,"ignore_eos":true}"#)
        .send()
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), body.next()).await {
            Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("stream stopped early: {other:?}"),
        }
    }
    let pid = g
        .process_pid("worker-0")
        .expect("the worker process is running");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    // The stream ends promptly with an error event, never a hang.
    let killed_at = Instant::now();
    let mut tail = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), body.next()).await {
            Ok(Some(Ok(b))) => tail.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("the stream hung after the worker died; got so far: {tail}"),
        }
    }
    assert!(killed_at.elapsed() < Duration::from_secs(10));
    assert!(
        tail.contains("event: error"),
        "expected an SSE error event, got: {tail}"
    );
    assert!(
        !tail.contains("[DONE]"),
        "a failed stream must not end with [DONE]"
    );
    // The supervisor restarts the worker; a new request succeeds (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    loop {
        let r = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(
                r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
            )
            .send()
            .await;
        if let Ok(r) = r {
            let status = r.status();
            last = format!("{status} {}", r.text().await.unwrap_or_default());
            if status == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no request succeeded after the restart; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let new_pid = g.process_pid("worker-0").expect("the worker was restarted");
    assert_ne!(new_pid, pid);
    let log = g.drain_stderr().join("\n");
    assert!(
        log.contains("restarting worker-0"),
        "the controller reports the restart:\n{log}"
    );
}

/// Reads an SSE body to its end (bounded), returning everything it carried.
async fn read_to_end<B: AsRef<[u8]>>(
    mut body: impl futures::Stream<Item = reqwest::Result<B>> + Unpin,
    mut seen: String,
) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.next()).await {
            Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(b.as_ref())),
            Ok(Some(Err(e))) => panic!("stream broke: {e}; got so far: {seen}"),
            Ok(None) => return seen,
            Err(_) => panic!("stream hung; got so far: {seen}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_has_its_requests_migrated() {
    need_model();
    // Two real-time mocker workers in their own processes; round-robin puts one of two
    // concurrent answers on each.
    let text = std::fs::read_to_string(agg()).expect("graphs/agg.toml");
    assert!(text.contains("[nodes.worker]\n"));
    let two = text.replace("[nodes.worker]\n", "[nodes.worker]\nreplicas = 2\n");
    let file = std::env::temp_dir().join(format!("dynamo-agg2-{}.toml", std::process::id()));
    std::fs::write(&file, two).expect("graph file");
    let mut g = Graph::up(&file, &["worker.engine=mocker", "worker.speedup=1.0"]);
    let client = reqwest::Client::new();
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"go on"}],"max_tokens":300,"stream":true,"ignore_eos":true,"stream_options":{"include_usage":true}}"#;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let resp = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("stream starts");
        assert_eq!(resp.status(), 200);
        streams.push(resp.bytes_stream());
    }
    let mut seen = vec![String::new(), String::new()];
    for (stream, seen) in streams.iter_mut().zip(seen.iter_mut()) {
        while seen.matches("data: ").count() < 3 {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("stream stopped early: {other:?}"),
            }
        }
    }
    let pid = g.process_pid("worker-0").expect("worker-0 runs");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Both answers complete: the one on worker-0 moves to worker-1 and goes on.
    for (stream, seen) in streams.into_iter().zip(seen) {
        let all = read_to_end(stream, seen).await;
        assert!(
            !all.contains("event: error"),
            "an error reached the client: {all}"
        );
        assert!(all.contains("data: [DONE]"), "no [DONE]: {all}");
        assert!(
            all.contains(r#""finish_reason":"length""#),
            "the answer did not run to max_tokens: {all}"
        );
        assert!(
            all.contains(r#""completion_tokens":300"#),
            "the whole token budget was streamed once, not more or less: {all}"
        );
    }
    let log = g.drain_stderr().join("\n");
    assert!(
        log.contains("migrating the request"),
        "the router reports the migration:\n{log}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn ctrl_c_stops_every_process() {
    need_model();
    let mut g = Graph::up(&agg(), &["worker.engine=mocker", "worker.speedup=inf"]);
    let worker = g.process_pid("worker-0").expect("worker runs");
    assert!(
        g.stop(Duration::from_secs(15)),
        "graph up did not exit after SIGINT"
    );
    let alive = std::path::Path::new(&format!("/proc/{worker}")).exists()
        && std::fs::read_to_string(format!("/proc/{worker}/stat"))
            .is_ok_and(|s| !s.contains(") Z "));
    assert!(!alive, "the worker process outlived graph up");
}

#[test]
fn ctrl_c_while_starting_stops_what_was_started() {
    need_model();
    let mut up = Command::new(dynamo_tests::dynamo_bin())
        .args(["graph", "up", "--offline", "--admin", "off"])
        .arg(agg())
        .args(["--set", "frontend.port=0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("graph up starts");
    // SIGINT as soon as the first process exists, before the graph serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    let started = loop {
        let children = dynamo_tests::children_of(up.id());
        if !children.is_empty() {
            break children;
        }
        assert!(Instant::now() < deadline, "graph up started no process");
        std::thread::sleep(Duration::from_millis(5));
    };
    let pid = nix::unistd::Pid::from_raw(up.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(status)) = up.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "graph up ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = up.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    // Interrupted while starting (130), or it had just finished starting and stopped the
    // graph in order (0): either way nothing it started may outlive it.
    assert!(
        matches!(status.code(), Some(130) | Some(0)),
        "{status:?}: {stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    for child in started {
        while std::path::Path::new(&format!("/proc/{child}")).exists()
            && std::fs::read_to_string(format!("/proc/{child}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(
                Instant::now() < deadline,
                "process {child} outlived graph up: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mocker_reports_the_log_probabilities_of_its_uniform_draw() {
    need_model();
    let g = Graph::up(&agg(), &["worker.engine=mocker", "worker.speedup=inf"]);
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}{CHAT}", g.url))
        .header("content-type", "application/json")
        .body(r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"ignore_eos":true,"logprobs":true,"top_logprobs":2}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value =
        serde_json::from_str(&r.text().await.unwrap_or_default()).expect("json");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(content.len(), 5, "{v}");
    let first = content[0]["logprob"].as_f64().unwrap_or(0.0);
    // SmolLM2's 49,152 ids less its special ones, drawn uniformly (ignore_eos).
    assert!(first < -10.0 && first > -11.0, "{first}");
    for t in &content {
        assert_eq!(t["logprob"].as_f64(), Some(first), "{t}");
        assert_eq!(t["top_logprobs"].as_array().map(Vec::len), Some(2), "{t}");
    }
}
