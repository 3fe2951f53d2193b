//! What one peer can cost the others, measured with real OTP nodes (a1
//! runs the scope `wan`; a2, a node of the same cluster, does not) behind a
//! real gateway (gw1), and peer gateways in this process whose local side
//! is the bench:
//!
//! 1. Scale of membership: dc2 advertises 1,000,000 members in one group,
//!    then withdraws them. The time until `pg:get_members/2` on a1 lists
//!    them all (and none); meanwhile, round trips of messages relayed
//!    through gw1 from dc2 (ordered behind its own membership changes) to
//!    a process on a1 (busy taking the members into pg) and to one on a2
//!    (no scope), and from dc3 (whose membership does not change) to a2.
//!    Targets: under 2 s each way; no relayed message waiting over 50 ms.
//! 2. Isolation: dc3, a well-behaved peer, calls a2 steadily while dc2
//!    floods gw1 at its limits, as fast as gw1 acks: messages to
//!    destinations it was never given, and messages bringing atoms past its
//!    budget, all refused at gw1 (and reported back to dc2). dc3's round
//!    trip with and without the flood, in the same run. Target: unchanged
//!    within noise. The flooding dc2 is a raw link writing frames it
//!    encodes itself (no gateway), on a runtime of its own: what the flood
//!    costs this 2-CPU machine is as much gw1's as it can be made.
//!
//!     cargo bench --bench peers              (about a minute)
//!
//! Loopback only; every process it starts is stopped by its handle.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{cpu_secs, proc_kib};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use wandist::demo::erl::{Epmd, Erl};
use wandist::erlang::etf::{self, Term};
use wandist::gateway::{self, Running};
use wandist::local::{RouteHandle, ToLocal};
use wandist::membership::Change;
use wandist::metrics::Metrics;
use wandist::wire::relay::Relay;
use wandist::wire::{codec, Handle};

const MEMBERS: u64 = 1_000_000;
/// The pinger's own handle (a process of the peer, as dc1 knows it).
const PINGER: u64 = 7;
/// The peer's member that a2's processes greet, to become known to it.
const GREETER: u64 = 8;

/// Round trips, by series (the series is the low 2 bits of the time sent).
type Series = Arc<Mutex<Vec<Vec<Duration>>>>;

struct Peer {
    running: Running,
    route: RouteHandle,
    inbox: mpsc::Receiver<ToLocal>,
}

async fn gateway(dir: &std::path::Path, name: &str, text: &str) -> Running {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let prepared = gateway::prepare(&path).unwrap_or_else(|p| panic!("{name}: {p:?}"));
    if text.contains("[erlang]") {
        wandist::app::start(prepared, Metrics::new()).await.unwrap()
    } else {
        gateway::start(prepared, Metrics::new(), 4096).await.unwrap()
    }
}

fn tls(certs: &std::path::Path, c: &str) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        certs.join(format!("{c}.pem")),
        certs.join(format!("{c}.key")),
        certs.join("ca.pem")
    )
}

/// A peer gateway dialing gw1, its local side the bench.
fn peer(rt: &Runtime, dir: &std::path::Path, certs: &std::path::Path, name: &str, gw1: &Running) -> Peer {
    let mut running = rt.block_on(gateway(
        dir,
        name,
        &format!(
            "[gateway]\ncluster = \"{name}\"\nname = \"{name}-gw\"\n{}[[route]]\ncluster = \"dc1\"\nendpoints = [\"{}\"]\n",
            tls(certs, name),
            gw1.peers.unwrap()
        ),
    ));
    let inbox = {
        let _in_runtime = rt.enter();
        running.merged_inbox(4096)
    };
    let route = running.local().route("dc1").unwrap().clone();
    Peer { running, route, inbox }
}

/// A process on `node` (found through a1's pg) greets the peer's GREETER
/// member and then runs `body`: the peer learns its handle.
fn known_to(rt: &Runtime, a1: &mut Erl, node: &mut Erl, p: &mut Peer, group: &str, body: &str) -> Handle {
    rt.block_on(p.running.local().join("dc1", group, vec![Handle(GREETER)]));
    a1.eval_until(&format!("length(pg:get_members(wan, {group}))."), |v| v == "1");
    // (A fun, so that nothing stays bound in the node's shell.)
    let greet = format!(
        "(fun(G) -> spawn(fun() -> G ! hello, ({body})() end), ok end)(hd(rpc:call('{}', pg, get_members, [wan, {group}]))).",
        a1.name
    );
    assert_eq!(node.eval(&greet), "ok");
    rt.block_on(async {
        loop {
            if let Some(ToLocal::Deliver { payload, .. }) = p.inbox.recv().await {
                let (r, _) = codec::from_prefix::<Relay>(&payload).unwrap();
                if let Relay::Send { to: Handle(GREETER), from: Some(from) } = r {
                    return from;
                }
            }
        }
    })
}

