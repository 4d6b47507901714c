use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::transport::socket_client::Resolve;
use crate::{ErrorKind, RequestContext, ResponseStream, ServeError, Service};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chunk {
    tag: u32,
    bytes: Vec<u8>,
}

const FIELD: BulkField<Chunk> = BulkField {
    take: |c| Bulk::Owned(std::mem::take(&mut c.bytes)),
    put: |c, b| c.bytes = b,
};

/// Sends the bytes as parts of up to 100,000 bytes each, from one shared buffer.
const PARTS: BulkField<Chunk> = BulkField {
    take: |c| {
        let all = bytes::Bytes::from(std::mem::take(&mut c.bytes));
        let parts = (0..all.len())
            .step_by(100_000)
            .map(|at| all.slice(at..(at + 100_000).min(all.len())))
            .collect();
        Bulk::Parts(parts)
    },
    put: |c, b| c.bytes = b,
};

/// Answers a chunk's tag, length and byte sum; tag 0 is refused.
struct Summer;

impl Service<Chunk, (u32, usize, u64)> for Summer {
    fn call(&self, req: Chunk, _ctx: RequestContext) -> ResponseStream<(u32, usize, u64)> {
        let answer = if req.tag == 0 {
            Err(ServeError::new(ErrorKind::Overloaded, "tag 0 is full"))
        } else {
            let sum = req.bytes.iter().map(|&b| u64::from(b)).sum();
            Ok((req.tag, req.bytes.len(), sum))
        };
        Box::pin(futures::stream::once(async move { answer }))
    }
}

/// Never answers; records that its request was cancelled.
struct Stuck(Arc<Mutex<Vec<u32>>>);

impl Service<Chunk, (u32, usize, u64)> for Stuck {
    fn call(&self, req: Chunk, ctx: RequestContext) -> ResponseStream<(u32, usize, u64)> {
        let seen = self.0.clone();
        Box::pin(futures::stream::once(async move {
            ctx.cancelled().await;
            seen.lock().expect("lock").push(req.tag);
            Err(ServeError::cancelled())
        }))
    }
}

fn start(stuck: Arc<Mutex<Vec<u32>>>) -> (String, CancellationToken) {
    let mut server = BulkServer::bind("127.0.0.1:0", FIELD).expect("bind");
    server.register("sum", Arc::new(Summer)).expect("sum");
    server
        .register("stuck", Arc::new(Stuck(stuck)))
        .expect("stuck");
    let addr = server.local_addr().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    (addr, stop)
}

fn resolve_to(addr: Arc<Mutex<String>>) -> Resolve {
    Arc::new(move || {
        let a = addr.lock().expect("lock").clone();
        futures::future::ready(Ok(a)).boxed()
    })
}

type Answer = Result<(u32, usize, u64), ServeError>;

fn client_of(addr: &str) -> BulkClient<Chunk, (u32, usize, u64)> {
    let at = Arc::new(Mutex::new(addr.to_string()));
    BulkClient::new("test", resolve_to(at), FIELD, BulkClientConfig::default())
}

async fn ask(svc: &Arc<dyn Service<Chunk, (u32, usize, u64)>>, chunk: Chunk) -> Answer {
    let mut s = svc.call(chunk, RequestContext::new("t"));
    s.next().await.expect("one answer")
}

#[tokio::test]
async fn concurrent_calls_carry_their_bulk_bytes_intact() {
    let (addr, _stop) = start(Arc::default());
    let client = client_of(&addr);
    let svc = client.endpoint("sum");
    let calls = (1..=8u32).map(|tag| {
        let len = tag as usize * 377_731;
        let bytes: Vec<u8> = (0..len).map(|i| (i as u32 ^ tag) as u8).collect();
        let sum = bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
        let svc = svc.clone();
        async move { (ask(&svc, Chunk { tag, bytes }).await, (tag, len, sum)) }
    });
    for (got, want) in futures::future::join_all(calls).await {
        assert_eq!(got.expect("answer"), want);
    }
    // The same bytes sent as parts arrive as one buffer, in order.
    let parts = BulkClient::new(
        "parts",
        resolve_to(Arc::new(Mutex::new(addr.clone()))),
        PARTS,
        BulkClientConfig::default(),
    );
    let bytes: Vec<u8> = (0..1_234_567u32).map(|i| (i % 251) as u8).collect();
    let want = (
        5,
        bytes.len(),
        bytes.iter().map(|&b| u64::from(b)).sum::<u64>(),
    );
    let got = ask(&parts.endpoint("sum"), Chunk { tag: 5, bytes }).await;
    assert_eq!(got.expect("parts"), want);
    // An empty bulk is a call like any.
    let empty = ask(
        &svc,
        Chunk {
            tag: 9,
            bytes: Vec::new(),
        },
    )
    .await;
    assert_eq!(empty.expect("empty"), (9, 0, 0));
}

#[tokio::test]
async fn errors_and_unknown_endpoints_come_back_as_errors() {
    let (addr, _stop) = start(Arc::default());
    let client = client_of(&addr);
    let refused = ask(
        &client.endpoint("sum"),
        Chunk {
            tag: 0,
            bytes: vec![1; 10],
        },
    )
    .await;
    let err = refused.expect_err("refused");
    assert_eq!(err.kind, ErrorKind::Overloaded);
    assert!(err.message.contains("tag 0 is full"), "{err}");
    let unknown = ask(
        &client.endpoint("nope"),
        Chunk {
            tag: 1,
            bytes: vec![1; 10],
        },
    )
    .await;
    let err = unknown.expect_err("unknown");
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(
        err.message.contains("`nope`") && err.message.contains("sum"),
        "{err}"
    );
    // The connection survived both.
    let ok = ask(
        &client.endpoint("sum"),
        Chunk {
            tag: 2,
            bytes: vec![3; 5],
        },
    )
    .await;
    assert_eq!(ok.expect("ok"), (2, 5, 15));
}

