//! Toxics: what toxiproxy 2.x calls the faults of one stream of a proxy, with its JSON
//! (`name`, `type`, `stream`, `toxicity`, `attributes`) and its semantics.

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ApiError;

/// Which direction of a proxied connection a toxic acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Client → upstream (requests).
    Upstream,
    /// Upstream → client (responses). Toxiproxy's default.
    Downstream,
}

impl Stream {
    /// `upstream` or `downstream`, as toxiproxy writes it.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }
}

/// A toxic's kind and its attributes, typed: toxiproxy's seven kinds and its `noop`, with its
/// attribute names and units, plus two of this crate's own. Each acts on one stream of every
/// connection as toxiproxy's `toxics/*.go` do; [the module](super) says how toxics start,
/// restart and stop on open connections.
#[derive(Debug, Clone, PartialEq)]
pub enum ToxicKind {
    /// `latency`: each chunk is delayed by `latency` ± `jitter` milliseconds, counted from
    /// when the proxy read it (so chunks that queue behind a delayed one are not delayed
    /// twice) or, after an earlier `latency` of the same stream, from when that one let it go
    /// (so two latencies add up).
    Latency {
        /// Milliseconds.
        latency: u64,
        /// Milliseconds, ±.
        jitter: u64,
    },
    /// `bandwidth`: at most `rate` KB (1000 bytes) per second — each byte is held 1/`rate`
    /// ms, chunks of more than 100 ms' worth go in 100 ms slices; 0 is unlimited.
    Bandwidth {
        /// KB/s.
        rate: u64,
    },
    /// `slow_close`: the end of the stream (its source closed) is passed on `delay` ms late;
    /// the data before it is not delayed.
    SlowClose {
        /// Milliseconds.
        delay: u64,
    },
    /// `timeout`: no data gets through — it is dropped, never delivered; the connection is
    /// closed (FIN) `timeout` ms after the toxic started on it, or — with 0 — when the toxic
    /// is removed (toxiproxy's `Cleanup`: removing a `timeout` closes every connection of its
    /// proxy, also those it was not drawn to act on).
    Timeout {
        /// Milliseconds; 0: never closes.
        timeout: u64,
    },
    /// `reset_peer`: the next chunk (or the end of the stream) is dropped and sets it off:
    /// `timeout` ms later both sockets of the connection are reset (TCP RST). Nothing passes
    /// it meanwhile; once set off, neither an update nor its removal stops it.
    ResetPeer {
        /// Milliseconds.
        timeout: u64,
    },
    /// `slicer`: chunks are cut into pieces of about `average_size` ± `size_variation` bytes
    /// (toxiproxy's recursive halving), each followed by a pause of `delay` microseconds.
    Slicer {
        /// Bytes.
        average_size: u64,
        /// Bytes; less than the average.
        size_variation: u64,
        /// Microseconds between pieces.
        delay: u64,
    },
    /// `limit_data`: the stream passes `bytes` bytes (the chunk that crosses the limit is cut),
    /// then the connection is closed (FIN). Counted per connection from the toxic's addition.
    LimitData {
        /// Bytes.
        bytes: u64,
    },
    /// toxiproxy's `noop`: passes everything on.
    Noop,
    /// `blackhole` (this crate's): nothing gets through and nothing is closed or dropped —
    /// the data (and the end of the stream) waits in the proxy and flows on, byte for byte,
    /// when the toxic is removed (a frozen network).
    Blackhole,
    /// `refuse` (this crate's): new connections are accepted and reset at once (existing
    /// ones are untouched), like a crashed server whose port still answers.
    Refuse,
}

