//! Matmul-only throughput of SmolLM2-135M's weights through the native quant kernels.
//!
//! ```text
//! cargo run --release -p dynamo-native --example quant_bench -- [MODEL.gguf] [--threads N] [--secs S]
//! ```
//!
//! For each batch size n it times one "forward" of matmuls only: the q, k, v, o, gate, up and
//! down projections of all 30 layers on n activation rows, plus the Q8_0 output head on every
//! row (only the last row for n = 512, as a prefill would). It prints the median time of the
//! repetitions and n / time as "matmul-only model tokens/s", and the same for the fastest
//! repetition (the box is often shared; the best rep is the least disturbed one).

use dynamo_native::quant::{kernel_name, ComputePool, QMatrix, Workspace};
use dynamo_preprocessor::gguf::GgufFile;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LAYER_TENSORS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut path = None;
    let mut threads = 1usize;
    let mut secs = 2.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().ok_or("--threads needs a value")?.parse()?,
            "--secs" => secs = args.next().ok_or("--secs needs a value")?.parse()?,
            _ => path = Some(PathBuf::from(a)),
        }
    }
    let path = match path {
        Some(p) => p,
        None => PathBuf::from(std::env::var("HOME")?)
            .join(".cache/dynamo/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };

    let t0 = Instant::now();
    let gguf = GgufFile::open(&path)?;
    let file = std::fs::File::open(&path)?;
    // SAFETY: the model file is not modified while the bench runs.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let load = |name: &str| -> Result<QMatrix, Box<dyn std::error::Error>> {
        let t = gguf
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("tensor {name} not in the model"))?;
        let (cols, rows) = (
            t.dims[0] as usize,
            t.dims.get(1).copied().unwrap_or(1) as usize,
        );
        let start = (gguf.data_offset + t.offset) as usize;
        let per_row = match t.ggml_type {
            dynamo_preprocessor::gguf::GgmlType::Q4_1 => cols / 32 * 20,
            dynamo_preprocessor::gguf::GgmlType::Q8_0 => cols / 32 * 34,
            other => return Err(format!("{name}: unexpected type {other:?}").into()),
        };
        let bytes = map
            .get(start..start + rows * per_row)
            .ok_or_else(|| format!("{name}: data past the end of the file"))?;
        Ok(QMatrix::from_ggml(t.ggml_type, rows, cols, bytes)?)
    };
    let mut layers = Vec::new();
    for l in 0.. {
        if !gguf
            .tensors
            .iter()
            .any(|t| t.name == format!("blk.{l}.attn_q.weight"))
        {
            break;
        }
        let mut mats = Vec::new();
        for t in LAYER_TENSORS {
            mats.push(load(&format!("blk.{l}.{t}.weight"))?);
        }
        layers.push(mats);
    }
    let head = load("token_embd.weight")?;
    let bytes: usize = layers
        .iter()
        .flatten()
        .map(QMatrix::memory_bytes)
        .sum::<usize>()
        + head.memory_bytes();
    println!(
        "model {} | {} layers, head {}x{} {} | weights {:.1} MB | loaded in {:.0} ms",
        path.display(),
        layers.len(),
        head.rows(),
        head.cols(),
        head.type_name(),
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64() * 1e3
    );
    println!("kernel {} | threads {threads}", kernel_name());

    let pool = ComputePool::new(threads);
    let mut ws = Workspace::default();
    let dim = head.cols();
    let ffn = layers.first().map(|l| l[4].rows()).unwrap_or(dim);
    let mut base = None;
    println!(
        "{:>5} {:>11} {:>11} {:>9} {:>10}   (matmul-only model tokens/s: median rep, best rep)",
        "n", "ms/forward", "tokens/s", "vs n=1", "best tok/s"
    );
    for n in [1usize, 2, 4, 8, 16, 64, 512] {
        let x: Vec<f32> = (0..n * ffn.max(dim))
            .map(|i| ((i as u32).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let mut out = vec![0.0f32; n * head.rows().max(ffn)];
        let head_rows = if n == 512 { 1 } else { n };
        let mut forward = || {
            for l in &layers {
                for (i, m) in l.iter().enumerate() {
                    let input = if i == 6 { ffn } else { dim };
                    m.matmul(&x[..n * input], n, &mut out, &mut ws, &pool);
                }
            }
            let last = &x[(n - head_rows) * dim..n * dim];
            head.matmul(last, head_rows, &mut out, &mut ws, &pool);
        };
        forward(); // warm-up
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || start.elapsed() < Duration::from_secs_f64(secs) {
            let t = Instant::now();
            forward();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[times.len() / 2];
        let tps = n as f64 / med;
        let b = *base.get_or_insert(tps);
        println!(
            "{n:>5} {:>11.2} {tps:>11.1} {:>8.2}x {:>10.1}   ({} reps)",
            med * 1e3,
            tps / b,
            n as f64 / times[0],
            times.len()
        );
    }
    Ok(())
}
