//! "Did you mean …?" for every name the user can misspell.

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn closest<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let w = word.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = strsim::damerau_levenshtein(&w, &c.to_ascii_lowercase());
        // One edit for short words, up to a third of the length for longer ones.
        let limit = (c.len().max(word.len()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, bc)| d < bd || (d == bd && c < bc)) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// A "did you mean" help line, or a list of what is valid when nothing is close.
pub fn help_for<'a, I>(word: &str, what: &str, candidates: I) -> Option<String>
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    if let Some(c) = closest(word, candidates.clone()) {
        return Some(format!("did you mean `{c}`?"));
    }
    let mut all: Vec<&str> = candidates.into_iter().collect();
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    all.dedup();
    let shown: Vec<String> = all.iter().take(12).map(|c| format!("`{c}`")).collect();
    let more = if all.len() > 12 {
        format!(" and {} more", all.len() - 12)
    } else {
        String::new()
    };
    Some(format!("valid {what}: {}{more}", shown.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_typos_but_not_strangers() {
        let c = ["prefill", "decode", "router"];
        assert_eq!(closest("prefil", c), Some("prefill"));
        assert_eq!(closest("decdoe", c), Some("decode"));
        assert_eq!(closest("Router", c), Some("router"));
        assert_eq!(closest("frontend", c), None);
    }

    #[test]
    fn lists_valid_names_when_nothing_is_close() {
        let h = help_for("zzz", "kinds", ["b", "a"]);
        assert_eq!(h.as_deref(), Some("valid kinds: `a`, `b`"));
    }
}
