//! `dynamo bench kv-transfer`: the KV data plane against the hardware's own figures,
//! measured side by side in one run: a plain memcpy of the hand-off's bytes against the
//! shared-memory hand-off (map the peer's pool once, copy the listed blocks into the own
//! pool), and raw loopback TCP throughput against the TCP block stream and against the
//! path `graph up` takes for a `tcp` link: `KvTransfer` chunks of 8 blocks as bulk calls
//! over TCP (`dynamo_runtime::transport::bulk`) with the prefill worker's window of 4 in
//! flight, each chunk imported into the decode side's pool; its bytes written from the
//! prefill pool in place (a pool in shared memory: the native and llama.cpp engines) or
//! exported from it first (the mocker); and the same chunks as socket-transport
//! messages, the path before bulk calls.
//!
//! The payload is the KV of a SmolLM2-135M sequence (30 layers, 3 KV heads, head dim 64,
//! f16, 16-token blocks): 1,000 tokens are 63 blocks, 23.2 MB.

use std::process::ExitCode;
use std::time::Instant;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use dynamo_host::kv_tcp::KV_BULK;
use dynamo_mocker::{send_kv_chunks, KV_CHUNK_BLOCKS, KV_WINDOW};
use dynamo_protocol::{KvLayout, KvTransfer, KvTransferAck};
use dynamo_runtime::kv_transfer::copy::{copy_blocks, copy_blocks_with, MAX_THREADS};
use dynamo_runtime::kv_transfer::tcp::{acknowledge, read_block, read_header, send_blocks};
use dynamo_runtime::kv_transfer::{ShmPeers, ShmSegment};
use dynamo_runtime::transport::bulk::{BulkClient, BulkClientConfig, BulkServer};
use dynamo_runtime::transport::socket_client::{Resolve, SocketClient, SocketClientConfig};
use dynamo_runtime::transport::socket_server::SocketServer;
use dynamo_runtime::{InstanceSet, RequestContext, ResponseStream, ServeError, Service};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// Tokens of the sequence handed off.
    #[arg(long, default_value_t = 1000)]
    tokens: usize,
    /// Repetitions per figure; medians are reported.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

/// SmolLM2-135M's KV per token: 2 (k, v) × 30 layers × 3 heads × 64 dims × 2 bytes.
const TOKEN_BYTES: usize = 2 * 30 * 3 * 64 * 2;
const BLOCK_TOKENS: usize = 16;
const BLOCK_BYTES: usize = TOKEN_BYTES * BLOCK_TOKENS;
/// Blocks in each pool: the hand-off's blocks are scattered over it, as in a busy pool.
const POOL_BLOCKS: usize = 256;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The hand-off's block ids: spread over the pool, not contiguous.
fn block_ids(blocks: usize) -> Vec<u32> {
    (0..blocks)
        .map(|i| ((i * 37) % POOL_BLOCKS) as u32)
        .collect()
}

/// Bytes per second of a memcpy of the hand-off's bytes, of the shared-memory hand-off's
/// copy out of the peer's mapped pool into the own pool as a decode worker does it
/// ([`copy_blocks`]: several cores for a large hand-off), and of the same copy on one
/// thread, alternated.
fn shm_figures(blocks: usize, reps: usize) -> anyhow::Result<(f64, f64, f64)> {
    let bytes = blocks * BLOCK_BYTES;
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0x11u8; bytes];
    let mut pool = ShmSegment::create("bench-kv", POOL_BLOCKS * BLOCK_BYTES)?;
    for (i, b) in pool.as_mut_slice().iter_mut().enumerate() {
        *b = i as u8;
    }
    let export = pool.export()?;
    let peers = ShmPeers::new();
    let mut own = vec![0x22u8; POOL_BLOCKS * BLOCK_BYTES];
    let ids = block_ids(blocks);
    let dest = block_ids(blocks).into_iter().rev().collect::<Vec<_>>();
    // What the decode worker does per hand-off: find the (once-mapped) pool, copy the
    // listed blocks into its own pool's blocks.
    let mut handoff = |threads: usize| -> anyhow::Result<()> {
        let peer = peers.get(export.name())?;
        let src = (ids.iter())
            .map(|&id| peer.block(id, BLOCK_BYTES))
            .collect::<Result<Vec<_>, _>>()?;
        copy_blocks_with(&mut own, BLOCK_BYTES, &dest, &src, threads)?;
        std::hint::black_box(&own);
        Ok(())
    };
    let (mut tm, mut ts, mut t1) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=reps.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        tm.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        handoff(MAX_THREADS)?;
        ts.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        handoff(1)?;
        t1.push(t.elapsed().as_secs_f64());
        if rep == 0 {
            // The warm-up.
            tm.clear();
            ts.clear();
            t1.clear();
        }
    }
    let rate = |times: Vec<f64>| bytes as f64 / median(times);
    Ok((rate(tm), rate(ts), rate(t1)))
}

