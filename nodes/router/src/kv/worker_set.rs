//! The set of workers holding one block, and the prefix walk over such sets.
//!
//! Workers are dense slot numbers (`u32`) handed out by the indexer. Most blocks are held
//! by one or a few workers, so a set starts inline (no allocation); a widely shared block
//! (a system prompt on every worker) becomes a bitset, so intersecting it with the walk's
//! active set costs one AND per 64 workers instead of one probe per worker.

/// Workers kept inline before a set turns into a bitset: three keep the set at 16 bytes,
/// so an index entry is 24 and a million-block index stays in a 32 MiB L3 cache.
const FEW: usize = 3;

#[derive(Debug, Clone)]
pub(crate) enum WorkerSet {
    Few { len: u8, ids: [u32; FEW] },
    Many(Box<Bits>),
}

#[derive(Debug, Clone)]
pub(crate) struct Bits {
    words: Vec<u64>,
    count: u32,
}

impl Default for WorkerSet {
    fn default() -> Self {
        WorkerSet::Few {
            len: 0,
            ids: [0; FEW],
        }
    }
}

fn bit(words: &[u64], slot: u32) -> bool {
    let (w, b) = ((slot / 64) as usize, slot % 64);
    words.get(w).is_some_and(|word| word & (1 << b) != 0)
}

impl WorkerSet {
    pub fn len(&self) -> usize {
        match self {
            WorkerSet::Few { len, .. } => usize::from(*len),
            WorkerSet::Many(bits) => bits.count as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, slot: u32) -> bool {
        match self {
            WorkerSet::Few { len, ids } => ids[..usize::from(*len)].contains(&slot),
            WorkerSet::Many(bits) => bit(&bits.words, slot),
        }
    }

    /// Adds `slot`; false if it was there already.
    pub fn insert(&mut self, slot: u32) -> bool {
        if self.contains(slot) {
            return false;
        }
        match self {
            WorkerSet::Few { len, ids } if usize::from(*len) < FEW => {
                ids[usize::from(*len)] = slot;
                *len += 1;
            }
            WorkerSet::Few { len, ids } => {
                let mut words = Vec::new();
                for &s in ids[..usize::from(*len)].iter().chain([&slot]) {
                    set_bit(&mut words, s);
                }
                *self = WorkerSet::Many(Box::new(Bits {
                    words,
                    count: FEW as u32 + 1,
                }));
            }
            WorkerSet::Many(bits) => {
                set_bit(&mut bits.words, slot);
                bits.count += 1;
            }
        }
        true
    }

    /// Removes `slot`; false if it was not there.
    pub fn remove(&mut self, slot: u32) -> bool {
        match self {
            WorkerSet::Few { len, ids } => {
                let n = usize::from(*len);
                let Some(at) = ids[..n].iter().position(|&s| s == slot) else {
                    return false;
                };
                ids[at] = ids[n - 1];
                *len -= 1;
                true
            }
            WorkerSet::Many(bits) => {
                if !bit(&bits.words, slot) {
                    return false;
                }
                bits.words[(slot / 64) as usize] &= !(1 << (slot % 64));
                bits.count -= 1;
                true
            }
        }
    }
}

fn set_bit(words: &mut Vec<u64>, slot: u32) {
    let w = (slot / 64) as usize;
    if words.len() <= w {
        words.resize(w + 1, 0);
    }
    words[w] |= 1 << (slot % 64);
}

fn first_bit(words: &[u64]) -> Option<u32> {
    let (i, w) = words.iter().enumerate().find(|(_, &w)| w != 0)?;
    Some(i as u32 * 64 + w.trailing_zeros())
}

/// Calls `f` with every set bit's slot.
fn each_bit(words: &[u64], mut f: impl FnMut(u32)) {
    for (i, &word) in words.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            let b = w.trailing_zeros();
            f(i as u32 * 64 + b);
            w &= w - 1;
        }
    }
}

/// The workers still matching every block so far.
enum Active {
    List(Vec<u32>),
    Bits(Vec<u64>),
}

/// Where a walk reports the workers that dropped out, with the depth each reached. A
/// wide group (the many workers holding only a shared system prompt) stays a bitset, so
/// a walk never touches its workers one by one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dropped {
    pub singles: Vec<(u32, u32)>,
    pub groups: Vec<(u32, Vec<u64>)>,
}

impl Dropped {
    fn group(&mut self, depth: u32, words: Vec<u64>) {
        if words.iter().any(|&w| w != 0) {
            self.groups.push((depth, words));
        }
    }

    /// The depth `slot` reached, if it is here.
    pub fn depth_of(&self, slot: u32) -> Option<u32> {
        self.groups
            .iter()
            .find(|(_, words)| bit(words, slot))
            .map(|g| g.0)
            .or_else(|| self.singles.iter().find(|s| s.0 == slot).map(|s| s.1))
    }

    /// Every `(slot, depth)`, groups expanded.
    pub fn for_each(&self, mut f: impl FnMut(u32, u32)) {
        for &(s, d) in &self.singles {
            f(s, d);
        }
        for (d, words) in &self.groups {
            each_bit(words, |s| f(s, *d));
        }
    }

    pub fn len(&self) -> usize {
        let grouped: u32 = self
            .groups
            .iter()
            .flat_map(|g| g.1.iter())
            .map(|w| w.count_ones())
            .sum();
        self.singles.len() + grouped as usize
    }

    /// A slot with the greatest depth, and the depth.
    pub fn deepest(&self) -> Option<(u32, u32)> {
        let single = self.singles.iter().copied().max_by_key(|s| s.1);
        let group = (self.groups.iter())
            .filter_map(|(d, words)| Some((first_bit(words)?, *d)))
            .max_by_key(|g| g.1);
        match (single, group) {
            (Some(s), Some(g)) => Some(if g.1 > s.1 { g } else { s }),
            (s, g) => s.or(g),
        }
    }

