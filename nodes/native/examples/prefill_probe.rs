//! Times one figure of `dynamo bench engine` alone, for profiling:
//! `prefill_probe MODEL prefill N` or `prefill_probe MODEL decode BATCH`.
fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("model path");
    let what = args.next().unwrap_or_else(|| "prefill".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(512);
    let cfg = dynamo_native::NativeConfig::new(path);
    let mut m = dynamo_native::load_model(&cfg).expect("load").model;
    for _ in 0..3 {
        let r = match what.as_str() {
            "decode" => dynamo_native::bench::decode(&mut m, n, 32, 32, 1),
            _ => dynamo_native::bench::prefill(&mut m, n, 1),
        }
        .expect("bench");
        println!("{what} {n}: {r:.1} tok/s");
    }
}