/// A raw loopback connection: the server reads `bytes` (1 MiB reads, discarded) and
/// answers one byte.
async fn raw_pair(bytes: usize) -> anyhow::Result<tokio::net::TcpStream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let mut left = bytes;
            while left > 0 {
                let n = s.read(&mut buf[..left.min(1 << 20)]).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                left -= n;
            }
            s.write_all(&[1]).await?;
        }
    });
    let c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// A block-stream connection: the server reads each hand-off's blocks straight into its
/// own pool's blocks, as a decode worker does.
async fn stream_pair(blocks: usize) -> anyhow::Result<tokio::net::TcpStream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut own = vec![0u8; POOL_BLOCKS * BLOCK_BYTES];
        let dest: Vec<u32> = block_ids(blocks).into_iter().rev().collect();
        while let Ok(header) = read_header(&mut s).await {
            for i in 0..header.blocks {
                let at = dest[i as usize % dest.len()] as usize * BLOCK_BYTES;
                read_block(&mut s, &header, i, &mut own[at..at + BLOCK_BYTES]).await?;
            }
            acknowledge(&mut s, &header).await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// The decode side of the graph path: copies each chunk's blocks into its own pool, as a
/// decode worker's engine does with an imported chunk ([`copy_blocks`]).
struct PoolImport {
    pool: Arc<Mutex<Vec<u8>>>,
    dest: Arc<Vec<u32>>,
}

impl Service<KvTransfer, KvTransferAck> for PoolImport {
    fn call(&self, req: KvTransfer, _ctx: RequestContext) -> ResponseStream<KvTransferAck> {
        let (pool, dest) = (self.pool.clone(), self.dest.clone());
        Box::pin(futures::stream::once(async move {
            let mut pool = pool
                .lock()
                .map_err(|_| ServeError::internal("pool lock poisoned"))?;
            let to: Vec<u32> = (req.hashes.iter())
                .map(|&hash| dest[hash as usize % dest.len()])
                .collect();
            let src: Vec<&[u8]> = req.payload.chunks(BLOCK_BYTES).collect();
            copy_blocks(&mut pool, BLOCK_BYTES, &to, &src)
                .map_err(|e| ServeError::invalid(e.to_string()))?;
            Ok(KvTransferAck {
                blocks: req.hashes.len() as u32,
            })
        }))
    }
}

fn pool_import(blocks: usize) -> Arc<dyn Service<KvTransfer, KvTransferAck>> {
    Arc::new(PoolImport {
        pool: Arc::new(Mutex::new(vec![0u8; POOL_BLOCKS * BLOCK_BYTES])),
        dest: Arc::new(block_ids(blocks).into_iter().rev().collect()),
    })
}

/// A prefill side's `kv` output reaching a [`PoolImport`] over TCP as `graph up` wires a
/// `tcp` link: bulk calls.
fn graph_path(blocks: usize) -> anyhow::Result<Arc<InstanceSet<KvTransfer, KvTransferAck>>> {
    let mut server = BulkServer::bind("127.0.0.1:0", KV_BULK)?;
    let addr = server.local_addr().to_string();
    server.register("decode.kv", pool_import(blocks))?;
    tokio::spawn(server.serve(CancellationToken::new()));
    let resolve: Resolve = Arc::new(move || futures::future::ready(Ok(addr.clone())).boxed());
    let client = BulkClient::new("decode.kv", resolve, KV_BULK, BulkClientConfig::default());
    let kv = Arc::new(InstanceSet::new("prefill.kv"));
    kv.add(1, client.endpoint("decode.kv"));
    Ok(kv)
}

/// The same through the socket transport over TCP: each chunk encoded into a message and
/// decoded out of it (how `tcp` links carried chunks before bulk calls).
fn message_path(blocks: usize) -> anyhow::Result<Arc<InstanceSet<KvTransfer, KvTransferAck>>> {
    let mut server = SocketServer::bind_tcp("127.0.0.1:0")?;
    let addr = server
        .local_addr()
        .context("the KV listener has no address")?;
    server.register("decode.kv", pool_import(blocks))?;
    tokio::spawn(server.serve(CancellationToken::new()));
    let client = SocketClient::tcp(&addr.to_string(), SocketClientConfig::default());
    let kv = Arc::new(InstanceSet::new("prefill.kv"));
    kv.add(1, client.endpoint::<KvTransfer, KvTransferAck>("decode.kv"));
    Ok(kv)
}

/// A block of the bench's prefill pool, sent in place.
struct PoolBlock {
    pool: Arc<Vec<u8>>,
    at: usize,
}

impl AsRef<[u8]> for PoolBlock {
    fn as_ref(&self) -> &[u8] {
        self.pool
            .get(self.at..self.at + BLOCK_BYTES)
            .unwrap_or_default()
    }
}

/// One hand-off through the graph path with `window` chunks in flight. Each chunk's
/// bytes are read out of the prefill pool when the window has room for it, as the
/// prefill worker exports them; or, `in_place`, sent from the pool as a prefill worker
/// whose pool is in shared memory sends them over a `tcp` link.
async fn graph_handoff(
    kv: &InstanceSet<KvTransfer, KvTransferAck>,
    pool: &Arc<Vec<u8>>,
    ids: &[u32],
    window: usize,
    in_place: bool,
) -> anyhow::Result<()> {
    let layout = KvLayout {
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        dtype_bytes: 2,
        block_size: BLOCK_TOKENS as u32,
    };
    let chunks = ids.len().div_ceil(KV_CHUNK_BLOCKS);
    let transfers = (ids.chunks(KV_CHUNK_BLOCKS).enumerate()).map(|(i, chunk)| {
        let first = i * KV_CHUNK_BLOCKS;
        let mut transfer = KvTransfer {
            handoff_id: "bench".into(),
            hashes: (first..first + chunk.len()).map(|h| h as u64).collect(),
            parent: first.checked_sub(1).map(|p| p as u64),
            payload: Vec::new(),
            layout,
            last: i + 1 == chunks,
            shared: None,
            in_place: Vec::new(),
        };
        let blocks = chunk.iter().map(|&id| id as usize * BLOCK_BYTES);
        if in_place {
            transfer.in_place = blocks
                .map(|at| {
                    let pool = pool.clone();
                    bytes::Bytes::from_owner(PoolBlock { pool, at })
                })
                .collect();
        } else {
            transfer.payload = Vec::with_capacity(chunk.len() * BLOCK_BYTES);
            for at in blocks {
                transfer
                    .payload
                    .extend_from_slice(&pool[at..at + BLOCK_BYTES]);
            }
        }
        transfer
    });
    let ctx = RequestContext::new("bench");
    send_kv_chunks(kv, 1, transfers, window, &ctx).await?;
    Ok(())
}

/// Sends the hand-off's bytes over the raw connection and waits for its one-byte answer.
async fn raw_send(raw: &mut tokio::net::TcpStream, payload: &[u8]) -> anyhow::Result<()> {
    for chunk in payload.chunks(1 << 20) {
        raw.write_all(chunk).await?;
    }
    let mut ack = [0u8; 1];
    raw.read_exact(&mut ack).await?;
    Ok(())
}

/// Bytes per second, alternated in three passes so that one path's allocations do not
/// slow the next one's copies: raw loopback TCP beside the TCP block stream; beside the
/// graph path with [`KV_WINDOW`] chunks in flight sent in place; and beside the graph
/// path exported and the message path. Each path's ratio is to the raw figure of its
/// pass.
async fn tcp_figures(blocks: usize, reps: usize) -> anyhow::Result<TcpFigures> {
    let bytes = blocks * BLOCK_BYTES;
    let mut raw = raw_pair(bytes).await?;
    let mut stream = stream_pair(blocks).await?;
    let kv = graph_path(blocks)?;
    let messages = message_path(blocks)?;
    let payload = vec![0x33u8; bytes];
    let pool: Arc<Vec<u8>> = Arc::new((0..POOL_BLOCKS * BLOCK_BYTES).map(|i| i as u8).collect());
    let ids = block_ids(blocks);
    let never = CancellationToken::new();
    let mut times = [(); 7].map(|_| Vec::new());
    let timed = |t: Instant, into: &mut Vec<f64>| into.push(t.elapsed().as_secs_f64());
    for rep in 0..=reps {
        let t = Instant::now();
        raw_send(&mut raw, &payload).await?;
        timed(t, &mut times[0]);
        let t = Instant::now();
        let refs: Vec<&[u8]> = ids
            .iter()
            .map(|&i| &pool[i as usize * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES])
            .collect();
        send_blocks(&mut stream, rep as u64, &refs, &never).await?;
        timed(t, &mut times[1]);
    }
    for _ in 0..=reps {
        let t = Instant::now();
        raw_send(&mut raw, &payload).await?;
        timed(t, &mut times[2]);
        let t = Instant::now();
        graph_handoff(&kv, &pool, &ids, KV_WINDOW, true).await?;
        timed(t, &mut times[3]);
    }
    for _ in 0..=reps {
        let t = Instant::now();
        raw_send(&mut raw, &payload).await?;
        timed(t, &mut times[4]);
        let t = Instant::now();
        graph_handoff(&kv, &pool, &ids, KV_WINDOW, false).await?;
        timed(t, &mut times[5]);
        let t = Instant::now();
        graph_handoff(&messages, &pool, &ids, KV_WINDOW, false).await?;
        timed(t, &mut times[6]);
    }
    // The first of each is the warm-up.
    let [raw_a, stream, raw_b, in_place, raw_c, exported, messages] = times.map(|mut times| {
        times.remove(0);
        bytes as f64 / median(times)
    });
    Ok(TcpFigures {
        raw_a,
        stream,
        raw_b,
        in_place,
        raw_c,
        exported,
        messages,
    })
}

/// Bytes per second of each TCP path; `raw_a` was measured beside `stream`, `raw_b`
/// beside `in_place`, `raw_c` beside the others.
struct TcpFigures {
    raw_a: f64,
    stream: f64,
    raw_b: f64,
    in_place: f64,
    raw_c: f64,
    exported: f64,
    messages: f64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let blocks = args.tokens.div_ceil(BLOCK_TOKENS);
    anyhow::ensure!(
        blocks <= POOL_BLOCKS,
        "at most {} tokens",
        POOL_BLOCKS * BLOCK_TOKENS
    );
    let bytes = blocks * BLOCK_BYTES;
    let (memcpy, shm, shm_one) =
        shm_figures(blocks, args.reps).context("the shared-memory figures")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tcp = rt
        .block_on(tcp_figures(blocks, args.reps))
        .context("the TCP figures")?;
    let gpu = crate::cmd::bench_kv_cuda::figures(blocks, POOL_BLOCKS, BLOCK_BYTES, args.reps)
        .context("the CUDA IPC figures")?;
    let gb = |bps: f64| bps / 1e9;
    let ms = |bps: f64| bytes as f64 / bps * 1e3;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "tokens": args.tokens, "blocks": blocks, "bytes": bytes,
                "memcpy_gbps": gb(memcpy), "shm_gbps": gb(shm), "shm_ratio": shm / memcpy,
                "shm_ms": ms(shm), "shm_one_thread_gbps": gb(shm_one),
                "tcp_raw_gbps": gb(tcp.raw_a), "tcp_gbps": gb(tcp.stream),
                "tcp_ratio": tcp.stream / tcp.raw_a,
                "graph_raw_gbps": gb(tcp.raw_b),
                "graph_tcp_gbps": gb(tcp.in_place), "graph_tcp_ratio": tcp.in_place / tcp.raw_b,
                "graph_exported_raw_gbps": gb(tcp.raw_c),
                "graph_tcp_exported_gbps": gb(tcp.exported),
                "graph_tcp_exported_ratio": tcp.exported / tcp.raw_c,
                "message_tcp_gbps": gb(tcp.messages),
                "message_tcp_ratio": tcp.messages / tcp.raw_c,
                "window": KV_WINDOW,
                "cuda": match &gpu {
                    Ok(g) => serde_json::json!({
                        "d2d_gbps": gb(g.d2d), "ipc_gbps": gb(g.ipc), "ipc_ratio": g.ipc / g.d2d,
                        "d2d_scattered_gbps": gb(g.d2d_scattered),
                        "ipc_scattered_gbps": gb(g.ipc_scattered),
                        "ipc_scattered_ratio": g.ipc_scattered / g.d2d_scattered,
                    }),
                    Err(why) => serde_json::json!({ "skipped": why }),
                },
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "KV of {} tokens: {blocks} blocks, {:.1} MB (medians of {})",
        args.tokens,
        bytes as f64 / 1e6,
        args.reps
    );
    let row = |what: &str, bps: f64, base: Option<(f64, &str)>| match base {
        None => println!("  {what:<22}{:6.2} GB/s  {:6.2} ms", gb(bps), ms(bps)),
        Some((base, of)) => println!(
            "  {what:<22}{:6.2} GB/s  {:6.2} ms  {:4.0}% of {of}",
            gb(bps),
            ms(bps),
            100.0 * bps / base
        ),
    };
    row("memcpy", memcpy, None);
    row("shm hand-off", shm, Some((memcpy, "memcpy")));
    row("same, one thread", shm_one, Some((memcpy, "memcpy")));
    row("raw loopback TCP", tcp.raw_a, None);
    row("TCP block stream", tcp.stream, Some((tcp.raw_a, "raw TCP")));
    row("raw loopback TCP", tcp.raw_b, None);
    row(
        "graph path, in place",
        tcp.in_place,
        Some((tcp.raw_b, "raw TCP")),
    );
    row("raw loopback TCP", tcp.raw_c, None);
    row(
        "graph path, exported",
        tcp.exported,
        Some((tcp.raw_c, "raw TCP")),
    );
    row(
        "messages (before)",
        tcp.messages,
        Some((tcp.raw_c, "raw TCP")),
    );
    match gpu {
        Ok(g) => {
            row("GPU device-to-device", g.d2d, None);
            row("CUDA IPC hand-off", g.ipc, Some((g.d2d, "D2D")));
            row("same, blocks scattered", g.d2d_scattered, None);
            row(
                "CUDA IPC, scattered",
                g.ipc_scattered,
                Some((g.d2d_scattered, "D2D")),
            );
        }
        Err(why) => println!("  CUDA IPC              skipped: {why}"),
    }
    Ok(ExitCode::SUCCESS)
}
