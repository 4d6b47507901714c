//! The set of workers holding one block, and the prefix walk over such sets.
//!
//! Workers are dense slot numbers (`u32`) handed out by the indexer. Most blocks are held
//! by one or a few workers, so a set is packed into one `u64` (up to three 16-bit slots
//! and a count) and the table's slot is 16 bytes; a widely shared block (a system prompt
//! on every worker) keeps a bitset in a side arena ([`WideSets`]), so intersecting it with
//! the walk's active set costs one AND per 64 workers instead of one probe per worker.

/// Workers kept inline before a set turns into a bitset.
const FEW: usize = 3;
/// Inline slots are 16 bits; a worker with a larger slot is only ever in a bitset.
const INLINE_LIMIT: u32 = 1 << 16;
/// Set in a wide set's word; the low 32 bits are then its index in [`WideSets`].
const WIDE: u64 = 1 << 63;
const LEN_SHIFT: u32 = 48;

/// One block's workers in a `u64`, as the table stores them: either up to three 16-bit
/// slots (bits 0–47) and their count (bits 48–49), or [`WIDE`] and the index of a bitset.
/// The empty set is 0, so a zeroed table is a vacant one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PackedSet(pub u64);

/// A wide set: one bit per worker slot, and how many are set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bits {
    words: Vec<u64>,
    count: u32,
}

/// The bitsets of the wide sets, by index; freed ones are reused (their words kept,
/// zeroed), so a block that keeps gaining and losing holders does not allocate each time.
#[derive(Debug, Default)]
pub(crate) struct WideSets {
    sets: Vec<Bits>,
    free: Vec<u32>,
}

impl WideSets {
    /// Wide sets in use.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sets.len() - self.free.len()
    }

    fn alloc(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.sets.push(Bits::default());
        (self.sets.len() - 1) as u32
    }

    fn release(&mut self, i: u32) {
        if let Some(bits) = self.sets.get_mut(i as usize) {
            bits.words.fill(0);
            bits.count = 0;
            self.free.push(i);
        }
    }
}

/// A set read out of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SetRef<'a> {
    Few { len: u8, ids: [u32; FEW] },
    Many(&'a Bits),
}

fn bit(words: &[u64], slot: u32) -> bool {
    let (w, b) = ((slot / 64) as usize, slot % 64);
    words.get(w).is_some_and(|word| word & (1 << b) != 0)
}

fn set_bit(words: &mut Vec<u64>, slot: u32) {
    let w = (slot / 64) as usize;
    if words.len() <= w {
        words.resize(w + 1, 0);
    }
    words[w] |= 1 << (slot % 64);
}

impl PackedSet {
    pub const EMPTY: PackedSet = PackedSet(0);

    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    #[inline]
    fn wide_index(self) -> Option<u32> {
        (self.0 & WIDE != 0).then_some(self.0 as u32)
    }

    #[inline]
    fn inline_len(self) -> usize {
        ((self.0 >> LEN_SHIFT) & 0x3) as usize
    }

    #[inline]
    fn inline_id(self, k: usize) -> u32 {
        ((self.0 >> (16 * k)) & 0xFFFF) as u32
    }

    /// Whether `slot` is among the inline ids.
    #[inline]
    fn inline_has(self, slot: u32) -> bool {
        slot < INLINE_LIMIT && (0..self.inline_len()).any(|k| self.inline_id(k) == slot)
    }

    /// The set of `slot` alone.
    #[inline]
    pub fn one(slot: u32, wide: &mut WideSets) -> PackedSet {
        if slot < INLINE_LIMIT {
            return PackedSet(u64::from(slot) | (1 << LEN_SHIFT));
        }
        let mut set = PackedSet::EMPTY;
        set.insert(slot, wide);
        set
    }

