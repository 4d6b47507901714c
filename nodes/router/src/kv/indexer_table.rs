//! The index's map from block hash to worker set: open addressing with linear probing in
//! one flat array of 16-byte slots, the key and its packed worker set side by side.
//!
//! Why not a general-purpose map: applying an event is one lookup per block in a table far
//! larger than the L2 cache, so each lookup is a cache miss. Here a lookup touches one slot
//! (a quarter of a line) where a control-byte map touches a control group and a bucket,
//! and the slot of a hash is known before probing, so [`BlockTable::prefetch`] can start a
//! whole event's misses at once. A set of up to three workers is inline in the slot
//! ([`PackedSet`]); wider ones are bitsets in a side arena ([`WideSets`]).
//!
//! A vacant slot is all zeros (the empty set): the table never stores an empty set (a set
//! that empties is removed), so a fresh zeroed mapping is an empty table.

use dynamo_protocol::BlockHash;

use crate::kv::pages::ZeroedPairs;
use crate::kv::worker_set::{PackedSet, SetRef, WideSets};

/// Smallest capacity once anything is stored.
const MIN_CAPACITY: usize = 16;
/// Fibonacci hashing: structured keys (small test numbers) spread as well as xxh3 outputs.
const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    /// `[key, packed set]` per slot; vacant when the set is 0.
    slots: ZeroedPairs,
    /// `64 - log2(capacity)`: the home slot is the product's top bits.
    shift: u32,
    len: usize,
    wide: WideSets,
}

/// The home slot of `hash`: the top bits of one multiply.
#[inline(always)]
fn home(hash: BlockHash, shift: u32) -> usize {
    (hash.wrapping_mul(MIX) >> shift) as usize
}

impl BlockTable {
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Starts loading the slot of `hash` into the cache, without waiting for it, and the
    /// slot after it: a probe or a removal's backward shift reads it, and a quarter of the
    /// time it is on the next line.
    #[inline]
    pub fn prefetch(&self, hash: BlockHash) {
        let i = home(hash, self.shift);
        if let Some(slot) = self.slots.get(i) {
            prefetch(slot);
        }
        if let Some(next) = self.slots.get((i + 1) & self.mask()) {
            prefetch(next);
        }
    }

    /// Where the slots are now, to prefetch without holding the table (see [`TableView`]).
    pub fn view(&self) -> TableView {
        TableView {
            base: self.slots.as_ptr() as usize,
            len: self.slots.len(),
            shift: self.shift,
        }
    }