    pub fn max_depth(&self) -> u32 {
        let singles = self.singles.iter().map(|s| s.1);
        singles
            .chain(self.groups.iter().map(|g| g.0))
            .max()
            .unwrap_or(0)
    }
}

/// A walk down a request's blocks: the workers that hold all of the first `depth` blocks.
/// Each worker that drops out is reported with the depth it reached.
pub(crate) struct PrefixWalk {
    active: Active,
    depth: u32,
}

impl PrefixWalk {
    /// The walk after the first block, held by `first`.
    pub fn start(first: &WorkerSet) -> Self {
        let active = match first {
            WorkerSet::Few { len, ids } => Active::List(ids[..usize::from(*len)].to_vec()),
            WorkerSet::Many(bits) => Active::Bits(bits.words.clone()),
        };
        PrefixWalk { active, depth: 1 }
    }

    /// One more block, held by `next`: workers not in it leave with the depth so far.
    /// False once no worker is left.
    pub fn step(&mut self, next: &WorkerSet, out: &mut Dropped) -> bool {
        let depth = self.depth;
        let left = match (&mut self.active, next) {
            (Active::List(list), _) => {
                list.retain(|&s| {
                    let keep = next.contains(s);
                    if !keep {
                        out.singles.push((s, depth));
                    }
                    keep
                });
                !list.is_empty()
            }
            (Active::Bits(words), WorkerSet::Few { len, ids }) => {
                let kept: Vec<u32> = ids[..usize::from(*len)]
                    .iter()
                    .copied()
                    .filter(|&s| bit(words, s))
                    .collect();
                for &s in &kept {
                    words[(s / 64) as usize] &= !(1 << (s % 64));
                }
                out.group(depth, std::mem::take(words));
                let left = !kept.is_empty();
                self.active = Active::List(kept);
                left
            }
            (Active::Bits(words), WorkerSet::Many(bits)) => {
                let other = &bits.words;
                let other_at = |i: usize| other.get(i).copied().unwrap_or(0);
                let leaving = words.iter().enumerate().any(|(i, w)| w & !other_at(i) != 0);
                if leaving {
                    let gone = words.iter().enumerate().map(|(i, w)| w & !other_at(i));
                    out.group(depth, gone.collect());
                }
                let mut any = 0;
                for (i, word) in words.iter_mut().enumerate() {
                    *word &= other_at(i);
                    any |= *word;
                }
                any != 0
            }
        };
        if left {
            self.depth += 1;
        }
        left
    }

    /// The walk is over: every worker still active matched `depth` blocks.
    pub fn finish(self, out: &mut Dropped) {
        let depth = self.depth;
        match self.active {
            Active::List(list) => out.singles.extend(list.into_iter().map(|s| (s, depth))),
            Active::Bits(words) => out.group(depth, words),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slots: &[u32]) -> WorkerSet {
        let mut s = WorkerSet::default();
        for &x in slots {
            assert!(s.insert(x));
        }
        s
    }

    #[test]
    fn grows_into_a_bitset_and_shrinks() {
        assert_eq!(
            std::mem::size_of::<WorkerSet>(),
            16,
            "an index entry stays small"
        );
        let mut s = set(&[3, 1, 200]);
        assert!(matches!(s, WorkerSet::Few { .. }));
        assert!(!s.insert(1), "no duplicates");
        assert!(s.insert(7) && s.insert(9) && s.insert(64));
        assert!(matches!(s, WorkerSet::Many(_)));
        assert_eq!(s.len(), 6);
        for x in [1, 3, 7, 9, 64, 200] {
            assert!(s.contains(x), "{x}");
        }
        assert!(!s.contains(2) && !s.contains(100_000));
        assert!(s.remove(200) && !s.remove(200));
        assert_eq!(s.len(), 5);
    }

    fn walk(sets: &[WorkerSet]) -> Vec<(u32, u32)> {
        let mut out = Dropped::default();
        let mut w = PrefixWalk::start(&sets[0]);
        let mut alive = true;
        for s in &sets[1..] {
            if !w.step(s, &mut out) {
                alive = false;
                break;
            }
        }
        if alive {
            w.finish(&mut out);
        }
        let mut flat = Vec::new();
        out.for_each(|s, d| flat.push((s, d)));
        assert_eq!(flat.len(), out.len());
        for &(s, d) in &flat {
            assert_eq!(out.depth_of(s), Some(d));
        }
        assert_eq!(out.max_depth(), flat.iter().map(|f| f.1).max().unwrap_or(0));
        let deepest = out.deepest().map(|d| d.1);
        assert_eq!(deepest, flat.iter().map(|f| f.1).max());
        flat.sort_unstable();
        flat
    }

    #[test]
    fn walk_scores_contiguous_prefixes_across_representations() {
        let wide: Vec<u32> = (0..130).collect();
        let sets = [
            set(&wide),
            set(&(0..70).collect::<Vec<_>>()),
            set(&[5, 69, 129]),
            set(&[69]),
        ];
        let got = walk(&sets);
        let mut want: Vec<(u32, u32)> = (70..130).map(|s| (s, 1)).collect();
        want.extend((0..70).filter(|&s| s != 5 && s != 69).map(|s| (s, 2)));
        want.push((5, 3));
        want.push((69, 4));
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn a_worker_missing_a_middle_block_stops_there() {
        // Worker 2 holds blocks 0 and 2 but not 1: its prefix is 1 block long.
        let sets = [set(&[1, 2]), set(&[1]), set(&[1, 2])];
        assert_eq!(walk(&sets), vec![(1, 3), (2, 1)]);
    }
}