    #[inline]
    pub fn view(self, wide: &WideSets) -> SetRef<'_> {
        match self.wide_index() {
            Some(i) => match wide.sets.get(i as usize) {
                Some(bits) => SetRef::Many(bits),
                None => SetRef::Few {
                    len: 0,
                    ids: [0; FEW],
                },
            },
            None => {
                let len = self.inline_len();
                let mut ids = [0; FEW];
                for (k, id) in ids.iter_mut().enumerate().take(len) {
                    *id = self.inline_id(k);
                }
                SetRef::Few {
                    len: len as u8,
                    ids,
                }
            }
        }
    }

    #[cfg(test)]
    pub fn contains(self, slot: u32, wide: &WideSets) -> bool {
        match self.wide_index() {
            Some(i) => wide
                .sets
                .get(i as usize)
                .is_some_and(|b| bit(&b.words, slot)),
            None => self.inline_has(slot),
        }
    }

    /// Adds `slot`; false if it was there already.
    #[inline]
    pub fn insert(&mut self, slot: u32, wide: &mut WideSets) -> bool {
        if let Some(i) = self.wide_index() {
            let Some(bits) = wide.sets.get_mut(i as usize) else {
                return false;
            };
            if bit(&bits.words, slot) {
                return false;
            }
            set_bit(&mut bits.words, slot);
            bits.count += 1;
            return true;
        }
        if self.inline_has(slot) {
            return false;
        }
        let len = self.inline_len();
        if len < FEW && slot < INLINE_LIMIT {
            let cleared = self.0 & !(0x3 << LEN_SHIFT);
            self.0 = cleared | (u64::from(slot) << (16 * len)) | ((len as u64 + 1) << LEN_SHIFT);
            return true;
        }
        // Full, or a slot too large to be inline: the set becomes a bitset.
        let i = wide.alloc();
        let Some(bits) = wide.sets.get_mut(i as usize) else {
            return false;
        };
        for k in 0..len {
            set_bit(&mut bits.words, self.inline_id(k));
        }
        set_bit(&mut bits.words, slot);
        bits.count = len as u32 + 1;
        self.0 = WIDE | u64::from(i);
        true
    }

    /// Removes `slot`; false if it was not there. A bitset left empty is freed.
    #[inline]
    pub fn remove(&mut self, slot: u32, wide: &mut WideSets) -> bool {
        if let Some(i) = self.wide_index() {
            let Some(bits) = wide.sets.get_mut(i as usize) else {
                return false;
            };
            if !bit(&bits.words, slot) {
                return false;
            }
            bits.words[(slot / 64) as usize] &= !(1 << (slot % 64));
            bits.count -= 1;
            if bits.count == 0 {
                wide.release(i);
                *self = PackedSet::EMPTY;
            }
            return true;
        }
        let len = self.inline_len();
        let Some(at) = (0..len).find(|&k| slot < INLINE_LIMIT && self.inline_id(k) == slot) else {
            return false;
        };
        // The last id moves into the hole; the last field and the count shrink.
        let last = u64::from(self.inline_id(len - 1));
        let mut word = self.0 & !(0xFFFF << (16 * at));
        word |= last << (16 * at);
        word &= !(0xFFFF << (16 * (len - 1)));
        word = (word & !(0x3 << LEN_SHIFT)) | ((len as u64 - 1) << LEN_SHIFT);
        // An emptied set comes out all zeros: vacant.
        self.0 = word;
        true
    }
}

