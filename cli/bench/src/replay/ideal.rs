//! The trace's own prefix-reuse ceiling: with an infinite cache shared by all workers, a
//! request hits the longest run of its leading blocks that earlier requests (in trace
//! order) already sent. Counted in tokens, so truncated last blocks count what they hold.

use std::collections::HashMap;

use serde::Serialize;

/// Prefix hits an infinite cache would give the replayed prompts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IdealHitRate {
    pub prompt_tokens: u64,
    pub hit_tokens: u64,
    /// `hit_tokens / prompt_tokens` (0 for no tokens).
    pub token_rate: f64,
    pub blocks: u64,
    /// Leading blocks found whole in the cache.
    pub hit_blocks: u64,
    pub block_rate: f64,
}

/// Walks `(hash_ids, prompt_tokens)` rows in order. A block seen before only in a shorter
/// (truncated) form hits the tokens seen and ends the run.
pub(crate) fn ideal_hit_rate<'a>(
    rows: impl IntoIterator<Item = (&'a [u64], usize)>,
    block_tokens: usize,
) -> IdealHitRate {
    // Block id → the most of its tokens any earlier prompt held.
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut r = IdealHitRate::default();
    for (ids, tokens) in rows {
        let mut left = tokens;
        let mut matching = true;
        for &id in ids {
            let len = left.min(block_tokens);
            if len == 0 {
                break;
            }
            left -= len;
            r.prompt_tokens += len as u64;
            r.blocks += 1;
            let known = seen.get(&id).copied().unwrap_or(0);
            if matching {
                r.hit_tokens += known.min(len) as u64;
                if known >= len {
                    r.hit_blocks += 1;
                } else {
                    matching = false;
                }
            }
            if len > known {
                seen.insert(id, len);
            }
        }
    }
    let rate = |hit: u64, all: u64| {
        if all == 0 {
            0.0
        } else {
            hit as f64 / all as f64
        }
    };
    r.token_rate = rate(r.hit_tokens, r.prompt_tokens);
    r.block_rate = rate(r.hit_blocks, r.blocks);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_hand_made_trace() {
        // Blocks of 4 tokens.
        let rows: Vec<(Vec<u64>, usize)> = vec![
            (vec![0, 1, 2], 12), // cold: 0 hits
            (vec![0, 1, 3], 10), // 0 and 1 hit: 8 tokens, 2 blocks
            (vec![0, 4, 1], 12), // only 0: 1 after a miss does not count
            (vec![5], 2),        // cold, holds 2 tokens of block 5
            (vec![5, 6], 8),     // block 5 known by 2 tokens: 2 hit, run ends
            (vec![0, 1, 3], 12), // 0, 1 whole; 3 was seen with 2 tokens: 4 + 4 + 2
        ];
        let r = ideal_hit_rate(rows.iter().map(|(i, n)| (&i[..], *n)), 4);
        assert_eq!(r.prompt_tokens, 12 + 10 + 12 + 2 + 8 + 12);
        assert_eq!(r.hit_tokens, 8 + 4 + 2 + 10);
        assert_eq!(r.blocks, 3 + 3 + 3 + 1 + 2 + 3);
        assert_eq!(r.hit_blocks, 2 + 1 + 2);
        assert!((r.token_rate - 24.0 / 56.0).abs() < 1e-12);
        assert!((r.block_rate - 5.0 / 15.0).abs() < 1e-12);
    }

    #[test]
    fn empty_and_repeated() {
        assert_eq!(
            ideal_hit_rate(std::iter::empty(), 512),
            IdealHitRate::default()
        );
        let ids = [7u64, 8];
        let r = ideal_hit_rate([(&ids[..], 1024), (&ids[..], 1024)], 512);
        assert_eq!((r.hit_tokens, r.prompt_tokens), (1024, 2048));
        assert!((r.token_rate - 0.5).abs() < 1e-12);
    }
}
