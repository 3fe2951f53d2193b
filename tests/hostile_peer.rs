//! A peer gateway that is authenticated but hostile, driven by the test,
//! against a real OTP node behind a real gateway — with an honest peer
//! cluster (real gateway, real node) beside it that must keep working.
//!
//! dc1: node a1 and gateway gw1 (listening, small limits for dc0).
//! dc0: the hostile peer (its name sorts first, so gw1 never trims its
//!      links: only the hard cap bounds them): an in-process gateway whose "local side" is the
//!      test (it submits crafted relays and advertises crafted groups),
//!      and raw connections with dc0's certificate for frame-level attacks.
//! dc3: the honest peer: node c1 with an echo server, gateway gw3.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::erl::{epmd, erl_table, tag, Epmd, Erl};
use support::inproc::{next, InProc};
use support::*;
use wandist::erlang::etf::{self, Pid, Term};
use wandist::local::ToLocal;
use wandist::membership::Change;
use wandist::route::{FailReason, Outcome};
use wandist::wire::relay::Relay;
use wandist::wire::{codec, Advert, AdvertBody, Frame, Handle, Header};

/// dc1's limits for dc0.
const DC2_LIMITS: &str = "max_links = 2\nmax_proxies = 2000\nmax_members = 1000\nmax_groups = 50\nmax_monitors = 5\n\
                          max_peer_atoms = 1000\nmax_refusals_per_second = 1000\n";

struct World {
    _epmd: Epmd,
    a1: Erl,
    _c1: Erl,
    gw1: InProc,
    _gw3: InProc,
    dc0: InProc,
    certs: Certs,
    /// The handles dc0 was given for dc1's members of `svc` (10 processes).
    svc: Vec<Handle>,
    next_token: u64,
    dir: tempfile::TempDir,
    /// Items dc0's side received while waiting for something else.
    stash: std::collections::VecDeque<ToLocal>,
}

async fn world() -> World {
    let t = tag();
    let epmd = epmd();
    let mut a1 = Erl::start(&format!("a1_{t}"), "cookie_a", &epmd);
    let mut c1 = Erl::start(&format!("c1_{t}"), "cookie_c", &epmd);
    for n in [&mut a1, &mut c1] {
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    // dc1: ten processes in `svc` that count what they get.
    assert_eq!(
        a1.eval(
            "ets:new(got, [named_table, public]), \
             [pg:join(wan, svc, spawn(fun L() -> receive M -> ets:update_counter(got, n, 1, {n, 0}), put(last, M), L() end end)) \
              || _ <- lists:seq(1, 10)], ok."
        ),
        "ok"
    );
    // dc3: an echo server.
    assert_eq!(
        c1.eval("E = spawn(fun L() -> receive {'$gen_call', F, R} -> gen:reply(F, {echo, R}), L() end end), pg:join(wan, echo, E)."),
        "ok"
    );
    let certs = Certs::new(&["dc1", "dc0", "dc3"]);
    let gw1 = InProc::start_erlang(
        "gw-dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc0\"\n{DC2_LIMITS}[[route]]\ncluster = \"dc3\"\n{}",
            gateway_table("dc1", true),
            certs.tls_table("dc1"),
            erl_table(&epmd, &format!("w1_{t}@127.0.0.1"), "cookie_a", &[&a1]).await
        ),
    )
    .await;
    let gw3 = InProc::start_erlang(
        "gw-dc3",
        &format!(
            "{}{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\n{}",
            gateway_table("dc3", false),
            certs.tls_table("dc3"),
            gw1.peer_addr(),
            erl_table(&epmd, &format!("w3_{t}@127.0.0.1"), "cookie_c", &[&c1]).await
        ),
    )
    .await;
    let mut dc0 = InProc::start("dc0", &dialing("dc0", &certs, "dc1", gw1.peer_addr()), 4096).await;
    a1.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
    // dc0 learns dc1's `svc` members: handles issued to it.
    let mut svc = Vec::new();
    while svc.len() < 10 {
        if let ToLocal::Members { change: Change::Join { group, members }, .. } = next(&mut dc0.rx, "svc members").await
        {
            assert_eq!(group, "svc");
            svc.extend(members);
        }
    }
    World {
        _epmd: epmd,
        a1,
        _c1: c1,
        gw1,
        _gw3: gw3,
        dc0,
        certs,
        svc,
        next_token: 1,
        dir: tempfile::tempdir().unwrap(),
        stash: Default::default(),
    }
}

