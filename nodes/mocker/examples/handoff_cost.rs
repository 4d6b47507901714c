//! CPU cost of the KV hand-off's fabricated payload: what a mocker prefill worker spends
//! making a block's bytes and a decode worker spends checking every one of them.
//!
//! `cargo run --release -p dynamo-mocker --example handoff_cost -- [blocks]` (default
//! 2000), with the default layout (SmolLM2-135M, 16-token blocks: 368,640 bytes).

use std::time::Instant;

use dynamo_mocker::payload::{fabricate, verify_transfer};
use dynamo_mocker::MockerConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let blocks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000);
    let layout = MockerConfig::default().layout();
    let block_bytes = usize::try_from(layout.bytes_per_block())?;
    let chunk: Vec<u64> = (0..8u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let rounds = blocks.div_ceil(chunk.len()).max(1);

    let started = Instant::now();
    let mut payload = Vec::new();
    for _ in 0..rounds {
        payload = fabricate(&chunk, block_bytes);
    }
    let make = started.elapsed();

    let started = Instant::now();
    for _ in 0..rounds {
        verify_transfer(&layout, block_bytes, &layout, &chunk, &payload)?;
    }
    let check = started.elapsed();

    let n = (rounds * chunk.len()) as f64;
    let gib = n * block_bytes as f64 / (1u64 << 30) as f64;
    println!("{n} blocks of {block_bytes} bytes");
    println!(
        "fabricate: {:.1} µs per block, {:.2} GiB/s",
        make.as_secs_f64() * 1e6 / n,
        gib / make.as_secs_f64()
    );
    println!(
        "verify:    {:.1} µs per block, {:.2} GiB/s",
        check.as_secs_f64() * 1e6 / n,
        gib / check.as_secs_f64()
    );
    Ok(())
}
