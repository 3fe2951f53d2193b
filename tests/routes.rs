//! Routes end to end: gateways in this process (each with its own metrics
//! and an in-memory local side), real mutual-TLS links over loopback, and a
//! TCP forwarder the test controls in front of the primary endpoint.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::forward::Forwarder;
use support::inproc::{delivered_in_order, next, InProc};
use support::*;
use wandist::local::ToLocal;
use wandist::membership::Change;
use wandist::route::{FailReason, Outcome};
use wandist::wire::Handle;

fn cfg(cluster: &str, listen: bool, certs: &Certs, routes: &str) -> String {
    format!("{}{}{routes}", gateway_table(cluster, listen), certs.tls_table(cluster))
}

fn n(i: u64) -> Bytes {
    Bytes::copy_from_slice(&i.to_be_bytes())
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Cut,
    Blackhole,
}

/// Streams `total` messages dc1 -> dc2 while the primary path fails once.
async fn stream_through_a_fault(fault: Fault) {
    const TOTAL: u64 = 100_000;
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let primary_path = Forwarder::start(Some(dc2.peer_addr()));
    // The first endpoint (through the forwarder) carries the primary; the
    // second, direct, the standby.
    let dc1 = InProc::start(
        "dc1",
        &cfg(
            "dc1",
            false,
            &certs,
            &format!(
                "[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\", \"{}\"]\nstandby = 1\n",
                primary_path.addr,
                dc2.peer_addr()
            ),
        ),
        4096,
    )
    .await;
    dc1.wait_metric("wandist_link_up", &[("peer", "dc2"), ("role", "standby")], |v| v == 1.0).await;
    assert!(primary_path.forwarded() >= 1);

    let route = dc1.running().local().route("dc2").unwrap().clone();
    let producer = tokio::spawn(async move {
        for i in 0..TOTAL {
            route.submit(n(i), None).await.unwrap();
        }
    });

    let mut expect = 0u64;
    let mut fault_at = None;
    let mut stall = Duration::ZERO;
    let mut last = Instant::now();
    while expect < TOTAL {
        match next(&mut dc2.rx, &format!("message {expect}")).await {
            ToLocal::Deliver { peer, payload, .. } => {
                assert_eq!(&*peer, "dc1");
                let got = u64::from_be_bytes(payload[..].try_into().unwrap());
                assert_eq!(got, expect, "out of order or duplicated");
                expect += 1;
                let now = Instant::now();
                if fault_at.is_some() {
                    stall = stall.max(now - last);
                }
                last = now;
                if expect == TOTAL / 3 {
                    match fault {
                        Fault::Cut => primary_path.cut(),
                        Fault::Blackhole => primary_path.blackhole(true),
                    }
                    fault_at = Some(now);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    producer.await.unwrap();
    dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v == TOTAL as f64).await;
    assert_eq!(dc1.metric("wandist_failovers_total", &[("peer", "dc2")]), Some(1.0));
    assert_eq!(dc1.metric("wandist_messages_sent_total", &[("peer", "dc2")]), Some(TOTAL as f64));
    assert_eq!(dc1.metric("wandist_unacked_messages", &[("peer", "dc2")]), Some(0.0));
    let resent = dc1.metric("wandist_retransmitted_messages_total", &[("peer", "dc2")]).unwrap();
    let dups = dc2.metric("wandist_duplicates_dropped_total", &[("peer", "dc1")]).unwrap();
    println!(
        "{fault:?}: {TOTAL} messages exactly once in order; longest gap in delivery after the fault {stall:?}; \
         {resent} retransmitted, {dups} duplicates dropped by the receiver"
    );
    while let Ok(item) = dc2.rx.try_recv() {
        assert!(
            matches!(item, ToLocal::Up { .. } | ToLocal::Synced { .. }),
            "more than the {TOTAL} messages: {item:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_the_primary_being_cut() {
    stream_through_a_fault(Fault::Cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_the_primary_being_blackholed() {
    stream_through_a_fault(Fault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmations_say_delivered_and_a_peer_restart_fails_what_was_in_flight() {
    let certs = Certs::new(&["dc1", "dc2"]);
    // dc2's local side takes one message and then stalls: the rest stay unacked.
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 1).await;
    let path = Forwarder::start(Some(dc2.peer_addr()));
    let mut dc1 = InProc::start("dc1", &dialing("dc1", &certs, "dc2", path.addr), 4096).await;
    let route = dc1.running().local().route("dc2").unwrap().clone();
    route.submit(Bytes::from_static(b"first"), Some(wandist::route::Token(1))).await.unwrap();
    assert!(matches!(next(&mut dc2.rx, "first").await, ToLocal::Deliver { payload, .. } if payload == "first"));
    match next(&mut dc1.rx, "confirmation").await {
        ToLocal::Confirm { peer, token: wandist::route::Token(1), outcome: Outcome::Delivered } => {
            assert_eq!(&*peer, "dc2")
        }
        other => panic!("unexpected {other:?}"),
    }
    // Four more: one fills dc2's local queue (handed over, not finished:
    // not acked), three wait inside dc2's route.
    for token in 2..=5 {
        route.submit(Bytes::from(format!("m{token}")), Some(wandist::route::Token(token))).await.unwrap();
    }
    dc2.wait_metric("wandist_messages_received_total", &[("peer", "dc1")], |v| v >= 2.0).await;
    let delivered_before = dc1.metric("wandist_messages_delivered_total", &[("peer", "dc2")]).unwrap() as u64;
    assert_eq!(delivered_before, 1, "acked a message dc2's local side had not finished with");

    // dc2's gateway process is replaced by a new run (new epoch).
    dc2.stop().await;
    let mut dc2b = InProc::start("dc2b", &accepting("dc2", &certs, "dc1"), 4096).await;
    path.set_target(dc2b.peer_addr());
    let mut failed = Vec::new();
    let mut confirmed = Vec::new();
    let mut lost = 0;
    while failed.len() + confirmed.len() < 4 {
        match next(&mut dc1.rx, "outcomes").await {
            ToLocal::Confirm { token, outcome: Outcome::Failed(FailReason::PeerRestarted), .. } => failed.push(token),
            ToLocal::Confirm { token, outcome: Outcome::Delivered, .. } => confirmed.push(token),
            ToLocal::Lost { peer } if &*peer == "dc2" => lost += 1,
            ToLocal::Up { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lost >= 1, "the local side was not told the peer's old run is gone");
    // What the old run confirmed is delivered; everything else is reported failed, none silently lost.
    assert_eq!(confirmed.len() as u64, delivered_before - 1);
    assert_eq!(failed.len() as u64, 5 - delivered_before);
    let failed_metric = dc1
        .wait_metric("wandist_messages_failed_total", &[("peer", "dc2"), ("reason", "peer_restarted")], |v| v >= 1.0)
        .await;
    assert_eq!(failed_metric as usize, failed.len());

    // The new session carries new messages.
    route.submit(Bytes::from_static(b"after"), Some(wandist::route::Token(9))).await.unwrap();
    assert!(matches!(next(&mut dc2b.rx, "after").await, ToLocal::Deliver { payload, .. } if payload == "after"));
    loop {
        match next(&mut dc1.rx, "confirm 9").await {
            ToLocal::Lost { .. } | ToLocal::Up { .. } => continue, // the route going down, the new session
            other => {
                assert!(
                    matches!(
                        other,
                        ToLocal::Confirm { token: wandist::route::Token(9), outcome: Outcome::Delivered, .. }
                    ),
                    "{other:?}"
                );
                break;
            }
        }
    }
    dc1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_bounds_the_senders_memory_and_the_link_stays_up() {
    const WINDOW: u64 = 500;
    const TOTAL: u64 = 3000;
    let certs = Certs::new(&["dc1", "dc2"]);
    let window = format!("window_messages = {WINDOW}\n");
    let mut dc2 =
        InProc::start("dc2", &cfg("dc2", true, &certs, &format!("[[route]]\ncluster = \"dc1\"\n{window}")), 16).await;
    let dc1 = InProc::start(
        "dc1",
        &cfg(
            "dc1",
            false,
            &certs,
            &format!("[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n{window}", dc2.peer_addr()),
        ),
        4096,
    )
    .await;
    let route = dc1.running().local().route("dc2").unwrap().clone();
    let producer = tokio::spawn(async move {
        for i in 0..TOTAL {
            route.submit(n(i), None).await.unwrap();
        }
    });
    // dc2's local side reads nothing: the window fills and the sender waits.
    dc1.wait_metric("wandist_unacked_messages", &[("peer", "dc2")], |v| v == WINDOW as f64).await;
    let rtt_before = dc1.metric("wandist_link_rtt_seconds_count", &[("peer", "dc2")]).unwrap_or(0.0);
    // Stay stalled for more than twice dead_after (1.5 s): 40 heartbeats of 100 ms.
    dc1.wait_metric("wandist_link_rtt_seconds_count", &[("peer", "dc2")], |v| v >= rtt_before + 40.0).await;
    assert!(!producer.is_finished(), "the sender did not wait");
    assert_eq!(dc1.metric("wandist_unacked_messages", &[("peer", "dc2")]), Some(WINDOW as f64), "window exceeded");
    for (gw, peer) in [(&dc1, "dc2"), (&dc2, "dc1")] {
        let m = gw.running().metrics.render();
        assert_eq!(metric_value(&m, "wandist_link_connects_total", &[("peer", peer)]), Some(1.0), "{}", gw.name);
        assert_eq!(metric_sum(&m, "wandist_link_disconnects_total", &[("peer", peer)]), 0.0, "{}", gw.name);
    }
    // The receiver resumes: everything arrives, in order.
    for i in 0..TOTAL {
        match next(&mut dc2.rx, "resumed delivery").await {
            ToLocal::Deliver { payload, .. } => assert_eq!(payload, n(i)),
            other => panic!("unexpected {other:?}"),
        }
    }
    producer.await.unwrap();
}

/// Collects membership changes until `pred` holds on the resulting view.
async fn members_until(
    gw: &mut InProc,
    view: &mut BTreeMap<(String, String), Vec<String>>,
    pred: impl Fn(&BTreeMap<(String, String), Vec<String>>) -> bool,
) {
    while !pred(view) {
        match next(&mut gw.rx, &format!("{}: membership, have {view:?}", gw.name)).await {
            ToLocal::Members { peer, change } => {
                let (group, members, join) = match change {
                    Change::Join { group, members } => (group, members, true),
                    Change::Leave { group, members } => (group, members, false),
                };
                let entry = view.entry((peer.to_string(), group)).or_default();
                for m in members {
                    let m = m.0.to_string();
                    if join {
                        entry.push(m);
                    } else if let Some(i) = entry.iter().position(|x| *x == m) {
                        entry.remove(i);
                    }
                }
                entry.sort();
            }
            // The route went down (or its peer restarted) or came up: membership news follows.
            ToLocal::Lost { .. } | ToLocal::Up { .. } => {}
            ToLocal::Deliver { peer, payload, .. } => {
                panic!("{}: unexpected message from {peer}: {payload:?}", gw.name)
            }
            other => panic!("{}: unexpected {other:?}", gw.name),
        }
    }
}

fn key(peer: &str, group: &str) -> (String, String) {
    (peer.to_string(), group.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_is_not_transitive_along_a_line_and_forged_adverts_are_rejected() {
    let certs = Certs::new(&["dc1", "dc2", "dc3", "dc4"]);
    // A line: dc1 — dc2 — dc3 (dc2 in the middle), plus dc4 for the forger.
    let mut b = InProc::start(
        "dc2",
        &cfg(
            "dc2",
            true,
            &certs,
            "[[route]]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc3\"\n[[route]]\ncluster = \"dc4\"\n",
        ),
        4096,
    )
    .await;
    let mut a = InProc::start("dc1", &dialing("dc1", &certs, "dc2", b.peer_addr()), 4096).await;
    let mut c = InProc::start("dc3", &dialing("dc3", &certs, "dc2", b.peer_addr()), 4096).await;
    // Members are handles each gateway issued to the peer it tells (here:
    // a1 = 11, b1 = 21, c1 = 31, c2 = 32).
    a.running().local().join("dc2", "chat", vec![Handle(11)]).await;
    for peer in ["dc1", "dc3"] {
        b.running().local().join(peer, "chat", vec![Handle(21)]).await;
    }
    c.running().local().join("dc2", "chat", vec![Handle(31)]).await;
    c.running().local().join("dc2", "ops", vec![Handle(32)]).await;

    let mut seen_b = BTreeMap::new();
    members_until(&mut b, &mut seen_b, |v| {
        v.get(&key("dc1", "chat")) == Some(&vec!["11".to_string()])
            && v.get(&key("dc3", "chat")) == Some(&vec!["31".to_string()])
            && v.get(&key("dc3", "ops")) == Some(&vec!["32".to_string()])
    })
    .await;
    let mut seen_a = BTreeMap::new();
    members_until(&mut a, &mut seen_a, |v| v.get(&key("dc2", "chat")) == Some(&vec!["21".to_string()])).await;
    let mut seen_c = BTreeMap::new();
    members_until(&mut c, &mut seen_c, |v| v.get(&key("dc2", "chat")) == Some(&vec!["21".to_string()])).await;
    // b knows 3 members from elsewhere, yet exports only its own one.
    b.wait_metric("wandist_members", &[("peer", "dc1"), ("direction", "exported")], |v| v == 1.0).await;
    b.wait_metric("wandist_members", &[("peer", "dc3"), ("direction", "exported")], |v| v == 1.0).await;
    b.wait_metric("wandist_members", &[("peer", "dc3"), ("direction", "imported")], |v| v == 2.0).await;

    // A message from dc3 goes to dc2's cluster and no further.
    c.running()
        .local()
        .route("dc2")
        .unwrap()
        .submit(Bytes::from_static(b"for dc1?"), Some(wandist::route::Token(1)))
        .await
        .unwrap();
    match next(&mut b.rx, "dc3's message at dc2").await {
        ToLocal::Deliver { peer, payload, .. } => assert_eq!((&*peer, &payload[..]), ("dc3", &b"for dc1?"[..])),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        next(&mut c.rx, "confirmation").await,
        ToLocal::Confirm { token: wandist::route::Token(1), outcome: Outcome::Delivered, .. }
    ));

    // A forger with a valid dc4 certificate advertises dc1's members as if transitive.
    let forged = wandist::wire::Advert {
        origin: "dc1".into(),
        counter: 1,
        body: wandist::wire::AdvertBody::Snapshot {
            part: 0,
            last: true,
            groups: vec![("chat".into(), vec![Handle(99)])],
        },
    };
    forge_advert(&certs, b.peer_addr(), "dc4", forged).await;
    b.wait_metric("wandist_adverts_rejected_total", &[("peer", "dc4")], |v| v == 1.0).await;
    assert_eq!(b.metric("wandist_members", &[("peer", "dc4"), ("direction", "imported")]), Some(0.0));

    // Everything settled: nothing more arrived anywhere, and dc1 and dc3 never
    // learned each other's members.
    assert!(seen_a.keys().all(|(peer, _)| peer == "dc2"));
    assert!(seen_c.keys().all(|(peer, _)| peer == "dc2"));
    for gw in [&mut a, &mut b, &mut c] {
        while let Ok(item) = gw.rx.try_recv() {
            assert!(matches!(item, ToLocal::Up { .. } | ToLocal::Synced { .. }), "{}: unexpected {item:?}", gw.name);
        }
    }
    a.wait_metric("wandist_members", &[("peer", "dc2"), ("direction", "imported")], |v| v == 1.0).await;
    c.wait_metric("wandist_members", &[("peer", "dc2"), ("direction", "imported")], |v| v == 1.0).await;
}

/// Connects as `as_cluster` with its real certificate and sends one advert.
async fn forge_advert(certs: &Certs, to: std::net::SocketAddr, as_cluster: &str, advert: wandist::wire::Advert) {
    use tokio::io::AsyncWriteExt;
    use wandist::config::{PathAt, TlsFiles};
    use wandist::link::handshake::{self, Identity, Offer};
    use wandist::link::Timeouts;
    use wandist::route::Window;
    use wandist::wire::{codec, Header};
    let at = |f: String| PathAt { path: certs.path(&f), line: None };
    let files = TlsFiles::new(at(format!("{as_cluster}.pem")), at(format!("{as_cluster}.key")), at("ca.pem".into()));
    let tls = wandist::tls::Tls::load(&files, Some(as_cluster), std::path::Path::new("test")).unwrap();
    let t = Timeouts { connect: Duration::from_secs(5), handshake: Duration::from_secs(5) };
    let me = Identity { cluster: as_cluster.into(), gateway: "forger".into(), epoch: wandist::wire::Epoch(1) };
    let offer = Offer { links_wanted: 1, recv_window: Window { messages: 10, bytes: 1 << 20 } };
    let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
    let mut est = handshake::client(tcp, Some(&tls), "dc2", me.hello(offer), &t, 1 << 20).await.unwrap();
    let mut out = bytes::BytesMut::new();
    codec::encode(&Header::Advert(advert), &[], 1 << 20, &mut out).unwrap();
    est.io.write_all(&out).await.unwrap();
    est.io.flush().await.unwrap();
    // Keep the connection open until the advert has been judged.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(est);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_withdrawn_when_the_route_is_down_and_come_back_with_it() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let path = Forwarder::start(Some(dc2.peer_addr()));
    let mut dc1 = InProc::start("dc1", &dialing("dc1", &certs, "dc2", path.addr), 4096).await;
    dc2.running().local().join("dc1", "chat", vec![Handle(21), Handle(22)]).await;
    let mut view = BTreeMap::new();
    let both = vec!["21".to_string(), "22".to_string()];
    members_until(&mut dc1, &mut view, |v| v.get(&key("dc2", "chat")) == Some(&both)).await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;

    // Every path down, and kept down.
    path.refuse(true);
    path.cut();
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 0.0).await;
    let down_at = Instant::now();
    members_until(&mut dc1, &mut view, |v| v.get(&key("dc2", "chat")).is_some_and(|m| m.is_empty())).await;
    let withdrawn_after = down_at.elapsed();
    assert!(withdrawn_after >= Duration::from_millis(1000), "withdrawn after {withdrawn_after:?}, before dead_after");
    dc1.wait_metric("wandist_members", &[("peer", "dc2"), ("direction", "imported")], |v| v == 0.0).await;

    // Messages accepted while down wait in the window (the peer's run is the same).
    let route = dc1.running().local().route("dc2").unwrap().clone();
    for i in 0..100 {
        route.submit(n(i), Some(wandist::route::Token(i))).await.unwrap();
    }
    // Changes while down reach dc1 with the next snapshot.
    dc2.running().local().leave("dc1", "chat", vec![Handle(22)]).await;
    path.refuse(false);
    members_until(&mut dc1, &mut view, |v| v.get(&key("dc2", "chat")) == Some(&vec!["21".to_string()])).await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;
    let back_after = down_at.elapsed();
    // The route came back by itself and delivers what waited, once, in order, confirmed.
    let mut i = 0;
    while i < 100 {
        match next(&mut dc2.rx, &format!("message {i} after recovery")).await {
            ToLocal::Deliver { payload, .. } => {
                assert_eq!(payload, n(i));
                i += 1;
            }
            ToLocal::Lost { .. } => {} // dc2 saw the route go down too
            other => panic!("unexpected {other:?}"),
        }
    }
    delivered_in_order(&mut dc1.rx, 100, "confirmations after recovery").await;
    println!(
        "members withdrawn {withdrawn_after:?} after the route went down (dead_after 1.5 s); route back {back_after:?} \
         after the fault, 100 messages sent while down delivered and confirmed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_do_not_hold_up_heartbeats_or_small_messages() {
    const BIG: usize = 64 * 1024 * 1024;
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let dc1 = InProc::start("dc1", &dialing("dc1", &certs, "dc2", dc2.peer_addr()), 4096).await;
    let route = dc1.running().local().route("dc2").unwrap().clone();
    let producer = tokio::spawn(async move {
        for i in 0..3u8 {
            let mut big = vec![i; BIG];
            big[BIG - 1] = 0xEE;
            route.submit(Bytes::from(big), None).await.unwrap();
            for j in 0..100u64 {
                route.submit(n(j), None).await.unwrap();
            }
        }
    });
    for i in 0..3u8 {
        match next(&mut dc2.rx, "big message").await {
            ToLocal::Deliver { payload, .. } => {
                assert_eq!(payload.len(), BIG);
                assert!(payload[..BIG - 1].iter().all(|&b| b == i) && payload[BIG - 1] == 0xEE, "corrupted");
            }
            other => panic!("unexpected {other:?}"),
        }
        for j in 0..100u64 {
            assert!(matches!(next(&mut dc2.rx, "small").await, ToLocal::Deliver { payload, .. } if payload == n(j)));
        }
    }
    producer.await.unwrap();
    for (gw, peer) in [(&dc1, "dc2"), (&dc2, "dc1")] {
        let m = gw.running().metrics.render();
        assert_eq!(
            metric_sum(&m, "wandist_link_disconnects_total", &[("peer", peer)]),
            0.0,
            "{}: a link died",
            gw.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_side_holds_at_most_its_byte_budget_of_messages() {
    const BIG: usize = 64 * 1024 * 1024;
    let certs = Certs::new(&["dc1", "dc2"]);
    // Windows (both ways) big enough for five unacked: a message is acked
    // only once the local side drops it.
    let window = "window_bytes = 1073741824\n";
    let mut dc2 = InProc::start("dc2", &format!("{}{window}", accepting("dc2", &certs, "dc1")), 4096).await;
    let dc1 = InProc::start("dc1", &format!("{}{window}", dialing("dc1", &certs, "dc2", dc2.peer_addr())), 4096).await;
    let route = dc1.running().local().route("dc2").unwrap().clone();
    tokio::spawn(async move {
        for i in 0..5u8 {
            route.submit(Bytes::from(vec![i; BIG]), None).await.unwrap();
        }
    });
    // Take four (256 MiB, the budget) and keep them: the fifth must wait.
    let mut kept = Vec::new();
    for i in 0..4u8 {
        match next(&mut dc2.rx, "a big message").await {
            ToLocal::Deliver { payload, held, .. } => {
                assert_eq!((payload.len(), payload[0]), (BIG, i));
                kept.push((payload, held));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let early = tokio::time::timeout(Duration::from_millis(1500), dc2.rx.recv()).await;
    assert!(early.is_err(), "a fifth message was handed over beyond the budget");
    // Done with them: the fifth comes.
    drop(kept);
    match next(&mut dc2.rx, "the fifth").await {
        ToLocal::Deliver { payload, .. } => assert_eq!((payload.len(), payload[0]), (BIG, 4)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_receiving_side_cannot_deliver_is_reported_failed_not_delivered() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let mut dc1 = InProc::start("dc1", &dialing("dc1", &certs, "dc2", dc2.peer_addr()), 4096).await;
    let route = dc1.running().local().route("dc2").unwrap().clone();
    for token in 1..=3u64 {
        route.submit(n(token), Some(wandist::route::Token(token))).await.unwrap();
    }
    // dc2's local side delivers 1 and 3, and cannot deliver 2.
    for token in 1..=3u64 {
        match next(&mut dc2.rx, "a message").await {
            ToLocal::Deliver { payload, mut held, .. } => {
                assert_eq!(payload, n(token));
                if token == 2 {
                    held.undeliverable();
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut outcomes = BTreeMap::new();
    while outcomes.len() < 3 {
        match next(&mut dc1.rx, "outcomes").await {
            ToLocal::Confirm { token, outcome, .. } => assert!(outcomes.insert(token.0, outcome).is_none()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(outcomes[&1], Outcome::Delivered);
    assert_eq!(outcomes[&2], Outcome::Failed(FailReason::Undeliverable));
    assert_eq!(outcomes[&3], Outcome::Delivered);
    let m = dc1.running().metrics.render();
    assert_eq!(
        metric_value(&m, "wandist_messages_failed_total", &[("peer", "dc2"), ("reason", "undeliverable")]),
        Some(1.0)
    );
    assert_eq!(metric_value(&m, "wandist_messages_delivered_total", &[("peer", "dc2")]), Some(2.0));
    // The link is fine.
    assert_eq!(metric_sum(&m, "wandist_link_disconnects_total", &[("peer", "dc2")]), 0.0);
    dc1.stop().await;
}

/// A gateway that stops (SIGTERM) refuses new messages but finishes the
/// ones it accepted before it closes its links: with the whole window in
/// flight at the stop, every message is still confirmed delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_finishes_its_window_before_it_leaves() {
    const TOTAL: u64 = 20_000;
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let mut dc1 = InProc::start("dc1", &dialing("dc1", &certs, "dc2", dc2.peer_addr()), 4096).await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;
    let mut rx2 = std::mem::replace(&mut dc2.rx, tokio::sync::mpsc::channel(1).1);
    let consumer = tokio::spawn(async move {
        let mut got = 0u64;
        while got < TOTAL {
            if let ToLocal::Deliver { .. } = next(&mut rx2, "a message").await {
                got += 1;
            }
        }
        got
    });
    let route = dc1.running().local().route("dc2").unwrap().clone();
    for i in 0..TOTAL {
        route.submit(n(i), Some(wandist::route::Token(i))).await.unwrap();
    }
    // The local side takes outcomes as they come (as the Erlang side does).
    let mut rx1 = std::mem::replace(&mut dc1.rx, tokio::sync::mpsc::channel(1).1);
    let outcomes = tokio::spawn(async move {
        let mut delivered = 0;
        while delivered < TOTAL {
            match next(&mut rx1, "confirmations").await {
                ToLocal::Confirm { outcome: Outcome::Delivered, .. } => delivered += 1,
                ToLocal::Confirm { token, outcome, .. } => {
                    panic!("token {}: {outcome:?} (after {delivered} delivered)", token.0)
                }
                _ => {}
            }
        }
        delivered
    });
    let unacked = dc1.metric("wandist_unacked_messages", &[("peer", "dc2")]).unwrap_or(0.0);
    dc1.stop().await;
    assert!(
        route.submit(n(TOTAL), Some(wandist::route::Token(TOTAL))).await.is_err(),
        "a stopped gateway took a message"
    );
    assert_eq!(outcomes.await.unwrap(), TOTAL);
    assert_eq!(consumer.await.unwrap(), TOTAL);
    println!("stopped with {unacked} of {TOTAL} messages unconfirmed: all {TOTAL} confirmed delivered, none failed");
    dc2.stop().await;
}

/// `compression`: with `"lz4"` or `"zstd"`, data batches to a peer that
/// speaks the codec go packed with it, every message arrives intact and in
/// order, and the bytes on the link shrink (counted before and after, per
/// codec). `"auto"` (the default) packs nothing on loopback and zstd over
/// a 40 ms round trip (a delaying proxy between the gateways); `"off"`
/// packs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_arrive_intact_and_smaller() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let dc2_addr = dc2.peer_addr();
    let dialing_with = |compression: &str, to: std::net::SocketAddr| {
        cfg("dc1", false, &certs, &format!("[[route]]\ncluster = \"dc2\"\nendpoints = [\"{to}\"]\n{compression}"))
    };
    // Chat-like messages: the run, a counter, then text that repeats as
    // real text does.
    let message = |run: u8, i: u64| {
        let mut b = vec![run];
        b.extend_from_slice(&i.to_be_bytes());
        let text = format!("{{chat, room_{}, <<\"user {} says hello to everyone in the room\">>}}", i % 7, i % 13);
        b.extend_from_slice(text.as_bytes());
        Bytes::from(b)
    };
    // One run: a fresh dc1 with `compression` sends `total` messages (in
    // bursts of `burst`, each once the one before arrived, if given); they
    // arrive in order and intact; returns the bytes before and after
    // packing, per codec (lz4, zstd).
    let mut run = 0u8;
    let mut one_run = async |compression: &str, to: std::net::SocketAddr, total: u64, burst: Option<u64>| {
        run += 1;
        let mut dc1 = InProc::start("dc1", &dialing_with(compression, to), 4096).await;
        dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;
        if compression.is_empty() || compression.contains("auto") {
            // `auto` decides by the link's lowest round trip: a few
            // heartbeats first, so that one sample slowed by a loaded
            // machine is not all it knows (on loopback it then packed).
            dc1.wait_metric("wandist_link_rtt_seconds_count", &[("peer", "dc2")], |v| v >= 3.0).await;
        }
        let route = dc1.running().local().route("dc2").unwrap().clone();
        let (go, mut went) = tokio::sync::mpsc::unbounded_channel::<()>();
        let producer = tokio::spawn(async move {
            for i in 0..total {
                if let Some(b) = burst.filter(|b| i > 0 && i % b == 0) {
                    let _ = b;
                    went.recv().await.unwrap();
                }
                route.submit(message(run, i), None).await.unwrap();
            }
        });
        let mut got = 0;
        while got < total {
            // (Other items: an earlier run's end, this one's start.)
            if let ToLocal::Deliver { payload, .. } =
                next(&mut dc2.rx, &format!("message {got} of {compression}")).await
            {
                if payload[0] == run {
                    assert_eq!(payload, message(run, got), "message {got} of {compression}");
                    got += 1;
                    if burst.is_some_and(|b| got % b == 0) {
                        let _ = go.send(());
                    }
                }
            }
        }
        producer.await.unwrap();
        dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v == total as f64).await;
        let bytes = |codec: &str, stage: &str| {
            dc1.metric("wandist_compression_bytes_total", &[("peer", "dc2"), ("codec", codec), ("stage", stage)])
                .unwrap_or(0.0)
        };
        let figures = [bytes("lz4", "raw"), bytes("lz4", "packed"), bytes("zstd", "raw"), bytes("zstd", "packed")];
        println!(
            "{compression:?}: lz4 {} -> {} bytes, zstd {} -> {} bytes",
            figures[0], figures[1], figures[2], figures[3]
        );
        dc1.stop().await;
        figures
    };
    let [raw, packed, zraw, _] = one_run("compression = \"lz4\"\n", dc2_addr, 20_000, None).await;
    assert!(raw > 0.0 && packed > 0.0 && zraw == 0.0, "lz4: {raw} / {packed} / {zraw}");
    assert!(packed < raw / 2.0, "lz4: packed {packed} of {raw} bytes");
    let [raw, _, zraw, zpacked] = one_run("compression = \"zstd\"\n", dc2_addr, 20_000, None).await;
    assert!(zraw > 0.0 && zpacked > 0.0 && raw == 0.0, "zstd: {zraw} / {zpacked} / {raw}");
    assert!(zpacked < zraw / 2.0, "zstd: packed {zpacked} of {zraw} bytes");
    // auto (the default, no key), loopback: nothing packed.
    assert_eq!(one_run("", dc2_addr, 5_000, None).await, [0.0; 4]);
    // auto over a 40 ms round trip (a delaying proxy; bursts of 40
    // messages, each sent once the one before arrived): zstd only.
    let proxy = Forwarder::start(Some(dc2_addr));
    proxy.delay(Duration::from_millis(20), Duration::ZERO);
    let [raw, _, zraw, zpacked] = one_run("compression = \"auto\"\n", proxy.addr, 2_000, Some(40)).await;
    assert!(zraw > 0.0 && zpacked < zraw / 2.0 && raw == 0.0, "auto, 40 ms: {zraw} / {zpacked} / {raw}");
    proxy.cut();
    // off: nothing packed.
    assert_eq!(one_run("compression = \"off\"\n", dc2_addr, 5_000, None).await, [0.0; 4]);
}
