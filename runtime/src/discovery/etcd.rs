//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, served on the client port
//! by etcd ≥ 3.4): lease grant / keep-alive / revoke, put, range and watch — what
//! registration and discovery need, with no protobuf toolchain at build time.
//!
//! Keys and values travel base64-encoded and 64-bit integers as strings, as the gateway
//! wants them.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::DiscoveryError;

/// One key under a prefix, as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete(String),
}

#[derive(Clone)]
pub struct EtcdClient {
    http: reqwest::Client,
    endpoint: String,
}

impl EtcdClient {
    /// `endpoint` is a client URL such as `http://127.0.0.1:2379`.
    pub fn new(endpoint: &str, request_timeout: Duration) -> Result<Self, DiscoveryError> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        if !endpoint.starts_with("http://") {
            return Err(DiscoveryError::BadUrl(endpoint));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(request_timeout)
            .read_timeout(request_timeout)
            .build()
            .map_err(|e| DiscoveryError::Etcd(e.to_string()))?;
        Ok(EtcdClient { http, endpoint })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, DiscoveryError> {
        let url = format!("{}{path}", self.endpoint);
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| DiscoveryError::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| DiscoveryError::Unreachable(format!("{url}: {e}")))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            if text.contains("lease not found") {
                return Err(DiscoveryError::LeaseNotFound);
            }
            return Err(DiscoveryError::Etcd(format!("{url}: {status}: {text}")));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| DiscoveryError::Etcd(format!("{url}: unexpected answer: {e}")))
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, DiscoveryError> {
        let ttl = ttl.as_secs().max(1);
        let resp: LeaseGrant = self
            .post("/v3/lease/grant", json!({ "TTL": ttl.to_string() }))
            .await?;
        if let Some(error) = resp.error.filter(|e| !e.is_empty()) {
            return Err(DiscoveryError::Etcd(error));
        }
        parse_i64(&resp.id).ok_or_else(|| DiscoveryError::Etcd("lease grant without an id".into()))
    }

    /// Refreshes a lease; returns its remaining TTL in seconds, or `LeaseNotFound` if it
    /// expired (or etcd lost it).
    pub async fn lease_keep_alive(&self, lease: i64) -> Result<i64, DiscoveryError> {
        let resp: KeepAliveAnswer = self
            .post("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        if let Some(error) = resp.error {
            let text = error.message.unwrap_or_default();
            if text.contains("lease not found") {
                return Err(DiscoveryError::LeaseNotFound);
            }
            return Err(DiscoveryError::Etcd(text));
        }
        let ttl = resp
            .result
            .and_then(|r| r.ttl)
            .and_then(|t| parse_i64(&t))
            .unwrap_or(0);
        if ttl <= 0 {
            return Err(DiscoveryError::LeaseNotFound);
        }
        Ok(ttl)
    }

    pub async fn lease_revoke(&self, lease: i64) -> Result<(), DiscoveryError> {
        let _: serde_json::Value = self
            .post("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .await?;
        Ok(())
    }

    /// Puts `key` = `value`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), DiscoveryError> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let _: serde_json::Value = self.post("/v3/kv/put", body).await?;
        Ok(())
    }

    /// Deletes every key under `prefix`; returns how many there were.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, DiscoveryError> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
        });
        let resp: serde_json::Value = self.post("/v3/kv/deleterange", body).await?;
        Ok(resp
            .get("deleted")
            .and_then(|d| d.as_str())
            .and_then(parse_i64)
            .map_or(0, |n| n.max(0) as u64))
    }

    /// Every key under `prefix`, sorted, and the store revision they were read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), DiscoveryError> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "sort_target": "KEY",
        });
        let resp: RangeAnswer = self.post("/v3/kv/range", body).await?;
        let revision = resp
            .header
            .and_then(|h| h.revision)
            .and_then(|r| parse_i64(&r));
        let kvs = resp
            .kvs
            .unwrap_or_default()
            .into_iter()
            .map(JsonKv::decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((kvs, revision.unwrap_or(0)))
    }

    /// Changes under `prefix` from `start_revision` on. The stream ends (or yields an
    /// error) when the connection to etcd breaks; the caller resynchronises.
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<impl Stream<Item = Result<Vec<WatchEvent>, DiscoveryError>>, DiscoveryError> {
        let url = format!("{}/v3/watch", self.endpoint);
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        // A watch is long-lived: no read timeout on it; liveness is the caller's concern.
        let resp = reqwest::Client::builder()
            .build()
            .map_err(|e| DiscoveryError::Etcd(e.to_string()))?
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| DiscoveryError::Unreachable(format!("{url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(DiscoveryError::Etcd(format!("{url}: {}", resp.status())));
        }
        let mut lines = LineSplitter::default();
        let bytes = resp.bytes_stream();
        Ok(bytes.flat_map(move |chunk| {
            let batches: Vec<Result<Vec<WatchEvent>, DiscoveryError>> = match chunk {
                Err(e) => vec![Err(DiscoveryError::Unreachable(format!("watch: {e}")))],
                Ok(chunk) => lines
                    .push(&chunk)
                    .into_iter()
                    .filter_map(|line| decode_watch_line(&line).transpose())
                    .collect(),
            };
            futures::stream::iter(batches)
        }))
    }
}

