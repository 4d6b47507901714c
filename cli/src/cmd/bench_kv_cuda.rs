//! `dynamo bench kv-transfer`'s CUDA IPC figures, on a machine with a GPU: a pool on GPU 0
//! is exported as a prefill worker's is; a second process (this binary, `dynamo bench
//! kv-transfer-cuda-peer`, as the decode worker) opens it by its IPC handle and, alternated
//! in one run, copies the hand-off's blocks out of it and out of a pool of its own (the
//! plain device-to-device copy the goal is measured against), with the blocks neighbours
//! in both pools and scattered over them. Each copy is timed until its stream is done.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::Context;
use dynamo_runtime::kv_transfer::{cuda, CudaPeers, CudaPool, Gpu};

/// Bytes per second of each copy (medians).
pub struct CudaFigures {
    pub d2d: f64,
    pub ipc: f64,
    pub d2d_scattered: f64,
    pub ipc_scattered: f64,
}

/// The figures, or why there are none (no GPU on this machine).
pub fn figures(
    blocks: usize,
    pool_blocks: usize,
    block_bytes: usize,
    reps: usize,
) -> anyhow::Result<Result<CudaFigures, String>> {
    match cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return Ok(Err("the CUDA driver sees no GPU".into())),
        Err(e) => return Ok(Err(e.to_string())),
    }
    let gpu = Gpu::open(0)?;
    let pool = CudaPool::alloc(&gpu, pool_blocks * block_bytes)?;
    let pattern: Vec<u8> = (0..pool.len()).map(|i| (i % 251) as u8).collect();
    pool.write(0, &pattern)?;
    let export = pool.export()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench", "kv-transfer-cuda-peer", "--export", export.name()])
        .args(["--blocks", &blocks.to_string()])
        .args(["--block-bytes", &block_bytes.to_string()])
        .args(["--reps", &reps.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the peer process")?;
    let out = child.stdout.take().context("the peer's output")?;
    let line = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("figures "));
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "the peer process failed: {status}");
    let line = line.context("the peer printed no figures")?;
    let v: Vec<f64> = line["figures ".len()..]
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("the peer's figures")?;
    let [d2d, ipc, d2d_scattered, ipc_scattered] = v[..] else {
        anyhow::bail!("the peer printed {} figures, not 4", v.len());
    };
    Ok(Ok(CudaFigures {
        d2d,
        ipc,
        d2d_scattered,
        ipc_scattered,
    }))
}

#[derive(clap::Args)]
pub struct PeerArgs {
    /// The export name of the pool to open.
    #[arg(long)]
    export: String,
    #[arg(long)]
    blocks: usize,
    #[arg(long)]
    block_bytes: usize,
    #[arg(long)]
    reps: usize,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The decode side: prints `figures D2D IPC D2D_SCATTERED IPC_SCATTERED` (bytes/s).
pub fn peer(args: PeerArgs) -> anyhow::Result<ExitCode> {
    let gpu = Gpu::open(0)?;
    let peers = CudaPeers::new(gpu.clone());
    let peer = peers.get(&args.export)?;
    let bs = args.block_bytes.max(1);
    let pool_blocks = peer.len() / bs;
    anyhow::ensure!(args.blocks <= pool_blocks, "more blocks than the pool has");
    let own = CudaPool::alloc(&gpu, peer.len())?;
    let local = CudaPool::alloc(&gpu, peer.len())?;
    let n = args.blocks as u32;
    let contiguous: Vec<(u32, u32)> = (0..n).map(|i| (i, i)).collect();
    // Spread over the pools, as in busy ones (the host figures' ids).
    let spread = |i: u32| ((i as usize * 37) % pool_blocks) as u32;
    let scattered: Vec<(u32, u32)> = (0..n).map(|i| (spread(i), spread(n - 1 - i))).collect();
    // The bytes arrive: the owner wrote byte i as i % 251.
    own.copy_from_peer(&peer, &scattered, bs)?;
    let mut got = vec![0u8; bs];
    let (from, to) = scattered[scattered.len() / 2];
    own.read(to as usize * bs, &mut got)?;
    let at = from as usize * bs;
    anyhow::ensure!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == ((at + i) % 251) as u8),
        "a block copied by CUDA IPC differs from the owner's"
    );
    let bytes = (args.blocks * bs) as f64;
    let mut times: [Vec<f64>; 4] = Default::default();
    for rep in 0..=args.reps.max(1) {
        let timed = |f: &dyn Fn() -> anyhow::Result<usize>| -> anyhow::Result<f64> {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        };
        let got = [
            timed(&|| Ok(own.copy_from_pool(&local, &contiguous, bs)?))?,
            timed(&|| Ok(own.copy_from_peer(&peer, &contiguous, bs)?))?,
            timed(&|| Ok(own.copy_from_pool(&local, &scattered, bs)?))?,
            timed(&|| Ok(own.copy_from_peer(&peer, &scattered, bs)?))?,
        ];
        // The first round warms up.
        if rep > 0 {
            for (all, t) in times.iter_mut().zip(got) {
                all.push(t);
            }
        }
    }
    let [a, b, c, d] = times.map(|t| bytes / median(t));
    println!("figures {a} {b} {c} {d}");
    Ok(ExitCode::SUCCESS)
}
