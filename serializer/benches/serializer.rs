//! Encode and decode throughput of each wire form. `cargo bench -p fawkes-serializer`
//! prints messages per second (criterion's "thrpt" in elem/s).

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fawkes_serializer::{Broadcast, Frame, Message, Payload, Ref, Reply, ReplyStatus, Serializer};
use serde_json::json;
use std::hint::black_box;

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    let v2 =
        Frame::text(r#"["3","17","room:lobby","new_msg",{"body":"hello there, how is everyone doing today?","n":42}]"#);
    let v1 = Frame::text(
        r#"{"topic":"room:lobby","event":"new_msg","payload":{"body":"hello there, how is everyone doing today?","n":42},"ref":"17","join_ref":"3"}"#,
    );
    let bin =
        Frame::Binary(Bytes::from([&[0u8, 1, 2, 10, 4][..], b"3", b"17", b"room:lobby", b"ping", &[7u8; 64]].concat()));
    g.bench_function("v2_json", |b| b.iter(|| Serializer::V2.decode(black_box(&v2))));
    g.bench_function("v1_json", |b| b.iter(|| Serializer::V1.decode(black_box(&v1))));
    g.bench_function("v2_binary", |b| b.iter(|| Serializer::V2.decode(black_box(&bin))));
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    let payload = Payload::Json(json!({"body": "hello there, how is everyone doing today?", "user": "ann"}));
    let reply = Reply {
        join_ref: Some(Ref::new("3")),
        msg_ref: Some(Ref::new("17")),
        topic: "room:lobby".into(),
        status: ReplyStatus::Ok,
        response: payload.clone(),
    };
    let broadcast = Broadcast { topic: "room:lobby".into(), event: "new_msg".into(), payload: payload.clone() };
    let binary = Broadcast { payload: Payload::Binary(Bytes::from(vec![7u8; 100])), ..broadcast.clone() };
    for s in [Serializer::V1, Serializer::V2] {
        g.bench_with_input(BenchmarkId::new("reply", s.name()), &reply, |b, r| b.iter(|| s.encode_reply(black_box(r))));
        g.bench_with_input(BenchmarkId::new("broadcast", s.name()), &broadcast, |b, m| {
            b.iter(|| s.encode_broadcast(black_box(m)))
        });
    }
    g.bench_function("broadcast/V2 binary", |b| b.iter(|| Serializer::V2.encode_broadcast(black_box(&binary))));
    let msg = Message {
        join_ref: Some(Ref::new("3")),
        msg_ref: Some(Ref::new("17")),
        topic: "room:lobby".into(),
        event: "new_msg".into(),
        payload,
    };
    g.bench_function("client_push/V2", |b| b.iter(|| Serializer::V2.encode_message(black_box(&msg))));
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