impl ToxicKind {
    /// The toxiproxy type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            ToxicKind::Latency { .. } => "latency",
            ToxicKind::Bandwidth { .. } => "bandwidth",
            ToxicKind::SlowClose { .. } => "slow_close",
            ToxicKind::Timeout { .. } => "timeout",
            ToxicKind::ResetPeer { .. } => "reset_peer",
            ToxicKind::Slicer { .. } => "slicer",
            ToxicKind::LimitData { .. } => "limit_data",
            ToxicKind::Noop => "noop",
            ToxicKind::Blackhole => "blackhole",
            ToxicKind::Refuse => "refuse",
        }
    }

    /// The attributes, as toxiproxy writes them.
    fn attributes(&self) -> Value {
        match self {
            ToxicKind::Latency { latency, jitter } => {
                serde_json::json!({ "latency": latency, "jitter": jitter })
            }
            ToxicKind::Bandwidth { rate } => serde_json::json!({ "rate": rate }),
            ToxicKind::SlowClose { delay } => serde_json::json!({ "delay": delay }),
            ToxicKind::Timeout { timeout } | ToxicKind::ResetPeer { timeout } => {
                serde_json::json!({ "timeout": timeout })
            }
            ToxicKind::Slicer {
                average_size,
                size_variation,
                delay,
            } => serde_json::json!({
                "average_size": average_size,
                "size_variation": size_variation,
                "delay": delay,
            }),
            ToxicKind::LimitData { bytes } => serde_json::json!({ "bytes": bytes }),
            ToxicKind::Noop | ToxicKind::Blackhole | ToxicKind::Refuse => serde_json::json!({}),
        }
    }

    /// The kind `type_name` with `attributes` (missing or null ones 0, as toxiproxy), `current`
    /// being the values an update starts from (missing or null ones keep theirs).
    fn parse(
        type_name: &str,
        attributes: &Value,
        current: Option<&ToxicKind>,
    ) -> Result<ToxicKind, ApiError> {
        let base = current.map(ToxicKind::attributes).unwrap_or(Value::Null);
        let get = |name: &str| -> Result<u64, ApiError> {
            let given = attributes.get(name).filter(|v| !v.is_null());
            match given.or_else(|| base.get(name)) {
                None | Some(Value::Null) => Ok(0),
                Some(v) => v.as_u64().ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "bad request body: attribute {name} must be a non-negative integer"
                    ))
                }),
            }
        };
        Ok(match type_name {
            "latency" => ToxicKind::Latency {
                latency: get("latency")?,
                jitter: get("jitter")?,
            },
            "bandwidth" => ToxicKind::Bandwidth { rate: get("rate")? },
            "slow_close" => ToxicKind::SlowClose {
                delay: get("delay")?,
            },
            "timeout" => ToxicKind::Timeout {
                timeout: get("timeout")?,
            },
            "reset_peer" => ToxicKind::ResetPeer {
                timeout: get("timeout")?,
            },
            "slicer" => ToxicKind::Slicer {
                average_size: get("average_size")?,
                size_variation: get("size_variation")?,
                delay: get("delay")?,
            },
            "limit_data" => ToxicKind::LimitData {
                bytes: get("bytes")?,
            },
            "noop" => ToxicKind::Noop,
            "blackhole" => ToxicKind::Blackhole,
            "refuse" => ToxicKind::Refuse,
            _ => return Err(ApiError::invalid_toxic_type()),
        })
    }

    /// A latency ± jitter draw in milliseconds (toxiproxy's: uniform in [latency − jitter,
    /// latency + jitter)); below 0 when the jitter is larger than the latency.
    pub(crate) fn latency_ms(latency: u64, jitter: u64) -> i64 {
        let mut ms = i64::try_from(latency).unwrap_or(i64::MAX);
        if jitter > 0 {
            let j = i64::try_from(jitter).unwrap_or(i64::MAX / 2);
            ms = ms.saturating_add(rand::rng().random_range(-j..j));
        }
        ms
    }

    /// The cut points of `len` bytes for a slicer (toxiproxy's recursive halving).
    pub(crate) fn slices(len: usize, average: usize, variation: usize) -> Vec<(usize, usize)> {
        fn cut(
            start: usize,
            end: usize,
            average: usize,
            variation: usize,
            out: &mut Vec<(usize, usize)>,
        ) {
            if (end - start).saturating_sub(average) <= variation || end - start <= 1 {
                out.push((start, end));
                return;
            }
            let mut mid = start + (end - start) / 2;
            if variation > 0 {
                let v = variation as i64;
                let shifted = mid as i64 + rand::rng().random_range(-v..v);
                mid = shifted.clamp(start as i64 + 1, end as i64 - 1) as usize;
            }
            cut(start, mid, average, variation, out);
            cut(mid, end, average, variation, out);
        }
        let mut out = Vec::new();
        if len > 0 {
            cut(0, len, average, variation, &mut out);
        }
        out
    }
}

/// One toxic of a proxy, as toxiproxy's API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Toxic {
    /// Unique per proxy; defaults to `<type>_<stream>`.
    pub name: String,
    /// The direction it acts on.
    pub stream: Stream,
    /// The chance (0..=1) that it acts on a given connection, drawn on each connection every
    /// time the toxic starts there: when the connection opens or the toxic is added, and at
    /// each update.
    pub toxicity: f32,
    /// What it does.
    pub kind: ToxicKind,
}

/// A toxic as JSON comes in: every field optional.
#[derive(Debug, Deserialize)]
struct ToxicBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    type_name: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    toxicity: Option<f32>,
    #[serde(default)]
    attributes: Option<Value>,
}

impl Toxic {
    /// A toxic acting on every connection.
    pub fn new(name: impl Into<String>, stream: Stream, kind: ToxicKind) -> Toxic {
        Toxic {
            name: name.into(),
            stream,
            toxicity: 1.0,
            kind,
        }
    }

    /// Toxics of `kind` on both streams of a proxy, named `<name>_upstream` and
    /// `<name>_downstream`.
    pub fn both_ways(name: &str, kind: ToxicKind) -> [Toxic; 2] {
        [Stream::Upstream, Stream::Downstream]
            .map(|stream| Toxic::new(format!("{name}_{}", stream.name()), stream, kind.clone()))
    }

