//! Shared-memory KV pools on one machine.
//!
//! The owner (a prefill worker) keeps its pool in a [`ShmSegment`] (a memfd mapping) and
//! serves it with [`ShmExport`]: a thread answering each connection on an abstract unix
//! socket with the segment's file descriptor (SCM_RIGHTS) and its length. A peer (a decode
//! worker) calls [`ShmPeers::get`] with the export's name; the first call per name maps
//! the segment read-only ([`ShmPeer`]), later calls reuse the mapping.
//!
//! Who may write which block is the callers' protocol: the owner keeps the blocks of a
//! hand-off pinned (not reused, not written) until the peer answered; the peer only reads
//! those. The kernel frees the pages when the last descriptor and mapping are gone.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::announce::{self, Announcer, PeerPool, Peers};
use super::KvTransferError;

/// A memfd-backed shared mapping: a KV pool another process can map.
pub struct ShmSegment {
    file: Arc<File>,
    map: MmapMut,
}

impl ShmSegment {
    /// A zeroed segment of `len` bytes (at least one page); `label` names it in
    /// `/proc/<pid>/fd` (as `memfd:<label>`), nowhere in a file system.
    pub fn create(label: &str, len: usize) -> Result<ShmSegment, KvTransferError> {
        let len = len.max(4096);
        let err = |source| KvTransferError::Create { bytes: len, source };
        let fd =
            memfd_create(label, MFdFlags::MFD_CLOEXEC).map_err(|e| err(std::io::Error::from(e)))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(err)?;
        // SAFETY: the memfd is ours and sized above; other processes only ever map it
        // read-only and read blocks this process does not write while they read them.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }.map_err(err)?;
        Ok(ShmSegment {
            file: Arc::new(file),
            map,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Serves this segment to peers under a fresh name (see [`ShmExport`]).
    pub fn export(&self) -> Result<ShmExport, KvTransferError> {
        ShmExport::start(self.file.clone(), self.map.len())
    }
}

/// Hands a segment's descriptor to every peer that connects to its abstract socket, until
/// dropped. Each peer's connection stays open while the export lives: when it closes (the
/// export dropped, or its process died), the peer forgets its mapping ([`ShmPeers`]).
pub struct ShmExport {
    announcer: Announcer,
}

impl ShmExport {
    fn start(file: Arc<File>, len: usize) -> Result<ShmExport, KvTransferError> {
        let announcer =
            Announcer::start("dynamo-kv", move |conn| send_fd(conn, file.as_fd(), len))?;
        Ok(ShmExport { announcer })
    }

    /// The handle a peer passes to [`ShmPeers::get`].
    pub fn name(&self) -> &str {
        self.announcer.name()
    }
}

fn send_fd(conn: &UnixStream, fd: std::os::fd::BorrowedFd<'_>, len: usize) -> std::io::Result<()> {
    let header = (len as u64).to_le_bytes();
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&header)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// A peer's segment, mapped read-only in this process.
pub struct ShmPeer {
    name: String,
    map: Mmap,
    /// Open while the export lives.
    conn: UnixStream,
}

impl std::fmt::Debug for ShmPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPeer")
            .field("name", &self.name)
            .field("len", &self.map.len())
            .finish()
    }
}

impl ShmPeer {
    /// Connects to the export `name`, receives its descriptor and maps it.
    pub fn connect(name: &str) -> Result<ShmPeer, KvTransferError> {
        let fail = |message: String| KvTransferError::Map {
            name: name.to_string(),
            message,
        };
        let conn = announce::connect(name)?;
        let mut header = [0u8; 8];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut fd = None;
        let got = {
            let mut iov = [IoSliceMut::new(&mut header)];
            let msg = recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(space.as_mut_slice()),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| fail(format!("receiving the descriptor: {e}")))?;
            for cmsg in msg.cmsgs().map_err(|e| fail(e.to_string()))? {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    for raw in fds {
                        // SAFETY: the kernel just installed `raw` in this process for us.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            msg.bytes
        };
        let fd = fd.ok_or_else(|| fail("the export sent no descriptor".into()))?;
        if got != header.len() {
            return Err(fail(format!("a {got}-byte header, not 8")));
        }
        let len = usize::try_from(u64::from_le_bytes(header)).map_err(|e| fail(e.to_string()))?;
        let file = File::from(fd);
        let real = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        if real < len as u64 {
            return Err(fail(format!(
                "the segment has {real} bytes, the export says {len}"
            )));
        }
        // SAFETY: a read-only shared mapping; the owner does not write the blocks we read
        // while a hand-off of them is open (it pins them until we answer).
        let map =
            unsafe { MmapOptions::new().len(len).map(&file) }.map_err(|e| fail(e.to_string()))?;
        Ok(ShmPeer {
            name: name.to_string(),
            map,
            conn,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the export still lives (its connection is open).
    pub fn is_alive(&self) -> bool {
        announce::is_alive(&self.conn)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Block `id` of `block_bytes` bytes, as the pool lays blocks out (back to back).
    pub fn block(&self, id: u32, block_bytes: usize) -> Result<&[u8], KvTransferError> {
        let start = (id as usize).checked_mul(block_bytes);
        start
            .and_then(|s| self.map.get(s..s.checked_add(block_bytes)?))
            .ok_or_else(|| KvTransferError::OutOfRange {
                name: self.name.clone(),
                block: id,
                bytes: block_bytes,
                len: self.map.len(),
            })
    }

    /// The blocks `ids`, in order.
    pub fn blocks(&self, ids: &[u32], block_bytes: usize) -> Result<Vec<&[u8]>, KvTransferError> {
        ids.iter().map(|&id| self.block(id, block_bytes)).collect()
    }
}

impl PeerPool for ShmPeer {
    fn is_alive(&self) -> bool {
        ShmPeer::is_alive(self)
    }
}

/// The peers' segments this process mapped, one mapping per export name.
#[derive(Default)]
pub struct ShmPeers {
    peers: Peers<ShmPeer>,
}

impl ShmPeers {
    pub fn new() -> ShmPeers {
        ShmPeers::default()
    }

    /// The mapping of export `name`, connecting and mapping on first use. Mappings of
    /// exports that went away (a restarted prefill worker's old pool) are dropped here.
    pub fn get(&self, name: &str) -> Result<Arc<ShmPeer>, KvTransferError> {
        self.peers.get_or_open(name, || ShmPeer::connect(name))
    }

    /// Unmaps `name` (its owner went away); the next [`ShmPeers::get`] maps it afresh.
    pub fn forget(&self, name: &str) {
        self.peers.forget(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_maps_the_segment_and_reads_its_blocks() {
        let mut seg = ShmSegment::create("test", 4 * 4096).unwrap();
        for (i, b) in seg.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let export = seg.export().unwrap();
        let peers = ShmPeers::new();
        let peer = peers.get(export.name()).unwrap();
        assert_eq!(peer.len(), seg.len());
        assert_eq!(peer.block(2, 4096).unwrap(), &seg.as_slice()[8192..12288]);
        assert!(
            peer.block(4, 4096).is_err(),
            "a block past the end was read"
        );
        // Written after the mapping: the peer sees it, there is no copy in between.
        seg.as_mut_slice()[8192] = 7;
        assert_eq!(
            peers.get(export.name()).unwrap().block(2, 4096).unwrap()[0],
            7
        );
        let name = export.name().to_string();
        drop(export);
        assert!(!peer.is_alive(), "the peer did not see the export go");
        assert!(
            peers.get(&name).is_err(),
            "a dropped export was mapped again"
        );
        assert!(ShmPeer::connect("dynamo-kv-nobody").is_err());
    }
}
