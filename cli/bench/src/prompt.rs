//! Prompts of an approximate token length, with optional shared prefixes per group.
//!
//! Prompts are built from a fixed list of short, common English words, each of which is a
//! single token (with its leading space) in the usual BPE tokenizers (Llama, GPT, SmolLM),
//! so N words come out at about N tokens. It is an approximation: the chat template, the
//! tokenizer and word boundaries move the real count by a few percent.

use crate::rng::SplitMix64;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
    "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem", "hand",
    "part", "place", "case", "week", "company", "system", "program", "question", "work",
    "government", "number", "night", "point", "home", "water", "room", "mother", "area",
    "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job",
    "word", "business", "issue", "side", "kind", "head", "house", "service", "friend",
    "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city",
    "name", "team", "minute", "idea", "kid", "body", "back", "face", "level", "office",
    "door", "health", "person", "art", "war", "history", "party", "result", "change",
    "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force",
    "good", "new", "first", "last", "long", "great", "little", "own", "other", "old", "big",
    "high", "different", "small", "large", "next", "early", "young", "important", "few",
    "public", "bad", "same", "able", "red", "blue", "green", "black", "white", "open",
    "run", "walk", "read", "write", "play", "move", "live", "hold", "bring", "begin",
    "keep", "start", "show", "hear", "turn", "call", "ask", "need", "feel", "become",
    "leave", "put", "mean", "let", "seem", "help", "talk", "tell", "find",
];

/// One generated prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt text.
    pub text: String,
    /// The prefix group (request index mod `--prefix-groups`).
    pub group: usize,
    /// Approximate token count (the word count).
    pub approx_tokens: usize,
}

/// Builds the prompt of every request of a run, deterministically from the seed.
#[derive(Debug, Clone)]
pub struct PromptGenerator {
    seed: u64,
    unique_words: usize,
    prefixes: Vec<String>,
    prefix_words: usize,
}

impl PromptGenerator {
    /// `input_tokens` words per prompt, the first `shared_prefix_tokens` of which are the
    /// same for every request of a group. `groups` is clamped to at least 1 and
    /// `shared_prefix_tokens` to at most `input_tokens`.
    pub fn new(seed: u64, input_tokens: usize, shared_prefix_tokens: usize, groups: usize) -> Self {
        let prefix_words = shared_prefix_tokens.min(input_tokens);
        let prefixes = (0..groups.max(1))
            .map(|g| words(&mut SplitMix64::derived(seed, 1, g as u64), prefix_words))
            .collect();
        PromptGenerator {
            seed,
            unique_words: input_tokens - prefix_words,
            prefixes,
            prefix_words,
        }
    }

    /// The prompt of request `index` (warmup requests use their own indices so they
    /// never repeat a measured prompt's unique part).
    pub fn prompt(&self, index: u64) -> Prompt {
        let group = (index % self.prefixes.len() as u64) as usize;
        let prefix = self.prefixes.get(group).map(String::as_str).unwrap_or("");
        let unique = words(
            &mut SplitMix64::derived(self.seed, 2, index),
            self.unique_words,
        );
        let text = match (prefix.is_empty(), unique.is_empty()) {
            (true, _) => unique,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix} {unique}"),
        };
        Prompt {
            text,
            group,
            approx_tokens: self.prefix_words + self.unique_words,
        }
    }
}

fn words(rng: &mut SplitMix64, n: usize) -> String {
    let mut out = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS.get(rng.below(WORDS.len())).copied().unwrap_or("the"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word_count(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn prompt_has_the_asked_word_count() {
        for n in [0, 1, 7, 128, 1000] {
            let g = PromptGenerator::new(1, n, 0, 1);
            let p = g.prompt(3);
            assert_eq!(word_count(&p.text), n);
            assert_eq!(p.approx_tokens, n);
        }
        let g = PromptGenerator::new(1, 100, 40, 2);
        assert_eq!(word_count(&g.prompt(0).text), 100);
        assert_eq!(
            word_count(&PromptGenerator::new(1, 40, 40, 2).prompt(5).text),
            40
        );
    }

    #[test]
    fn same_group_shares_the_prefix_and_differs_after_it() {
        let g = PromptGenerator::new(9, 64, 32, 3);
        let prefix = |i: u64| -> Vec<String> {
            g.prompt(i)
                .text
                .split(' ')
                .take(32)
                .map(str::to_string)
                .collect()
        };
        // Requests 0, 3, 6 are in group 0; 1 and 4 in group 1.
        assert_eq!(g.prompt(3).group, 0);
        assert_eq!(prefix(0), prefix(3));
        assert_eq!(prefix(0), prefix(6));
        assert_eq!(prefix(1), prefix(4));
        assert_ne!(prefix(0), prefix(1));
        assert_ne!(prefix(1), prefix(2));
        assert_ne!(
            g.prompt(0).text,
            g.prompt(3).text,
            "unique parts must differ"
        );
    }

    #[test]
    fn no_prefix_means_prompts_differ_from_the_start() {
        let g = PromptGenerator::new(5, 16, 0, 4);
        let first = |i: u64| {
            g.prompt(i)
                .text
                .split(' ')
                .take(4)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_ne!(first(0), first(4));
    }

    #[test]
    fn same_seed_same_prompts() {
        let a = PromptGenerator::new(11, 50, 10, 2);
        let b = PromptGenerator::new(11, 50, 10, 2);
        let c = PromptGenerator::new(12, 50, 10, 2);
        assert_eq!(a.prompt(7), b.prompt(7));
        assert_ne!(a.prompt(7), c.prompt(7));
    }

    #[test]
    fn words_are_single_plain_words() {
        assert!(WORDS
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase())));
        assert!(WORDS.len() >= 200);
    }
}
