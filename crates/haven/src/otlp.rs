//! The OTLP/HTTP (protobuf) span exporter of `--otlp-endpoint`. It writes each batch's
//! `ExportTraceServiceRequest` straight from the SDK's span data into the request body, and
//! posts it from the batch processor's own thread.
//!
//! Why not `opentelemetry-otlp`'s exporter: with every request traced, its export was the
//! largest single cost of tracing (BENCHMARKS.md, "Observability"): it converts each span into
//! the generated protobuf structs (a `String` for every attribute's key and value, a `Vec` for
//! every id), groups them through a hash map, encodes them, then frees it all, and hands every
//! request to another thread (reqwest's blocking client). Here a batch costs one body buffer
//! and the encoding itself. The wire format is the same; the tests decode it with the
//! generated types (`opentelemetry-proto`) and compare it with that crate's own conversion.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint};

/// Exports spans to an OTLP/HTTP endpoint as protobuf.
pub struct SpanExporter {
    url: String,
    client: reqwest::Client,
    /// A runtime of the batch processor's thread, which sends the requests.
    rt: tokio::runtime::Runtime,
    /// The encoded `Resource` message of every request.
    resource: Vec<u8>,
    resource_schema: String,
    /// The size of the last request's body, to allocate the next one at once.
    last_len: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for SpanExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanExporter")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SpanExporter {
    /// An exporter posting to `url` (the full `/v1/traces` address), each request given at
    /// most `timeout`.
    pub fn new(url: String, timeout: Duration) -> Result<SpanExporter, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the exporter's runtime: {e}"))?;
        let client = {
            let _in = rt.enter();
            reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?
        };
        Ok(SpanExporter {
            url,
            client,
            rt,
            resource: Vec::new(),
            resource_schema: String::new(),
            last_len: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn post(&self, body: Vec<u8>) -> OTelSdkResult {
        let request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body);
        self.rt.block_on(async {
            let response = request
                .send()
                .await
                .map_err(|e| OTelSdkError::InternalFailure(format!("{}: {e}", self.url)))?;
            let status = response.status();
            // The body (a partial success at most) is read so that the connection is reused.
            let _ = response.bytes().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure(format!(
                    "{} answered {status}",
                    self.url
                )))
            }
        })
    }
}

impl opentelemetry_sdk::trace::SpanExporter for SpanExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        use std::sync::atomic::Ordering;
        let result = if batch.is_empty() {
            Ok(())
        } else {
            let mut body = Vec::with_capacity(self.last_len.load(Ordering::Relaxed) + 64);
            request(&mut body, &self.resource, &self.resource_schema, &batch);
            drop(batch);
            self.last_len.store(body.len(), Ordering::Relaxed);
            self.post(body)
        };
        std::future::ready(result)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut out = Vec::new();
        for (k, v) in resource.iter() {
            nested(&mut out, 1, |o| key_value(o, k.as_str(), v));
        }
        self.resource = out;
        self.resource_schema = resource.schema_url().unwrap_or_default().to_owned();
    }
}

/// Writes an `ExportTraceServiceRequest` of `spans` (one `ResourceSpans`, one `ScopeSpans` per
/// instrumentation scope in the order first seen) into `out`.
pub fn request(out: &mut Vec<u8>, resource: &[u8], resource_schema: &str, spans: &[SpanData]) {
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    for s in spans {
        if !scopes.contains(&&s.instrumentation_scope) {
            scopes.push(&s.instrumentation_scope);
        }
    }
    nested(out, 1, |o| {
        nested(o, 1, |r| r.extend_from_slice(resource));
        for scope in scopes {
            nested(o, 2, |ss| {
                nested(ss, 1, |sc| {
                    string(sc, 1, scope.name());
                    string(sc, 2, scope.version().unwrap_or_default());
                    for kv in scope.attributes() {
                        nested(sc, 3, |o| key_value(o, kv.key.as_str(), &kv.value));
                    }
                });
                for s in spans.iter().filter(|s| s.instrumentation_scope == *scope) {
                    nested(ss, 2, |o| span(o, s));
                }
                string(ss, 3, scope.schema_url().unwrap_or_default());
            });
        }
        string(o, 3, resource_schema);
    });
}

