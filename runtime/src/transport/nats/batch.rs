//! One NATS message for the responses of many calls: a server's response messages that
//! are ready together and go to the same client are published as one batch on the
//! client's batch subject (`<inbox>.b`), each part tagged with its call's stream id.
//!
//! Why: a worker's engine produces one token for every running sequence per step, and
//! most of those sequences were sent by the same router. Published one by one, each
//! token costs the NATS server a message to parse, match and deliver (the broker was most
//! of NATS's cost over the local socket); batched, a step of 16 sequences is one message.
//! Nothing waits for a batch to fill: the batcher takes what is queued when it runs, after
//! letting the other tasks woken by the same step queue theirs (one `yield_now`), so a
//! lone response goes out as before, on its own reply subject.
//!
//! Order: one queue per server, flushed in order, so each call's messages keep theirs.
//! Only callers that said they read batches (the [`super::wire::BATCH`] request header)
//! get them; the others get every message on its own reply subject.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::wire::{self, Parts, BATCH_SUFFIX};

/// A batch stops growing at this many bytes; more parts go in the next one (NATS's
/// default payload limit is 1 MiB).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A response message for one call: its reply subject and body, and whether its caller
/// reads batches.
struct Outgoing {
    reply: async_nats::Subject,
    body: Bytes,
    batchable: bool,
}

/// Publishes a server's response messages, batching those that are ready together.
#[derive(Clone)]
pub(super) struct Batcher {
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl Batcher {
    /// Starts the publishing task; it ends once every `Batcher` clone is dropped and the
    /// queue is flushed.
    pub fn start(nats: async_nats::Client) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Batcher { tx }, tokio::spawn(run(nats, rx)))
    }

    /// Queues `body` for `reply` (to be batched with others if `batchable`); false once
    /// the publishing task is gone.
    pub fn send(&self, reply: &async_nats::Subject, body: Bytes, batchable: bool) -> bool {
        let reply = reply.clone();
        let out = Outgoing {
            reply,
            body,
            batchable,
        };
        self.tx.send(out).is_ok()
    }
}

async fn run(nats: async_nats::Client, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut ready = Vec::new();
    while let Some(first) = rx.recv().await {
        ready.push(first);
        // The other streams woken by the same engine step queue theirs meanwhile.
        tokio::task::yield_now().await;
        while let Ok(next) = rx.try_recv() {
            ready.push(next);
        }
        flush(&nats, &mut ready).await;
    }
}

/// The inbox and stream id of a reply subject a `NatsClient` made (`<inbox>.<id>`).
fn split_reply(reply: &str) -> Option<(&str, u64)> {
    let (inbox, id) = reply.rsplit_once('.')?;
    Some((inbox, id.parse().ok()?))
}

/// Publishes `ready`: the messages for one client inbox, in their order, as batches of
/// at most [`MAX_BATCH_BYTES`] or the server's payload limit (a message alone, too large
/// to share, or for a caller that does not read batches, as itself). Every message of one
/// call goes to the same inbox, so each call keeps its order.
async fn flush(nats: &async_nats::Client, ready: &mut Vec<Outgoing>) {
    let limit = MAX_BATCH_BYTES.min(nats.max_payload());
    let mut groups: HashMap<String, Vec<(u64, Outgoing)>> = HashMap::new();
    for out in ready.drain(..) {
        match split_reply(&out.reply).filter(|_| out.batchable) {
            Some((inbox, id)) => match groups.get_mut(inbox) {
                Some(group) => group.push((id, out)),
                None => {
                    groups.insert(inbox.to_string(), vec![(id, out)]);
                }
            },
            None => publish(nats, out.reply, out.body).await,
        }
    }
    for (inbox, group) in groups {
        let mut batch = Batch::default();
        for (id, out) in group {
            if !batch.fits(&out.body, limit) {
                batch.publish(nats, &inbox).await;
            }
            batch.push(id, out);
        }
        batch.publish(nats, &inbox).await;
    }
}

async fn publish(nats: &async_nats::Client, subject: async_nats::Subject, body: Bytes) {
    if let Err(e) = nats.publish(subject.clone(), body).await {
        // The caller's stream sees a gap or goes quiet, and ends with `Unavailable`.
        tracing::warn!(%subject, error = %e, "cannot publish a response message");
    }
}

/// The messages of one batch being gathered.
#[derive(Default)]
struct Batch {
    parts: Vec<(u64, Outgoing)>,
    bytes: usize,
}

impl Batch {
    fn fits(&self, body: &Bytes, limit: usize) -> bool {
        self.bytes + wire::PART_HEAD + body.len() <= limit
    }

    fn push(&mut self, id: u64, out: Outgoing) {
        self.bytes += wire::PART_HEAD + out.body.len();
        self.parts.push((id, out));
    }

    /// Publishes what was gathered (one message on its own subject), and empties it.
    async fn publish(&mut self, nats: &async_nats::Client, inbox: &str) {
        self.bytes = 0;
        let mut parts = std::mem::take(&mut self.parts);
        if parts.len() <= 1 {
            if let Some((_, out)) = parts.pop() {
                publish(nats, out.reply, out.body).await;
            }
            return;
        }
        let size = parts
            .iter()
            .map(|(_, o)| wire::PART_HEAD + o.body.len())
            .sum();
        let mut body = BytesMut::with_capacity(size);
        for (id, out) in &parts {
            Parts::append(&mut body, *id, &out.body);
        }
        let subject = async_nats::Subject::from(format!("{inbox}.{BATCH_SUFFIX}"));
        publish(nats, subject, body.freeze()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_split_into_inbox_and_stream() {
        assert_eq!(split_reply("_INBOX.abc.17"), Some(("_INBOX.abc", 17)));
        assert_eq!(split_reply("_INBOX.abc.b"), None);
        assert_eq!(split_reply("plain"), None);
    }

    #[test]
    fn a_batch_never_grows_past_its_limit_but_takes_a_large_message_alone() {
        let out = |n: usize| Outgoing {
            reply: async_nats::Subject::from("_INBOX.x.1"),
            body: Bytes::from(vec![0u8; n]),
            batchable: true,
        };
        let limit = MAX_BATCH_BYTES;
        let mut batch = Batch::default();
        assert!(batch.fits(&out(limit - wire::PART_HEAD).body, limit));
        assert!(!batch.fits(&out(limit).body, limit));
        batch.push(1, out(limit / 2));
        assert!(!batch.fits(&out(limit / 2).body, limit));
        assert!(batch.fits(&out(1000).body, limit));
        assert!(
            !batch.fits(&out(1000).body, 1000),
            "a smaller server limit wins"
        );
    }
}
