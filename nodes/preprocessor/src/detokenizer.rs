//! Incremental detokenization: token ids arrive one step at a time and text leaves as
//! soon as it is complete, never with half a UTF-8 character.
//!
//! The technique is Hugging Face text-generation-inference's: keep a small window of ids
//! `[prefix_offset, read_offset)` that has already been emitted, decode the window with
//! and without the new ids, and emit the difference, unless the decoded text ends in
//! U+FFFD, which is what a byte-level decoder gives for an incomplete character. Then
//! the new ids stay pending until a later id completes the character. Decoding a
//! window rather than single tokens also keeps the leading spaces that SentencePiece
//! decoders strip from the first token of a text.
//!
//! One refinement over TGI: while ids are pending, the text before the trailing U+FFFD
//! run is final (later bytes only complete the incomplete tail), so it is emitted at
//! once. A chain of tokens that each end inside a character (common in CJK text) then
//! streams, and a genuine U+FFFD is held only until the next token.

use crate::tokenizer::{Tokenizer, TokenizerError};

const REPLACEMENT: char = '\u{FFFD}';

/// Anything that turns ids into text, skipping special tokens. The model's [`Tokenizer`]
/// in production; small fakes in tests.
pub trait TokenDecoder {
    fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError>;
}

impl TokenDecoder for Tokenizer {
    fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self.decode_bytes(ids) {
            Some(text) => Ok(text),
            None => self.decode(ids, true),
        }
    }
}

/// The state of one response stream.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    /// Ids from the start of the context window on (older ones are dropped).
    ids: Vec<u32>,
    /// End of the already-emitted context window `ids[..read_offset]`.
    read_offset: usize,
    /// Bytes of text after the window already emitted while ids are pending.
    emitted: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts with `context` (the last few prompt ids) as already-emitted text, so the
    /// first generated token decodes in context (its leading space is kept).
    pub fn with_context(context: &[u32]) -> Self {
        Detokenizer {
            ids: context.to_vec(),
            read_offset: context.len(),
            emitted: 0,
        }
    }

    /// Adds `new_ids` and returns the text that became complete (possibly empty).
    pub fn push<D: TokenDecoder + ?Sized>(
        &mut self,
        decoder: &D,
        new_ids: &[u32],
    ) -> Result<String, TokenizerError> {
        self.ids.extend_from_slice(new_ids);
        if self.ids.len() == self.read_offset {
            return Ok(String::new());
        }
        let prefix = decoder.decode_text(&self.ids[..self.read_offset])?;
        let full = decoder.decode_text(&self.ids)?;
        if full.ends_with(REPLACEMENT) {
            // The last character may be incomplete: keep the ids pending, but let out
            // the final text before the trailing U+FFFD run.
            let start = prefix.len() + self.emitted;
            let stable = full.trim_end_matches(REPLACEMENT);
            if !full.starts_with(&prefix) || stable.len() <= start {
                return Ok(String::new());
            }
            let text = stable.get(start..).unwrap_or_default().to_string();
            self.emitted += text.len();
            return Ok(text);
        }
        if full.len() <= prefix.len() {
            // The new ids decode to nothing (special tokens).
            self.advance();
            return Ok(String::new());
        }
        Ok(self.emit_rest(&full, &prefix))
    }

    /// Everything still pending, at the end of the stream. An incomplete character
    /// comes out as U+FFFD, because no later id can complete it.
    pub fn flush<D: TokenDecoder + ?Sized>(
        &mut self,
        decoder: &D,
    ) -> Result<String, TokenizerError> {
        if self.ids.len() == self.read_offset {
            return Ok(String::new());
        }
        let prefix = decoder.decode_text(&self.ids[..self.read_offset])?;
        let full = decoder.decode_text(&self.ids)?;
        Ok(self.emit_rest(&full, &prefix))
    }

    /// The text after the window not emitted yet; then every id counts as emitted.
    fn emit_rest(&mut self, full: &str, prefix: &str) -> String {
        let rest = suffix_after(full, prefix);
        let text = rest.get(self.emitted..).unwrap_or_default().to_string();
        self.advance();
        text
    }

    /// Everything pushed so far is emitted: the pushed ids become the new context
    /// window, and ids before it are no longer needed.
    fn advance(&mut self) {
        let prefix_offset = self.read_offset;
        self.ids.drain(..prefix_offset);
        self.read_offset = self.ids.len();
        self.emitted = 0;
    }
}