/// The smallest key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn parse_i64(s: &str) -> Option<i64> {
    s.parse().ok()
}

#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=at).collect();
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                lines.push(line);
            }
        }
        lines
    }
}

/// One line of the watch stream: `None` for the "created" line and progress notices.
fn decode_watch_line(line: &[u8]) -> Result<Option<Vec<WatchEvent>>, DiscoveryError> {
    let answer: WatchAnswer = serde_json::from_slice(line)
        .map_err(|e| DiscoveryError::Etcd(format!("watch: unexpected answer: {e}")))?;
    if let Some(error) = answer.error {
        return Err(DiscoveryError::Etcd(format!(
            "watch: {}",
            error.message.unwrap_or_default()
        )));
    }
    let Some(result) = answer.result else {
        return Ok(None);
    };
    if result.canceled.unwrap_or(false) {
        let why = result.cancel_reason.unwrap_or_else(|| "compacted".into());
        return Err(DiscoveryError::Etcd(format!("watch cancelled: {why}")));
    }
    let Some(events) = result.events else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let kv = e.kv.decode()?;
        out.push(match e.kind.as_deref() {
            Some("DELETE") => WatchEvent::Delete(kv.key),
            _ => WatchEvent::Put(kv),
        });
    }
    Ok(Some(out))
}

#[derive(Deserialize)]
struct LeaseGrant {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct KeepAliveAnswer {
    result: Option<KeepAliveResult>,
    error: Option<GatewayError>,
}

#[derive(Deserialize)]
struct KeepAliveResult {
    #[serde(rename = "TTL")]
    ttl: Option<String>,
}

#[derive(Deserialize)]
struct GatewayError {
    message: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    revision: Option<String>,
}

#[derive(Deserialize)]
struct RangeAnswer {
    header: Option<Header>,
    kvs: Option<Vec<JsonKv>>,
}

#[derive(Deserialize, Serialize)]
struct JsonKv {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    lease: Option<String>,
}

impl JsonKv {
    fn decode(self) -> Result<KeyValue, DiscoveryError> {
        let bad =
            |e: base64::DecodeError| DiscoveryError::Etcd(format!("bad base64 from etcd: {e}"));
        let key = B64.decode(&self.key).map_err(bad)?;
        let value = B64.decode(&self.value).map_err(bad)?;
        Ok(KeyValue {
            key: String::from_utf8_lossy(&key).into_owned(),
            value,
            lease: self.lease.as_deref().and_then(parse_i64).unwrap_or(0),
        })
    }
}

#[derive(Deserialize)]
struct WatchAnswer {
    result: Option<WatchResult>,
    error: Option<GatewayError>,
}

#[derive(Deserialize)]
struct WatchResult {
    events: Option<Vec<JsonEvent>>,
    canceled: Option<bool>,
    cancel_reason: Option<String>,
}

#[derive(Deserialize)]
struct JsonEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    kv: JsonKv,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn watch_lines_decode_puts_and_deletes() {
        let mut lines = LineSplitter::default();
        let a = br#"{"result":{"header":{"revision":"2"},"created":true}}"#;
        let b = br#"{"result":{"events":[{"kv":{"key":"YS8x","value":"eA==","lease":"7"}},{"type":"DELETE","kv":{"key":"YS8y"}}]}}"#;
        let mut stream = a.to_vec();
        stream.push(b'\n');
        stream.extend_from_slice(b);
        stream.push(b'\n');
        let (first, second) = stream.split_at(30);
        let mut got = lines.push(first);
        got.extend(lines.push(second));
        assert_eq!(got.len(), 2);
        assert_eq!(decode_watch_line(&got[0]).expect("created"), None);
        assert_eq!(
            decode_watch_line(&got[1]).expect("events"),
            Some(vec![
                WatchEvent::Put(KeyValue {
                    key: "a/1".into(),
                    value: b"x".to_vec(),
                    lease: 7
                }),
                WatchEvent::Delete("a/2".into()),
            ])
        );
        assert!(decode_watch_line(b"not json").is_err());
    }
}