/// The `Span` message of `s`.
fn span(out: &mut Vec<u8>, s: &SpanData) {
    let sc = &s.span_context;
    bytes(out, 1, &sc.trace_id().to_bytes());
    bytes(out, 2, &sc.span_id().to_bytes());
    string(out, 3, &sc.trace_state().header());
    if s.parent_span_id != SpanId::INVALID {
        bytes(out, 4, &s.parent_span_id.to_bytes());
    }
    string(out, 5, &s.name);
    varint(out, 6, kind(&s.span_kind));
    fixed64(out, 7, nanos(s.start_time));
    fixed64(out, 8, nanos(s.end_time));
    attributes(out, 9, &s.attributes);
    varint(out, 10, s.dropped_attributes_count.into());
    for e in &s.events.events {
        nested(out, 11, |o| {
            fixed64(o, 1, nanos(e.timestamp));
            string(o, 2, &e.name);
            attributes(o, 3, &e.attributes);
            varint(o, 4, e.dropped_attributes_count.into());
        });
    }
    varint(out, 12, s.events.dropped_count.into());
    for l in &s.links.links {
        nested(out, 13, |o| {
            let lc = &l.span_context;
            bytes(o, 1, &lc.trace_id().to_bytes());
            bytes(o, 2, &lc.span_id().to_bytes());
            string(o, 3, &lc.trace_state().header());
            attributes(o, 4, &l.attributes);
            varint(o, 5, l.dropped_attributes_count.into());
            fixed32(o, 6, flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    varint(out, 14, s.links.dropped_count.into());
    nested(out, 15, |o| {
        let (code, message) = match &s.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        string(o, 2, message);
        varint(o, 3, code);
    });
    fixed32(
        out,
        16,
        flags(s.parent_span_is_remote, sc.trace_flags().to_u8()),
    );
}

/// OTLP's span flags: the W3C trace flags, and whether the parent's remoteness is known (it
/// always is here) and true.
fn flags(remote: bool, trace_flags: u8) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

/// OTLP's `SpanKind` number.
fn kind(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn attributes(out: &mut Vec<u8>, field: u32, kvs: &[KeyValue]) {
    for kv in kvs {
        nested(out, field, |o| key_value(o, kv.key.as_str(), &kv.value));
    }
}

/// A `KeyValue` message's fields.
fn key_value(out: &mut Vec<u8>, key: &str, value: &Value) {
    string(out, 1, key);
    nested(out, 2, |o| any_value(o, value));
}

/// An `AnyValue` message's field (a oneof: written even when it holds a default value).
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => bytes(out, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, out);
            encode_varint(u64::from(*b), out);
        }
        Value::I64(i) => {
            encode_key(3, WireType::Varint, out);
            encode_varint(*i as u64, out);
        }
        Value::F64(f) => {
            encode_key(4, WireType::SixtyFourBit, out);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Array(a) => nested(out, 5, |o| {
            // ArrayValue { repeated AnyValue values = 1; }
            match a {
                Array::Bool(v) => v
                    .iter()
                    .for_each(|x| nested(o, 1, |o| any_value(o, &Value::Bool(*x)))),
                Array::I64(v) => v
                    .iter()
                    .for_each(|x| nested(o, 1, |o| any_value(o, &Value::I64(*x)))),
                Array::F64(v) => v
                    .iter()
                    .for_each(|x| nested(o, 1, |o| any_value(o, &Value::F64(*x)))),
                Array::String(v) => v
                    .iter()
                    .for_each(|x| nested(o, 1, |o| bytes(o, 1, x.as_str().as_bytes()))),
                // A kind of array this version does not know: an empty array.
                _ => {}
            }
        }),
        // A kind of value this version does not know: an empty `AnyValue`.
        _ => {}
    }
}

/// A length-delimited field whose body `body` writes: the body is written in place, then its
/// length is put in front of it.
fn nested(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, out);
    let start = out.len();
    body(out);
    let len = (out.len() - start) as u64;
    let mut prefix = [0u8; 10];
    let n = {
        let mut b = &mut prefix[..];
        encode_varint(len, &mut b);
        10 - b.len()
    };
    out.splice(start..start, prefix[..n].iter().copied());
}

/// A non-empty string field (proto3 leaves an empty one out).
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        bytes(out, field, s.as_bytes());
    }
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn varint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        encode_key(field, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        encode_key(field, WireType::SixtyFourBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        encode_key(field, WireType::ThirtyTwoBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, Link, SpanContext, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    fn context(trace: u128, span: u64, remote: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            TraceState::from_key_value([("k", "v")]).unwrap(),
        )
    }

    fn sample(n: u64, scope: &InstrumentationScope) -> SpanData {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789 + n);
        let mut events = opentelemetry_sdk::trace::SpanEvents::default();
        events.events.push(Event::new(
            "ev",
            t0,
            vec![KeyValue::new("b", false), KeyValue::new("i", 0i64)],
            1,
        ));
        events.dropped_count = 2;
        let mut links = opentelemetry_sdk::trace::SpanLinks::default();
        links.links.push(Link::new(
            context(7, 8, true),
            vec![KeyValue::new("why", "takeover")],
            0,
        ));
        SpanData {
            span_context: context(0xabc + u128::from(n), 0x1234 + n, false),
            parent_span_id: if n.is_multiple_of(2) {
                SpanId::from(99)
            } else {
                SpanId::INVALID
            },
            parent_span_is_remote: n.is_multiple_of(2),
            span_kind: [SpanKind::Server, SpanKind::Internal, SpanKind::Client][n as usize % 3]
                .clone(),
            name: format!("tools/call echo {n}").into(),
            start_time: t0,
            end_time: t0 + Duration::from_micros(40),
            attributes: vec![
                KeyValue::new("mcp.method.name", "tools/call"),
                KeyValue::new("n", n as i64),
                KeyValue::new("neg", -5i64),
                KeyValue::new("f", 0.5),
                KeyValue::new("t", true),
                KeyValue::new("empty", ""),
                KeyValue::new(
                    "arr",
                    Value::Array(Array::String(vec!["a".into(), "".into()])),
                ),
                KeyValue::new("ints", Value::Array(Array::I64(vec![1, -1]))),
            ],
            dropped_attributes_count: 3,
            events,
            links,
            status: if n.is_multiple_of(2) {
                Status::error("broke")
            } else {
                Status::Ok
            },
            instrumentation_scope: scope.clone(),
        }
    }

    /// The bytes written decode, with the generated types, to exactly what
    /// `opentelemetry-proto`'s own conversion of the same spans gives.
    #[test]
    fn requests_decode_to_what_the_reference_conversion_gives() {
        use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
        use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
        let haven = InstrumentationScope::builder("haven").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_schema_url("https://example.test/s")
            .with_attributes([KeyValue::new("a", 1i64)])
            .build();
        let spans: Vec<SpanData> = (0..7)
            .map(|n| sample(n, if n == 3 { &other } else { &haven }))
            .collect();
        let resource = Resource::builder()
            .with_service_name("haven")
            .with_attributes([KeyValue::new("cloud.region", "eu")])
            .build();
        let mut exporter = SpanExporter::new(
            "http://127.0.0.1:1/v1/traces".into(),
            Duration::from_secs(1),
        )
        .unwrap();
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
        let mut body = Vec::new();
        request(
            &mut body,
            &exporter.resource,
            &exporter.resource_schema,
            &spans,
        );
        let ours = ExportTraceServiceRequest::decode(body.as_slice()).expect("a valid request");
        let reference = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans,
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, reference);
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);
        assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 6);
    }

    /// An empty batch sends nothing; a failed post is an error, not a panic.
    #[test]
    fn an_unreachable_endpoint_is_an_error() {
        use opentelemetry_sdk::trace::SpanExporter as _;
        let exporter = SpanExporter::new(
            "http://127.0.0.1:1/v1/traces".into(),
            Duration::from_secs(2),
        )
        .unwrap();
        let scope = InstrumentationScope::builder("haven").build();
        assert!(futures::executor::block_on(exporter.export(Vec::new())).is_ok());
        assert!(futures::executor::block_on(exporter.export(vec![sample(1, &scope)])).is_err());
    }
}