/// `full` minus its leading `prefix`. When the two disagree (a context window that
/// started or ended inside a character) the text after their longest common
/// character prefix, so slicing never lands inside a character.
fn suffix_after(full: &str, prefix: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common: usize = full
        .char_indices()
        .zip(prefix.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    full[common..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level fake: token `i` is one byte `i` (0..=255), token 256+ is special and
    /// decodes to nothing; bytes are decoded lossily, like the ByteLevel decoder.
    struct Bytes;

    impl TokenDecoder for Bytes {
        fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
            let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn ids(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    /// Pushes one id at a time; returns the chunks, the final flush included.
    fn stream(input: &[u32]) -> Vec<String> {
        let mut d = Detokenizer::new();
        let mut out: Vec<String> = input
            .iter()
            .map(|&i| d.push(&Bytes, &[i]).unwrap())
            .collect();
        out.push(d.flush(&Bytes).unwrap());
        out
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "aé😀中 z";
        let chunks = stream(&ids(text));
        assert_eq!(chunks.concat(), text);
        for c in &chunks {
            assert!(!c.contains(REPLACEMENT), "split character in {chunks:?}");
        }
        // The emoji's four bytes come out as one chunk, on its last byte.
        let emoji_at = "aé".len();
        assert_eq!(chunks[emoji_at..emoji_at + 4], ["", "", "", "😀"]);
    }

    #[test]
    fn special_tokens_are_skipped() {
        let mut input = ids("hi");
        input.insert(1, 300);
        input.push(301);
        let chunks = stream(&input);
        assert_eq!(chunks, ["h", "", "i", "", ""]);
    }

    #[test]
    fn incomplete_tail_is_flushed_lossily() {
        let mut input = ids("ok");
        input.push(0xF0);
        input.push(0x9F);
        let chunks = stream(&input);
        assert_eq!(chunks[..4], ["o", "k", "", ""]);
        assert_eq!(chunks[4], "\u{FFFD}");
    }

    #[test]
    fn several_ids_per_push_and_context() {
        let prompt = ids("xyz");
        let mut d = Detokenizer::with_context(&prompt);
        assert_eq!(d.push(&Bytes, &ids("ab")).unwrap(), "ab");
        assert_eq!(d.push(&Bytes, &[0xC3]).unwrap(), "");
        assert_eq!(d.push(&Bytes, &[0xA9, b'!' as u32]).unwrap(), "é!");
        assert_eq!(d.flush(&Bytes).unwrap(), "");
        // The window only keeps what it needs, not the whole stream.
        assert_eq!(d.ids.len(), 3, "{:?}", d.ids);
    }

    #[test]
    fn context_ending_inside_a_character_does_not_panic() {
        // The prompt ends with the first two bytes of "中"; generation completes it.
        let mut d = Detokenizer::with_context(&[b'a' as u32, 0xE4, 0xB8]);
        let out = d.push(&Bytes, &[0xAD, b'b' as u32]).unwrap();
        assert_eq!(out, "中b");
    }

    /// Tokens of several bytes that may end inside a character, like byte-level BPE
    /// merges across character boundaries in CJK text.
    struct Table(&'static [&'static [u8]]);

    impl TokenDecoder for Table {
        fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| self.0[i as usize].iter().copied())
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    #[test]
    fn a_chain_of_split_characters_still_streams() {
        // "a中文字b" where every token ends inside the next character.
        let t = Table(&[b"a\xe4", b"\xb8\xad\xe6", b"\x96\x87\xe5", b"\xad\x97b"]);
        let mut d = Detokenizer::new();
        let chunks: Vec<String> = (0..4).map(|i| d.push(&t, &[i]).unwrap()).collect();
        assert_eq!(chunks, ["a", "中", "文", "字b"]);
        assert_eq!(d.flush(&t).unwrap(), "");
    }

    #[test]
    fn a_genuine_replacement_character_is_held_one_token_at_most() {
        let t = Table(&[b"x\xef\xbf\xbd", b"y", b"\xff"]);
        let mut d = Detokenizer::new();
        assert_eq!(d.push(&t, &[0]).unwrap(), "x");
        assert_eq!(d.push(&t, &[1]).unwrap(), "\u{FFFD}y");
        // An invalid byte at the very end comes out at the flush.
        assert_eq!(d.push(&t, &[2]).unwrap(), "");
        assert_eq!(d.flush(&t).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn suffix_after_handles_disagreeing_prefix() {
        assert_eq!(suffix_after("hello", "he"), "llo");
        assert_eq!(suffix_after("a中b", "a\u{FFFD}"), "中b");
        assert_eq!(suffix_after("abc", ""), "abc");
    }
}
