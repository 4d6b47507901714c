//! Synthetic prompts from hash ids: each id names a fixed block of token ids drawn from a
//! generator seeded by (seed, id), so equal ids give equal tokens and a prompt's shared
//! leading ids give a shared token prefix. A partial block is a prefix of the full one.

use crate::rng::SplitMix64;

/// Smallest token id used: ids below it are the special tokens of usual vocabularies
/// (SmolLM2's are 0..17) and byte-level oddities.
pub const TOKEN_MIN: u32 = 100;
/// One past the largest token id used; SmolLM2's vocabulary has 49,152 ids.
pub const TOKEN_END: u32 = 49_000;

/// The generator stream of token blocks (others use 1..3 for prompts and arrivals).
const BLOCK_STREAM: u64 = 11;

/// Appends the first `len` tokens of block `hash_id` to `out`.
pub(crate) fn push_block(seed: u64, hash_id: u64, len: usize, out: &mut Vec<u32>) {
    let mut g = SplitMix64::derived(seed, BLOCK_STREAM, hash_id);
    let span = (TOKEN_END - TOKEN_MIN) as usize;
    out.extend((0..len).map(|_| TOKEN_MIN + g.below(span) as u32));
}

/// The prompt of a row: full blocks for every id but the last, which holds the rest of
/// `prompt_tokens`. Ids beyond what `prompt_tokens` needs are ignored.
pub(crate) fn prompt_tokens(
    seed: u64,
    hash_ids: &[u64],
    prompt_tokens: usize,
    block_tokens: usize,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(prompt_tokens);
    for &id in hash_ids {
        let len = (prompt_tokens - out.len()).min(block_tokens);
        if len == 0 {
            break;
        }
        push_block(seed, id, len, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_hash_same_tokens_different_hash_different_tokens() {
        let a = prompt_tokens(0, &[5, 6], 1024, 512);
        let b = prompt_tokens(0, &[5, 7], 1024, 512);
        assert_eq!(a.len(), 1024);
        assert_eq!(a[..512], b[..512], "shared first id, shared first block");
        assert_ne!(a[512..], b[512..]);
        assert_eq!(a, prompt_tokens(0, &[5, 6], 1024, 512), "deterministic");
        assert_ne!(a, prompt_tokens(1, &[5, 6], 1024, 512), "the seed matters");
        // Same id at another position is the same block.
        let c = prompt_tokens(0, &[6], 512, 512);
        assert_eq!(c[..], a[512..]);
    }

    #[test]
    fn last_block_is_truncated_and_lengths_are_exact() {
        for len in [1usize, 511, 512, 513, 1000, 1536] {
            let ids: Vec<u64> = (0..len.div_ceil(512) as u64).collect();
            let p = prompt_tokens(3, &ids, len, 512);
            assert_eq!(p.len(), len);
            let full = prompt_tokens(3, &ids, ids.len() * 512, 512);
            assert_eq!(
                p[..],
                full[..len],
                "a partial block is a prefix of the full one"
            );
        }
        assert_eq!(prompt_tokens(0, &[1, 2, 3], 600, 512).len(), 600);
        assert_eq!(prompt_tokens(0, &[1], 600, 512).len(), 512, "ids run out");
    }

    #[test]
    fn ids_stay_in_the_ordinary_range() {
        let p = prompt_tokens(9, &(0..64).collect::<Vec<u64>>(), 64 * 512, 512);
        assert!(p.iter().all(|&t| (TOKEN_MIN..TOKEN_END).contains(&t)));
        let distinct: std::collections::BTreeSet<u32> = p.iter().copied().collect();
        assert!(distinct.len() > 10_000, "{} distinct ids", distinct.len());
    }
}
