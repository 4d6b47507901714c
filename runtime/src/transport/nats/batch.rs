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

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::wire::{Parts, BATCH_SUFFIX};

/// A batch stops growing at this many bytes; more parts go in the next one (NATS's
/// default payload limit is 1 MiB).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A response message for one call: its reply subject and body.
struct Outgoing {
    reply: async_nats::Subject,
    body: Bytes,
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

    /// Queues `body` for `reply`; false once the publishing task is gone.
    pub fn send(&self, reply: &async_nats::Subject, body: Bytes) -> bool {
        let reply = reply.clone();
        self.tx.send(Outgoing { reply, body }).is_ok()
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
/// at most [`MAX_BATCH_BYTES`] (a lone message as itself). Every message of one call goes
/// to the same inbox, so each call keeps its order.
async fn flush(nats: &async_nats::Client, ready: &mut Vec<Outgoing>) {
    let mut groups: Vec<(String, Vec<(u64, Outgoing)>)> = Vec::new();
    for out in ready.drain(..) {
        let Some((inbox, id)) = split_reply(&out.reply) else {
            let _ = nats.publish(out.reply, out.body).await;
            continue;
        };
        match groups.iter_mut().find(|(i, _)| i == inbox) {
            Some((_, group)) => group.push((id, out)),
            None => groups.push((inbox.to_string(), vec![(id, out)])),
        }
    }
    for (inbox, group) in groups {
        let mut group = group.into_iter().peekable();
        while let Some((id, first)) = group.next() {
            if group.peek().is_none() {
                let _ = nats.publish(first.reply, first.body).await;
                break;
            }
            let mut batch = BytesMut::with_capacity(4096);
            Parts::append(&mut batch, id, &first.body);
            while let Some((id, next)) = group.next_if(|_| batch.len() < MAX_BATCH_BYTES) {
                Parts::append(&mut batch, id, &next.body);
            }
            let subject = format!("{inbox}.{BATCH_SUFFIX}");
            let _ = nats.publish(subject, batch.freeze()).await;
        }
    }
}
