//! Support for end-to-end tests: they start the real `dynamo` binary and talk to it as a
//! user would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The `dynamo` binary under test: `$DYNAMO_BIN`, or the workspace's debug build.
///
/// The README's test command (`scripts/test.sh`) builds it before running the tests.
pub fn dynamo_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DYNAMO_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let bin = target.join("debug").join("dynamo");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build --bin dynamo` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A graph served by `dynamo graph up`, stopped (SIGINT, then SIGKILL) when dropped.
pub struct Graph {
    child: Child,
    /// `http://127.0.0.1:PORT` of the first frontend.
    pub url: String,
    /// `127.0.0.1:PORT` of the admin server (graph page, `/api/stats`), when it serves one.
    pub admin: Option<String>,
    /// Every line the controller printed on stderr so far is collected here.
    stderr: mpsc::Receiver<String>,
    pub stderr_lines: Vec<String>,
}

impl Graph {
    /// Start `file` with the frontend on a free port, plus `sets` (`node.key=value`), and
    /// wait (bounded) until it serves.
    pub fn up(file: &Path, sets: &[&str]) -> Graph {
        Graph::up_with(file, sets, &[])
    }

    /// [`Graph::up`] with more `graph up` arguments, e.g. `["--nats", URL]`. The admin
    /// server gets a free port unless `args` say `--admin` or the file has `[admin]`.
    pub fn up_with(file: &Path, sets: &[&str], args: &[&str]) -> Graph {
        let mut cmd = Command::new(dynamo_bin());
        cmd.args(["graph", "up", "--offline", "--grace", "5"])
            .arg(file)
            .args(["--set", "frontend.port=0"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let file_says = std::fs::read_to_string(file).is_ok_and(|t| t.contains("\n[admin]"));
        if !args.contains(&"--admin") && !file_says {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        cmd.args(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dynamo graph up starts");
        let (url_tx, url_rx) = mpsc::channel();
        let (admin_tx, admin_rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(i) = line.find("graph page: http://") {
                        let addr = line[i + "graph page: http://".len()..]
                            .split(['/', ' '])
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let _ = admin_tx.send(addr);
                    }
                    if let Some(i) = line.find("OpenAI API http://") {
                        let url = line[i + "OpenAI API ".len()..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .trim_end_matches("/v1")
                            .to_string();
                        let _ = url_tx.send(url);
                    }
                }
            });
        }
        let (err_tx, err_rx) = mpsc::channel();
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = err_tx.send(line);
                }
            });
        }
        let url = match url_rx.recv_timeout(Duration::from_secs(90)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                let log: Vec<String> = err_rx.try_iter().collect();
                panic!(
                    "graph {} did not start within 90 s:\n{}",
                    file.display(),
                    log.join("\n")
                );
            }
        };
        // The admin line follows the frontends' (it is absent with `--admin off`).
        let admin = if args.windows(2).any(|w| w == ["--admin", "off"]) {
            None
        } else {
            admin_rx.recv_timeout(Duration::from_secs(10)).ok()
        };
        Graph {
            child,
            url,
            admin,
            stderr: err_rx,
            stderr_lines: Vec::new(),
        }
    }

    /// Pick up what the controller printed since the last call.
    pub fn drain_stderr(&mut self) -> &[String] {
        self.stderr_lines.extend(self.stderr.try_iter());
        &self.stderr_lines
    }

    /// Waits (at most `within`) until the controller has printed a line containing
    /// `needle`; whether it did. What it printed meanwhile stays for `drain_stderr`.
    pub fn wait_stderr(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.drain_stderr().iter().any(|l| l.contains(needle)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(line) = self.stderr.recv_timeout(left) {
                self.stderr_lines.push(line);
            }
        }
    }

    /// The pid of the planned process `name` (e.g. `worker-0`) of this graph, found by
    /// its command line (`dynamo node run … --process NAME …`).
    pub fn process_pid(&self, name: &str) -> Option<i32> {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let is_ours = args
                .windows(2)
                .any(|w| w[0] == b"--process" && w[1] == name.as_bytes())
                && args.windows(2).any(|w| {
                    w[0] == b"--run-dir"
                        && String::from_utf8_lossy(w[1]).ends_with(&format!("-{}", self.child.id()))
                });
            if is_ours {
                return Some(pid);
            }
        }
        None
    }

    pub fn controller_pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stop with SIGINT like a user's Ctrl-C; true when it exited by itself in time.
    pub fn stop(&mut self, within: Duration) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// `graphs/disagg.toml` with `transport = "tcp"` asked for on its KV edge (as between
