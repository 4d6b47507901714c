//! Validation as a list of small passes that each collect diagnostics.

pub mod agreement;
pub mod engines;
pub mod resolve;
pub mod topology;
pub mod types;

use crate::diagnostic::Diagnostic;
use resolve::Resolved;

/// A pass over the resolved graph.
pub type Pass = fn(&Resolved<'_>, &mut Vec<Diagnostic>);

/// The passes after name resolution, in order.
pub const PASSES: &[(&str, Pass)] = &[
    ("port types", types::check),
    ("topology", topology::check),
    ("agreement", agreement::check),
    ("engines", engines::check),
];
