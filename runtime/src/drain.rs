//! Graceful draining: on SIGTERM a process stops taking new requests and waits, for a
//! bounded time, for the ones in flight to finish.
//!
//! ```no_run
//! # async fn run(svc: std::sync::Arc<dyn dynamo_runtime::Service<String, String>>) {
//! use dynamo_runtime::drain::{self, Drain};
//! let drain = Drain::new();
//! let port = drain.wrap(svc); // hand `port` to the transport
//! drain::wait_for_sigterm().await.ok();
//! drain.start_draining();
//! let finished = drain.wait_idle(std::time::Duration::from_secs(10)).await;
//! # let _ = (port, finished);
//! # }
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use crate::edge::{error_stream, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

/// Counts requests in flight and refuses new ones once draining. Cheap to clone.
#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

/// Held while one request is in flight; dropping it marks the request finished.
pub struct InFlight {
    inner: Arc<Inner>,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a new request, or `None` once draining has started.
    pub fn try_enter(&self) -> Option<InFlight> {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.inner.draining.load(Ordering::Acquire) {
            self.release();
            return None;
        }
        Some(InFlight {
            inner: self.inner.clone(),
        })
    }

    fn release(&self) {
        release(&self.inner);
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stops admitting requests. Idempotent.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.idle.notify_waiters();
    }

    /// Waits until nothing is in flight, at most `timeout`. Returns whether it got there.
    /// Call after [`Drain::start_draining`], otherwise new requests may keep it busy.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Wraps a service so each call is tracked for as long as its response stream lives,
    /// and calls made while draining fail with `Unavailable` (the caller retries elsewhere).
    pub fn wrap<Req, Resp>(&self, inner: Arc<dyn Service<Req, Resp>>) -> Arc<dyn Service<Req, Resp>>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        Arc::new(Drained {
            drain: self.clone(),
            inner,
        })
    }
}

fn release(inner: &Inner) {
    if inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
        inner.idle.notify_waiters();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        release(&self.inner);
    }
}

struct Drained<Req, Resp> {
    drain: Drain,
    inner: Arc<dyn Service<Req, Resp>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Service<Req, Resp> for Drained<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let Some(guard) = self.drain.try_enter() else {
            return error_stream(ServeError::unavailable(
                "draining: not accepting new requests",
            ));
        };
        let stream = self.inner.call(req, ctx);
        Box::pin(stream.map(move |item| {
            let _held = &guard;
            item
        }))
    }
}

/// Resolves when this process receives SIGTERM.
pub async fn wait_for_sigterm() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slow;
    impl Service<u64, u64> for Slow {
        fn call(&self, ms: u64, _ctx: RequestContext) -> ResponseStream<u64> {
            Box::pin(futures::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(ms)
            }))
        }
    }

    #[tokio::test]
    async fn refuses_new_work_and_waits_for_in_flight() {
        let drain = Drain::new();
        let svc = drain.wrap(Arc::new(Slow) as Arc<dyn Service<u64, u64>>);
        let running = svc.call(150, RequestContext::new("a"));
        assert_eq!(drain.in_flight(), 1);
        let task = tokio::spawn(async move { running.collect::<Vec<_>>().await });
        drain.start_draining();
        let refused: Vec<_> = svc.call(1, RequestContext::new("b")).collect().await;
        assert_eq!(refused.len(), 1);
        assert_eq!(
            refused[0].as_ref().map_err(|e| e.kind),
            Err(crate::ErrorKind::Unavailable)
        );
        assert!(
            !drain.wait_idle(Duration::from_millis(10)).await,
            "still busy"
        );
        assert!(
            drain.wait_idle(Duration::from_secs(2)).await,
            "never drained"
        );
        assert_eq!(drain.in_flight(), 0);
        let done = tokio::time::timeout(Duration::from_secs(2), task).await;
        assert!(matches!(done, Ok(Ok(ref v)) if v == &vec![Ok(150)]));
    }

    #[tokio::test]
    async fn idle_drain_returns_at_once() {
        let drain = Drain::new();
        drain.start_draining();
        assert!(drain.wait_idle(Duration::from_millis(50)).await);
        assert!(drain.try_enter().is_none());
    }
}
