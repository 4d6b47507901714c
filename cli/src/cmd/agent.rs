//! `dynamo agent`: registers this machine (its GPUs counted or declared) and runs the
//! processes graphs place on it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dynamo_graph::Plan;
use dynamo_host::agent::{self, AgentOptions};
use dynamo_host::cluster::AgentInfo;
use dynamo_host::gpus::{GpuCount, Gpus};
use dynamo_runtime::supervisor::OutputStream;
use tokio_util::sync::CancellationToken;

use crate::cmd::cluster::{client, runtime};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// This machine's name, as the graph files' `[cluster.machines.NAME]` say.
    #[arg(long)]
    machine: String,
    /// The etcd the graphs are written to, `http://HOST:PORT`.
    #[arg(long, value_name = "URL")]
    etcd: String,
    /// The address other machines reach this one at.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// GPUs this machine offers: a number, or `auto` to count them through NVML (else
    /// the NVIDIA driver's /proc entries, else none).
    #[arg(long, value_name = "N|auto", default_value = "auto")]
    gpus: GpuCount,
    /// A label of this machine, `key=value` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Seconds the machine (and its processes' states) outlive a silent agent.
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// Seconds in-flight requests get when a graph is taken down.
    #[arg(long, default_value_t = 30)]
    grace: u64,
    /// Never download a missing model; fail the graph's processes here instead.
    #[arg(long)]
    offline: bool,
}

pub fn run(args: AgentArgs, dyn_log: Option<String>) -> anyhow::Result<ExitCode> {
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l}: expected key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let gpus = Gpus::resolve(args.gpus);
    eprintln!("machine `{}`: {}", args.machine, gpus.describe());
    let info = AgentInfo {
        machine: args.machine.clone(),
        address: args.address.clone(),
        gpus: gpus.count,
        gpu_source: Some(gpus.source),
        gpu_devices: gpus.devices,
        labels,
        pid: std::process::id(),
    };
    let offline = args.offline;
    let opts = AgentOptions {
        info,
        ttl: Duration::from_secs(args.ttl.max(1)),
        exe: std::env::current_exe().context("finding the dynamo binary")?,
        run_base: std::env::temp_dir(),
        ready_timeout: Duration::from_secs(120),
        env: dyn_log
            .map(|v| vec![("DYN_LOG".to_string(), v)])
            .unwrap_or_default(),
        grace: Duration::from_secs(args.grace),
        prepare: Arc::new(move |plan: &mut Plan| {
            crate::cmd::model::resolve_plan(plan, offline).map_err(|e| format!("{e:#}"))
        }),
    };
    let etcd = client(&args.etcd)?;
    let machine = args.machine;
    runtime()?.block_on(async move {
        let shutdown = CancellationToken::new();
        let log = {
            let machine = machine.clone();
            Arc::new(move |process: &str, _s: OutputStream, line: &str| {
                eprintln!("{machine}/{process} | {line}");
            })
        };
        eprintln!("agent for machine `{machine}` following {}", etcd.endpoint());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            stop.cancel();
        });
        agent::run(etcd, opts, log, shutdown)
            .await
            .context("encoding the machine's record")?;
        eprintln!("agent for `{machine}` stopped");
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
        let base = [
            "agent",
            "--machine",
            "m1",
            "--etcd",
            "http://127.0.0.1:2379",
        ];
        Cmd::try_parse_from(base.iter().chain(extra)).map(|c| c.agent)
    }

    #[test]
    fn gpus_are_auto_unless_a_number_is_given() {
        let args = |extra: &[&str]| parse(extra).map(|a| a.gpus).map_err(|e| e.to_string());
        assert_eq!(args(&[]), Ok(GpuCount::Auto));
        assert_eq!(args(&["--gpus", "auto"]), Ok(GpuCount::Auto));
        assert_eq!(args(&["--gpus", "4"]), Ok(GpuCount::Declared(4)));
        assert_eq!(args(&["--gpus=0"]), Ok(GpuCount::Declared(0)));
    }

    #[test]
    fn a_bad_gpu_count_is_a_clap_error_naming_the_flag() {
        for bad in ["four", "-2", "1.5"] {
            let flag = format!("--gpus={bad}");
            let err = parse(&[&flag]).err().expect(bad);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("invalid value '{bad}' for '--gpus <N|auto>'"))
                    && text.contains("is neither `auto` nor a number of GPUs"),
                "{text}"
            );
        }
    }
}
