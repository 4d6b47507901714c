//! A fixed-length array of zeroed 16-byte pairs for the KV index's table, on 2 MiB pages
//! when it is large (Linux).
//!
//! Why not a `Vec`: the table's lookups land on random pages, and with 4 KiB pages most
//! of them also miss the TLB. `madvise(MADV_HUGEPAGE)` only helps pages not yet touched,
//! and a `Vec` of a large table is touched before the advice can be given (an allocator
//! may hand back used memory and zero it, or a non-zero initial value is written). A
//! fresh anonymous mapping is zero and untouched, so the advice comes first and the first
//! write to each 2 MiB range faults in a huge page.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Below this a table lives on the heap.
#[cfg(target_os = "linux")]
const MAP_AT_LEAST: usize = 4 << 20;

pub(crate) type Pair = [u64; 2];

/// `len` zeroed pairs.
pub(crate) struct ZeroedPairs {
    ptr: NonNull<Pair>,
    len: usize,
    /// Owned by an anonymous mapping (unmapped on drop), else a leaked `Box<[Pair]>`.
    mapped: bool,
}

// SAFETY: a `ZeroedPairs` owns its memory exclusively, like a `Vec<[u64; 2]>`; shared
// access is only through `&[Pair]`.
unsafe impl Send for ZeroedPairs {}
// SAFETY: as above; `&ZeroedPairs` gives only `&[Pair]`.
unsafe impl Sync for ZeroedPairs {}

impl ZeroedPairs {
    pub fn new(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if let Some(mapped) = Self::map(len) {
            return mapped;
        }
        Self::boxed(len)
    }

    fn boxed(len: usize) -> Self {
        let slice: Box<[Pair]> = vec![[0u64; 2]; len].into_boxed_slice();
        let raw = Box::into_raw(slice);
        ZeroedPairs {
            ptr: NonNull::new(raw.cast::<Pair>()).unwrap_or(NonNull::dangling()),
            len,
            mapped: false,
        }
    }

    #[cfg(target_os = "linux")]
    fn map(len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<Pair>())?;
        if bytes < MAP_AT_LEAST {
            return None;
        }
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is touched. The result is checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: advice on the mapping just made, before anything is written to it; a
        // kernel without transparent huge pages refuses and ordinary pages serve.
        unsafe {
            libc::madvise(ptr, bytes, libc::MADV_HUGEPAGE);
        }
        Some(ZeroedPairs {
            ptr: NonNull::new(ptr.cast::<Pair>())?,
            len,
            mapped: true,
        })
    }
}

impl Default for ZeroedPairs {
    fn default() -> Self {
        Self::boxed(0)
    }
}

impl Deref for ZeroedPairs {
    type Target = [Pair];

    fn deref(&self) -> &[Pair] {
        // SAFETY: `ptr` points at `len` initialised (zeroed or since written) pairs owned
        // by `self` (a mapping or a boxed slice; dangling and aligned when `len` is 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for ZeroedPairs {
    fn deref_mut(&mut self) -> &mut [Pair] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ZeroedPairs {
    fn drop(&mut self) {
        if self.mapped {
            #[cfg(target_os = "linux")]
            // SAFETY: the mapping made in `map`, of exactly this size, unmapped once.
            unsafe {
                libc::munmap(
                    self.ptr.as_ptr().cast(),
                    self.len * std::mem::size_of::<Pair>(),
                );
            }
        } else {
            let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            // SAFETY: `ptr`/`len` came from `Box::into_raw` of a boxed slice in `boxed`
            // and are released once, here.
            drop(unsafe { Box::from_raw(raw) });
        }
    }
}

impl std::fmt::Debug for ZeroedPairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroedPairs")
            .field("len", &self.len)
            .field("mapped", &self.mapped)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_arrays_start_zeroed_and_keep_writes() {
        for len in [0, 16, (8 << 20) / 16] {
            let mut a = ZeroedPairs::new(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|p| *p == [0, 0]));
            if let Some(last) = a.last_mut() {
                *last = [1, 2];
            }
            if len > 0 {
                assert_eq!(a[len - 1], [1, 2]);
            }
        }
        #[cfg(target_os = "linux")]
        assert!(
            ZeroedPairs::new((8 << 20) / 16).mapped,
            "large ones are mapped"
        );
    }
}