const ECHO: &str = "fun L() -> receive {ping, P, T} -> P ! {pong, T}, L() end end";

/// Pings `targets` (handle, series) every 2 ms from `route`, until stopped.
fn ping(rt: &Runtime, route: RouteHandle, targets: Vec<(Handle, i64)>, start: Instant) -> mpsc::Sender<()> {
    let (stop_tx, mut stop) = mpsc::channel::<()>(1);
    rt.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(2));
        loop {
            tokio::select! {
                _ = stop.recv() => return,
                _ = every.tick() => {}
            }
            for &(to, series) in &targets {
                let t = (start.elapsed().as_micros() as i64 & !3) | series;
                let mut body = vec![etf::VERSION, 104, 3];
                etf::put_atom(&mut body, "ping");
                etf::put_handle(&mut body, etf::PEER_PID, PINGER);
                etf::put_term(&mut body, &Term::Int(t));
                let mut payload = Vec::new();
                codec::encode_value(&Relay::Send { to, from: Some(Handle(PINGER)) }, &mut payload).unwrap();
                payload.extend(body);
                if route.submit(Bytes::from(payload), None).await.is_err() {
                    return;
                }
            }
        }
    });
    stop_tx
}

/// Collects the pongs arriving in `inbox` into `series`.
fn collect(rt: &Runtime, mut inbox: mpsc::Receiver<ToLocal>, series: Series, start: Instant) {
    rt.spawn(async move {
        while let Some(item) = inbox.recv().await {
            let ToLocal::Deliver { payload, .. } = item else { continue };
            let Ok((Relay::Send { .. }, used)) = codec::from_prefix::<Relay>(&payload) else { continue };
            let Ok((t, _)) = etf::decode(&payload[used..]) else { continue };
            if let Some(Term::Int(sent)) = t.as_tuple().and_then(|t| t.get(1)) {
                let rtt = start.elapsed().saturating_sub(Duration::from_micros(*sent as u64));
                series.lock().unwrap()[(sent & 3) as usize].push(rtt);
            }
        }
    });
}

