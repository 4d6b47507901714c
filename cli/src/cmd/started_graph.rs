//! A graph started by a benchmark (`bench serve --graph`, `bench replay --graph`): its
//! URL, its ready time, and the pids of its processes that run no engine.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

pub struct Started {
    child: Child,
    pub url: String,
    pub ready_ms: u64,
    pub run_dir: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // exited already (it failed to start)
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(graph: &Path, sets: &[String]) -> anyhow::Result<Started> {
    let exe = std::env::current_exe().context("finding the dynamo binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["graph", "up", "--offline"])
        .arg(graph)
        .args(["--set", "frontend.port=0"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the graph")?;
    // Held from here on, so that an error below stops the graph too.
    let mut started = Started {
        child,
        url: String::new(),
        ready_ms: 0,
        run_dir: PathBuf::new(),
    };
    let (tx, rx) = mpsc::channel();
    if let Some(out) = started.child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let (mut url, mut ready_ms, mut run_dir) = (None, 0, None);
    while url.is_none() || run_dir.is_none() {
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("the graph did not start within 120 s")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = started.child.wait().ok();
                anyhow::bail!(
                    "the graph exited before serving ({}; its errors are above)",
                    status.map_or("status unknown".to_string(), |s| s.to_string())
                )
            }
        };
        if let Some(ms) = line
            .split("ready in ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
        {
            ready_ms = ms;
        }
        if let Some(i) = line.find("OpenAI API ") {
            url = line[i + 11..]
                .split_whitespace()
                .next()
                .map(|u| u.trim_end_matches("/v1").to_string());
        }
        if let Some(dir) = line.trim().strip_prefix("run directory: ") {
            run_dir = Some(PathBuf::from(dir));
        }
    }
    started.url = url.unwrap_or_default();
    started.ready_ms = ready_ms;
    started.run_dir = run_dir.unwrap_or_default();
    Ok(started)
}

/// Pids of the graph's processes (engines' too with `engines`), by their command lines.
pub fn graph_pids(run_dir: &Path, engines: bool) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(run_dir.join("plan.json"))
        .with_context(|| format!("reading {}/plan.json", run_dir.display()))?;
    let plan: dynamo_graph::Plan = serde_json::from_str(&text)?;
    let wanted: Vec<&str> = plan
        .processes
        .iter()
        .filter(|p| engines || !dynamo_host::controller::is_engine_process(&plan, &p.name))
        .map(|p| p.name.as_str())
        .collect();
    let dir = run_dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let has = |flag: &str, value: &str| args.windows(2).any(|w| w[0] == flag && w[1] == value);
        if has("--run-dir", &dir) && wanted.iter().any(|p| has("--process", p)) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
