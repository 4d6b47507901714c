//! A worker's KV events as our `events` port serves them: the translated state for
//! snapshots, and a broadcast of each translated event with its id.

use std::sync::{Arc, Mutex, PoisonError};

use dynamo_protocol::{KvEvent, KvEventData, KvStreamItem, KvSubscribe};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use tokio::sync::broadcast::{self, error::RecvError, Receiver};

use super::translate::{Skipped, Translator};
use super::wire::WireBatch;

struct State {
    translator: Translator,
    last_event_id: Option<u64>,
}

pub struct KvEventHub {
    worker_id: u64,
    state: Mutex<State>,
    tx: broadcast::Sender<KvEvent>,
}

impl KvEventHub {
    pub fn new(worker_id: u64, block_size: usize, seed: u64) -> Arc<Self> {
        let (tx, _) = broadcast::channel(4096);
        Arc::new(KvEventHub {
            worker_id,
            state: Mutex::new(State {
                translator: Translator::new(block_size, seed),
                last_event_id: None,
            }),
            tx,
        })
    }

    /// Translates and publishes one batch; returns how many of our events it made.
    pub fn apply(&self, seq: i64, batch: &WireBatch) -> usize {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let events = st.translator.batch(seq, batch);
        let n = events.len();
        // Published under the lock, so a snapshot never misses or repeats an event.
        for data in events {
            let id = st.last_event_id.map_or(0, |i| i + 1);
            st.last_event_id = Some(id);
            let _ = self.tx.send(KvEvent {
                worker_id: self.worker_id,
                event_id: id,
                data,
            });
        }
        n
    }

    /// The sequence number of the last batch applied.
    pub fn last_seq(&self) -> Option<i64> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .translator
            .last_seq()
    }

    pub fn skipped(&self) -> Skipped {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .translator
            .skipped
    }

    /// Blocks held now.
    pub fn blocks(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .translator
            .len()
    }

    fn snapshot(&self) -> (Option<u64>, Vec<KvEventData>) {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (st.last_event_id, st.translator.snapshot())
    }
}

/// Where one subscriber's stream stands.
enum Feed {
    Snapshot(Arc<KvEventHub>, Receiver<KvEvent>),
    Live(Receiver<KvEvent>, Option<u64>),
    Ended,
}

/// The worker's `events` port: a snapshot of the translated cache, then every event after.
pub struct EventsPort(pub Arc<KvEventHub>);

impl Service<KvSubscribe, KvStreamItem> for EventsPort {
    fn call(&self, _req: KvSubscribe, ctx: RequestContext) -> ResponseStream<KvStreamItem> {
        let start = Feed::Snapshot(self.0.clone(), self.0.tx.subscribe());
        futures::stream::unfold(start, move |feed| {
            let ctx = ctx.clone();
            async move {
                match feed {
                    Feed::Ended => None,
                    Feed::Snapshot(hub, live) => {
                        let (last, events) = hub.snapshot();
                        let item = KvStreamItem::Snapshot {
                            worker_id: hub.worker_id,
                            last_event_id: last,
                            events,
                        };
                        Some((Ok(item), Feed::Live(live, last)))
                    }
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
