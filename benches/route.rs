//! The route state machine (submit / transmit / ack / receive) and the
//! membership tables (snapshot, deltas), without I/O.

use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use wandist::membership::{Filter, ImportLimits, PeerMembership};
use wandist::route::{Epoch, LinkId, Route, Seq, Window};
use wandist::wire::Handle;

const W: Window = Window { messages: 65_536, bytes: 64 << 20 };

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    let payload = Bytes::from(vec![0u8; 100]);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("submit_transmit_ack_1000", |b| {
        let mut r = Route::new(Epoch(1), W, W);
        r.link_up(LinkId(1), Epoch(2), W);
        b.iter(|| {
            let now = Instant::now();
            let mut last = Seq(0);
            for _ in 0..1000 {
                r.submit(payload.clone(), None);
                last = r.next_transmit(now).unwrap().seq;
            }
            r.on_ack(Epoch(1), last, now).unwrap();
        })
    });
    g.bench_function("receive_deliver_ack_1000", |b| {
        let mut r = Route::new(Epoch(1), W, W);
        r.link_up(LinkId(1), Epoch(2), W);
        let mut seq = 0;
        b.iter(|| {
            for _ in 0..1000 {
                seq += 1;
                r.on_data(LinkId(1), Seq(seq), payload.clone()).unwrap();
                r.next_delivery().unwrap();
            }
            let (_, upto) = r.pending_ack().unwrap();
            r.ack_sent(upto);
        })
    });
    g.bench_function("failover_resend_1000", |b| {
        b.iter_batched(
            || {
                let mut r = Route::new(Epoch(1), W, W);
                r.link_up(LinkId(1), Epoch(2), W);
                r.link_up(LinkId(2), Epoch(2), W);
                let now = Instant::now();
                for _ in 0..1000 {
                    r.submit(payload.clone(), None);
                    r.next_transmit(now);
                }
                r
            },
            |mut r| {
                r.link_down(LinkId(1));
                let now = Instant::now();
                while r.next_transmit(now).is_some() {}
                r
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn membership(c: &mut Criterion) {
    let mut g = c.benchmark_group("membership");
    let members: Vec<Handle> = (1..=10_000u64).map(Handle).collect();
    let mut a = PeerMembership::new("a", "b", Filter::all(), Filter::all(), ImportLimits::DEFAULT);
    for (i, m) in members.iter().enumerate() {
        a.local_join(&format!("group{}", i % 100), std::slice::from_ref(m));
    }
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("snapshot_10k_members_apply", |b| {
        b.iter(|| {
            let mut recv = PeerMembership::new("b", "a", Filter::all(), Filter::all(), ImportLimits::DEFAULT);
            let mut joined = 0;
            for part in a.snapshot() {
                for c in recv.on_advert(part).unwrap().changes {
                    if let wandist::membership::Change::Join { members, .. } = c {
                        joined += members.len();
                    }
                }
            }
            assert_eq!(joined, 10_000);
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("delta_join_apply", |b| {
        let big = ImportLimits { members: 100_000_000, ..ImportLimits::DEFAULT };
        let mut send = PeerMembership::new("a", "b", Filter::all(), Filter::all(), big);
        let mut recv = PeerMembership::new("b", "a", Filter::all(), Filter::all(), big);
        for p in send.snapshot() {
            recv.on_advert(p).unwrap();
        }
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let d = send.local_join("g", &[Handle(i)]).unwrap();
            recv.on_advert(d).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, route, membership);
criterion_main!(benches);