fn relay(r: &Relay, body: &[u8]) -> Bytes {
    let mut out = Vec::new();
    codec::encode_value(r, &mut out).unwrap();
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn with_handles(tags: &[(u8, u64)]) -> Vec<u8> {
    let mut v = vec![etf::VERSION, 104, tags.len() as u8];
    for &(t, h) in tags {
        etf::put_handle(&mut v, t, h);
    }
    v
}

impl World {
    /// dc0 relays this (with a confirmation token); returns its outcome.
    async fn attack(&mut self, r: Relay, body: &[u8]) -> Outcome {
        let token = self.next_token;
        self.next_token += 1;
        let route = self.dc0.running().local().route("dc1").unwrap().clone();
        route.submit(relay(&r, body), Some(wandist::route::Token(token))).await.unwrap();
        loop {
            match next(&mut self.dc0.rx, &format!("the outcome of {r:?}")).await {
                ToLocal::Confirm { token: t, outcome, .. } if t.0 == token => return outcome,
                other => self.stash.push_back(other),
            }
        }
    }

    /// The next item dc0's side received (stashed ones first).
    async fn next_item(&mut self, what: &str) -> ToLocal {
        match self.stash.pop_front() {
            Some(item) => item,
            None => next(&mut self.dc0.rx, what).await,
        }
    }

    fn rejected(&self, reason: &str) -> f64 {
        self.gw1.metric("wandist_erlang_rejected_total", &[("peer", "dc0"), ("reason", reason)]).unwrap_or(0.0)
    }

    /// The honest peer works, and a1 is alive and still connected to gw1.
    async fn all_is_well(&mut self) {
        assert_eq!(self.a1.eval("gen_server:call(hd(pg:get_members(wan, echo)), ping, 5000)."), "{echo,ping}");
        assert_eq!(self.gw1.metric("wandist_erlang_nodes_connected", &[]), Some(1.0), "a1 dropped the gateway");
    }

    /// Messages the `svc` processes have received in all.
    fn got(&mut self) -> u64 {
        self.a1.eval("case ets:lookup(got, n) of [{n, N}] -> N; [] -> 0 end.").parse().unwrap()
    }

    /// Waits until they have received `n` (a confirmation says the node
    /// has a message in its receiver's queue, not that it was taken out).
    fn wait_got(&mut self, n: u64) {
        let want = n.to_string();
        self.a1.eval_until("case ets:lookup(got, n) of [{n, N}] -> N; [] -> 0 end.", |v| v == want);
    }
}

const UNDELIVERABLE: Outcome = Outcome::Failed(FailReason::Undeliverable);

/// The attacks found: forged pids for `rex` (a shell command as the node's
/// user) and `init` (halting the node), forged identities going home, as
/// alias targets, monitor and Down targets. With capability addressing
/// there is nothing to forge with: each is refused, counted as forged,
/// and reported back to the peer as undeliverable; the node lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reaches_only_what_it_was_given() {
    let mut w = world().await;
    let marker = w.dir.path().join("owned");
    let control = w.dir.path().join("control");
    let cast = |file: &std::path::Path| {
        etf::encode(&Term::tuple(vec![
            Term::atom("$gen_cast"),
            Term::tuple(vec![
                Term::atom("cast"),
                Term::atom("os"),
                Term::atom("cmd"),
                Term::list(vec![Term::Str(format!("touch {}", file.display()).into_bytes())]),
                Term::atom("user"),
            ]),
        ]))
    };
    // The payload is live: sent to rex on a1 itself, it runs the command.
    let live = cast(&control).iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
    w.a1.eval(&format!("rex ! binary_to_term(<<{live}>>), ok."));
    wait_for("the control command", SOON, || control.exists().then_some(()));
    // From dc0, to every handle it was not given (rex's pid numbers do not
    // exist any more: a destination is a handle or nothing).
    let given: Vec<u64> = w.svc.iter().map(|h| h.0).collect();
    let mut tried = 0;
    for h in (0..64).chain([53, 1 << 32, u64::MAX]).filter(|h| !given.contains(h)) {
        assert_eq!(
            w.attack(Relay::Send { to: Handle(h), from: None }, &cast(&marker)).await,
            UNDELIVERABLE,
            "handle {h}"
        );
        tried += 1;
    }
    // {stop, stop} to init was the other: no handle reaches init either.
    let stop = etf::encode(&Term::tuple(vec![Term::atom("stop"), Term::atom("stop")]));
    assert_eq!(w.attack(Relay::Send { to: Handle(0), from: None }, &stop).await, UNDELIVERABLE);
    assert_eq!(w.rejected("forged"), (tried + 1) as f64);
    w.all_is_well().await;
    assert!(!marker.exists(), "a forged relay ran a command on a1");

    // A raw pid written in a payload going to a process it was given: forged.
    let rex = Pid { node: w.a1.name.clone(), id: 53, serial: 0, creation: 1 };
    let raw = etf::encode(&Term::tuple(vec![Term::atom("reply_to"), Term::Pid(rex)]));
    let svc0 = w.svc[0];
    assert_eq!(w.attack(Relay::Send { to: svc0, from: None }, &raw).await, UNDELIVERABLE);
    // A home handle inside a payload that was never issued: forged.
    let home = with_handles(&[(etf::HOME_PID, 999)]);
    assert_eq!(w.attack(Relay::Send { to: svc0, from: None }, &home).await, UNDELIVERABLE);
    // A pid's handle used as an alias: forged.
    assert_eq!(w.attack(Relay::AliasSend { to: svc0, from: None }, &stop).await, UNDELIVERABLE);
    assert_eq!(w.rejected("forged"), (tried + 4) as f64);
    // What it was given works: delivered, from a proxy of dc0's sender.
    let before = w.got();
    let fine = with_handles(&[(etf::PEER_PID, 7), (etf::HOME_PID, svc0.0)]);
    assert_eq!(w.attack(Relay::Send { to: svc0, from: Some(Handle(7)) }, &fine).await, Outcome::Delivered);
    w.wait_got(before + 1);
    assert_eq!(w.a1.eval("length(pg:get_members(wan, svc))."), "10");

    // A monitor on a forged target: refused, answered with a Down (noproc).
    let proxies =
        |w: &World| w.gw1.metric("wandist_peer_quota_used", &[("peer", "dc0"), ("quota", "proxies")]).unwrap_or(0.0);
    w.attack(Relay::Monitor { target: Handle(4242) }, &[]).await;
    loop {
        match w.next_item("the Down for a forged monitor").await {
            ToLocal::Deliver { payload, .. } => {
                let (r, used) = codec::from_prefix::<Relay>(&payload).unwrap();
                assert_eq!(r, Relay::Down { target: Handle(4242) });
                assert_eq!(etf::decode(&payload[used..]).unwrap().0, Term::atom("noproc"));
                break;
            }
            _ => continue,
        }
    }
    // Downs for processes nobody watches mint nothing.
    let held_before = proxies(&w);
    for h in 5000..5200 {
        w.attack(Relay::Down { target: Handle(h) }, &etf::encode(&Term::atom("bye"))).await;
    }
    w.gw1.wait_metric("wandist_peer_quota_used", &[("peer", "dc0"), ("quota", "proxies")], |_| true).await;
    assert!(proxies(&w) <= held_before + 1.0, "Downs minted proxies: {} -> {}", held_before, proxies(&w));
    assert!(w.rejected("forged") >= (tried + 5) as f64);
    w.all_is_well().await;
    assert!(!marker.exists());
}

