//! The index's map from block hash to worker set: open addressing with linear probing in
//! one flat array, key and set side by side in a 24-byte slot.
//!
//! Why not a general-purpose map: applying an event is one lookup per block in a table far
//! larger than the L2 cache, so each lookup is a cache miss. Here a lookup touches one slot
//! (one line, rarely two) where a control-byte map touches a control group and a bucket,
//! and the slot of a hash is known before probing, so [`BlockTable::prefetch`] can start a
//! whole event's misses at once with plain loads.
//!
//! A vacant slot holds an empty inline set: the table never stores an empty set (a set
//! that empties is removed), so vacancy is read from the slot itself.

use dynamo_protocol::BlockHash;

use crate::kv::worker_set::WorkerSet;

/// Smallest capacity once anything is stored.
const MIN_CAPACITY: usize = 16;

#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    slots: Vec<(BlockHash, WorkerSet)>,
    /// One byte per slot: 0 if vacant, else 7 bits of its key's hash. A lookup of a block
    /// nobody holds (most requests' first block) reads this 1 MiB array, not a cold slot.
    tags: Vec<u8>,
    len: usize,
}

fn tag(hash: BlockHash) -> u8 {
    ((hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u8) | 0x80
}

fn vacant(set: &WorkerSet) -> bool {
    matches!(set, WorkerSet::Few { len: 0, .. })
}

impl BlockTable {
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The home slot of `hash`: a Fibonacci multiply, so structured keys (small test
    /// numbers) spread as well as xxh3 outputs do.
    fn home(&self, hash: BlockHash) -> usize {
        let bits = self.slots.len().trailing_zeros();
        if bits == 0 {
            return 0;
        }
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// Starts loading the slot of `hash` into the cache, without waiting for it.
    #[inline]
    pub fn prefetch(&self, hash: BlockHash) {
        let i = self.home(hash);
        if let Some(slot) = self.slots.get(i) {
            prefetch_read(slot);
        }
        if let Some(&t) = self.tags.get(i) {
            std::hint::black_box(t);
        }
        // The next slot too: a probe or a removal's backward shift reads it, and it is
        // often on the next cache line.
        if let Some(slot) = self.slots.get((i + 1) & self.mask()) {
            prefetch_read(slot);
        }
    }

    /// The index of `hash`'s slot, if stored.
    fn find(&self, hash: BlockHash) -> Option<usize> {
        let (mask, want) = (self.mask(), tag(hash));
        let mut i = self.home(hash);
        loop {
            let t = *self.tags.get(i)?;
            if t == 0 {
                return None;
            }
            if t == want && self.slots.get(i)?.0 == hash {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    pub fn get(&self, hash: BlockHash) -> Option<&WorkerSet> {
        self.find(hash)
            .and_then(|i| self.slots.get(i))
            .map(|s| &s.1)
    }

    /// Adds `slot` to the workers of `hash`; false if it was there already.
    pub fn insert(&mut self, hash: BlockHash, slot: u32) -> bool {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let Some((key, set)) = self.slots.get_mut(i) else {
                return false;
            };
            if vacant(set) {
                *key = hash;
                self.len += 1;
                if let Some(t) = self.tags.get_mut(i) {
                    *t = tag(hash);
                }
                return set.insert(slot);
            }
            if *key == hash {
                return set.insert(slot);
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
        let Some((_, set)) = self.slots.get_mut(i) else {
            return false;
        };
        if !set.remove(slot) {
            return false;
        }
        if set.is_empty() {
            self.vacate(i);
        }
        true
    }

    /// Empties slot `i` and shifts back the entries after it that probed past it, so
    /// every entry stays reachable from its home without tombstones.
    fn vacate(&mut self, mut i: usize) {
        let mask = self.mask();
        if let Some((key, set)) = self.slots.get_mut(i) {
            *key = 0;
            *set = WorkerSet::default();
        }
        if let Some(t) = self.tags.get_mut(i) {
            *t = 0;
        }
        self.len -= 1;
        let mut j = (i + 1) & mask;
        loop {
            // The tag says whether to read the slot at all: usually not.
            if self.tags.get(j).is_none_or(|&t| t == 0) {
                return;
            }
            let Some((key, _)) = self.slots.get(j) else {
                return;
            };
            let home = self.home(*key);
            // Move j back to i unless its home lies cyclically in (i, j].
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(i) & mask) {
                self.slots.swap(i, j);
                self.tags.swap(i, j);
                i = j;
            }
            j = (j + 1) & mask;
        }
    }

    /// Calls `f` on every set; drops the entries whose set `f` leaves empty. Rebuilds the
    /// table in one pass.
    pub fn retain(&mut self, mut f: impl FnMut(&mut WorkerSet)) {
        let old = std::mem::take(&mut self.slots);
        let capacity = old.len();
        self.slots = vacant_slots(capacity);
        self.tags = vec![0; capacity];
        self.len = 0;
        for (key, mut set) in old {
            if vacant(&set) {
                continue;
            }
            f(&mut set);
            if !set.is_empty() {
                self.place(key, set);
            }
        }
    }

    /// `(hash, set)` of every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (BlockHash, &WorkerSet)> {
        (self.slots.iter())
            .filter(|(_, set)| !vacant(set))
            .map(|(key, set)| (*key, set))
    }

    fn grow(&mut self) {
        let capacity = (self.slots.len() * 2).max(MIN_CAPACITY);
        let old = std::mem::replace(&mut self.slots, vacant_slots(capacity));
        self.tags = vec![0; capacity];
        self.len = 0;
        for (key, set) in old {
            if !vacant(&set) {
                self.place(key, set);
            }
        }
    }

    /// Puts a non-empty `set` of a key not in the table at its first free slot.
    fn place(&mut self, hash: BlockHash, set: WorkerSet) {
        let mask = self.mask();
        let mut i = self.home(hash);
        while let Some(s) = self.slots.get_mut(i) {
            if vacant(&s.1) {
                *s = (hash, set);
                self.len += 1;
                if let Some(t) = self.tags.get_mut(i) {
                    *t = tag(hash);
                }
                return;
            }
            i = (i + 1) & mask;
        }
    }
}

/// `capacity` vacant slots. A large table asks for 2 MiB pages: its lookups land on
/// random pages, and with 4 KiB ones most would also miss the TLB.
fn vacant_slots(capacity: usize) -> Vec<(BlockHash, WorkerSet)> {
    let slots = vec![(0, WorkerSet::default()); capacity];
    advise_huge_pages(&slots);
    slots
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(slots: &[T]) {
    const PAGE: usize = 4096;
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(slots);
    if bytes < 2 * HUGE {
        return;
    }
    let start = slots.as_ptr() as usize;
    let aligned = start.next_multiple_of(PAGE);
    let len = (bytes - (aligned - start)) / PAGE * PAGE;
    // SAFETY: madvise only advises the kernel about pages inside `slots`' allocation
    // (the range is rounded inward to whole pages); it changes no contents. Failure
    // (no THP support) leaves ordinary pages, so its result is ignored.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_slots: &[T]) {}

/// Loads the slot's key into nothing: the load has no dependants, so the CPU issues the
/// misses of a batch together (a prefetch without `unsafe`).
#[inline(always)]
fn prefetch_read(slot: &(BlockHash, WorkerSet)) {
    std::hint::black_box(slot.0);
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
            let held = t.get(k).is_some_and(|s| s.contains(1));
            assert_eq!(held, n % 3 != 0, "key {k}");
        }
        assert!(
            t.get(0).is_some_and(|s| s.contains(2)),
            "another worker kept it"
        );
        t.retain(|s| {
            s.remove(1);
        });
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0]);
    }
}
