//! The wire format of the local socket transport.
//!
//! A frame on the wire is `[u32 big-endian length][header][payload]`: the length prefix is
//! the one [`tokio_util::codec::LengthDelimitedCodec`] reads (see [`codec`]), the header is
//! a postcard-encoded [`Header`], and for `Request` and `Response` frames the rest of the
//! frame is the postcard-encoded payload. Keeping the payload outside the header means it
//! is encoded straight into the outgoing buffer and decoded straight from the received one:
//! no intermediate copy in either direction.
//!
//! Flow control is per stream, by credit: a `Request` says how many `Response` frames the
//! server may send before it waits (`window`), and the client returns `Credit` as its
//! consumer takes items. A slow consumer therefore holds back only its own stream, never
//! the connection it shares with other streams.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::ServeError;

/// Largest frame either side accepts; a larger one closes the connection.
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

const LEN_PREFIX: usize = 4;

/// Largest per-stream flow-control window (responses in flight) either side uses.
pub const MAX_WINDOW: u32 = 4096;

/// Identifies one request stream on a connection; chosen by the client.
pub type StreamId = u64;

/// Everything but the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Header<'a> {
    /// Opens a stream; the request payload follows the header.
    Request {
        stream_id: StreamId,
        /// Response frames the server may send before it needs more credit.
        window: u32,
        endpoint: &'a str,
        request_id: &'a str,
        #[serde(borrow)]
        traceparent: Option<&'a str>,
    },
    /// One response item; its payload follows the header.
    Response { stream_id: StreamId },
    /// The server's stream ended normally.
    End { stream_id: StreamId },
    /// The server's stream ended with an error.
    Error {
        stream_id: StreamId,
        error: ServeError,
    },
    /// The client dropped the stream; the server cancels the request.
    Cancel { stream_id: StreamId },
    /// The client consumed `n` more responses; the server may send `n` more.
    Credit { stream_id: StreamId, n: u32 },
}

impl Header<'_> {
    pub fn stream_id(&self) -> StreamId {
        match self {
            Header::Request { stream_id, .. }
            | Header::Response { stream_id }
            | Header::End { stream_id }
            | Header::Error { stream_id, .. }
            | Header::Cancel { stream_id }
            | Header::Credit { stream_id, .. } => *stream_id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("cannot encode frame: {0}")]
    Encode(postcard::Error),
    #[error("malformed frame: {0}")]
    Decode(postcard::Error),
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: usize },
}

/// The codec both sides read frames with. Writers produce the same layout through
/// [`encode`].
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LEN_PREFIX)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Encodes a whole frame (length prefix included) at the end of `buf` and returns it as
/// `Bytes`, leaving `buf` empty so its allocation can be reused once the frame is written.
/// On error `buf` is left as it was before the call.
pub fn encode<P: Serialize + ?Sized>(
    buf: &mut BytesMut,
    header: &Header<'_>,
    payload: Option<&P>,
) -> Result<Bytes, FrameError> {
    append(buf, header, payload)?;
    Ok(buf.split().freeze())
}

/// Encodes a whole frame at the end of `buf`, after any frames already there, so several
/// frames can go out in one write. On error `buf` is left as it was before the call.
pub fn append<P: Serialize + ?Sized>(
    buf: &mut BytesMut,
    header: &Header<'_>,
    payload: Option<&P>,
) -> Result<(), FrameError> {
    let start = buf.len();
    buf.put_u32(0);
    let result = write_body(buf, header, payload);
    let body_len = buf.len() - start - LEN_PREFIX;
    if let Err(e) = result {
        buf.truncate(start);
        return Err(e);
    }
    if body_len > MAX_FRAME_LEN {
        buf.truncate(start);
        return Err(FrameError::TooLarge { len: body_len });
    }
    // `body_len <= MAX_FRAME_LEN` so it fits in a u32.
    buf[start..start + LEN_PREFIX].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(())
}

