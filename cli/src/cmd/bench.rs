//! `dynamo bench …`: benchmarks whose figures go in the README.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Validate and place a generated graph (default: 10,000 nodes, 20,000 edges, 1,000 machines).
    Graph(crate::cmd::bench_graph::Args),
    /// Load an OpenAI-compatible server: a running one (`--url`), or a graph this command
    /// starts itself (`--graph`), measuring the CPU of its non-engine processes.
    Serve(Box<crate::cmd::bench_serve::Args>),
    /// Replay a Mooncake trace (`../shared/data/mooncake_*.jsonl`) on the trace's schedule,
    /// scaled; report TTFT/ITL/E2E, throughput, errors and the KV hit rate.
    Replay(Box<crate::cmd::replay::Args>),
    /// The native engine on a GGUF model: prefill, decode, batched decode, cached TTFT and
    /// KV hand-off; with `--llamacpp`, llama.cpp on the same file in the same run.
    Engine(crate::cmd::bench_engine::Args),
    /// The KV data plane: shared-memory hand-off against memcpy, TCP block streaming
    /// against raw loopback TCP, on the KV of a 1,000-token SmolLM2 sequence.
    KvTransfer(crate::cmd::bench_kv::Args),
    /// The decode side of `kv-transfer`'s CUDA IPC figures, started by it.
    #[command(hide = true)]
    KvTransferCudaPeer(crate::cmd::bench_kv_cuda::PeerArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Graph(a) => crate::cmd::bench_graph::run(a),
        BenchCommand::Serve(a) => crate::cmd::bench_serve::run(*a),
        BenchCommand::Replay(a) => crate::cmd::replay::run(*a),
        BenchCommand::Engine(a) => crate::cmd::bench_engine::run(a),
        BenchCommand::KvTransfer(a) => crate::cmd::bench_kv::run(a),
        BenchCommand::KvTransferCudaPeer(a) => crate::cmd::bench_kv_cuda::peer(a),
    }
}
