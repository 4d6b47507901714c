//! What travels in NATS messages on an edge.
//!
//! - A **request** is published on the endpoint's subject with a reply subject unique to
//!   the call (`<client inbox>.<stream id>`). Its headers carry the W3C `traceparent` and
//!   the request id; its payload is a postcard [`RequestHead`] followed by the postcard
//!   request.
//! - The server answers on the reply subject with messages whose body is one or more
//!   frames `[u32 big-endian length][postcard ServerFrame][payload]`: the first is
//!   `Accepted` (which instance took the call, and where to send cancellation), then
//!   `Item`s, then exactly one `End` or `Error`. Every frame but `Heartbeat` carries a
//!   sequence number counted from 0, so a lost message is a detected gap, not a silent
//!   hole. Frames that are ready together travel in one message.
//! - Response messages for several calls of one client that are ready together may travel
//!   (when the requests carried the [`BATCH`] header) as one message on the client's batch
//!   subject `<client inbox>.b`: [`Parts`], each
//!   `[u64 big-endian stream id][u32 big-endian length][message body]`, the body exactly
//!   what would have gone to `<client inbox>.<stream id>`.
//! - `Heartbeat` frames come while a stream is open but quiet, so a client can tell a slow
//!   worker from a dead one.
//! - The client sends [`ControlFrame`]s (cancel, flow-control credit) to the control
//!   subject the server named in `Accepted`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::ServeError;

/// NATS header carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// NATS header carrying the request id.
pub const REQUEST_ID: &str = "Dynamo-Request-Id";
/// NATS header by which a client says it reads batches on its batch subject; a server
/// batches the responses of a call only when its request carried it.
pub const BATCH: &str = "Dynamo-Batch";

const LEN_PREFIX: usize = 4;

/// The last token of a client's batch subject (stream ids are numbers, so it is never
/// one).
pub const BATCH_SUFFIX: &str = "b";

/// Bytes before each part's body in a batch (stream id, length).
pub const PART_HEAD: usize = 12;

/// Precedes the request payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Items the server may send before it needs more credit.
    pub window: u32,
}

/// One frame of a response message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame<'a> {
    /// The call was taken by `instance`; cancel and credit go to `control`.
    Accepted {
        seq: u64,
        instance: u64,
        control: &'a str,
    },
    /// One response; its postcard payload follows.
    Item { seq: u64 },
    /// The stream ended normally.
    End { seq: u64 },
    /// The stream ended with an error.
    Error { seq: u64, error: ServeError },
    /// The stream is open and its worker alive, but nothing else was sent lately.
    Heartbeat,
}

impl ServerFrame<'_> {
    pub fn seq(&self) -> Option<u64> {
        match self {
            ServerFrame::Accepted { seq, .. }
            | ServerFrame::Item { seq }
            | ServerFrame::End { seq }
            | ServerFrame::Error { seq, .. } => Some(*seq),
            ServerFrame::Heartbeat => None,
        }
    }
}

