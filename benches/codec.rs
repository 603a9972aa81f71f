//! Micro-benchmarks of the I/O-free codecs on the broker's hot paths: parsing a typical
//! `POST /publish` request, decoding a masked 200-byte WebSocket text frame, decoding a
//! `PUBLISH` frame into its command, and writing the `MESSAGE` frame of a 128-byte
//! message. Run with `cargo bench --bench codec`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pubsub::command::{decode_frame, Command};
use pubsub::http::{parse_request, Limits};
use pubsub::message::{write_frame, IdGen, Message, MessageText};
use pubsub::ws::{Decoder, Event, Utf8Bytes};

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
    // The same frame with `ttl_ms` and `headers`, which the fast path also takes.
    let with_headers = Utf8Bytes::from(frame.as_str().replacen(
        r#""key":"k","#,
        r#""key":"k","ttl_ms":60000,"headers":{"trace":"4bf92f35","tenant":"acme"},"#,
        1,
    ));
    // The same frame with a `\u` escape in its key, which the fast path (`command::scan`)
    // leaves to serde_json.
    let escaped = Utf8Bytes::from(frame.as_str().replacen(
        r#""key":"k","#,
        r#""key":"\u006b","#,
        1,
    ));
    let mut group = c.benchmark_group("command");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in [
        ("decode_publish_frame", &frame),
        ("decode_publish_frame_headers", &with_headers),
        ("decode_publish_frame_serde", &escaped),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let cmd = decode_frame(black_box(frame.clone()), 1 << 20);
                assert!(matches!(cmd, Ok(Command::Publish(_))));
                black_box(cmd)
            })
        });
    }
    group.finish();
}

fn ws_encode(c: &mut Criterion) {
    // One delivery's `MESSAGE` frame, as a subscriber's connection writes it.
    let msg = Message {
        id: IdGen::new(0).next_id(),
        text: MessageText::new(
            &Bytes::new(),
            br#""bench.x""#,
            Some(br#""k""#),
            b"k",
            format!(r#"{{"t":123456789012,"s":4242,"p":"{}"}}"#, "x".repeat(92)).as_bytes(),
        ),
        headers: None,
        published_at: 1_764_000_000_000,
        expires_at: None,
        persistent: false,
    };
    let mid: &[u8] = br#","subscription":"sub-0-3-1","queue":"bench.q","exchange":"#;
    let mut group = c.benchmark_group("ws");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_message_128", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut tag = 0u64;
        b.iter(|| {
            if out.len() > 60 * 1024 {
                out.clear();
            }
            tag += 1;
            write_frame(&mut out, black_box(&msg), mid, tag, false);
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
