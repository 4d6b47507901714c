//! The rendered text of every diagnostic, snapshotted, so error quality cannot silently
//! regress. The inputs are the malformed-input corpus in `tests/corpus/` (one file per
//! code at least); `cargo insta review` (or INSTA_UPDATE=always) accepts a change.

use std::path::PathBuf;

use dynamo_graph::{check, render, Environment, SourceFile};

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "toml"));
    files.sort();
    files
}

#[test]
fn rendered_diagnostics_match_their_snapshots() {
    let files = corpus();
    assert!(files.len() >= 30);
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        // A stable file name, so snapshots do not depend on where the checkout lives.
        let file = SourceFile::new(format!("tests/corpus/{name}.toml"), text);
        let c = check(file, &Environment::default());
        assert!(!c.diagnostics.items.is_empty(), "{name}: no diagnostic");
        insta::assert_snapshot!(name, render::render_text(&c.file, &c.diagnostics));
    }
}

/// E0306 depends on how the binary was built, so the corpus (checked by a binary built
/// with every engine) cannot show it: an environment without llama.cpp does.
#[test]
fn an_engine_the_binary_lacks_is_e0306_at_its_value() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../graphs/llamacpp.toml");
    let text = std::fs::read_to_string(&path).expect("graphs/llamacpp.toml");
    let without = Environment {
        missing_engines: vec!["llamacpp".into()],
        ..Environment::default()
    };
    let c = check(
        SourceFile::new("graphs/llamacpp.toml", text.clone()),
        &without,
    );
    assert!(c.plan.is_none(), "a graph the binary cannot run got a plan");
    let d = c
        .diagnostics
        .items
        .iter()
        .find(|d| d.code == dynamo_graph::Code::E0306)
        .expect("E0306");
    let line = text
        .lines()
        .position(|l| l.starts_with("engine = \"llamacpp\""))
        .expect("the engine line")
        + 1;
    let rendered = render::render_text(&c.file, &c.diagnostics);
    assert!(
        rendered.contains(&format!("graphs/llamacpp.toml:{line}:10"))
            && rendered.contains("--features llamacpp"),
        "{rendered}"
    );
    assert!(d.message.contains("`worker`"), "{}", d.message);
    // With llama.cpp in the binary the same file is fine.
    let c = check(
        SourceFile::new("graphs/llamacpp.toml", text),
        &Environment::default(),
    );
    assert!(c.plan.is_some(), "{:?}", c.diagnostics.items);
}
