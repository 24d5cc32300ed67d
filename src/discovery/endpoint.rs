//! One registered endpoint and its stored form: the JSON of Go's `naming/endpoints.Update`.

use serde::Serialize;
use serde_json::Value;

use crate::Error;

/// The largest stored value a registration writes: etcd refuses requests over its
/// `--max-request-bytes` (1.5 MiB by default), so larger metadata is refused before sending.
pub const MAX_ENDPOINT_JSON_LEN: usize = 1 << 20;

/// A service endpoint: an address and optional metadata, stored the way etcd's Go
/// `naming/endpoints` stores them (and grpc-go's etcd resolver reads them).
///
/// ```
/// use etcd_coord::discovery::Endpoint;
///
/// let e = Endpoint::new("10.0.0.1:50051").with_metadata(serde_json::json!({"zone": "a"}));
/// assert_eq!(e.addr(), "10.0.0.1:50051");
/// assert_eq!(e.metadata()["zone"], "a");
/// assert_eq!(e.to_json(), r#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":{"zone":"a"}}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    addr: String,
    metadata: Value,
}

/// Go's `endpoints.Update` as Go's `encoding/json` writes it (no JSON tags: the field names
/// are the Go names).
#[derive(Serialize)]
struct Update<'a> {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: &'a str,
    #[serde(rename = "Metadata")]
    metadata: &'a Value,
}

/// What a stored value says about its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    /// The key is this endpoint (whatever the value's `Op`: Go's watch channel and its `List`
    /// report every put as an Add).
    Add(Endpoint),
}

/// Go's operation Add, which we write.
const OP_ADD: u8 = 0;

impl Endpoint {
    /// An endpoint at `addr` (for gRPC, `host:port`), without metadata (`null`).
    pub fn new(addr: impl Into<String>) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            metadata: Value::Null,
        }
    }

    /// The same endpoint with `metadata` (any JSON).
    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Endpoint {
        self.metadata = metadata;
        self
    }

    /// The address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The metadata (`Value::Null` when there is none).
    pub fn metadata(&self) -> &Value {
        &self.metadata
    }

    /// The stored form: `{"Op":0,"Addr":…,"Metadata":…}`, byte for byte what Go's
    /// `endpoints.Manager` writes for the same endpoint when Go holds the metadata as a map or
    /// plain value (object keys sorted; `<`, `>`, `&`, U+2028 and U+2029 escaped as Go's
    /// `encoding/json` does). Go writes a struct's fields, or a `json.RawMessage`'s bytes, in
    /// their own order, and may spell some floating-point numbers differently (`1e+21` for
    /// `1e21`); readers compare values, not bytes, so this never matters to discovery.
    pub fn to_json(&self) -> String {
        let plain = serde_json::to_string(&Update {
            op: OP_ADD,
            addr: &self.addr,
            metadata: &self.metadata,
        })
        .expect("a serde_json::Value always serializes");
        go_html_escape(plain)
    }

    /// Reads a stored value as Go's `naming/endpoints` does: with `encoding/json`'s rules
    /// (field names match without regard to case, `Op` and `Metadata` may be missing — etcd's
    /// docs write `{"Addr":"1.2.3.4"}` — and unknown fields are ignored), and whatever its
    /// `Op`: Go's watch channel and `List` report every put as an Add, so a stored `Op` 1
    /// (Delete) or 7 is an endpoint too. `Op` must still be what Go can decode into its
    /// `uint8`, or Go skips the value.
    ///
    /// One difference from Go: a value without an address (no `Addr`, `null` or `""`) is an
    /// error here, where Go reports an endpoint with an empty address — which no client can
    /// dial.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (saying why) for a value that is not a JSON object, has no
    /// non-empty `Addr` string, or an `Op` that is not an integer from 0 to 255.
    pub fn from_json(value: &[u8]) -> Result<Endpoint, Error> {
        match decode(value)? {
            Stored::Add(e) => Ok(e),
        }
    }

    /// `Ok` if this endpoint can be registered.
    pub(crate) fn validate(&self) -> Result<String, Error> {
        if self.addr.is_empty() {
            return Err(Error::InvalidArgument("endpoint address is empty".into()));
        }
        let json = self.to_json();
        if json.len() > MAX_ENDPOINT_JSON_LEN {
            return Err(Error::InvalidArgument(format!(
                "endpoint {} is {} bytes as JSON; at most {MAX_ENDPOINT_JSON_LEN} are allowed",
                self.addr,
                json.len()
            )));
        }
        Ok(json)
    }
}