/// What a client sends to a server's control subject. `stream` is the call's reply
/// subject, which names the stream uniquely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlFrame<'a> {
    Cancel { stream: &'a str },
    Credit { stream: &'a str, n: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode: {0}")]
    Encode(postcard::Error),
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    #[error("truncated frame: {0} bytes announced, {1} left")]
    Truncated(usize, usize),
}

/// Encodes a request payload: head, then the request.
pub fn encode_request<Req: Serialize>(head: RequestHead, req: &Req) -> Result<Bytes, WireError> {
    let mut buf = BytesMut::with_capacity(64);
    let mut w = (&mut buf).writer();
    postcard::to_io(&head, &mut w).map_err(WireError::Encode)?;
    postcard::to_io(req, &mut w).map_err(WireError::Encode)?;
    Ok(buf.freeze())
}

/// Splits a request payload into its head and the request bytes.
pub fn decode_request(payload: &[u8]) -> Result<(RequestHead, &[u8]), WireError> {
    postcard::take_from_bytes(payload).map_err(WireError::Decode)
}

/// Appends one frame to `buf`; on error `buf` is left as it was.
pub fn append<P: Serialize + ?Sized>(
    buf: &mut BytesMut,
    frame: &ServerFrame<'_>,
    payload: Option<&P>,
) -> Result<(), WireError> {
    let start = buf.len();
    buf.put_u32(0);
    let result = write_frame(buf, frame, payload);
    if let Err(e) = result {
        buf.truncate(start);
        return Err(e);
    }
    let len = buf.len() - start - LEN_PREFIX;
    let Ok(len) = u32::try_from(len) else {
        buf.truncate(start);
        return Err(WireError::Truncated(len, 0));
    };
    buf[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn write_frame<P: Serialize + ?Sized>(
    buf: &mut BytesMut,
    frame: &ServerFrame<'_>,
    payload: Option<&P>,
) -> Result<(), WireError> {
    let mut w = buf.writer();
    postcard::to_io(frame, &mut w).map_err(WireError::Encode)?;
    if let Some(p) = payload {
        postcard::to_io(p, &mut w).map_err(WireError::Encode)?;
    }
    Ok(())
}

/// Reads the frames of one response message in order.
pub struct Frames {
    body: Bytes,
}

impl Frames {
    pub fn new(body: Bytes) -> Self {
        Frames { body }
    }

    /// The next frame's body (header and payload), or `None` at the end.
    pub fn next_frame(&mut self) -> Option<Result<Bytes, WireError>> {
        if self.body.is_empty() {
            return None;
        }
        if self.body.len() < LEN_PREFIX {
            let left = self.body.len();
            self.body.clear();
            return Some(Err(WireError::Truncated(LEN_PREFIX, left)));
        }
        let len = (&self.body[..LEN_PREFIX]).get_u32() as usize;
        if self.body.len() - LEN_PREFIX < len {
            let left = self.body.len() - LEN_PREFIX;
            self.body.clear();
            return Some(Err(WireError::Truncated(len, left)));
        }
        self.body.advance(LEN_PREFIX);
        Some(Ok(self.body.split_to(len)))
    }
}

/// Reads the parts of a batch message in order: `(stream id, message body)`.
pub struct Parts {
    body: Bytes,
}

impl Parts {
    pub fn new(body: Bytes) -> Self {
        Parts { body }
    }

    /// Appends one part to a batch being built.
    pub fn append(batch: &mut BytesMut, stream_id: u64, message: &[u8]) {
        batch.put_u64(stream_id);
        // A response message is far below 4 GiB (NATS refuses more than a few MiB).
        batch.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
        batch.put_slice(message);
    }

    /// The next part, or `None` at the end.
    pub fn next_part(&mut self) -> Option<Result<(u64, Bytes), WireError>> {
        if self.body.is_empty() {
            return None;
        }
        if self.body.len() < PART_HEAD {
            let left = self.body.len();
            self.body.clear();
            return Some(Err(WireError::Truncated(PART_HEAD, left)));
        }
        let id = self.body.get_u64();
        let len = self.body.get_u32() as usize;
        if self.body.len() < len {
            let left = self.body.len();
            self.body.clear();
            return Some(Err(WireError::Truncated(len, left)));
        }
        Some(Ok((id, self.body.split_to(len))))
    }
}

/// Splits a frame body into its header and payload bytes.
pub fn decode_frame(frame: &[u8]) -> Result<(ServerFrame<'_>, &[u8]), WireError> {
    postcard::take_from_bytes(frame).map_err(WireError::Decode)
}

pub fn encode_control(frame: &ControlFrame<'_>) -> Result<Bytes, WireError> {
    postcard::to_stdvec(frame)
        .map(Bytes::from)
        .map_err(WireError::Encode)
}

pub fn decode_control(body: &[u8]) -> Result<ControlFrame<'_>, WireError> {
    postcard::from_bytes(body).map_err(WireError::Decode)
}

pub fn decode_payload<'de, T: Deserialize<'de>>(payload: &'de [u8]) -> Result<T, WireError> {
    postcard::from_bytes(payload).map_err(WireError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn frames_of_one_message_read_back_in_order() {
        let mut buf = BytesMut::new();
        let accepted = ServerFrame::Accepted {
            seq: 0,
            instance: 7,
            control: "dynamo-ctl.a.b.c.7",
        };
        append(&mut buf, &accepted, None::<&()>).expect("accepted");
        append(&mut buf, &ServerFrame::Item { seq: 1 }, Some(&"tok")).expect("item");
        let error = ServerFrame::Error {
            seq: 2,
            error: ServeError::new(ErrorKind::Overloaded, "full"),
        };
        append(&mut buf, &error, None::<&()>).expect("error");
        append(&mut buf, &ServerFrame::Heartbeat, None::<&()>).expect("heartbeat");

        let mut frames = Frames::new(buf.freeze());
        let f = frames.next_frame().expect("1").expect("1");
        assert_eq!(decode_frame(&f).expect("1").0, accepted);
        let f = frames.next_frame().expect("2").expect("2");
        let (h, p) = decode_frame(&f).expect("2");
        assert_eq!(h, ServerFrame::Item { seq: 1 });
        assert_eq!(decode_payload::<&str>(p).expect("payload"), "tok");
        let f = frames.next_frame().expect("3").expect("3");
        assert_eq!(decode_frame(&f).expect("3").0, error);
        let f = frames.next_frame().expect("4").expect("4");
        assert_eq!(decode_frame(&f).expect("4").0.seq(), None);
        assert!(frames.next_frame().is_none());
    }

    #[test]
    fn requests_and_control_round_trip() {
        let wire = encode_request(RequestHead { window: 64 }, &vec![1u32, 2]).expect("encode");
        let (head, rest) = decode_request(&wire).expect("decode");
        assert_eq!(head.window, 64);
        assert_eq!(decode_payload::<Vec<u32>>(rest).expect("req"), vec![1, 2]);
        for c in [
            ControlFrame::Cancel {
                stream: "_INBOX.x.1",
            },
            ControlFrame::Credit {
                stream: "_INBOX.x.2",
                n: 32,
            },
        ] {
            let wire = encode_control(&c).expect("encode");
            assert_eq!(decode_control(&wire).expect("decode"), c);
        }
    }

    #[test]
    fn batch_parts_read_back_in_order() {
        let mut one = BytesMut::new();
        append(&mut one, &ServerFrame::Item { seq: 3 }, Some(&"a")).expect("item");
        let mut batch = BytesMut::new();
        Parts::append(&mut batch, 7, &one);
        Parts::append(&mut batch, u64::MAX, b"");
        Parts::append(&mut batch, 9, b"xyz");
        let mut parts = Parts::new(batch.freeze());
        let (id, body) = parts.next_part().expect("1").expect("1");
        assert_eq!(id, 7);
        let f = Frames::new(body)
            .next_frame()
            .expect("frame")
            .expect("frame");
        assert_eq!(
            decode_frame(&f).expect("item").0,
            ServerFrame::Item { seq: 3 }
        );
        assert_eq!(
            parts.next_part().expect("2").expect("2"),
            (u64::MAX, Bytes::new())
        );
        assert_eq!(
            parts.next_part().expect("3").expect("3"),
            (9, Bytes::from_static(b"xyz"))
        );
        assert!(parts.next_part().is_none());
    }

    #[test]
    fn truncated_and_random_bytes_are_errors_not_panics() {
        let mut frames = Frames::new(Bytes::from_static(&[0, 0, 0, 9, 1, 2]));
        assert!(frames.next_frame().expect("one").is_err());
        assert!(frames.next_frame().is_none());
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let body: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
            let mut frames = Frames::new(Bytes::from(body.clone()));
            while let Some(Ok(f)) = frames.next_frame() {
                let _ = decode_frame(&f);
            }
            let _ = decode_control(&body);
            let _ = decode_request(&body);
            let mut parts = Parts::new(Bytes::from(body));
            while let Some(Ok(_)) = parts.next_part() {}
        }
    }
}
