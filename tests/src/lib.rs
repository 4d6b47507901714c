//! Support for end-to-end tests: they start the real `dynamo` binary and talk to it as a
//! user would.

use std::path::PathBuf;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The `dynamo` binary under test: `$DYNAMO_BIN`, or the workspace's debug build.
///
/// The README's test command (`scripts/test.sh`) builds it before running the tests.
pub fn dynamo_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DYNAMO_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let bin = target.join("debug").join("dynamo");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build --bin dynamo` (scripts/test.sh does)",
        bin.display()
    );
    bin
}