fn write_body<P: Serialize + ?Sized>(
    buf: &mut BytesMut,
    header: &Header<'_>,
    payload: Option<&P>,
) -> Result<(), FrameError> {
    let mut w = buf.writer();
    postcard::to_io(header, &mut w).map_err(FrameError::Encode)?;
    if let Some(p) = payload {
        postcard::to_io(p, &mut w).map_err(FrameError::Encode)?;
    }
    Ok(())
}

/// Splits a frame body (without its length prefix) into its header and payload bytes.
pub fn decode(frame: &[u8]) -> Result<(Header<'_>, &[u8]), FrameError> {
    postcard::take_from_bytes(frame).map_err(FrameError::Decode)
}

/// Decodes a payload that followed a `Request` or `Response` header.
pub fn decode_payload<'de, T: Deserialize<'de>>(payload: &'de [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use tokio_util::codec::Decoder;

    fn roundtrip(header: Header<'_>, payload: Option<&Vec<String>>) {
        let mut buf = BytesMut::new();
        let wire = encode(&mut buf, &header, payload).expect("encode");
        assert!(buf.is_empty());
        let mut rx = BytesMut::from(&wire[..]);
        let body = codec()
            .decode(&mut rx)
            .expect("codec")
            .expect("a whole frame");
        let (got, rest) = decode(&body).expect("decode");
        assert_eq!(got, header);
        match payload {
            Some(p) => assert_eq!(&decode_payload::<Vec<String>>(rest).expect("payload"), p),
            None => assert!(rest.is_empty()),
        }
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let payload = vec!["hello".to_string(), "wörld".to_string()];
        roundtrip(
            Header::Request {
                stream_id: 7,
                window: 64,
                endpoint: "generate",
                request_id: "req-1",
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            },
            Some(&payload),
        );
        roundtrip(
            Header::Response {
                stream_id: u64::MAX,
            },
            Some(&payload),
        );
        roundtrip(Header::End { stream_id: 1 }, None);
        roundtrip(
            Header::Error {
                stream_id: 2,
                error: ServeError::new(ErrorKind::Overloaded, "full"),
            },
            None,
        );
        roundtrip(Header::Cancel { stream_id: 3 }, None);
        roundtrip(
            Header::Credit {
                stream_id: 4,
                n: 32,
            },
            None,
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode(&[]).is_err());
        assert!(decode_payload::<String>(&[0x05, b'a']).is_err());
    }

    #[test]
    fn appended_frames_read_back_in_order() {
        let mut buf = BytesMut::new();
        append(&mut buf, &Header::Response { stream_id: 1 }, Some(&"a")).expect("a");
        append(&mut buf, &Header::End { stream_id: 1 }, None::<&()>).expect("end");
        let mut codec = codec();
        let first = codec.decode(&mut buf).expect("codec").expect("first");
        let (h, rest) = decode(&first).expect("first");
        assert_eq!(h, Header::Response { stream_id: 1 });
        assert_eq!(decode_payload::<&str>(rest).expect("payload"), "a");
        let second = codec.decode(&mut buf).expect("codec").expect("second");
        assert_eq!(
            decode(&second).expect("second").0,
            Header::End { stream_id: 1 }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut body = Vec::new();
        for _ in 0..20_000 {
            body.clear();
            body.extend((0..rng.usize(0..48)).map(|_| rng.u8(..)));
            if let Ok((_, rest)) = decode(&body) {
                let _ = decode_payload::<(String, Option<u64>, Vec<u32>)>(rest);
            }
        }
    }

    #[test]
    fn buffer_is_reused_between_frames() {
        let mut buf = BytesMut::with_capacity(256);
        let a = encode(&mut buf, &Header::End { stream_id: 1 }, None::<&()>).expect("a");
        drop(a);
        let b = encode(&mut buf, &Header::End { stream_id: 2 }, None::<&()>).expect("b");
        assert_eq!(
            decode(&b[LEN_PREFIX..]).expect("b").0,
            Header::End { stream_id: 2 }
        );
    }
}
