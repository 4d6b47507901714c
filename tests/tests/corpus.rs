//! The malformed-input corpus: every file in `tests/corpus/` is a broken (or warned-about)
//! graph whose first line says which diagnostic it must produce and where:
//!
//! ```text
//! # expect: E0102 "\"wokrer.in\""        first occurrence of the snippet (after this line)
//! # expect: E0109 "\"router.out\""@last  last occurrence
//! # expect: E0001 at 3:13                an explicit line:column
//! # exit: 0                              (optional) expected exit status, default 2
//! ```
//!
//! Each file is run through the real binary, in JSON and text form: the status must match,
//! the diagnostic must be there at that position, and nothing may panic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use dynamo_tests::{dynamo_bin, workspace};
use serde_json::Value;

struct Expect {
    code: String,
    line: usize,
    col: usize,
    exit: i32,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count())
        + 1;
    (line, col)
}

fn expectation(path: &Path, text: &str) -> Expect {
    let first = text.lines().next().unwrap_or_default();
    let rest = first.strip_prefix("# expect: ").unwrap_or_else(|| {
        panic!(
            "{}: first line must be `# expect: CODE ...`",
            path.display()
        )
    });
    let (code, place) = rest
        .split_once(' ')
        .unwrap_or_else(|| panic!("{}: no position", path.display()));
    let exit = text
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("# exit: "))
        .map_or(2, |s| s.trim().parse().unwrap_or(2));
    let (line, col) = if let Some(lc) = place.strip_prefix("at ") {
        let (l, c) = lc
            .split_once(':')
            .unwrap_or_else(|| panic!("{}: bad line:col", path.display()));
        (l.parse().unwrap_or(0), c.parse().unwrap_or(0))
    } else {
        let (lit, last) = match place.strip_suffix("@last") {
            Some(l) => (l, true),
            None => (place, false),
        };
        let snippet: String = serde_json::from_str(lit)
            .unwrap_or_else(|e| panic!("{}: bad snippet {lit}: {e}", path.display()));
        let body_start = first.len() + 1;
        let body = &text[body_start..];
        let found = if last {
            body.rfind(&snippet)
        } else {
            body.find(&snippet)
        };
        let at =
            found.unwrap_or_else(|| panic!("{}: snippet {snippet:?} not in file", path.display()));
        line_col(text, body_start + at)
    };
    Expect {
        code: code.to_string(),
        line,
        col,
        exit,
    }
}

fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace().join("tests/corpus"))
        .expect("tests/corpus exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_yields_its_diagnostic_at_its_place() {
    let files = corpus();
    assert!(
        files.len() >= 30,
        "the corpus has only {} files",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable");
        let want = expectation(path, &text);
        let out = Command::new(dynamo_bin())
            .args(["graph", "validate", "--format", "json"])
            .arg(path)
            .output()
            .expect("dynamo runs");
        let status = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("panicked") {
            failures.push(format!("{}: panicked: {stderr}", path.display()));
            continue;
        }
        if status != want.exit {
            failures.push(format!(
                "{}: exit {status}, expected {}",
                path.display(),
                want.exit
            ));
        }
        let report: Value = match serde_json::from_slice(&out.stdout) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{}: output is not JSON: {e}", path.display()));
                continue;
            }
        };
        let diags = report["diagnostics"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let hit = diags.iter().any(|d| {
            d["code"] == want.code.as_str()
                && d["span"]["start"]["line"] == want.line
                && d["span"]["start"]["column"] == want.col
        });
        if !hit {
            let got: Vec<String> = diags
                .iter()
                .map(|d| {
                    format!(
                        "{} at {}:{}",
                        d["code"], d["span"]["start"]["line"], d["span"]["start"]["column"]
                    )
                })
                .collect();
            failures.push(format!(
                "{}: expected {} at {}:{}, got {got:?}",
                path.display(),
                want.code,
                want.line,
                want.col
            ));
        }
        // The text form names the same code, and points at the file and line.
        let text_out = Command::new(dynamo_bin())
            .args(["graph", "validate"])
            .arg(path)
            .output()
            .expect("dynamo runs");
        let rendered = String::from_utf8_lossy(&text_out.stderr);
        let header = format!("[{}]", want.code);
        let location = format!("{}:{}:{}", path.display(), want.line, want.col);
        if !rendered.contains(&header) || !rendered.contains(&location) {
            failures.push(format!(
                "{}: text output lacks {header} or {location}:\n{rendered}",
                path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_corpus_covers_every_diagnostic_code() {
    let mut covered: BTreeSet<String> = corpus()
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).expect("readable");
            expectation(p, &text).code
        })
        .collect();
    covered.insert("E0009".into()); // tested below: it needs a file that does not exist
                                    // A binary without the llamacpp feature (graph/tests/diagnostics.rs); this one has it.
    covered.insert("E0306".into());
    let missing: Vec<String> = dynamo_graph::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !covered.contains(c))
        .collect();
    assert!(missing.is_empty(), "no corpus file for {missing:?}");
}

#[test]
fn an_unreadable_file_is_e0009_with_status_2() {
    let out = Command::new(dynamo_bin())
        .args(["graph", "validate", "/nonexistent/graph.toml"])
        .output()
        .expect("dynamo runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error[E0009]") && stderr.contains("/nonexistent/graph.toml"),
        "{stderr}"
    );
}

#[test]
fn every_example_graph_validates_plans_and_draws() {
    let mut n = 0;
    for entry in std::fs::read_dir(workspace().join("graphs")).expect("graphs/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        n += 1;
        let run = |args: &[&str]| {
            let out = Command::new(dynamo_bin())
                .args(args)
                .arg(&path)
                .output()
                .expect("dynamo runs");
            assert!(
                out.status.success(),
                "{args:?} {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert!(run(&["graph", "validate"]).starts_with("ok:"));
        let plan: Value = serde_json::from_str(&run(&["graph", "plan", "--format", "json"]))
            .expect("plan is JSON");
        assert!(!plan["replicas"].as_array().expect("replicas").is_empty());
        assert!(run(&["graph", "viz", "--format", "dot"]).starts_with("digraph"));
        assert!(run(&["graph", "viz", "--format", "mermaid"]).starts_with("flowchart LR"));
        assert!(run(&["graph", "viz", "--format", "svg"]).contains("<svg"));
        let drawing: Value = serde_json::from_str(&run(&["graph", "viz", "--format", "json"]))
            .expect("drawing is JSON");
        assert_eq!(drawing["valid"], true);
    }
    assert!(n >= 5, "expected the five example graphs, found {n}");
}