/// Names, atoms and terms a node would refuse — and drop the gateway's
/// whole connection over, cutting the cluster off from every peer — are
/// refused at the gateway; the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_would_refuse_never_reaches_it() {
    let mut w = world().await;
    let svc0 = w.svc[0];
    // A 300-character group name, and a good group beside it.
    let long = "g".repeat(300);
    w.dc0.running().local().join("dc1", &long, vec![Handle(1)]).await;
    w.dc0.running().local().join("dc1", "fine", vec![Handle(2)]).await;
    w.a1.eval_until("length(pg:get_members(wan, fine)).", |v| v == "1");
    w.gw1
        .wait_metric("wandist_adverts_rejected_total", &[("peer", "dc0"), ("reason", "bad_group")], |v| v >= 1.0)
        .await;
    w.all_is_well().await;

    let atoms_before: i64 = w.a1.eval("erlang:system_info(atom_count).").parse().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a 300-character atom",
            {
                let mut v = vec![etf::VERSION, 118, 1, 44];
                v.extend([b'x'; 300]);
                v
            },
            "invalid_term",
        ),
        (
            "NaN",
            {
                let mut v = vec![etf::VERSION, 70];
                v.extend(f64::NAN.to_be_bytes());
                v
            },
            "invalid_term",
        ),
        (
            "a map with two equal keys",
            vec![etf::VERSION, 116, 0, 0, 0, 2, 97, 1, 97, 1, 98, 0, 0, 0, 1, 97, 2],
            "invalid_term",
        ),
        ("a bit string of 0 bits", vec![etf::VERSION, 77, 0, 0, 0, 1, 0, 0xff], "invalid_term"),
        (
            "a port",
            {
                let mut v = vec![etf::VERSION, 89, 119, 3];
                v.extend(b"x@y");
                v.extend([0, 0, 0, 1, 0, 0, 0, 1]);
                v
            },
            "unsupported_term",
        ),
        // More new atoms than dc0's budget (1,000).
        (
            "an atom bomb",
            etf::encode(&Term::list((0..5000).map(|i| Term::atom(&format!("bomb_{i}"))).collect())),
            "atom_budget",
        ),
    ];
    for (what, payload, reason) in cases {
        assert_eq!(w.attack(Relay::Send { to: svc0, from: None }, &payload).await, UNDELIVERABLE, "{what}");
        assert!(w.rejected(reason) >= 1.0, "{what}: not counted as {reason}");
        w.all_is_well().await;
    }
    let atoms_after: i64 = w.a1.eval("erlang:system_info(atom_count).").parse().unwrap();
    assert!(atoms_after - atoms_before < 1000, "a1 gained {} atoms", atoms_after - atoms_before);
    // Deep nesting (8 MiB of it) is scanned in bounded memory and delivered.
    let mut deep = vec![etf::VERSION];
    for _ in 0..(4 << 20) {
        deep.extend([104, 1]);
    }
    deep.push(106);
    let before = w.got();
    assert_eq!(w.attack(Relay::Send { to: svc0, from: None }, &deep).await, Outcome::Delivered);
    w.wait_got(before + 1);
    w.all_is_well().await;
}

