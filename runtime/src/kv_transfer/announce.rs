//! How a pool's owner and its peers on one machine meet: the owner listens on an abstract
//! unix socket under a fresh name and tells every peer that connects how to reach the pool
//! (a memfd for [`super::shm`], an IPC handle for [`super::cuda`]); the peer keeps its
//! connection open and learns from its closing that the owner is gone ([`Peers`] then
//! forgets the pool). An abstract socket has no file, so nothing is left behind on a crash.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::MsgFlags;

use super::KvTransferError;

static EXPORTS: AtomicU64 = AtomicU64::new(0);

/// Tells every peer that connects how to reach a pool, until dropped. Each peer's
/// connection stays open while the announcer lives.
pub(crate) struct Announcer {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Announcer {
    /// Listens under a fresh name made of `prefix`, the pid and a counter; `tell` writes
    /// what a peer needs on its connection.
    pub(crate) fn start(
        prefix: &str,
        tell: impl Fn(&UnixStream) -> std::io::Result<()> + Send + 'static,
    ) -> Result<Announcer, KvTransferError> {
        let name = format!(
            "{prefix}-{}-{}-{:08x}",
            std::process::id(),
            EXPORTS.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let err = |source| KvTransferError::Export {
            name: name.clone(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        let listener = UnixListener::bind_addr(&addr).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let label = name.clone();
        let thread = std::thread::Builder::new()
            .name("kv-export".into())
            .spawn(move || {
                let mut peers = Vec::new();
                for conn in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(conn) => {
                            // An abstract socket has no file permissions: only a process of
                            // this user may have the pool (it holds other users' prompts).
                            if !same_user(&conn) {
                                tracing::warn!(export = %label, "kv: a process of another user asked for the pool; refused");
                                continue;
                            }
                            match tell(&conn) {
                                Ok(()) => peers.push(conn),
                                Err(e) => tracing::warn!(export = %label, error = %e, "kv: handing the pool to a peer failed"),
                            }
                        }
                        Err(e) => {
                            tracing::warn!(export = %label, error = %e, "kv: accepting a peer failed")
                        }
                    }
                }
            })
            .map_err(err)?;
        Ok(Announcer {
            name,
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees `stop` and closes the socket.
        let woken = SocketAddr::from_abstract_name(self.name.as_bytes())
            .and_then(|addr| UnixStream::connect_addr(&addr))
            .is_ok();
        // Joined, the thread has closed the peers' connections and what `tell` held.
        if let (true, Some(thread)) = (woken, self.thread.take()) {
            let _ = thread.join();
        }
    }
}

fn same_user(conn: &UnixStream) -> bool {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .is_ok_and(|cred| cred.uid() == nix::unistd::getuid().as_raw())
}

/// Connects to the announcer `name`; errors say whether anything answers.
pub(crate) fn connect(name: &str) -> Result<UnixStream, KvTransferError> {
    let fail = |message: String| KvTransferError::Map {
        name: name.to_string(),
        message,
    };
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| fail(e.to_string()))?;
    UnixStream::connect_addr(&addr).map_err(|e| {
        fail(format!(
            "no export answers ({e}); is its process on this machine?"
        ))
    })
}

/// Whether the announcer at the other end of `conn` still lives.
pub(crate) fn is_alive(conn: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    !matches!(
        nix::sys::socket::recv(conn.as_raw_fd(), &mut byte, flags),
        Ok(0) | Err(nix::errno::Errno::ECONNRESET)
    )
}

/// A peer's pool opened in this process, alive while its owner's announcer is.
pub(crate) trait PeerPool: Send + Sync {
    fn is_alive(&self) -> bool;
}

/// The peers' pools this process opened, one per export name.
pub(crate) struct Peers<P> {
    peers: Mutex<HashMap<String, Arc<P>>>,
}

impl<P> Default for Peers<P> {
    fn default() -> Self {
        Peers {
            peers: Mutex::new(HashMap::new()),
        }
    }
}

impl<P: PeerPool> Peers<P> {
    /// The pool `name`, opened by `open` on first use. Pools of exports that went away (a
    /// restarted prefill worker's old pool) are dropped here.
    pub(crate) fn get_or_open(
        &self,
        name: &str,
        open: impl FnOnce() -> Result<P, KvTransferError>,
    ) -> Result<Arc<P>, KvTransferError> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        peers.retain(|_, peer| peer.is_alive());
        if let Some(peer) = peers.get(name) {
            return Ok(peer.clone());
        }
        let peer = Arc::new(open()?);
        peers.insert(name.to_string(), peer.clone());
        Ok(peer)
    }

    /// Forgets `name` (its owner went away); the next `get_or_open` opens it afresh.
    pub(crate) fn forget(&self, name: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(name);
    }
}