/// Go's `encoding/json` escapes these characters inside strings; outside strings JSON never
/// contains them, so replacing them anywhere in the output is exact.
fn go_html_escape(json: String) -> String {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Decodes a stored value (see [`Endpoint::from_json`]).
pub(crate) fn decode(value: &[u8]) -> Result<Stored, Error> {
    let malformed = |why: String| Error::InvalidArgument(format!("malformed endpoint: {why}"));
    let parsed: Value = serde_json::from_slice(value).map_err(|e| malformed(e.to_string()))?;
    let Value::Object(fields) = parsed else {
        return Err(malformed("not a JSON object".into()));
    };
    // Go matches field names case-insensitively, preferring an exact match.
    let field = |name: &str| {
        fields.get(name).or_else(|| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
    };
    // Go decodes `Op` into a uint8 and then ignores it: any put is an Add. A null leaves it
    // unset; anything that is not an integer from 0 to 255 fails Go's decoding.
    match field("Op") {
        None | Some(Value::Null) => {}
        Some(op) => {
            if op.as_u64().is_none_or(|n| n > u64::from(u8::MAX)) {
                return Err(malformed(format!(
                    "Op {op} is not an integer from 0 to 255"
                )));
            }
        }
    }
    let addr = match field("Addr") {
        Some(Value::String(a)) if !a.is_empty() => a.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(malformed("no address (Addr)".into()))
        }
        Some(other) => return Err(malformed(format!("Addr {other} is not a string"))),
    };
    let metadata = field("Metadata").cloned().unwrap_or(Value::Null);
    Ok(Stored::Add(Endpoint { addr, metadata }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn writes_exactly_what_gos_manager_writes() {
        assert_eq!(
            Endpoint::new("10.0.0.1:80").to_json(),
            r#"{"Op":0,"Addr":"10.0.0.1:80","Metadata":null}"#
        );
        assert_eq!(
            Endpoint::new("h:1").with_metadata(json!("m")).to_json(),
            r#"{"Op":0,"Addr":"h:1","Metadata":"m"}"#
        );
        assert_eq!(
            Endpoint::new("a&b")
                .with_metadata(json!({"z": "<x>", "a": 1}))
                .to_json(),
            r#"{"Op":0,"Addr":"a\u0026b","Metadata":{"a":1,"z":"\u003cx\u003e"}}"#,
            "keys sorted and HTML characters escaped, as Go's json.Marshal does"
        );
    }

    #[test]
    fn reads_values_without_op_or_metadata_and_in_any_case() {
        assert_eq!(
            decode(br#"{"Addr":"1.2.3.4"}"#).unwrap(),
            Stored::Add(Endpoint::new("1.2.3.4"))
        );
        assert_eq!(
            decode(br#"{"addr":"1.2.3.4","metadata":{"w":2},"op":0,"extra":true}"#).unwrap(),
            Stored::Add(Endpoint::new("1.2.3.4").with_metadata(json!({"w": 2})))
        );
    }

    #[test]
    fn every_op_go_can_decode_is_an_add_as_for_gos_watch_channel() {
        for (value, addr) in [
            (&br#"{"Op":1,"Addr":"1.2.3.4"}"#[..], "1.2.3.4"),
            (br#"{"Op":7,"Addr":"a"}"#, "a"),
            (br#"{"Op":255,"Addr":"b"}"#, "b"),
            (br#"{"Op":null,"Addr":"c"}"#, "c"),
        ] {
            assert_eq!(
                decode(value).unwrap(),
                Stored::Add(Endpoint::new(addr)),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn rejects_what_is_not_an_endpoint_with_a_reason() {
        for bad in [
            &b""[..],
            b"not json",
            b"[1,2]",
            b"\"1.2.3.4\"",
            br#"{"Metadata":1}"#,
            br#"{"Addr":""}"#,
            br#"{"Addr":7}"#,
            br#"{"Op":1}"#,
            br#"{"Op":256,"Addr":"a"}"#,
            br#"{"Op":-1,"Addr":"a"}"#,
            br#"{"Op":1.5,"Addr":"a"}"#,
            br#"{"Op":"0","Addr":"a"}"#,
            b"null",
            b"\xff\xfe",
        ] {
            match decode(bad) {
                Err(Error::InvalidArgument(why)) => assert!(why.starts_with("malformed")),
                other => panic!("{:?} decoded as {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }

    #[test]
    fn refuses_to_register_what_etcd_would_refuse() {
        assert!(matches!(
            Endpoint::new("").validate(),
            Err(Error::InvalidArgument(_))
        ));
        let huge = Endpoint::new("a:1").with_metadata(json!("x".repeat(MAX_ENDPOINT_JSON_LEN)));
        assert!(matches!(huge.validate(), Err(Error::InvalidArgument(_))));
    }

    fn metadata() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn every_endpoint_reads_back_as_itself(addr in ".{1,40}", meta in metadata()) {
            let e = Endpoint::new(addr).with_metadata(meta);
            prop_assert_eq!(decode(e.to_json().as_bytes()).unwrap(), Stored::Add(e));
        }

        #[test]
        fn no_byte_string_makes_decoding_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}