impl SetRef<'_> {
    pub fn contains(&self, slot: u32) -> bool {
        match self {
            SetRef::Few { len, ids } => ids[..usize::from(*len)].contains(&slot),
            SetRef::Many(bits) => bit(&bits.words, slot),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        match self {
            SetRef::Few { len, .. } => usize::from(*len),
            SetRef::Many(bits) => bits.count as usize,
        }
    }
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

/// Up to [`FEW`] slots, inline.
#[derive(Debug, Clone, Copy, Default)]
struct Short<T: Copy + Default> {
    len: u8,
    items: [T; FEW],
}

impl<T: Copy + Default> Short<T> {
    fn as_slice(&self) -> &[T] {
        &self.items[..usize::from(self.len)]
    }

    fn push(&mut self, item: T) {
        if let Some(at) = self.items.get_mut(usize::from(self.len)) {
            *at = item;
            self.len += 1;
        }
    }
}

/// The workers still matching every block so far. A list comes from a set of at most
/// [`FEW`] and only shrinks, so it stays inline.
enum Active {
    List(Short<u32>),
    Bits(Vec<u64>),
}

/// Where a walk reports the workers that dropped out, with the depth each reached. A
/// wide group (the many workers holding only a shared system prompt) stays a bitset, so
/// a walk never touches its workers one by one. At most [`FEW`] workers are ever single
/// (they come from one short list), so a walk over inline sets allocates nothing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dropped {
    singles: Short<(u32, u32)>,
    groups: Vec<(u32, Vec<u64>)>,
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
            .or_else(|| {
                let singles = self.singles.as_slice();
                singles.iter().find(|s| s.0 == slot).map(|s| s.1)
            })
    }

    /// Every `(slot, depth)`, groups expanded.
    pub fn for_each(&self, mut f: impl FnMut(u32, u32)) {
        for &(s, d) in self.singles.as_slice() {
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
        usize::from(self.singles.len) + grouped as usize
    }

    /// A slot with the greatest depth, and the depth.
    pub fn deepest(&self) -> Option<(u32, u32)> {
        let single = self.singles.as_slice().iter().copied().max_by_key(|s| s.1);
        let group = (self.groups.iter())
            .filter_map(|(d, words)| Some((first_bit(words)?, *d)))
            .max_by_key(|g| g.1);
        match (single, group) {
            (Some(s), Some(g)) => Some(if g.1 > s.1 { g } else { s }),
            (s, g) => s.or(g),
        }
    }

    pub fn max_depth(&self) -> u32 {
        let singles = self.singles.as_slice().iter().map(|s| s.1);
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
    pub fn start(first: SetRef<'_>) -> Self {
        let active = match first {
            SetRef::Few { len, ids } => Active::List(Short { len, items: ids }),
            SetRef::Many(bits) => Active::Bits(bits.words.clone()),
        };
        PrefixWalk { active, depth: 1 }
    }

    /// One more block, held by `next`: workers not in it leave with the depth so far.
    /// False once no worker is left.
    pub fn step(&mut self, next: SetRef<'_>, out: &mut Dropped) -> bool {
        let depth = self.depth;
        let left = match (&mut self.active, next) {
            (Active::List(list), _) => {
                let mut kept = Short::default();
                for &s in list.as_slice() {
                    if next.contains(s) {
                        kept.push(s);
                    } else {
                        out.singles.push((s, depth));
                    }
                }
                *list = kept;
                list.len > 0
            }
            (Active::Bits(words), SetRef::Few { len, ids }) => {
                let mut kept = Short::default();
                for &s in &ids[..usize::from(len)] {
                    if bit(words, s) {
                        kept.push(s);
                        words[(s / 64) as usize] &= !(1 << (s % 64));
                    }
                }
                out.group(depth, std::mem::take(words));
                self.active = Active::List(kept);
                kept.len > 0
            }
            (Active::Bits(words), SetRef::Many(bits)) => {
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
            Active::List(list) => {
                for &s in list.as_slice() {
                    out.singles.push((s, depth));
                }
            }
            Active::Bits(words) => out.group(depth, words),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slots: &[u32], wide: &mut WideSets) -> PackedSet {
        let mut s = PackedSet::EMPTY;
        for &x in slots {
            assert!(s.insert(x, wide));
        }
        s
    }

    fn sorted(s: PackedSet, wide: &WideSets) -> Vec<u32> {
        let mut out = match s.view(wide) {
            SetRef::Few { len, ids } => ids[..usize::from(len)].to_vec(),
            SetRef::Many(bits) => {
                let mut v = Vec::new();
                each_bit(&bits.words, |x| v.push(x));
                v
            }
        };
        out.sort_unstable();
        out
    }

    #[test]
    fn grows_into_a_bitset_and_shrinks() {
        let mut wide = WideSets::default();
        let mut s = set(&[3, 1, 200], &mut wide);
        assert!(matches!(s.view(&wide), SetRef::Few { len: 3, .. }));
        assert_eq!(wide.len(), 0, "three stay inline");
        assert!(!s.insert(1, &mut wide), "no duplicates");
        assert!(s.insert(7, &mut wide) && s.insert(9, &mut wide) && s.insert(64, &mut wide));
        assert!(matches!(s.view(&wide), SetRef::Many(_)));
        assert_eq!(s.view(&wide).len(), 6);
        for x in [1, 3, 7, 9, 64, 200] {
            assert!(s.contains(x, &wide), "{x}");
        }
        assert!(!s.contains(2, &wide) && !s.contains(100_000, &wide));
        assert!(s.remove(200, &mut wide) && !s.remove(200, &mut wide));
        assert_eq!(s.view(&wide).len(), 5);
        for x in [1, 3, 7, 9, 64] {
            assert!(s.remove(x, &mut wide), "{x}");
        }
        assert_eq!(
            s,
            PackedSet::EMPTY,
            "an emptied bitset leaves a vacant word"
        );
        assert_eq!(wide.len(), 0, "and is freed");
        // The freed bitset is reused, zeroed.
        let t = set(&[5, 6, 7, 8], &mut wide);
        assert_eq!(sorted(t, &wide), vec![5, 6, 7, 8]);
        assert_eq!(wide.sets.len(), 1);
    }

    #[test]
    fn inline_removal_keeps_the_others_and_empties_to_zero() {
        let mut wide = WideSets::default();
        for gone in [10, 20, 30] {
            let mut s = set(&[10, 20, 30], &mut wide);
            assert!(s.remove(gone, &mut wide));
            assert!(!s.remove(gone, &mut wide) && !s.contains(gone, &wide));
            let mut want = vec![10, 20, 30];
            want.retain(|&x| x != gone);
            assert_eq!(sorted(s, &wide), want);
            for x in want {
                assert!(s.remove(x, &mut wide));
            }
            assert_eq!(s.0, 0, "vacant is all zeros");
        }
        // Slot 0 is a worker like any other: a set of it alone is not vacant.
        let s = set(&[0], &mut wide);
        assert!(!s.is_empty() && s.contains(0, &wide));
        assert_eq!(wide.len(), 0);
    }

    #[test]
    fn slots_past_sixteen_bits_go_to_a_bitset() {
        let mut wide = WideSets::default();
        let mut s = PackedSet::one(70_000, &mut wide);
        assert!(matches!(s.view(&wide), SetRef::Many(_)));
        assert!(s.contains(70_000, &wide) && !s.contains(70_000 - 65_536, &wide));
        let mut t = set(&[4, 70_000 - 65_536], &mut wide);
        assert!(!t.contains(70_000, &wide), "no aliasing on the low 16 bits");
        assert!(!t.remove(70_000, &mut wide));
        assert!(t.insert(70_000, &mut wide));
        assert_eq!(sorted(t, &wide), vec![4, 70_000 - 65_536, 70_000]);
        assert!(s.remove(70_000, &mut wide) && s.is_empty());
    }

    fn walk(slots: &[&[u32]]) -> Vec<(u32, u32)> {
        let mut wide = WideSets::default();
        let sets: Vec<PackedSet> = slots.iter().map(|s| set(s, &mut wide)).collect();
        let mut out = Dropped::default();
        let mut w = PrefixWalk::start(sets[0].view(&wide));
        let mut alive = true;
        for s in &sets[1..] {
            if !w.step(s.view(&wide), &mut out) {
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
        let seventy: Vec<u32> = (0..70).collect();
        let got = walk(&[&wide, &seventy, &[5, 69, 129], &[69]]);
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
        assert_eq!(walk(&[&[1, 2], &[1], &[1, 2]]), vec![(1, 3), (2, 1)]);
        assert_eq!(
            walk(&[&[1, 2, 3], &[3, 1], &[3]]),
            vec![(1, 2), (2, 1), (3, 3)]
        );
    }
}