#[tokio::test]
async fn a_dropped_call_is_cancelled_on_the_server() {
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (addr, _stop) = start(seen.clone());
    let client = client_of(&addr);
    let svc = client.endpoint("stuck");
    let ctx = RequestContext::new("c");
    let mut answer = svc.call(
        Chunk {
            tag: 7,
            bytes: vec![0; 1 << 20],
        },
        ctx.clone(),
    );
    // Sent, not answered.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), answer.next())
            .await
            .is_err()
    );
    drop(answer);
    // Cancelling the caller's context also reaches the server.
    let ctx2 = RequestContext::new("d");
    let mut second = svc.call(
        Chunk {
            tag: 8,
            bytes: vec![0; 10],
        },
        ctx2.clone(),
    );
    let waiter = tokio::spawn(async move { second.next().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx2.cancel();
    let got = waiter.await.expect("join").expect("an answer");
    assert_eq!(got.expect_err("cancelled").kind, ErrorKind::Cancelled);
    for _ in 0..100 {
        if seen.lock().expect("lock").len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![7, 8]);
}

#[tokio::test]
async fn a_gone_server_fails_calls_and_a_new_address_is_found() {
    let (addr, stop) = start(Arc::default());
    let at = Arc::new(Mutex::new(addr));
    let client = BulkClient::new(
        "test",
        resolve_to(at.clone()),
        FIELD,
        BulkClientConfig::default(),
    );
    let svc = client.endpoint("sum");
    assert!(ask(
        &svc,
        Chunk {
            tag: 1,
            bytes: vec![1; 3]
        }
    )
    .await
    .is_ok());
    stop.cancel();
    // The server drains, closes its connections and its listener.
    let mut failed = None;
    for _ in 0..50 {
        match ask(
            &svc,
            Chunk {
                tag: 1,
                bytes: vec![1; 3],
            },
        )
        .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("calls fail once the server is gone");
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    // The worker comes back elsewhere: the next call dials the new address.
    let (addr, _stop) = start(Arc::default());
    *at.lock().expect("lock") = addr;
    let ok = ask(
        &svc,
        Chunk {
            tag: 4,
            bytes: vec![2; 4],
        },
    )
    .await;
    assert_eq!(ok.expect("reconnected"), (4, 4, 8));
}

#[tokio::test]
async fn a_silent_peer_times_out_instead_of_hanging() {
    let (addr, _stop) = start(Arc::default());
    let config = BulkClientConfig {
        answer_timeout: Duration::from_millis(300),
        ..BulkClientConfig::default()
    };
    let client = BulkClient::new(
        "test",
        resolve_to(Arc::new(Mutex::new(addr))),
        FIELD,
        config,
    );
    let err = ask(
        &client.endpoint("stuck"),
        Chunk {
            tag: 1,
            bytes: vec![1; 3],
        },
    )
    .await
    .expect_err("no answer");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.message.contains("did not answer"), "{err}");
    // Nobody listening at all: a clear error, not a hang.
    let nobody = BulkClient::new(
        "nobody",
        resolve_to(Arc::new(Mutex::new("127.0.0.1:1".into()))),
        FIELD,
        BulkClientConfig::default(),
    );
    let err = ask(
        &nobody.endpoint("sum"),
        Chunk {
            tag: 1,
            bytes: vec![],
        },
    )
    .await
    .expect_err("refused");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.message.contains("nobody"), "{err}");
}

#[tokio::test]
async fn garbage_closes_only_its_own_connection() {
    let (addr, _stop) = start(Arc::default());
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        [
            PREFACE.to_vec(),
            vec![CALL],
            u32::MAX.to_le_bytes().to_vec(),
            vec![0; 8],
        ]
        .concat(),
        [
            PREFACE.to_vec(),
            frame_head(CALL, 3, 0).to_vec(),
            vec![0xff; 3],
        ]
        .concat(),
        [PREFACE.to_vec(), frame_head(9, 0, 0).to_vec()].concat(),
        // A cancel frame that claims bulk bytes would desynchronise the stream.
        [
            PREFACE.to_vec(),
            frame_head(CANCEL, 8, 5).to_vec(),
            vec![0; 13],
        ]
        .concat(),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        s.write_all(&junk).await.expect("write");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "the server closes a connection that sent garbage"
        );
    }
    let client = client_of(&addr);
    let ok = ask(
        &client.endpoint("sum"),
        Chunk {
            tag: 3,
            bytes: vec![1; 2],
        },
    )
    .await;
    assert_eq!(ok.expect("still serving"), (3, 2, 2));
}

#[tokio::test]
async fn calls_queued_behind_a_failed_dial_share_its_error() {
    let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = dials.clone();
    let resolve: Resolve = Arc::new(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok("127.0.0.1:1".to_string())
        }
        .boxed()
    });
    let client = BulkClient::new("gone", resolve, FIELD, BulkClientConfig::default());
    let svc = client.endpoint("sum");
    let calls = (0..4).map(|tag| {
        ask(
            &svc,
            Chunk {
                tag,
                bytes: vec![1; 8],
            },
        )
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.expect_err("refused").kind, ErrorKind::Unavailable);
    }
    assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A later call dials again.
    let _ = ask(
        &svc,
        Chunk {
            tag: 9,
            bytes: vec![],
        },
    )
    .await;
    assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 2);
}
