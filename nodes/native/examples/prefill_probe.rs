fn main() {
    let path = std::env::args().nth(1).expect("model path");
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let cfg = dynamo_native::NativeConfig::new(path);
    let mut m = dynamo_native::load_model(&cfg).expect("load").model;
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let r = dynamo_native::bench::prefill(&mut m, n, 1).expect("prefill");
        println!(
            "prefill {n}: {r:.1} tok/s ({:.0} ms)",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
