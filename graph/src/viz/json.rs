//! The drawing as JSON, for tools that lay it out themselves (the live graph page).

use super::Drawing;

pub fn render(d: &Drawing) -> String {
    let mut s =
        serde_json::to_string_pretty(d).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}
