//! The receiving side: a TCP listener serving registered endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BulkField, CallHead, CALL, CANCEL, FRAME_HEAD, MAX_BULK, MAX_HEAD, PREFACE};
use crate::transport::ServerError;
use crate::{Message, RequestContext, ServeError, Service};

/// Serves endpoints whose requests carry bulk bytes ([`super`]) until a shutdown token
/// fires; then it refuses new calls, waits up to the drain timeout for the ones in flight
/// and closes its connections.
pub struct BulkServer<Req, Resp> {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    endpoints: HashMap<String, Arc<dyn Service<Req, Resp>>>,
    field: BulkField<Req>,
    drain_timeout: Duration,
}

/// What every connection of one server shares.
struct Shared<Req, Resp> {
    endpoints: HashMap<String, Arc<dyn Service<Req, Resp>>>,
    field: BulkField<Req>,
    /// Fires at shutdown: new calls are refused.
    draining: CancellationToken,
    calls: TaskTracker,
}

impl<Req: Message, Resp: Message> BulkServer<Req, Resp> {
    /// Listens on `addr` (`host:port`; port 0 lets the kernel pick).
    pub fn bind(addr: &str, field: BulkField<Req>) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::BindTcp {
            addr: addr.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(BulkServer {
            listener,
            addr,
            endpoints: HashMap::new(),
            field,
            drain_timeout: Duration::from_secs(10),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn register(
        &mut self,
        endpoint: &str,
        service: Arc<dyn Service<Req, Resp>>,
    ) -> Result<(), ServerError> {
        if self.endpoints.contains_key(endpoint) {
            return Err(ServerError::DuplicateEndpoint(endpoint.to_string()));
        }
        self.endpoints.insert(endpoint.to_string(), service);
        Ok(())
    }

    pub async fn serve(self, shutdown: CancellationToken) {
        let listener = match TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(addr = %self.addr, error = %e, "cannot serve bulk calls");
                return;
            }
        };
        let shared = Arc::new(Shared {
            endpoints: self.endpoints,
            field: self.field,
            draining: shutdown.clone(),
            calls: TaskTracker::new(),
        });
        let connections = CancellationToken::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let (shared, stop) = (shared.clone(), connections.child_token());
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, &shared, stop).await {
                            tracing::warn!(%peer, error = %e, "closing bulk connection");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(addr = %self.addr, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        shared.calls.close();
        if tokio::time::timeout(self.drain_timeout, shared.calls.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = shared.calls.len(),
                "drain timeout elapsed; cancelling the remaining bulk calls"
            );
        }
        connections.cancel();
    }
}

/// One connection: reads calls until the client closes it, `stop` fires or a frame is
/// malformed (`Err`, which closes it). Its calls are cancelled when it ends.
async fn serve_connection<Req: Message, Resp: Message>(
    stream: TcpStream,
    shared: &Arc<Shared<Req, Resp>>,
    stop: CancellationToken,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (replies, queue) = mpsc::channel(64);
    tokio::spawn(write_replies(wr, queue, stop.clone()));
    let calls: Arc<Mutex<HashMap<u64, CancellationToken>>> = Arc::default();
    let result = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        r = read_calls(&mut rd, shared, &replies, &calls, &stop) => r,
    };
    stop.cancel();
    result
}

