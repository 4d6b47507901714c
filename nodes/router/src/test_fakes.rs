//! Fake workers for the router's tests: they stream N deltas carrying their own id,
//! fail or hang when told to, and keep every context they were called with so a test
//! can check cancellation.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use dynamo_protocol::{SamplingOptions, StopConditions, TokenDelta, TokenRequest};
use dynamo_runtime::{
    ErrorKind, InstanceId, InstanceSet, RequestContext, ResponseStream, ServeError, Service,
};
use futures::{Stream, StreamExt};

use crate::RouterService;

pub const WAIT: Duration = Duration::from_secs(5);

/// What a fake worker does with each request.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Streams `n` deltas, each carrying the worker's id as its token, then ends.
    Stream(usize),
    /// Streams `n` deltas, then never yields again.
    HangAfter(usize),
    /// Streams `n` deltas, then fails with this kind.
    FailAfter(usize, ErrorKind),
}

pub struct Fake {
    pub id: InstanceId,
    behaviour: Behaviour,
    contexts: Mutex<Vec<RequestContext>>,
    requests: Mutex<Vec<TokenRequest>>,
    pub streams_dropped: Arc<AtomicUsize>,
}

impl Fake {
    pub fn new(id: InstanceId, behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Fake {
            id,
            behaviour,
            contexts: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            streams_dropped: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn calls(&self) -> usize {
        self.contexts.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn contexts(&self) -> Vec<RequestContext> {
        self.contexts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

struct FakeStream {
    items: VecDeque<Result<TokenDelta, ServeError>>,
    hang: bool,
    dropped: Arc<AtomicUsize>,
}

impl Stream for FakeStream {
    type Item = Result<TokenDelta, ServeError>;
    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.items.pop_front() {
            Some(item) => Poll::Ready(Some(item)),
            None if self.hang => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

impl Drop for FakeStream {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Service<TokenRequest, TokenDelta> for Fake {
    fn call(&self, request: TokenRequest, ctx: RequestContext) -> ResponseStream<TokenDelta> {
        if let Ok(mut c) = self.contexts.lock() {
            c.push(ctx);
        }
        if let Ok(mut r) = self.requests.lock() {
            r.push(request);
        }
        let delta = || {
            Ok(TokenDelta {
                token_ids: vec![self.id as u32],
                ..TokenDelta::default()
            })
        };
        let (n, hang, error) = match self.behaviour {
            Behaviour::Stream(n) => (n, false, None),
            Behaviour::HangAfter(n) => (n, true, None),
            Behaviour::FailAfter(n, kind) => {
                (n, false, Some(ServeError::new(kind, "fake failure")))
            }
        };
        let items = (0..n).map(|_| delta()).chain(error.map(Err)).collect();
        Box::pin(FakeStream {
            items,
            hang,
            dropped: self.streams_dropped.clone(),
        })
    }
}

pub fn request() -> TokenRequest {
    TokenRequest {
        model: "m".into(),
        token_ids: vec![1, 2, 3],
        sampling: SamplingOptions::default(),
        stop: StopConditions::default(),
    }
}

pub fn set_of(fakes: &[&Arc<Fake>]) -> Arc<InstanceSet<TokenRequest, TokenDelta>> {
    let set = Arc::new(InstanceSet::new("decode"));
    for f in fakes {
        set.add(f.id, (*f).clone());
    }
    set
}

/// Every item of a stream, with a bound.
pub async fn collect(stream: ResponseStream<TokenDelta>) -> Vec<Result<TokenDelta, ServeError>> {
    tokio::time::timeout(WAIT, stream.collect())
        .await
        .unwrap_or_else(|_| panic!("stream did not end within {WAIT:?}"))
}

/// The next item of a stream, with a bound.
pub async fn next(
    stream: &mut ResponseStream<TokenDelta>,
) -> Option<Result<TokenDelta, ServeError>> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no item within {WAIT:?}"))
}

/// Which worker produced a delta.
pub fn worker(item: &Result<TokenDelta, ServeError>) -> InstanceId {
    match item {
        Ok(d) => d.token_ids.first().copied().map_or(0, u64::from),
        Err(e) => panic!("expected a delta, got {e}"),
    }
}

pub fn in_flight(router: &RouterService) -> Vec<(InstanceId, u64)> {
    router
        .stats()
        .into_iter()
        .map(|(id, f, _)| (id, f))
        .collect()
}
