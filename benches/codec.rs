//! Micro-benchmarks of the I/O-free codecs on the broker's hot paths: parsing a typical
//! `POST /publish` request, decoding a masked 200-byte WebSocket text frame, decoding a
//! `PUBLISH` frame into its command, and encoding a 128-byte `MESSAGE` frame from its
//! parts. Run with `cargo bench --bench codec`.

use std::time::Duration;

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pubsub::command::{decode_frame, Command};
use pubsub::http::{parse_request, Limits};
use pubsub::ws::{write_text_parts, Decoder, Event, Utf8Bytes};

const PUBLISH_BODY: &str =
    r#"{"exchange_name":"orders","key":"eu.order.created","payload":{"id":42,"amount":19.99}}"#;

fn publish_request() -> Vec<u8> {
    format!(
        "POST /publish HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench/1.0\r\n\
Accept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        PUBLISH_BODY.len(),
        PUBLISH_BODY
    )
    .into_bytes()
}

fn masked_text_frame(len: usize) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    let mut v = vec![0x81, 0x80 | 126];
    v.extend_from_slice(&(len as u16).to_be_bytes());
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

fn http_parse(c: &mut Criterion) {
    let wire = publish_request();
    let limits = Limits::default();
    let mut group = c.benchmark_group("http");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("parse_publish_request", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let req = parse_request(&mut buf, &limits);
            assert!(matches!(req, Ok(Some(_))));
            black_box(req)
        })
    });
    group.finish();
}

fn ws_decode(c: &mut Criterion) {
    let wire = masked_text_frame(200);
    let mut group = c.benchmark_group("ws");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("decode_masked_text_200", |b| {
        let mut decoder = Decoder::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let ev = decoder.decode(&mut buf);
            assert!(matches!(ev, Ok(Some(Event::Text(_)))));
            black_box(ev)
        })
    });
    group.finish();
}

fn publish_decode(c: &mut Criterion) {
    // What the load generator sends: a 128-byte JSON payload in a PUBLISH frame.
    let frame = format!(
        r#"{{"type":"PUBLISH","payload":{{"exchange_name":"bench.x","key":"k","payload":{{"t":123456789012,"s":4242,"p":"{}"}}}}}}"#,
        "x".repeat(92)
    );
    let frame = Utf8Bytes::from(frame);
    let mut group = c.benchmark_group("command");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_publish_frame", |b| {
        b.iter(|| {
            let cmd = decode_frame(black_box(&frame), 1 << 20);
            assert!(matches!(cmd, Ok(Command::Publish(_))));
            black_box(cmd)
        })
    });
    group.finish();
}

fn ws_encode(c: &mut Criterion) {
    let prefix: &[u8] = br#"{"type":"MESSAGE","unique_id":"01JDQ8Z3K4M5N6P7Q8R9S0T1V2","body":"#;
    let suffix: &[u8] = br#","delivery_tag":17,"redelivered":false}"#;
    let body_len = 128 - prefix.len() - suffix.len();
    let body = format!("\"{}\"", "x".repeat(body_len - 2)).into_bytes();
    let mut group = c.benchmark_group("ws");
    group.throughput(Throughput::Bytes(128));
    group.bench_function("encode_message_128", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            if out.len() > 60 * 1024 {
                out.clear();
            }
            write_text_parts(&mut out, &[prefix, &body, suffix]);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = http_parse, ws_decode, publish_decode, ws_encode
}
criterion_main!(benches);