async fn read_calls<Req: Message, Resp: Message>(
    rd: &mut (impl AsyncRead + Unpin),
    shared: &Arc<Shared<Req, Resp>>,
    replies: &mpsc::Sender<Vec<u8>>,
    calls: &Arc<Mutex<HashMap<u64, CancellationToken>>>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut preface = [0u8; PREFACE.len()];
    rd.read_exact(&mut preface)
        .await
        .map_err(|e| format!("reading the preface: {e}"))?;
    if &preface != PREFACE {
        return Err(format!("not a bulk-call client (preface {preface:02x?})"));
    }
    loop {
        let mut fh = [0u8; FRAME_HEAD];
        // A clean end is a close between frames.
        if rd.read(&mut fh[..1]).await.map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        rd.read_exact(&mut fh[1..])
            .await
            .map_err(|e| format!("reading a frame head: {e}"))?;
        let head_len = u32::from_le_bytes([fh[1], fh[2], fh[3], fh[4]]) as usize;
        let mut bulk_len = [0u8; 8];
        bulk_len.copy_from_slice(&fh[5..]);
        let bulk_len = u64::from_le_bytes(bulk_len);
        if head_len > MAX_HEAD || bulk_len > MAX_BULK {
            return Err(format!(
                "a frame of {head_len} + {bulk_len} bytes exceeds the limits ({MAX_HEAD} + {MAX_BULK})"
            ));
        }
        let mut head = vec![0u8; head_len];
        rd.read_exact(&mut head)
            .await
            .map_err(|e| format!("reading a frame: {e}"))?;
        match fh[0] {
            CANCEL => {
                let id = <[u8; 8]>::try_from(head.as_slice())
                    .ok()
                    .filter(|_| bulk_len == 0)
                    .ok_or_else(|| format!("a cancel frame of {head_len} + {bulk_len} bytes"))?;
                if let Some(token) = lock(calls).remove(&u64::from_le_bytes(id)) {
                    token.cancel();
                }
            }
            CALL => {
                let bulk = read_bulk(rd, bulk_len as usize).await?;
                let head: CallHead<Req> =
                    postcard::from_bytes(&head).map_err(|e| format!("a malformed call: {e}"))?;
                start_call(head, bulk, shared, replies, calls, stop);
            }
            other => return Err(format!("unknown frame kind {other}")),
        }
    }
}

/// Reads `len` bytes into a buffer of exactly that capacity (never zeroed first, never
/// grown: the bytes land where the service will find them).
async fn read_bulk(rd: &mut (impl AsyncRead + Unpin), len: usize) -> Result<Vec<u8>, String> {
    let mut bulk = Vec::with_capacity(len);
    while bulk.len() < len {
        let left = (len - bulk.len()) as u64;
        let n = (&mut *rd)
            .take(left)
            .read_buf(&mut bulk)
            .await
            .map_err(|e| format!("reading bulk bytes: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the connection ended after {} of {len} bulk bytes",
                bulk.len()
            ));
        }
    }
    Ok(bulk)
}

fn start_call<Req: Message, Resp: Message>(
    head: CallHead<Req>,
    bulk: Vec<u8>,
    shared: &Arc<Shared<Req, Resp>>,
    replies: &mpsc::Sender<Vec<u8>>,
    calls: &Arc<Mutex<HashMap<u64, CancellationToken>>>,
    stop: &CancellationToken,
) {
    let CallHead {
        call,
        endpoint,
        request_id,
        traceparent,
        mut request,
    } = head;
    (shared.field.put)(&mut request, bulk);
    let service = shared.endpoints.get(&endpoint).cloned();
    let draining = shared.draining.is_cancelled();
    let token = stop.child_token();
    lock(calls).insert(call, token.clone());
    let (replies, calls) = (replies.clone(), calls.clone());
    let known = || {
        let mut known: Vec<&str> = shared.endpoints.keys().map(String::as_str).collect();
        known.sort_unstable();
        known.join(", ")
    };
    let refused = match (&service, draining) {
        (None, _) => Some(ServeError::new(
            crate::ErrorKind::NotFound,
            format!(
                "unknown endpoint `{endpoint}`; this server has: {}",
                known()
            ),
        )),
        (Some(_), true) => Some(ServeError::unavailable("server is shutting down")),
        _ => None,
    };
    shared.calls.spawn(async move {
        let answer = match (service, refused) {
            (Some(service), None) => {
                let ctx = RequestContext::with_token(request_id, traceparent, token);
                let mut answers = service.call(request, ctx);
                answers.next().await.unwrap_or_else(|| {
                    Err(ServeError::unavailable(format!(
                        "`{endpoint}` ended without an answer"
                    )))
                })
            }
            (_, Some(refused)) => Err(refused),
            (None, None) => Err(ServeError::internal("no service")),
        };
        lock(&calls).remove(&call);
        match postcard::to_allocvec(&(call, &answer)) {
            Ok(body) => {
                let _ = replies.send(body).await;
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a bulk call's answer"),
        }
    });
}

/// Writes each reply body with its length until the queue closes or `stop` fires.
async fn write_replies(
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    stop: CancellationToken,
) {
    loop {
        let body = tokio::select! {
            _ = stop.cancelled() => break,
            b = queue.recv() => match b { Some(b) => b, None => break },
        };
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        if let Err(e) = wr.write_all(&frame).await {
            tracing::debug!(error = %e, "bulk reply write failed; closing connection");
            stop.cancel();
            break;
        }
    }
    let _ = wr.shutdown().await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