    /// The toxic a `POST /proxies/{proxy}/toxics` body describes (toxiproxy's defaults:
    /// downstream, toxicity 1, name `<type>_<stream>`), checked in toxiproxy's order: the
    /// body, the stream (either case), the type, whether its name is `taken` (409), the
    /// attributes.
    pub(crate) fn from_json(body: &[u8], taken: impl Fn(&str) -> bool) -> Result<Toxic, ApiError> {
        let b: ToxicBody = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))?;
        let stream_name = b.stream.unwrap_or_else(|| "downstream".into());
        let stream = match stream_name.to_lowercase().as_str() {
            "upstream" => Stream::Upstream,
            "downstream" => Stream::Downstream,
            _ => return Err(ApiError::invalid_stream()),
        };
        let type_name = b.type_name.unwrap_or_default();
        let name = b
            .name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{type_name}_{stream_name}"));
        ToxicKind::parse(&type_name, &Value::Null, None)?;
        if taken(&name) {
            return Err(ApiError::toxic_exists());
        }
        let kind = ToxicKind::parse(
            &type_name,
            b.attributes.as_ref().unwrap_or(&Value::Null),
            None,
        )?;
        let toxicity = b.toxicity.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&toxicity) {
            return Err(ApiError::bad_request(
                "bad request body: toxicity must be between 0 and 1".into(),
            ));
        }
        Ok(Toxic {
            name,
            stream,
            toxicity,
            kind,
        })
    }

    /// This toxic updated by a `POST/PATCH /proxies/{proxy}/toxics/{toxic}` body (attributes
    /// and toxicity; attributes not given keep their values).
    pub(crate) fn updated(&self, body: &[u8]) -> Result<Toxic, ApiError> {
        let b: ToxicBody = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))?;
        let kind = ToxicKind::parse(
            self.kind.type_name(),
            b.attributes.as_ref().unwrap_or(&Value::Null),
            Some(&self.kind),
        )?;
        let toxicity = b.toxicity.unwrap_or(self.toxicity);
        if !(0.0..=1.0).contains(&toxicity) {
            return Err(ApiError::bad_request(
                "bad request body: toxicity must be between 0 and 1".into(),
            ));
        }
        Ok(Toxic {
            kind,
            toxicity,
            ..self.clone()
        })
    }

    /// The JSON toxiproxy answers with.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "type": self.kind.type_name(),
            "stream": self.stream.name(),
            "toxicity": self.toxicity,
            "attributes": self.kind.attributes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_toxic_takes_toxiproxys_defaults_and_attribute_names() {
        let t = Toxic::from_json(
            br#"{"type":"latency","attributes":{"latency":100}}"#,
            |_| false,
        )
        .unwrap();
        assert_eq!(t.name, "latency_downstream");
        assert_eq!(t.stream, Stream::Downstream);
        assert_eq!(t.toxicity, 1.0);
        assert_eq!(
            t.kind,
            ToxicKind::Latency {
                latency: 100,
                jitter: 0
            }
        );
        assert_eq!(
            t.to_json(),
            serde_json::json!({"name":"latency_downstream","type":"latency","stream":"downstream",
                "toxicity":1.0,"attributes":{"latency":100,"jitter":0}})
        );
        let u = t
            .updated(br#"{"attributes":{"jitter":5,"latency":null}}"#)
            .unwrap();
        assert_eq!(
            u.kind,
            ToxicKind::Latency {
                latency: 100,
                jitter: 5
            }
        );
    }

    #[test]
    fn bad_toxics_are_refused_with_toxiproxys_errors() {
        let status = |body: &[u8]| Toxic::from_json(body, |_| false).unwrap_err().status;
        assert_eq!(status(br#"{"type":"nonsense"}"#), 400);
        assert_eq!(status(br#"{"type":"latency","stream":"sideways"}"#), 400);
        assert_eq!(status(br#"{"type":"latency","toxicity":2}"#), 400);
        assert_eq!(
            status(br#"{"type":"latency","attributes":{"latency":-1}}"#),
            400
        );
        assert_eq!(status(b"not json"), 400);
        // A taken name is refused before bad attributes are, as toxiproxy.
        let taken = Toxic::from_json(
            br#"{"type":"latency","name":"t","attributes":{"latency":-1}}"#,
            |n| n == "t",
        )
        .unwrap_err();
        assert_eq!(taken.status, 409);
        // The stream in either case, and noop.
        let t = Toxic::from_json(br#"{"type":"noop","stream":"UPSTREAM"}"#, |_| false).unwrap();
        assert_eq!(
            (t.name.as_str(), t.stream, t.kind),
            ("noop_UPSTREAM", Stream::Upstream, ToxicKind::Noop)
        );
    }

    proptest! {
        #[test]
        fn slices_cover_the_chunk_in_order_and_keep_near_the_average(
            len in 0usize..5000, average in 1usize..200, variation_pct in 0usize..100,
        ) {
            let variation = average * variation_pct / 100;
            let s = ToxicKind::slices(len, average, variation);
            let mut at = 0;
            for &(a, b) in &s {
                prop_assert_eq!(a, at);
                prop_assert!(b > a);
                at = b;
            }
            prop_assert_eq!(at, len);
            for &(a, b) in &s {
                prop_assert!(b - a <= average + variation || b - a <= 1, "{}", b - a);
            }
        }
    }
}
