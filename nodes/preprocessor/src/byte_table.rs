//! Decoding byte-level BPE ids without the tokenizer's decode pipeline: a table from id
//! to the bytes it stands for, built once. For byte-level BPE (GPT-2, SmolLM2) this is
//! exactly what `Tokenizer::decode(ids, skip_special_tokens = true)` computes — the bytes
//! of each ordinary token concatenated, special tokens skipped, invalid UTF-8 as U+FFFD —
//! at a fraction of the cost, which matters because the detokenizer decodes a small window
//! twice per streamed token.

use std::collections::HashMap;

/// GPT-2's map from the printable characters byte-level BPE uses back to bytes.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, u8::try_from(b).ok()?)))
        .collect()
}

/// Bytes of every id; `None` for special tokens, which decoding skips.
#[derive(Debug, Clone)]
pub struct ByteTable {
    bytes: Vec<Option<Box<[u8]>>>,
}

impl ByteTable {
    /// `tokens[id]` is the token's byte-level string; `special` ids are skipped;
    /// `literal` ids (added, non-special tokens) decode as their own text.
    pub fn new(tokens: &[&str], special: &[u32], literal: &[u32]) -> Option<ByteTable> {
        let map = unicode_to_byte();
        let mut bytes = Vec::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            let id32 = u32::try_from(id).ok()?;
            if special.contains(&id32) {
                bytes.push(None);
            } else if literal.contains(&id32) {
                bytes.push(Some(tok.as_bytes().into()));
            } else {
                // A character outside the byte alphabet means this is not byte-level BPE.
                let b: Option<Vec<u8>> = tok.chars().map(|c| map.get(&c).copied()).collect();
                bytes.push(Some(b?.into()));
            }
        }
        Some(ByteTable { bytes })
    }

    /// The bytes `id` stands for; `None` for a special token or an id outside the table.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(usize::try_from(id).ok()?)?.as_deref()
    }

    /// The text of `ids`, skipping special tokens; `None` for an id outside the table.
    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(b) = self.bytes.get(usize::try_from(id).ok()?)? {
                out.extend_from_slice(b);
            }
        }
        Some(match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_a_bijection() {
        let m = unicode_to_byte();
        assert_eq!(m.len(), 256);
        let mut bytes: Vec<u8> = m.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(m.get(&'Ġ'), Some(&b' '));
        assert_eq!(m.get(&'Ċ'), Some(&b'\n'));
        assert_eq!(m.get(&'a'), Some(&b'a'));
    }

    #[test]
    fn decodes_like_byte_level_bpe() {
        // "é" is C3 A9: byte-level chars 'Ã' (C3) and '©' (A9).
        let t = ByteTable::new(&["Ġhi", "Ã", "©", "<s>", "<x>"], &[3], &[4]).expect("byte-level");
        assert_eq!(t.decode(&[0, 1, 2]).as_deref(), Some(" hié"));
        assert_eq!(
            t.decode(&[0, 1]).as_deref(),
            Some(" hi\u{FFFD}"),
            "an incomplete character"
        );
        assert_eq!(
            t.decode(&[3, 0]).as_deref(),
            Some(" hi"),
            "special tokens are skipped"
        );
        assert_eq!(
            t.decode(&[4]).as_deref(),
            Some("<x>"),
            "literal added tokens are text"
        );
        assert_eq!(t.decode(&[9]), None);
        assert!(
            ByteTable::new(&["日本"], &[], &[]).is_none(),
            "not byte-level"
        );
    }
}