    /// The index of `hash`'s slot, if stored.
    #[inline]
    fn find(&self, hash: BlockHash) -> Option<usize> {
        let mask = self.mask();
        let mut i = home(hash, self.shift);
        loop {
            let pair = self.slots.get(i)?;
            if pair[1] == 0 {
                return None;
            }
            if pair[0] == hash {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, hash: BlockHash) -> Option<SetRef<'_>> {
        let slot = self.slots.get(self.find(hash)?)?;
        Some(PackedSet(slot[1]).view(&self.wide))
    }

    /// Whether `slot` holds `hash`.
    #[cfg(test)]
    pub fn contains(&self, hash: BlockHash, slot: u32) -> bool {
        (self.find(hash).and_then(|i| self.slots.get(i)))
            .is_some_and(|s| PackedSet(s[1]).contains(slot, &self.wide))
    }

    /// Adds `slot` to the workers of `hash`; false if it was there already.
    pub fn insert(&mut self, hash: BlockHash, slot: u32) -> bool {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut i = home(hash, self.shift);
        loop {
            let Some(pair) = self.slots.get_mut(i) else {
                return false;
            };
            if pair[1] == 0 {
                *pair = [hash, PackedSet::one(slot, &mut self.wide).0];
                self.len += 1;
                return true;
            }
            if pair[0] == hash {
                let mut set = PackedSet(pair[1]);
                let added = set.insert(slot, &mut self.wide);
                pair[1] = set.0;
                return added;
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes `slot` from the workers of `hash`, and the entry once no worker is left;
    /// false if `slot` did not hold it.
    pub fn remove(&mut self, hash: BlockHash, slot: u32) -> bool {
        let Some(i) = self.find(hash) else {
            return false;
        };
        let Some(pair) = self.slots.get_mut(i) else {
            return false;
        };
        let mut set = PackedSet(pair[1]);
        if !set.remove(slot, &mut self.wide) {
            return false;
        }
        pair[1] = set.0;
        if set.is_empty() {
            self.vacate(i);
        }
        true
    }

    /// Empties slot `i` and shifts back the entries after it that probed past it, so
    /// every entry stays reachable from its home without tombstones.
    fn vacate(&mut self, mut i: usize) {
        let mask = self.mask();
        if let Some(pair) = self.slots.get_mut(i) {
            *pair = [0, 0];
        }
        self.len -= 1;
        let mut j = (i + 1) & mask;
        loop {
            let Some(pair) = self.slots.get(j) else {
                return;
            };
            if pair[1] == 0 {
                return;
            }
            let at = home(pair[0], self.shift);
            // Move j back to i unless its home lies cyclically in (i, j].
            if (j.wrapping_sub(at) & mask) >= (j.wrapping_sub(i) & mask) {
                self.slots.swap(i, j);
                i = j;
            }
            j = (j + 1) & mask;
        }
    }

    /// Takes `slot` out of every set and drops the entries left empty: one pass that
    /// rebuilds the table.
    pub fn remove_everywhere(&mut self, slot: u32) {
        let old = std::mem::take(&mut self.slots);
        self.reset(old.len());
        for pair in old.iter() {
            let mut set = PackedSet(pair[1]);
            if set.is_empty() {
                continue;
            }
            set.remove(slot, &mut self.wide);
            if !set.is_empty() {
                self.place(pair[0], set);
            }
        }
    }

    /// `(hash, set)` of every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (BlockHash, SetRef<'_>)> {
        (self.slots.iter())
            .filter(|pair| pair[1] != 0)
            .map(|pair| (pair[0], PackedSet(pair[1]).view(&self.wide)))
    }

    fn grow(&mut self) {
        let capacity = (self.slots.len() * 2).max(MIN_CAPACITY);
        let old = std::mem::take(&mut self.slots);
        self.reset(capacity);
        for pair in old.iter().filter(|pair| pair[1] != 0) {
            self.place(pair[0], PackedSet(pair[1]));
        }
    }

    /// Empty slots for `capacity` entries (a power of two, or 0); the wide sets stay.
    fn reset(&mut self, capacity: usize) {
        self.slots = ZeroedPairs::new(capacity);
        self.shift = 64 - capacity.max(1).trailing_zeros();
        self.len = 0;
    }

    /// Puts a non-empty `set` of a key not in the table at its first free slot.
    fn place(&mut self, hash: BlockHash, set: PackedSet) {
        let mask = self.mask();
        let mut i = home(hash, self.shift);
        while let Some(pair) = self.slots.get_mut(i) {
            if pair[1] == 0 {
                *pair = [hash, set.0];
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }
}

/// A table's address and shape, copied out so another thread can prefetch a key's home
/// slot before it takes the lock the table lives behind. A stale view (the table grew or
/// was rebuilt since) only prefetches memory that is no longer the table: a prefetch is a
/// hint that never faults, and nothing is read through the view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TableView {
    pub base: usize,
    pub len: usize,
    pub shift: u32,
}

impl TableView {
    /// Starts loading the home slot of `hash` and the slot after it.
    #[inline]
    pub fn prefetch(&self, hash: BlockHash) {
        if self.len == 0 || !(1..64).contains(&self.shift) {
            return;
        }
        let mask = self.len - 1;
        let i = home(hash, self.shift) & mask;
        let size = std::mem::size_of::<crate::kv::pages::Pair>();
        prefetch_addr(self.base.wrapping_add(i * size));
        prefetch_addr(self.base.wrapping_add(((i + 1) & mask) * size));
    }
}

/// Asks for the line at `addr` without waiting for it: a hint, which never faults, so
/// `addr` need not point at anything live.
#[inline(always)]
fn prefetch_addr(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetcht0 reads nothing architecturally and cannot fault, whatever `addr`.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Asks for the line holding `*at` without waiting for it (a hint: never faults).
#[inline(always)]
fn prefetch<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetcht0 reads nothing architecturally and cannot fault; `at` is a valid
    // reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((at as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_removes_and_keeps_every_entry_reachable() {
        let mut t = BlockTable::default();
        let keys: Vec<u64> = (0..5000).map(|k| k * 7919).collect();
        for &k in &keys {
            assert!(t.insert(k, 1));
            assert!(!t.insert(k, 1));
        }
        assert!(t.insert(0, 2));
        assert_eq!(t.len(), keys.len());
        // Remove every third: backward shifts must keep the rest findable.
        for &k in keys.iter().step_by(3) {
            assert!(t.remove(k, 1));
            assert!(!t.remove(k, 1));
        }
        for (n, &k) in keys.iter().enumerate() {
            let held = t.contains(k, 1);
            assert_eq!(held, n % 3 != 0, "key {k}");
        }
        assert!(t.contains(0, 2), "another worker kept it");
        t.remove_everywhere(1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0]);
    }
}
