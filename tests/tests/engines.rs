//! An engine no one here wrote as a worker: llama.cpp's OpenAI-compatible server
//! (llama-cpp-python 0.3.36, CPU) serving SmolLM2 behind our frontend, preprocessor and
//! router, asked through the official `openai` client, streamed and not. Once launched and
//! supervised by the worker (`graphs/llamacpp_server.toml`), once connected to by URL
//! (a server this test starts itself). Killed, the launched engine is started again by
//! the supervisor and the graph answers again.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynamo_tests::{free_port, model_cached, python, workspace, Graph};

fn model() -> String {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let out = Command::new(dynamo_tests::dynamo_bin())
        .args(["model", "path"])
        .output()
        .expect("dynamo model path");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn need_llama_cpp_server() {
    let ok = Command::new(python())
        .args(["-c", "import llama_cpp.server.app"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "llama-cpp-python[server] is not in the venv: run scripts/setup-tests.sh"
    );
}

/// Runs tests/python/engine_answers.py against `g`; returns its `ANSWER:` line.
fn ask(g: &Graph) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/python/engine_answers.py"))
        .arg(&g.url)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("4 passed, 0 failed"),
        "openai client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ANSWER: "))
        .unwrap_or_default()
        .to_string()
}

fn graph_file() -> std::path::PathBuf {
    workspace().join("graphs/llamacpp_server.toml")
}

#[test]
fn llamacpp_server_launched_by_the_worker_answers_through_our_graph() {
    model();
    need_llama_cpp_server();
    let command = format!("worker.command={}", python().display());
    let g = Graph::up(&graph_file(), &[&command]);
    let answer = ask(&g);
    assert!(answer.contains("Paris"), "{answer}");

    // The engine dies: the supervisor starts it again and the graph answers again.
    let worker = g.process_pid("worker-0").expect("the worker process");
    let engine = engine_child(worker).expect("the engine is a child of the worker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engine),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the engine");
    let deadline = Instant::now() + Duration::from_secs(120);
    let restarted = loop {
        match engine_child(worker) {
            Some(pid) if pid != engine && answers(&g.url) => break pid,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the engine was not restarted, or the graph never answered again"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_ne!(restarted, engine);
    let answer = ask(&g);
    assert!(answer.contains("Paris"), "after the restart: {answer}");
}

/// The llama_cpp.server process whose parent is `parent`.
fn engine_child(parent: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let ppid: i32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        (ppid == parent && String::from_utf8_lossy(&cmd).contains("llama_cpp.server"))
            .then_some(pid)
    })
}

/// Whether one chat request through the graph succeeds.
fn answers(url: &str) -> bool {
    Command::new("curl")
        .args([
            "-sf",
            "-o",
            "/dev/null",
            "-H",
            "content-type: application/json",
        ])
        .arg("-d")
        .arg(r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#)
        .arg(format!("{url}/v1/chat/completions"))
        .status()
        .is_ok_and(|s| s.success())
}

/// A server the test started itself, killed when the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(model: &Path, port: u16) -> Server {
    let child = Command::new(python())
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // As the worker launches it: a new request must not cut off one in progress.
        .args(["--interrupt_requests", "False"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama_cpp.server starts");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "llama_cpp.server never listened");
        std::thread::sleep(Duration::from_millis(200));
    }
    server
}

#[test]
fn a_running_llamacpp_server_is_connected_to_by_url() {
    let model = model();
    need_llama_cpp_server();
    let port = free_port();
    let _server = start_server(Path::new(&model), port);
    let url = format!("worker.url=\"http://127.0.0.1:{port}\"");
    let g = Graph::up(&graph_file(), &[&url]);
    let answer = ask(&g);
    assert!(answer.contains("Paris"), "{answer}");
}
