//! The in-process edge: the caller's task calls the target [`Service`] directly. Nothing
//! is serialised; the only work added is a child cancellation token and a guard inside
//! the returned stream, so dropping the stream cancels the request (cancellation travels
//! forward, as on every other transport).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio_util::sync::DropGuard;

use crate::edge::{RequestContext, ResponseStream, Service};
use crate::error::ServeError;

/// A client for an output port whose target lives in the same process.
pub struct InProcessClient<Req, Resp> {
    target: Arc<dyn Service<Req, Resp>>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Send + 'static, Resp: Send + 'static> InProcessClient<Req, Resp> {
    pub fn new(target: Arc<dyn Service<Req, Resp>>) -> Self {
        InProcessClient {
            target,
            _types: PhantomData,
        }
    }

    /// The client as the port handle a node holds.
    pub fn into_service(self) -> Arc<dyn Service<Req, Resp>> {
        Arc::new(self)
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Service<Req, Resp> for InProcessClient<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        // The callee gets a child: dropping our stream cancels the callee's request but
        // never the caller's own context, which may still be serving other calls.
        let child = ctx.child();
        let guard = child.drop_guard();
        let inner = self.target.call(req, child);
        Box::pin(CancelOnDrop {
            inner,
            guard: Some(guard),
        })
    }
}

/// Wraps a response stream so that dropping it before its end cancels the request.
/// Once the stream has ended on its own the guard is disarmed: nothing is left to cancel.
pub struct CancelOnDrop<T> {
    inner: ResponseStream<T>,
    guard: Option<DropGuard>,
}

impl<T> CancelOnDrop<T> {
    pub fn new(inner: ResponseStream<T>, ctx: &RequestContext) -> Self {
        CancelOnDrop {
            inner,
            guard: Some(ctx.drop_guard()),
        }
    }
}

impl<T> Stream for CancelOnDrop<T> {
    type Item = Result<T, ServeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = this.inner.as_mut().poll_next(cx);
        if let Poll::Ready(None) = item {
            if let Some(guard) = this.guard.take() {
                guard.disarm();
            }
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// Streams numbers forever until cancelled, then reports that it saw the cancellation.
    struct Counter {
        observed: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    }

    impl Service<u32, u32> for Counter {
        fn call(&self, start: u32, ctx: RequestContext) -> ResponseStream<u32> {
            let tx = self.observed.lock().ok().and_then(|mut g| g.take());
            let (out_tx, out_rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                let mut n = start;
                loop {
                    tokio::select! {
                        _ = ctx.cancelled() => break,
                        r = out_tx.send(Ok(n)) => if r.is_err() { break },
                    }
                    n += 1;
                }
                ctx.cancelled().await;
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            });
            Box::pin(tokio_stream_from(out_rx))
        }
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl Stream<Item = T> + Send {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn streams_and_dropping_cancels_the_callee() {
        let (tx, rx) = oneshot::channel();
        let svc: Arc<dyn Service<u32, u32>> = Arc::new(Counter {
            observed: std::sync::Mutex::new(Some(tx)),
        });
        let client = InProcessClient::new(svc).into_service();
        let caller = RequestContext::new("r1");
        let mut stream = client.call(5, caller.clone());
        let got: Vec<u32> = (&mut stream)
            .take(3)
            .map(|r| r.unwrap_or(0))
            .collect()
            .await;
        assert_eq!(got, vec![5, 6, 7]);
        drop(stream);
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .expect("callee never saw the cancellation")
            .expect("callee dropped its reporter");
        assert!(
            !caller.is_cancelled(),
            "the caller's own context must survive"
        );
    }

    #[tokio::test]
    async fn a_finished_stream_does_not_cancel() {
        struct Two;
        impl Service<(), u8> for Two {
            fn call(&self, _: (), ctx: RequestContext) -> ResponseStream<u8> {
                let token = ctx.cancellation_token();
                Box::pin(
                    futures::stream::iter([Ok(1), Ok(2)]).chain(futures::stream::once(
                        async move {
                            // Checked after the last item: the guard must not fire before.
                            Err(ServeError::internal(format!(
                                "cancelled={}",
                                token.is_cancelled()
                            )))
                        },
                    )),
                )
            }
        }
        let client = InProcessClient::new(Arc::new(Two) as Arc<dyn Service<(), u8>>);
        let items: Vec<_> = client.call((), RequestContext::new("r")).collect().await;
        assert_eq!(items.len(), 3);
        assert_eq!(items[2], Err(ServeError::internal("cancelled=false")));
    }
}
