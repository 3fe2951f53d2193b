//! Frame encode/decode throughput.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wandist::wire::codec;
use wandist::wire::{Frame, Header};

fn frames(c: &mut Criterion) {
    let max = codec::DEFAULT_MAX_FRAME_BYTES;
    let mut group = c.benchmark_group("frame");
    for size in [100usize, 64 * 1024] {
        let frame = Frame {
            header: Header::Data { epoch: wandist::wire::Epoch(9), seq: wandist::wire::Seq(123_456), more: false },
            body: Bytes::from(vec![7u8; size]),
        };
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, f| {
            let mut out = BytesMut::with_capacity(size + 64);
            b.iter(|| {
                out.clear();
                codec::encode(&f.header, &f.body, max, &mut out).unwrap();
            })
        });
        let encoded = codec::encode_frame(&frame, max).unwrap().freeze();
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, e| {
            b.iter(|| {
                let mut buf = BytesMut::from(&e[..]);
                codec::decode(&mut buf, max).unwrap().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