/// machines, here on one), written to a temporary file named after `tag`; the caller
/// removes it.
pub fn disagg_over_tcp(tag: &str) -> PathBuf {
    let text = std::fs::read_to_string(workspace().join("graphs/disagg.toml")).expect("graph");
    let edge = "from = \"prefill.kv\"\nto = \"decode.kv\"\n";
    assert!(
        text.contains(edge),
        "graphs/disagg.toml changed its KV edge"
    );
    let text = text.replace(edge, &format!("{edge}transport = \"tcp\"\n"));
    let file = std::env::temp_dir().join(format!("dynamo-{tag}-tcp-{}.toml", std::process::id()));
    std::fs::write(&file, text).expect("write graph");
    file
}

/// The text of `GET {url}/metrics` (a frontend's, or any process's).
pub async fn metrics_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

/// `POST {url}/v1/chat/completions` with the JSON `body`; panics only if no answer comes.
pub async fn post_chat(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the frontend answers")
}

/// Sum of the Prometheus samples of `family` (in the text `metrics`) whose labels contain
/// every one of `with`.
pub fn metric_sum(metrics: &str, family: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The Python interpreter with the `openai` package: `$DYNAMO_PYTHON`, or the venv that
/// `scripts/setup-tests.sh` makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DYNAMO_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} does not exist: run scripts/setup-tests.sh (scripts/test.sh does)",
        venv.display()
    );
    venv
}

/// Whether the SmolLM2 model is in the cache (`dynamo model fetch` puts it there).
pub fn model_cached() -> bool {
    Command::new(dynamo_bin())
        .args(["model", "path"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).exists())
        .unwrap_or(false)
}

/// A binary a test needs from the system (e.g. `nats-server`), on `PATH` or in the usual
/// system folders; the test fails, saying how to install it, when it is missing.
pub fn system_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
            .into_iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed, and this test needs a real one: \
         run scripts/setup-tests.sh (it installs the Debian package)"
    );
}

/// A free TCP port on 127.0.0.1 (free when asked; a test binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A real `nats-server` on free loopback ports (client and HTTP monitoring), killed when
/// dropped. [`NatsServer::stop`] and [`NatsServer::start_again`] simulate an outage: it
/// comes back on the same ports.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub monitor_port: u16,
}

impl NatsServer {
    /// Start one and wait (bounded) until it accepts connections.
    pub fn start() -> NatsServer {
        let mut nats = NatsServer {
            child: None,
            port: free_port(),
            monitor_port: free_port(),
        };
        nats.start_again();
        nats
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` of its monitoring endpoints (`/varz`, `/connz`).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Start it (again, on the same ports) unless it runs.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let child = Command::new(system_binary("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [self.port, self.monitor_port] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "nats-server did not listen on 127.0.0.1:{port} within 10 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kill it (SIGKILL: an outage, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real `etcd` (Debian `etcd-server`) on free loopback ports with its own data
/// directory; killed and its data removed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

impl EtcdServer {
    /// Start one and wait (bounded) until it accepts connections.
    pub fn start() -> EtcdServer {
        let client_port = free_port();
        let peer_port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "dynamo-test-etcd-{}-{client_port}",
            std::process::id()
        ));
        let mut etcd = EtcdServer {
            child: None,
            client_port,
            peer_port,
            dir,
        };
        etcd.start_again();
        etcd
    }

    /// Kill it (SIGKILL: an outage); its data stays for [`EtcdServer::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it (again, on the same ports and data) unless it runs.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let (client_port, peer_port, dir) = (self.client_port, self.peer_port, &self.dir);
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new(system_binary("etcd"))
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not listen on {} within 15 s (peer port {})",
                self.url(),
                self.peer_port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `dynamo agent` for one machine; stopped with SIGTERM (it then stops the processes
/// it started), killed if it does not exit, when dropped.
pub struct Agent {
    child: Option<Child>,
    pub machine: String,
    /// Where its stderr (its processes' log lines) goes.
    log: PathBuf,
}

impl Agent {
    pub fn start(machine: &str, address: &str, etcd: &str) -> Agent {
        let log = std::env::temp_dir().join(format!(
            "dynamo-test-agent-{}-{machine}-{}.log",
            std::process::id(),
            free_port()
        ));
        let stderr = std::fs::File::create(&log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let child = Command::new(dynamo_bin())
            .args(["agent", "--offline", "--grace", "2", "--ttl", "3"])
            .args(["--machine", machine, "--address", address, "--etcd", etcd])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("dynamo agent starts");
        Agent {
            child: Some(child),
            machine: machine.to_string(),
            log,
        }
    }

    /// Everything it (and the processes it started) logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The machine dies: SIGKILL to the agent and to every process it started.
    pub fn kill_machine(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let agent = child.id();
        let children = children_of(agent);
        let _ = child.kill();
        let _ = child.wait();
        for pid in children {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// SIGTERM, then a bounded wait, then SIGKILL. Whether it exited on its own.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The live (not zombie) processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid …
        let mut rest = stat
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace();
        let state = rest.next();
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` runs `dynamo node run … --process NAME`.
pub fn runs_process(pid: u32, name: &str) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"--process" && w[1] == name.as_bytes())
}
