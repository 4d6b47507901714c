//! Stop strings matched across chunk boundaries.
//!
//! Text arrives in chunks; a stop string may straddle two of them. Text that could still
//! be the beginning of a stop string is held back until the next chunk decides: either
//! it completes a stop string (the output ends right before it) or it can no longer
//! match and is released.

/// What one [`StopMatcher::push`] lets out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text that is safe to emit.
    pub text: String,
    /// A stop string matched: `text` ends right before it, and nothing follows.
    pub stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text held back because it could be the start of a stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would stop before any output).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds a chunk. After a match, further input is ignored.
    pub fn push(&mut self, chunk: &str) -> StopOutput {
        if self.stopped {
            return StopOutput {
                text: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutput {
                text: chunk.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(chunk);
        // The earliest occurrence of any stop string wins.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.stopped = true;
            return StopOutput {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        StopOutput {
            text: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// The held-back text at the end of the stream: no stop string can complete now.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The first character boundary from which the rest of `held` is a proper prefix of
    /// some stop string; `held.len()` when there is none.
    fn partial_match_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Feeds the chunks; returns the emitted text, whether it stopped, and after which
    /// chunk.
    fn run(stops: &[&str], chunks: &[&str]) -> (String, Option<usize>) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for (i, c) in chunks.iter().enumerate() {
            let o = m.push(c);
            out.push_str(&o.text);
            if o.stopped {
                return (out, Some(i));
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_string_across_chunks() {
        assert_eq!(
            run(&["STOP"], &["abc S", "T", "OP tail"]),
            ("abc ".into(), Some(2))
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), Some(1)));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("ab ST").text, "ab ");
        assert_eq!(m.push("A").text, "STA");
        assert_eq!(run(&["STOP"], &["S", "T", "O"]), ("STO".into(), None));
    }

    #[test]
    fn held_text_is_only_what_can_still_match() {
        let mut m = matcher(&["abc"]);
        // "aab": the first "a" can no longer start "abc", but "ab" can.
        assert_eq!(m.push("aab").text, "a");
        assert_eq!(m.push("x").text, "abx");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), Some(0))
        );
        assert_eq!(run(&["xyz", "b"], &["a", "bxyz"]), ("a".into(), Some(1)));
    }

    #[test]
    fn multibyte_text_is_cut_at_character_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), Some(2)));
        assert_eq!(run(&["中文"], &["日中", "x"]), ("日中x".into(), None));
    }

    #[test]
    fn no_stops_passes_through_and_empty_stops_are_ignored() {
        let mut m = matcher(&[""]);
        assert!(m.is_empty());
        assert_eq!(m.push("anything").text, "anything");
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn nothing_after_a_match() {
        let mut m = matcher(&["x"]);
        assert!(m.push("axb").stopped);
        let o = m.push("more");
        assert!(o.stopped && o.text.is_empty());
        assert_eq!(m.flush(), "");
    }
}
