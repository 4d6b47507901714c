//! KV events on feedback edges. A router subscribes to each worker's `events` port (the
//! edge contract's request/stream, so every transport carries it unchanged): the worker
//! answers with a snapshot of its cache, then streams every event after it.

use std::sync::Arc;

use dynamo_mocker::MockerEngine;
use dynamo_protocol::{KvStreamItem, KvSubscribe};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;

/// A worker's `events` port.
pub struct EventsService {
    engine: Arc<MockerEngine>,
}

impl EventsService {
    pub fn new(engine: Arc<MockerEngine>) -> Self {
        EventsService { engine }
    }
}

impl Service<KvSubscribe, KvStreamItem> for EventsService {
    fn call(&self, _req: KvSubscribe, ctx: RequestContext) -> ResponseStream<KvStreamItem> {
        let engine = self.engine.clone();
        // Subscribe before taking the snapshot: nothing published in between is lost,
        // and what the snapshot already holds is skipped by event id.
        let mut live = engine.subscribe_events();
        let stream = async_stream_of(move |tx| async move {
            let snap = match engine.kv_snapshot().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let after = snap.last_event_id;
            let first = KvStreamItem::Snapshot {
                worker_id: snap.worker_id,
                last_event_id: snap.last_event_id,
                events: snap.events,
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let ev = tokio::select! {
                    _ = ctx.cancelled() => return,
                    ev = live.recv() => ev,
                };
                match ev {
                    Ok(ev) if after.is_some_and(|a| ev.event_id <= a) => continue,
                    Ok(ev) => {
                        if tx.send(Ok(KvStreamItem::Event(ev))).await.is_err() {
                            return;
                        }
                    }
                    // The subscriber fell behind: end the stream so it resubscribes and
                    // gets a fresh snapshot rather than a silent gap.
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(ServeError::unavailable(format!(
                                "event stream lagged by {n} events; resubscribe"
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        stream.boxed()
    }
}

/// A stream fed by a task through a small channel.
fn async_stream_of<F, Fut>(
    f: F,
) -> impl futures::Stream<Item = Result<KvStreamItem, ServeError>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<KvStreamItem, ServeError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    tokio_stream_from(rx, guard)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<KvStreamItem, ServeError>>,
    guard: AbortOnDrop,
) -> impl futures::Stream<Item = Result<KvStreamItem, ServeError>> + Send + 'static {
    futures::stream::poll_fn(move |cx| {
        let _keep = &guard;
        rx.poll_recv(cx)
    })
}

/// Keep a KV router's index of one worker current: subscribe to its `events` port, apply
/// the snapshot and then each event; on a gap, an error or a restart of the worker,
/// subscribe again (with backoff) and start over from a fresh snapshot.
pub async fn follow(
    kv: dynamo_router::KvRouterHandle,
    worker: u64,
    source: Arc<dyn Service<KvSubscribe, KvStreamItem>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use dynamo_router::EventOutcome;
    use std::time::Duration;
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut stream = source.call(
            KvSubscribe,
            RequestContext::new(format!("kv-events-{worker:x}")),
        );
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(KvStreamItem::Snapshot {
                    last_event_id,
                    events,
                    ..
                })) => {
                    backoff = Duration::from_millis(50);
                    if kv.apply_snapshot(worker, last_event_id, &events)
                        == EventOutcome::NeedsResync
                    {
                        break;
                    }
                }
                Some(Ok(KvStreamItem::Event(ev))) => {
                    if kv.apply_event(ev) == EventOutcome::NeedsResync {
                        tracing::debug!(worker, "gap in KV events; resubscribing for a snapshot");
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(worker, error = %e, "KV event stream ended");
                    break;
                }
                None => break,
            }
        }
        drop(stream);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
