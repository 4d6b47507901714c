//! Diagnostics as a person reads them (like rustc) and as a machine reads them (JSON).

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, Chars, Config};
use serde::Serialize;

use crate::diagnostic::{Diagnostic, Diagnostics, Severity};
use crate::source::SourceFile;

fn config() -> Config {
    Config {
        chars: Chars::ascii(),
        ..Config::default()
    }
}

fn to_codespan(d: &Diagnostic) -> cs::Diagnostic<()> {
    let base = match d.severity {
        Severity::Error => cs::Diagnostic::error(),
        Severity::Warning => cs::Diagnostic::warning(),
    };
    let mut labels = Vec::new();
    if let Some(span) = d.span {
        labels.push(cs::Label::primary((), span.start..span.end).with_message(&d.label));
    }
    for l in &d.labels {
        labels.push(cs::Label::secondary((), l.span.start..l.span.end).with_message(&l.message));
    }
    base.with_code(d.code.as_str())
        .with_message(&d.message)
        .with_labels(labels)
        .with_notes(d.help.iter().map(|h| format!("help: {h}")).collect())
}

/// One diagnostic as text, without colour.
pub fn render_one(file: &SourceFile, d: &Diagnostic) -> String {
    let files = SimpleFile::new(file.name.as_str(), file.text.as_str());
    match term::emit_into_string(&config(), &files, &to_codespan(d)) {
        Ok(s) => s,
        // Only a span outside the file can fail; fall back to the bare message.
        Err(_) => format!("{}[{}]: {}\n", severity_word(d), d.code.as_str(), d.message),
    }
}

fn severity_word(d: &Diagnostic) -> &'static str {
    match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// All diagnostics as text, with a closing summary line.
pub fn render_text(file: &SourceFile, ds: &Diagnostics) -> String {
    let mut out = String::new();
    for d in &ds.items {
        out.push_str(&render_one(file, d));
    }
    let (e, w) = (ds.error_count(), ds.warning_count());
    if e > 0 {
        out.push_str(&format!(
            "error: {} has {e} error{} and {w} warning{}\n",
            file.name,
            plural(e),
            plural(w)
        ));
    } else if w > 0 {
        out.push_str(&format!(
            "{}: ok with {w} warning{}\n",
            file.name,
            plural(w)
        ));
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[derive(Serialize)]
struct JsonPos {
    line: usize,
    column: usize,
    offset: usize,
}

#[derive(Serialize)]
struct JsonSpan {
    start: JsonPos,
    end: JsonPos,
}

#[derive(Serialize)]
struct JsonLabel {
    span: JsonSpan,
    message: String,
}

#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    code: String,
    severity: Severity,
    message: &'a str,
    file: &'a str,
    span: Option<JsonSpan>,
    label: &'a str,
    labels: Vec<JsonLabel>,
    help: &'a [String],
    rendered: String,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    file: &'a str,
    ok: bool,
    errors: usize,
    warnings: usize,
    diagnostics: Vec<JsonDiagnostic<'a>>,
}

fn json_span(file: &SourceFile, s: crate::source::Span) -> JsonSpan {
    let pos = |o| {
        let (line, column) = file.line_col(o);
        JsonPos {
            line,
            column,
            offset: o,
        }
    };
    JsonSpan {
        start: pos(s.start),
        end: pos(s.end),
    }
}

/// All diagnostics as one JSON document (for CI and editors).
pub fn render_json(file: &SourceFile, ds: &Diagnostics) -> String {
    let report = JsonReport {
        file: &file.name,
        ok: !ds.has_errors(),
        errors: ds.error_count(),
        warnings: ds.warning_count(),
        diagnostics: ds
            .items
            .iter()
            .map(|d| JsonDiagnostic {
                code: d.code.as_str(),
                severity: d.severity,
                message: &d.message,
                file: &file.name,
                span: d.span.map(|s| json_span(file, s)),
                label: &d.label,
                labels: d
                    .labels
                    .iter()
                    .map(|l| JsonLabel {
                        span: json_span(file, l.span),
                        message: l.message.clone(),
                    })
                    .collect(),
                help: &d.help,
                rendered: render_one(file, d),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
