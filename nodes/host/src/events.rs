//! KV events on feedback edges. A router subscribes to each worker's `events` port (the
//! edge contract's request/stream, so every transport carries it unchanged): the worker
//! answers with a snapshot of its cache, then streams every event after it.

use std::sync::Arc;

use dynamo_mocker::MockerEngine;
use dynamo_protocol::{KvEvent, KvStreamItem, KvSubscribe};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

/// A worker's `events` port.
pub struct EventsService {
    engine: Arc<MockerEngine>,
}

impl EventsService {
    pub fn new(engine: Arc<MockerEngine>) -> Self {
        EventsService { engine }
    }
}

/// Where a subscriber's stream stands.
enum Feed {
    /// The snapshot is still to be taken; `live` already collects what comes after.
    Snapshot(Arc<MockerEngine>, Receiver<KvEvent>),
    /// Streaming live events, skipping those the snapshot covered (ids ≤ `after`).
    Live(Receiver<KvEvent>, Option<u64>),
    Ended,
}

impl Service<KvSubscribe, KvStreamItem> for EventsService {
    fn call(&self, _req: KvSubscribe, ctx: RequestContext) -> ResponseStream<KvStreamItem> {
        // Subscribe before taking the snapshot: nothing published in between is lost,
        // and what the snapshot already holds is skipped by event id.
        let start = Feed::Snapshot(self.engine.clone(), self.engine.subscribe_events());
        futures::stream::unfold(start, move |feed| {
            let ctx = ctx.clone();
            async move {
                match feed {
                    Feed::Ended => None,
                    Feed::Snapshot(engine, live) => Some(match engine.kv_snapshot().await {
                        Ok(snap) => (
                            Ok(KvStreamItem::Snapshot {
                                worker_id: snap.worker_id,
                                last_event_id: snap.last_event_id,
                                events: snap.events,
                            }),
                            Feed::Live(live, snap.last_event_id),
                        ),
                        Err(e) => (Err(e), Feed::Ended),
                    }),
                    Feed::Live(mut live, after) => loop {
                        let ev = tokio::select! {
                            _ = ctx.cancelled() => return None,
                            ev = live.recv() => ev,
                        };
                        match ev {
                            Ok(ev) if after.is_some_and(|a| ev.event_id <= a) => continue,
                            Ok(ev) => {
                                return Some((Ok(KvStreamItem::Event(ev)), Feed::Live(live, after)))
                            }
                            // The subscriber fell behind: end the stream so it resubscribes
                            // and gets a fresh snapshot rather than a silent gap.
                            Err(RecvError::Lagged(n)) => {
                                let e = ServeError::unavailable(format!(
                                    "event stream lagged by {n} events; resubscribe"
                                ));
                                return Some((Err(e), Feed::Ended));
                            }
                            Err(RecvError::Closed) => return None,
                        }
                    },
                }
            }
        })
        .boxed()
    }
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
