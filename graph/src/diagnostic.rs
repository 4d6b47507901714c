//! Diagnostics: every problem found in a graph file, with a code, a place and help.

use serde::Serialize;

use crate::source::Span;

/// Every diagnostic code. The number groups them: 0xx the file itself, 1xx names,
/// 2xx port types and topology, 3xx settings that must agree, 4xx transports,
/// 5xx placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Code {
    /// The file is not valid TOML.
    E0001,
    /// A key that is not part of the format here.
    E0002,
    /// A value of the wrong type (a string where a number belongs, …).
    E0003,
    /// A value that is not one of the allowed ones.
    E0004,
    /// A required key is missing.
    E0005,
    /// The same name is defined twice.
    E0006,
    /// A number out of its allowed range (replicas < 1, …).
    E0007,
    /// Keys that exclude each other are both set, or a choice is left open.
    E0008,
    /// The file cannot be read.
    E0009,
    /// Unknown node kind.
    E0101,
    /// An edge names a node that does not exist.
    E0102,
    /// An edge names a port the node's kind does not have.
    E0103,
    /// A placement names a machine that is not in the cluster.
    E0104,
    /// A node names a model that is not defined.
    E0105,
    /// A placement colocates with a node that does not exist.
    E0106,
    /// A port reference is malformed or ambiguous.
    E0107,
    /// An edge goes the wrong way (from an input, or to an output).
    E0108,
    /// The same edge is declared twice.
    E0109,
    /// The two ends of an edge carry different message schemas.
    E0201,
    /// The two ends of an edge disagree on cardinality (unary vs stream).
    E0202,
    /// The two ends of an edge live in different memory domains (host vs cuda).
    E0203,
    /// An edge's kind (call or feedback) does not match its ports.
    E0204,
    /// A cycle of call edges.
    E0205,
    /// A node no request can reach from a frontend.
    E0206,
    /// A required port is not connected.
    E0207,
    /// The graph has no frontend.
    E0208,
    /// An output port of a node that does not route feeds several edges.
    E0209,
    /// A KV router over a worker that does not publish KV events.
    E0301,
    /// Block sizes disagree behind one KV router.
    E0302,
    /// A prefill worker and its decode worker serve different models.
    E0303,
    /// A chain of nodes serves different models.
    E0304,
    /// An external engine asked for something it cannot do (GPUs, events, a role).
    E0305,
    /// An engine this dynamo binary was built without (`llamacpp` needs the `llamacpp`
    /// cargo feature).
    E0306,
    /// An in-process edge between replicas in different processes.
    E0401,
    /// Shared memory or CUDA IPC between different machines.
    E0402,
    /// CUDA IPC where there is no GPU memory.
    E0403,
    /// An edge crosses machines but no NATS server is configured.
    E0404,
    /// A transport that cannot carry this kind of port.
    E0405,
    /// A replica needs more GPUs than any machine can give.
    E0501,
    /// No machine matches a node's placement constraints.
    E0502,
    /// Colocation that cannot be satisfied.
    E0503,
    /// A node listens on a port another node already uses.
    E0504,
    /// An output port that nothing listens to (warning).
    W0001,
    /// A setting that has no effect here (warning).
    W0002,
}

impl Code {
    pub fn as_str(self) -> String {
        format!("{self:?}")
    }

    pub fn is_warning(self) -> bool {
        matches!(self, Code::W0001 | Code::W0002)
    }

    /// Every code, for documentation and for the test that snapshots each one.
    pub const ALL: &'static [Code] = &[
        Code::E0001,
        Code::E0002,
        Code::E0003,
        Code::E0004,
        Code::E0005,
        Code::E0006,
        Code::E0007,
        Code::E0008,
        Code::E0009,
        Code::E0101,
        Code::E0102,
        Code::E0103,
        Code::E0104,
        Code::E0105,
        Code::E0106,
        Code::E0107,
        Code::E0108,
        Code::E0109,
        Code::E0201,
        Code::E0202,
        Code::E0203,
        Code::E0204,
        Code::E0205,
        Code::E0206,
        Code::E0207,
        Code::E0208,
        Code::E0209,
        Code::E0301,
        Code::E0302,
        Code::E0303,
        Code::E0304,
        Code::E0305,
        Code::E0306,
        Code::E0401,
        Code::E0402,
        Code::E0403,
        Code::E0404,
        Code::E0405,
        Code::E0501,
        Code::E0502,
        Code::E0503,
        Code::E0504,
        Code::W0001,
        Code::W0002,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A secondary place that explains the problem ("first defined here").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    /// Where the problem is; `None` only for problems of the whole file.
    pub span: Option<Span>,
    /// What to say under the caret.
    pub label: String,
    pub labels: Vec<Label>,
    pub help: Vec<String>,
}

impl Diagnostic {
    pub fn new(code: Code, span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            severity: if code.is_warning() {
                Severity::Warning
            } else {
                Severity::Error
            },
            message: message.into(),
            span,
            label: String::new(),
            labels: Vec::new(),
            help: Vec::new(),
        }
    }

    pub fn at(code: Code, span: Span, message: impl Into<String>) -> Self {
        Self::new(code, Some(span), message)
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: message.into(),
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help.push(help.into());
        self
    }

    pub fn maybe_help(self, help: Option<String>) -> Self {
        match help {
            Some(h) => self.help(h),
            None => self,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The diagnostics of one check, in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }

    pub fn extend(&mut self, ds: impl IntoIterator<Item = Diagnostic>) {
        self.items.extend(ds);
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.items.len() - self.error_count()
    }

    /// Sort by position, then code, then message, and drop exact duplicates.
    pub fn sort(&mut self) {
        self.items.sort_by(|a, b| {
            (a.span.map(|s| (s.start, s.end)), a.code, &a.message).cmp(&(
                b.span.map(|s| (s.start, s.end)),
                b.code,
                &b.message,
            ))
        });
        self.items.dedup();
    }

    pub fn codes(&self) -> Vec<Code> {
        self.items.iter().map(|d| d.code).collect()
    }
}
