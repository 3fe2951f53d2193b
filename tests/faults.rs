//! Network faults between two gateways (in this process, real mutual-TLS
//! links over loopback) injected by the test's fault proxy: latency with
//! jitter, writes split into tiny pieces, a throttled path. Cut and
//! blackhole of the primary are in `routes.rs`; a route down for longer
//! than dead_after is in `routes.rs` too.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::forward::Forwarder;
use support::inproc::{next, InProc};
use support::*;
use wandist::local::ToLocal;

fn msg(i: u64, size: usize) -> Bytes {
    let mut v = vec![0u8; size.max(8)];
    v[..8].copy_from_slice(&i.to_be_bytes());
    Bytes::from(v)
}

/// Receives `total` messages on `gw` and checks each is the next in order;
/// returns the largest dc1 unacked count seen while they arrived.
async fn receive_in_order(gw: &mut InProc, sender: &InProc, total: u64) -> f64 {
    let mut max_unacked: f64 = 0.0;
    for i in 0..total {
        match next(&mut gw.rx, &format!("message {i}")).await {
            ToLocal::Deliver { peer, payload, .. } => {
                assert_eq!(&*peer, "dc1");
                let got = u64::from_be_bytes(payload[..8].try_into().unwrap());
                assert_eq!(got, i, "out of order, lost or duplicated");
            }
            other => panic!("unexpected {other:?}"),
        }
        if i % 500 == 0 {
            let u = sender.metric("wandist_unacked_messages", &[("peer", "dc2")]).unwrap_or(0.0);
            max_unacked = max_unacked.max(u);
        }
    }
    max_unacked
}

fn no_link_ever_dropped(gw: &InProc, peer: &str) {
    let m = gw.running().metrics.render();
    assert_eq!(metric_sum(&m, "wandist_link_disconnects_total", &[("peer", peer)]), 0.0, "{}: a link dropped", gw.name);
    assert_eq!(metric_value(&m, "wandist_failovers_total", &[("peer", peer)]).unwrap_or(0.0), 0.0, "{}", gw.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_latency_with_jitter_keeps_the_window_full_and_never_fails_over() {
    const TOTAL: u64 = 50_000;
    const ONE_WAY: Duration = Duration::from_millis(200);
    const JITTER: Duration = Duration::from_millis(50);
    let certs = Certs::new(&["dc1", "dc2"]);
    // A round trip of 400-500 ms: the handshake (TCP, TLS 1.3, hello) needs a few.
    let slow = "handshake_timeout_ms = 5000\n";
    let dc2_cfg =
        format!("{}{}[[route]]\ncluster = \"dc1\"\n", gateway_table_with("dc2", true, slow), certs.tls_table("dc2"));
    let mut dc2 = InProc::start("dc2", &dc2_cfg, 4096).await;
    let wan = Forwarder::start(Some(dc2.peer_addr()));
    let wan2 = Forwarder::start(Some(dc2.peer_addr()));
    wan.delay(ONE_WAY, JITTER);
    wan2.delay(ONE_WAY, JITTER);
    // Both links (primary and standby) cross the slow path. The window is
    // the default (65,536 messages / 64 MiB): at a 0.5 s round trip that is
    // up to ~130k msgs/s before the sender has to wait for acks.
    let dc1_cfg = format!(
        "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\", \"{}\"]\nstandby = 1\n",
        gateway_table_with("dc1", false, slow),
        certs.tls_table("dc1"),
        wan.addr,
        wan2.addr
    );
    let dc1 = InProc::start("dc1", &dc1_cfg, 4096).await;
    dc1.wait_metric("wandist_link_up", &[("peer", "dc2"), ("role", "standby")], |v| v == 1.0).await;
    // Heartbeats measured the injected latency.
    dc1.wait_metric("wandist_link_rtt_seconds_count", &[("peer", "dc2")], |v| v >= 3.0).await;
    let rtt_sum = dc1.metric("wandist_link_rtt_seconds_sum", &[("peer", "dc2")]).unwrap();
    let rtt_n = dc1.metric("wandist_link_rtt_seconds_count", &[("peer", "dc2")]).unwrap();
    let rtt = rtt_sum / rtt_n;
    assert!(rtt >= 0.4, "mean heartbeat round trip {rtt} s; the proxy adds at least 0.4 s");

    let route = dc1.running().local().route("dc2").unwrap().clone();
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..TOTAL {
            route.submit(msg(i, 100), None).await.unwrap();
        }
    });
    let max_unacked = receive_in_order(&mut dc2, &dc1, TOTAL).await;
    let took = started.elapsed();
    producer.await.unwrap();
    dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v == TOTAL as f64).await;
    // Pipelined, not stop-and-wait: thousands were in flight at once.
    assert!(max_unacked >= 5_000.0, "at most {max_unacked} messages in flight");
    no_link_ever_dropped(&dc1, "dc2");
    no_link_ever_dropped(&dc2, "dc1");
    println!(
        "latency {ONE_WAY:?} + up to {JITTER:?} each way (mean heartbeat RTT {:.0} ms): {TOTAL} × 100 B in {took:?} \
         = {:.0} msgs/s, up to {max_unacked} in flight, no failover, no link dropped",
        rtt * 1000.0,
        TOTAL as f64 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_writes_and_a_throttled_path_deliver_everything_in_order() {
    const TOTAL: u64 = 2_000;
    const RATE: u64 = 1_000_000;
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let wan = Forwarder::start(Some(dc2.peer_addr()));
    // From the first byte of TCP on: TLS records, the preamble, the hello
    // and every frame arrive 3 bytes at a time.
    wan.split(3);
    let dc1 = InProc::start("dc1", &dialing("dc1", &certs, "dc2", wan.addr), 4096).await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;

    let route = dc1.running().local().route("dc2").unwrap().clone();
    let sender = tokio::spawn(async move {
        for i in 0..TOTAL {
            // Sizes from 8 B to ~1 KiB, so frames straddle every split.
            route.submit(msg(i, (i as usize * 37) % 1024), None).await.unwrap();
        }
        route
    });
    receive_in_order(&mut dc2, &dc1, TOTAL / 2).await;
    // Halfway: now also throttled.
    wan.throttle(RATE);
    let bytes_before = wan.bytes();
    let t = Instant::now();
    for i in TOTAL / 2..TOTAL {
        match next(&mut dc2.rx, &format!("message {i}")).await {
            ToLocal::Deliver { payload, .. } => assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), i),
            other => panic!("unexpected {other:?}"),
        }
    }
    let rate = (wan.bytes() - bytes_before) as f64 / t.elapsed().as_secs_f64();
    let _route = sender.await.unwrap();
    dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v == TOTAL as f64).await;
    no_link_ever_dropped(&dc1, "dc2");
    no_link_ever_dropped(&dc2, "dc1");
    println!("3-byte writes, then throttled to {RATE} B/s: {TOTAL} messages in order; {rate:.0} B/s through the proxy");
}
