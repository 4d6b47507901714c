//! vLLM's KV-event wire format, decoded from MessagePack.
//!
//! Written from `vllm/distributed/kv_events.py` of vLLM 0.33.0 (the wheel on PyPI; file
//! sha256 82b362a0…895ee). SGLang publishes the same classes. A ZeroMQ PUB message is three
//! frames: topic, an 8-byte big-endian sequence number, and the msgspec-encoded
//! `KVEventBatch`:
//!
//! - `EventBatch` is `array_like`: `[ts: float, events: list, data_parallel_rank?: int]`.
//! - each event is a tagged struct, in 0.33 a map whose `"type"` names the class
//!   (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`); releases before 0.11 made events
//!   `array_like` too, `["BlockStored", block_hashes, parent, token_ids, block_size, …]`.
//!   Both are read.
//! - a block hash (`ExternalBlockHash`) is `bytes` or, with
//!   `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, an `int`.
//! - `medium` is `"GPU"`, `"CPU"`, `"STORAGE"` or nil; only GPU (or unspecified) blocks are
//!   what a router can reuse.

use rmpv::Value;

/// A block hash as the engine writes it: opaque, only compared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineHash {
    Int(i128),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum WireEvent {
    BlockStored {
        block_hashes: Vec<EngineHash>,
        parent: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: usize,
        medium: Option<String>,
    },
    BlockRemoved {
        block_hashes: Vec<EngineHash>,
        medium: Option<String>,
    },
    AllBlocksCleared,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WireBatch {
    pub ts: f64,
    pub events: Vec<WireEvent>,
    pub data_parallel_rank: Option<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("not MessagePack: {0}")]
    Msgpack(String),
    #[error("KV event batch: {0}")]
    Shape(String),
    #[error("expected 3 frames (topic, sequence, payload), got {0}")]
    Frames(usize),
    #[error("sequence frame has {0} bytes, expected 8")]
    SeqLen(usize),
}

fn shape(msg: impl Into<String>) -> WireError {
    WireError::Shape(msg.into())
}

/// The sequence number of a PUB message's second frame (big-endian i64; -1 ends a replay).
pub fn sequence(frame: &[u8]) -> Result<i64, WireError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| WireError::SeqLen(frame.len()))?;
    Ok(i64::from_be_bytes(bytes))
}

pub fn decode_batch(payload: &[u8]) -> Result<WireBatch, WireError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).map_err(|e| WireError::Msgpack(e.to_string()))?;
    let Value::Array(items) = v else {
        return Err(shape(
            "a batch is an array [ts, events, data_parallel_rank?]",
        ));
    };
    let ts = items
        .first()
        .and_then(Value::as_f64)
        .ok_or_else(|| shape("ts is not a number"))?;
    let Some(Value::Array(events)) = items.get(1) else {
        return Err(shape("events is not an array"));
    };
    let data_parallel_rank = items.get(2).and_then(Value::as_i64);
    let events = events.iter().map(event).collect::<Result<_, _>>()?;
    Ok(WireBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

/// An event's fields by name, from either encoding.
struct Fields<'a> {
    tag: &'a str,
    map: Vec<(&'a str, &'a Value)>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// Field order of the array-like encoding, after the tag.
const STORED_ORDER: &[&str] = &[
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
];
const REMOVED_ORDER: &[&str] = &["block_hashes", "medium"];

fn fields(v: &Value) -> Result<Fields<'_>, WireError> {
    match v {
        Value::Map(entries) => {
            let mut map = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                if let Some(k) = k.as_str() {
                    map.push((k, v));
                }
            }
            let tag = map
                .iter()
                .find(|(k, _)| *k == "type")
                .and_then(|(_, v)| v.as_str())
                .ok_or_else(|| shape("an event map has no \"type\" tag"))?;
            Ok(Fields { tag, map })
        }
        Value::Array(items) => {
            let tag = items
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| shape("an array-like event does not start with its tag"))?;
            let order = match tag {
                "BlockStored" => STORED_ORDER,
                "BlockRemoved" => REMOVED_ORDER,
                _ => &[],
            };
            let map = order.iter().copied().zip(items.iter().skip(1)).collect();
            Ok(Fields { tag, map })
        }
        _ => Err(shape("an event is neither a map nor an array")),
    }
}

fn hash(v: &Value) -> Result<EngineHash, WireError> {
    match v {
        Value::Binary(b) => Ok(EngineHash::Bytes(b.clone())),
        Value::Integer(i) => i
            .as_i64()
            .map(i128::from)
            .or_else(|| i.as_u64().map(i128::from))
            .map(EngineHash::Int)
            .ok_or_else(|| shape("a block hash integer out of range")),
        _ => Err(shape("a block hash is neither bytes nor an integer")),
    }
}

fn hashes(v: Option<&Value>) -> Result<Vec<EngineHash>, WireError> {
    match v {
        Some(Value::Array(items)) => items.iter().map(hash).collect(),
        _ => Err(shape("block_hashes is not an array")),
    }
}

fn medium(f: &Fields<'_>) -> Option<String> {
    f.get("medium").and_then(Value::as_str).map(str::to_string)
}

fn event(v: &Value) -> Result<WireEvent, WireError> {
    let f = fields(v)?;
    match f.tag {
        "BlockStored" => {
            let parent = match f.get("parent_block_hash") {
                None | Some(Value::Nil) => None,
                Some(p) => Some(hash(p)?),
            };
            let token_ids = match f.get("token_ids") {
                Some(Value::Array(ts)) => ts
                    .iter()
                    .map(|t| {
                        t.as_u64()
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or_else(|| shape("a token id is not a u32"))
                    })
                    .collect::<Result<Vec<u32>, _>>()?,
                _ => return Err(shape("token_ids is not an array")),
            };
            let block_size = f
                .get("block_size")
                .and_then(Value::as_u64)
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| shape("block_size is not a positive integer"))?;
            Ok(WireEvent::BlockStored {
                block_hashes: hashes(f.get("block_hashes"))?,
                parent,
                token_ids,
                block_size,
                medium: medium(&f),
            })
        }
        "BlockRemoved" => Ok(WireEvent::BlockRemoved {
            block_hashes: hashes(f.get("block_hashes"))?,
            medium: medium(&f),
        }),
        "AllBlocksCleared" => Ok(WireEvent::AllBlocksCleared),
        other => Err(shape(format!("unknown event type {other:?}"))),
    }
}