fn take(series: &Series, i: usize) -> Vec<Duration> {
    let mut v = std::mem::take(&mut series.lock().unwrap()[i]);
    v.sort();
    v
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn row(what: &str, time: &str, to: &str, v: &[Duration]) {
    println!(
        "| {what} | {time} | {to} | {} | {} | {} | {} |",
        v.len(),
        ms(pct(v, 0.5)),
        ms(pct(v, 0.99)),
        ms(v.last().copied().unwrap_or_default())
    );
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The raw flooder's state, shared with the bench.
#[derive(Default)]
struct Flood {
    /// The handle of a1's sink, once gw1's snapshot named it.
    sink: AtomicU64,
    go: AtomicBool,
    stop: AtomicBool,
    sent: AtomicU64,
    acked: AtomicU64,
}

/// A raw dc2: one mutual-TLS link to gw1 with dc2's certificate, a new
/// run (epoch), answering pings; once told to go, it writes messages as
/// fast as gw1 acks them (at most half of gw1's window outstanding), in
/// batches of 256 frames: half to destinations it was never given, half
/// to the sink it was given, each bringing a new atom (past its budget of
/// 10,000: refused).
async fn raw_flood(certs: std::path::PathBuf, gw1: std::net::SocketAddr, f: Arc<Flood>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wandist::link::handshake::{self, Identity, Offer};
    use wandist::wire::{AdvertBody, Header};
    let at = |n: &str| wandist::config::PathAt { path: certs.join(n), line: None };
    let files = wandist::config::TlsFiles::new(at("dc2.pem"), at("dc2.key"), at("ca.pem"));
    let tls = wandist::tls::Tls::load(&files, Some("dc2"), std::path::Path::new("bench")).unwrap();
    let epoch = wandist::wire::Epoch(fastrand::u64(1..));
    // The same instance as the stopped dc2 gateway, run again (a new
    // epoch): gw1 starts a fresh session with it at once (another
    // instance's name would wait as a successor for the old one to leave).
    let id = Identity { cluster: "dc2".into(), gateway: "dc2-gw".into(), epoch };
    let offer = Offer { links_wanted: 1, recv_window: wandist::route::Window { messages: 1 << 16, bytes: 64 << 20 } };
    let t = wandist::link::Timeouts { connect: Duration::from_secs(5), handshake: Duration::from_secs(5) };
    let tcp = tokio::net::TcpStream::connect(gw1).await.unwrap();
    let est = handshake::client(tcp, Some(&tls), "dc1", id.hello(offer), &t, 1 << 20).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(est.io);
    let (pong_tx, mut pongs) = mpsc::channel::<u64>(64);
    let (fr, mut buf) = (f.clone(), est.rest);
    let reader = tokio::spawn(async move {
        loop {
            while let Ok(Some(frame)) = codec::decode(&mut buf, 64 << 20) {
                match frame.header {
                    Header::Ping { nonce } => {
                        let _ = pong_tx.try_send(nonce);
                    }
                    Header::Ack { upto, .. } => fr.acked.store(upto.0, Relaxed),
                    Header::Advert(a) => match a.body {
                        AdvertBody::Snapshot { groups, .. } => {
                            for (g, members) in groups {
                                if g == "sink" && !members.is_empty() {
                                    fr.sink.store(members[0].0, Relaxed);
                                }
                            }
                        }
                        AdvertBody::Join { group, members } if group == "sink" && !members.is_empty() => {
                            fr.sink.store(members[0].0, Relaxed)
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            if matches!(rd.read_buf(&mut buf).await, Ok(0) | Err(_)) || fr.stop.load(Relaxed) {
                return;
            }
        }
    });
    let mut seq = 0u64;
    let mut out = bytes::BytesMut::with_capacity(1 << 20);
    let mut every = tokio::time::interval(Duration::from_millis(1));
    while !f.stop.load(Relaxed) {
        while let Ok(nonce) = pongs.try_recv() {
            codec::encode(&Header::Pong { nonce }, &[], 1 << 20, &mut out).unwrap();
        }
        let room = f.go.load(Relaxed) && seq < f.acked.load(Relaxed) + (1 << 15);
        if room {
            let sink = Handle(f.sink.load(Relaxed));
            let mut body = Vec::with_capacity(64);
            for _ in 0..256 {
                seq += 1;
                body.clear();
                let relay = match seq % 2 {
                    0 => Relay::Send { to: Handle(1_000_000_000 + seq), from: None },
                    _ => Relay::Send { to: sink, from: None },
                };
                codec::encode_value(&relay, &mut body).unwrap();
                body.push(etf::VERSION);
                etf::put_atom(&mut body, &format!("flood_{seq}"));
                codec::encode(
                    &Header::Data { epoch, seq: wandist::wire::Seq(seq), more: false },
                    &body,
                    1 << 20,
                    &mut out,
                )
                .unwrap();
            }
            f.sent.store(seq, Relaxed);
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if !room {
            every.tick().await;
        }
    }
    let _ = wr.shutdown().await;
    reader.abort();
}

fn main() {
    assert!(wandist::demo::erl::available(), "erl is not installed: apt-get install -y erlang-nox");
    // Gateways in one process: a worker for two, as on this 2-CPU machine
    // two gateway processes would have one each.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let epmd = Epmd::start().unwrap();
    let tag = std::process::id();
    // (Schedulers that do not spin while idle: three nodes' spinning would
    // take this 2-CPU machine from the gateway.)
    let quiet = ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"];
    let mut a1 = Erl::start_with(&format!("pa1_{tag}"), "cookie_a", &epmd, &[&["+P", "2000000"][..], &quiet].concat());
    let mut a2 = Erl::start_with(&format!("pa2_{tag}"), "cookie_a", &epmd, &quiet);
    assert_eq!(a1.eval("{ok, _} = pg:start(wan), ok."), "ok");
    assert_eq!(a1.eval(&format!("pg:join(wan, echo, spawn({})).", ECHO)), "ok");
    assert_eq!(a1.eval("pg:join(wan, sink, spawn(fun L() -> receive _ -> L() end end))."), "ok");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    wandist::certs::generate(&certs, &["dc1".into(), "dc2".into(), "dc3".into()]).unwrap();
    let port =
        |n: &str| rt.block_on(wandist::erlang::dist::port_please_at(n, epmd.port, Duration::from_secs(5))).unwrap();
    let (p1, p2) = (port(&a1.name), port(&a2.name));
    let gw1 = rt.block_on(gateway(
        dir.path(),
        "dc1",
        &format!(
            "[gateway]\ncluster = \"dc1\"\nlisten = \"127.0.0.1:0\"\n{}\
             [[route]]\ncluster = \"dc2\"\nmax_members = 1100000\nmax_peer_atoms = 10000\n\
             [[route]]\ncluster = \"dc3\"\n\
             [erlang]\nnode = \"pgw1_{tag}@127.0.0.1\"\ncookie = \"cookie_a\"\nscope = \"wan\"\n\
             nodes = [{{ name = \"{}\", port = {p1} }}, {{ name = \"{}\", port = {p2} }}]\n",
            tls(&certs, "dc1"),
            a1.name,
            a2.name
        ),
    ));
    let mut dc2 = peer(&rt, dir.path(), &certs, "dc2", &gw1);
    let mut dc3 = peer(&rt, dir.path(), &certs, "dc3", &gw1);
    // dc2 learns a1's echo (dc1's member) and an echo on a2; dc3 an echo
    // on a2.
    let echo1 = rt.block_on(async {
        loop {
            if let Some(ToLocal::Members { change: Change::Join { group, members }, .. }) = dc2.inbox.recv().await {
                if group != "echo" {
                    continue;
                }
                return members[0];
            }
        }
    });
    let echo2 = known_to(&rt, &mut a1, &mut a2, &mut dc2, "greeter2", ECHO);
    let echo3 = known_to(&rt, &mut a1, &mut a2, &mut dc3, "greeter3", ECHO);
    let start = Instant::now();
    let series: Series = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    let Peer { running: dc2_running, route: dc2_route, inbox: dc2_inbox } = dc2;
    let Peer { running: dc3_running, route: dc3_route, inbox: dc3_inbox } = dc3;
    collect(&rt, dc2_inbox, series.clone(), start);
    collect(&rt, dc3_inbox, series.clone(), start);

    // ---- 1. a million members, in and out ----
    let stop = ping(&rt, dc2_route.clone(), vec![(echo1, 0), (echo2, 1)], start);
    // And from dc3, a peer whose membership does not change.
    let stop3 = ping(&rt, dc3_route.clone(), vec![(echo3, 3)], start);
    std::thread::sleep(Duration::from_secs(1));
    let idle = (take(&series, 0), take(&series, 1), take(&series, 3));
    let rss0 = rss_mib();
    // Whether the group is there at all (O(1) on the node, where counting
    // copies the million members); the count is checked once it is.
    let present = |a1: &mut Erl| a1.eval("ets:member(wan, big).") == "true";
    let count = |a1: &mut Erl| -> u64 { a1.eval("length(pg:get_members(wan, big)).").parse().unwrap() };
    let handles: Vec<Handle> = (1_000..1_000 + MEMBERS).map(Handle).collect();
    let step = wandist::erlang::core::MEMBERS_PER_STEP;
    // What taking them costs the node's pg: a1's CPU and memory.
    let (a1_cpu0, a1_rss0) = (cpu_secs(a1.pid()), proc_kib(a1.pid(), "VmRSS:"));
    let t = Instant::now();
    // As a local side tells its route: in pieces.
    rt.block_on(async {
        for chunk in handles.chunks(step) {
            dc2_running.local().join("dc1", "big", chunk.to_vec()).await;
        }
    });
    while !present(&mut a1) || count(&mut a1) < MEMBERS {
        assert!(t.elapsed() < Duration::from_secs(120), "never converged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let joined = t.elapsed();
    let during_join = (take(&series, 0), take(&series, 1), take(&series, 3));
    let rss1 = rss_mib();
    let (a1_cpu1, a1_rss1) = (cpu_secs(a1.pid()), proc_kib(a1.pid(), "VmRSS:"));
    let t = Instant::now();
    rt.block_on(async {
        for chunk in handles.chunks(step) {
            dc2_running.local().leave("dc1", "big", chunk.to_vec()).await;
        }
    });
    while present(&mut a1) {
        assert!(t.elapsed() < Duration::from_secs(120), "never converged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = t.elapsed();
    let during_leave = (take(&series, 0), take(&series, 1), take(&series, 3));
    let a1_cpu2 = cpu_secs(a1.pid());
    rt.block_on(stop.send(())).ok();
    rt.block_on(stop3.send(())).ok();

    println!("\n1. 1,000,000 members of a peer cluster into pg on a1, and out again");
    println!("| phase | time | relayed round trips to | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for (phase, time, (v1, v2, v3)) in [
        ("idle (1 s)", None, &idle),
        ("join 1,000,000", Some(joined), &during_join),
        ("leave 1,000,000", Some(left), &during_leave),
    ] {
        let time = time.map(|t| format!("{:.2} s", t.as_secs_f64())).unwrap_or_else(|| "-".into());
        row(phase, &time, "a1 (taking the members)", v1);
        row(phase, &time, "a2 (no scope)", v2);
        row(phase, &time, "a2, from dc3", v3);
    }
    println!("RSS of this process (gw1, and the peers' gateways): {rss0:.0} MiB idle, {rss1:.0} MiB holding 1,000,000 members");
    println!(
        "a1 (the node taking them into pg): CPU {:.2} s to join, {:.2} s to leave ({:.2} / {:.2} µs per member); RSS +{:.0} MiB holding them ({:.0} B per member)",
        a1_cpu1 - a1_cpu0,
        a1_cpu2 - a1_cpu1,
        (a1_cpu1 - a1_cpu0) * 1e6 / MEMBERS as f64,
        (a1_cpu2 - a1_cpu1) * 1e6 / MEMBERS as f64,
        (a1_rss1 - a1_rss0) / 1024.0,
        (a1_rss1 - a1_rss0) * 1024.0 / MEMBERS as f64
    );

    // ---- 2. a well-behaved peer beside one flooding at its limits ----
    // dc2's gateway stops; a raw dc2 (a new run of it, as gw1 sees it)
    // floods from frames it writes itself, on a runtime of its own, so
    // that what the flood costs this machine is gw1's, not a sender's.
    rt.block_on(dc2_running.stop());
    let rt_flood = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let flood = Arc::new(Flood::default());
    let flooder = rt_flood.spawn(raw_flood(certs.clone(), gw1.peers.unwrap(), flood.clone()));
    // The sink on a1 is dc1's member: the raw dc2 learns its handle from
    // gw1's snapshot (and is up) before the calm period starts.
    let t = Instant::now();
    while flood.sink.load(Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the raw dc2 never got gw1's snapshot");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = ping(&rt, dc3_route.clone(), vec![(echo3, 2)], start);
    std::thread::sleep(Duration::from_secs(3));
    let calm = take(&series, 2);
    flood.go.store(true, Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    flood.stop.store(true, Relaxed);
    let flooded = take(&series, 2);
    std::thread::sleep(Duration::from_secs(3));
    let after = take(&series, 2);
    rt.block_on(stop.send(())).ok();
    let sent = flood.sent.load(Relaxed);
    let acked = flood.acked.load(Relaxed);
    let text = gw1.metrics.render();
    let rejected = |reason: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("wandist_erlang_rejected_total")
                    && l.contains("peer=\"dc2\"")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    println!("\n2. dc3 calls a2 through gw1, calm and with dc2 flooding gw1 at its limits (3 s each)");
    println!("| dc2 | dc2's messages | relayed round trips to | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    row("calm", "0", "a2, from dc3", &calm);
    row("flooding", &format!("{sent} ({acked} acked)"), "a2, from dc3", &flooded);
    row("calm again", "0", "a2, from dc3", &after);
    let throttled = text
        .lines()
        .find(|l| l.starts_with("wandist_peer_throttled_total") && l.contains("peer=\"dc2\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut calms = [calm, after].concat();
    calms.sort();
    println!(
        "dc3's flooding / calm (both calm periods): p50 {:.2}x, p99 {:.2}x; dc2's refused: {} forged, {} atom_budget; \
         dc2 held back {} times (max_refusals_per_second)",
        pct(&flooded, 0.5).as_secs_f64() / pct(&calms, 0.5).as_secs_f64().max(1e-9),
        pct(&flooded, 0.99).as_secs_f64() / pct(&calms, 0.99).as_secs_f64().max(1e-9),
        rejected("forged"),
        rejected("atom_budget"),
        throttled,
    );
    rt_flood.block_on(flooder).unwrap();
    drop(rt_flood);
    rt.block_on(async move {
        let (gw1, dc3) = (gw1, dc3_running);
        dc3.stop().await;
        gw1.stop().await;
    });
}
