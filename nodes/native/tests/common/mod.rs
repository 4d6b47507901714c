//! Finding the test model. Tests that need it skip with a visible notice when it is
//! absent, so `cargo test` works on a fresh checkout; CI fetches the model first.

use std::io::Write;
use std::path::PathBuf;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$DYNAMO_MODEL_GGUF`, else `${DYNAMO_CACHE:-$HOME/.cache/dynamo}/models/<file>`.
/// `None` (after printing a SKIPPED notice) when the cached model is absent; a
/// `DYNAMO_MODEL_GGUF` that names a missing file is a failure, not a skip.
pub fn model_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DYNAMO_MODEL_GGUF") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "DYNAMO_MODEL_GGUF={} is not a file",
            p.display()
        );
        return Some(p);
    }
    let cache = std::env::var_os("DYNAMO_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dynamo")));
    let path = cache.map(|c| c.join("models").join(FILE));
    match path {
        Some(p) if p.is_file() => Some(p),
        _ => {
            // Straight to the stderr handle: the test harness captures `eprintln!` of
            // passing tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: test model {FILE} not found via DYNAMO_MODEL_GGUF or the \
                 cache (run scripts/fetch-model.sh)"
            );
            None
        }
    }
}