/// One peer at its limits costs only itself: its proxies, monitors, links
/// and membership are bounded by dc1's limits for it, each refusal counted
/// with its name, and the honest peer's calls go on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_its_limits_costs_only_itself() {
    let mut w = world().await;
    let svc0 = w.svc[0];
    // Calls from a1 to dc3 run all along; each must succeed.
    w.a1.eval(
        "Caller = spawn(fun() -> (fun L(N, Bad) -> receive {report, P} -> P ! {calls, N, Bad} after 0 -> \
         case catch gen_server:call(hd(pg:get_members(wan, echo)), ping, 5000) of {echo, ping} -> L(N + 1, Bad); _ -> L(N + 1, Bad + 1) end end end)(0, 0) end), ok.",
    );
    // Proxies: 30,000 distinct identities of dc0, 3,000 per message.
    for batch in 0..10u64 {
        let tags: Vec<(u8, u64)> = (0..3000).map(|i| (etf::PEER_PID, 1_000_000 + batch * 3000 + i)).collect();
        let mut v = vec![etf::VERSION, 108];
        v.extend((tags.len() as u32).to_be_bytes());
        for (t, h) in tags {
            etf::put_handle(&mut v, t, h);
        }
        v.push(106);
        assert_eq!(w.attack(Relay::Send { to: svc0, from: None }, &v).await, Outcome::Delivered);
    }
    w.gw1.wait_metric("wandist_peer_quota_used", &[("peer", "dc0"), ("quota", "proxies")], |v| v > 0.0).await;
    let used = w.gw1.metric("wandist_peer_quota_used", &[("peer", "dc0"), ("quota", "proxies")]).unwrap();
    assert!(used <= 2000.0, "dc0 holds {used} proxies, over its 2,000");
    // Monitors: on all ten processes it was given; five are held.
    for h in w.svc.clone() {
        w.attack(Relay::Monitor { target: h }, &[]).await;
    }
    w.gw1
        .wait_metric("wandist_erlang_rejected_total", &[("peer", "dc0"), ("reason", "monitor_quota")], |v| v == 5.0)
        .await;
    // Links: dc0 already has one; raw connections beyond max_links (2) are
    // closed. (As more links of dc0's own run: another run would be taken
    // for a restart of dc0.)
    let epoch = w.dc0.running().route_epoch("dc1").unwrap();
    let mut raws = Vec::new();
    for _ in 0..6 {
        if let Ok(est) = raw::connect(&w.certs, w.gw1.peer_addr(), "dc0", "dc1", epoch).await {
            raws.push(est);
        }
    }
    w.gw1
        .wait_metric("wandist_handshake_failures_total", &[("peer", "dc0"), ("reason", "link_limit")], |v| v >= 5.0)
        .await;
    let mut open = 0;
    for est in &mut raws {
        if !raw::closed_within(est, Duration::from_millis(300)).await {
            open += 1;
        }
    }
    assert!(open <= 1, "{open} raw links stayed open beside dc0's own");
    drop(raws);
    // A snapshot that never ends: parts past dc1's member limit are refused.
    let mut est = raw::connect(&w.certs, w.gw1.peer_addr(), "dc0", "dc1", epoch).await;
    // (the link limit may refuse it at first, while the others close)
    for _ in 0..50 {
        if est.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        est = raw::connect(&w.certs, w.gw1.peer_addr(), "dc0", "dc1", epoch).await;
    }
    let mut est = est.expect("a link once the others are gone");
    let parts: Vec<Frame> = (0..5u32)
        .map(|part| {
            let members = (0..400).map(|i| Handle(10_000 * part as u64 + i)).collect();
            Frame::control(Header::Advert(Advert {
                origin: "dc0".into(),
                // (past any counter dc0 itself used)
                counter: 1_000_000 + part as u64,
                body: AdvertBody::Snapshot { part, last: false, groups: vec![(format!("p{part}"), members)] },
            }))
        })
        .collect();
    let _ = raw::send(&mut est, &parts).await;
    w.gw1
        .wait_metric("wandist_adverts_rejected_total", &[("peer", "dc0"), ("reason", "member_limit")], |v| v >= 1.0)
        .await;
    drop(est);
    // Refusals cost it its pace: 3,000 forged messages, three times its
    // max_refusals_per_second, are all refused (none lost), and gw1 stops
    // reading dc0 while it is over: the last cannot be refused before the
    // budget allows it (a burst of 1,000, then 1,000 a second).
    let forged = w.rejected("forged");
    let route = w.dc0.running().local().route("dc1").unwrap().clone();
    let t = std::time::Instant::now();
    for i in 0..3000u64 {
        let forged = Relay::Send { to: Handle((1 << 40) + i), from: None };
        route.submit(relay(&forged, &[etf::VERSION, 106]), None).await.unwrap();
    }
    w.gw1
        .wait_metric("wandist_erlang_rejected_total", &[("peer", "dc0"), ("reason", "forged")], |v| {
            v >= forged + 3000.0
        })
        .await;
    assert!(t.elapsed() >= Duration::from_millis(1800), "3,000 refusals in {:?}", t.elapsed());
    let paused = w.gw1.metric("wandist_peer_throttled_total", &[("peer", "dc0")]).unwrap_or(0.0);
    assert!(paused >= 1.0, "dc0 was never held back");
    assert_eq!(w.gw1.metric("wandist_peer_throttled_total", &[("peer", "dc3")]).unwrap_or(0.0), 0.0);
    // The honest peer's calls all went through.
    let report =
        w.a1.eval("Caller ! {report, self()}, receive {calls, N, B} -> {N > 0, B} after 10000 -> timeout end.");
    assert_eq!(report, "{true,0}");
    w.all_is_well().await;
}
