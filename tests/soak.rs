//! Soak: two gateways (in this process, real mutual-TLS links over
//! loopback through two fault proxies) with steady traffic both ways while
//! faults are injected at random: cuts, blackholes, latency, and restarts
//! of either gateway, half of them as the cluster's other instance. At the end every message sent is accounted for —
//! delivered exactly once, or reported failed — and RSS did not grow.
//!
//!     cargo test --test soak                          (20 s; part of `cargo test`)
//!     cargo test --release --test soak -- --secs 600  (on demand)
//!
//! Prints the figures RELIABILITY.md reports.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::forward::Forwarder;
use support::inproc::InProc;
use support::*;
use tokio::sync::mpsc;
use wandist::local::{RouteHandle, ToLocal};
use wandist::route::{FailReason, Outcome};

const SUBMITTED: u8 = 1;
const RECEIVED: u8 = 2;
const CONFIRMED: u8 = 4;
const FAILED: u8 = 8;

/// Per direction (0: dc1 -> dc2, 1: dc2 -> dc1), one state byte per token.
#[derive(Default)]
struct Book {
    state: [Vec<u8>; 2],
    duplicates: u64,
    failed_restart: u64,
    failed_shutdown: u64,
    problems: Vec<String>,
}

impl Book {
    fn slot(&mut self, dir: usize, token: u64) -> &mut u8 {
        let v = &mut self.state[dir];
        if v.len() <= token as usize {
            v.resize(token as usize + 1, 0);
        }
        &mut v[token as usize]
    }

    fn received(&mut self, dir: usize, token: u64) {
        let s = self.slot(dir, token);
        if *s & RECEIVED != 0 {
            self.duplicates += 1;
            self.problems.push(format!("dir {dir} token {token} received twice"));
        }
        let s = self.slot(dir, token);
        *s |= RECEIVED;
    }

    fn outcome(&mut self, dir: usize, token: u64, outcome: Outcome) {
        let s = *self.slot(dir, token);
        if s & (CONFIRMED | FAILED) != 0 {
            self.problems.push(format!("dir {dir} token {token}: a second outcome {outcome:?}"));
        }
        let bit = match outcome {
            Outcome::Delivered => CONFIRMED,
            Outcome::Failed(FailReason::PeerRestarted) => {
                self.failed_restart += 1;
                FAILED
            }
            Outcome::Failed(_) => {
                self.failed_shutdown += 1;
                FAILED
            }
        };
        *self.slot(dir, token) |= bit;
    }
}

fn payload(dir: usize, token: u64) -> Bytes {
    let size = 9 + (token as usize * 7919) % 16_384;
    let mut v = vec![dir as u8; size];
    v[1..9].copy_from_slice(&token.to_be_bytes());
    Bytes::from(v)
}

/// Reads one gateway run's local side until it closes (the run stopped).
fn consume(mut rx: mpsc::Receiver<ToLocal>, book: Arc<Mutex<Book>>, own_dir: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            match item {
                ToLocal::Deliver { payload, .. } => {
                    let dir = payload[0] as usize;
                    let token = u64::from_be_bytes(payload[1..9].try_into().unwrap());
                    let mut b = book.lock().unwrap();
                    if dir != 1 - own_dir {
                        b.problems.push(format!("a message of direction {dir} delivered on the wrong side"));
                    }
                    b.received(dir, token);
                }
                ToLocal::Confirm { token, outcome, .. } => book.lock().unwrap().outcome(own_dir, token.0, outcome),
                _ => {}
            }
        }
    })
}

/// Submits tokens 0.. in order through whatever route handle is current;
/// a submit refused because the run stopped is retried on the next run.
fn produce(
    dir: usize,
    handle: Arc<Mutex<Option<RouteHandle>>>,
    book: Arc<Mutex<Book>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut token = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Some(route) = handle.lock().unwrap().clone() else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            match tokio::time::timeout(
                Duration::from_millis(200),
                route.submit(payload(dir, token), Some(wandist::route::Token(token))),
            )
            .await
            {
                Ok(Ok(())) => {
                    *book.lock().unwrap().slot(dir, token) |= SUBMITTED;
                    token += 1;
                }
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(5)).await, // that run is gone
                Err(_) => {}                                                      // window full: try again
            }
        }
        token
    })
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Run {
    gw: InProc,
    consumer: tokio::task::JoinHandle<()>,
}

async fn start(
    name: &str,
    cfg: &str,
    dir: usize,
    peer: &str,
    book: &Arc<Mutex<Book>>,
    handle: &Arc<Mutex<Option<RouteHandle>>>,
) -> Run {
    let mut gw = InProc::start(name, cfg, 4096).await;
    let (_tx, dummy) = mpsc::channel(1);
    let rx = std::mem::replace(&mut gw.rx, dummy);
    let consumer = consume(rx, book.clone(), dir);
    *handle.lock().unwrap() = Some(gw.running().local().route(peer).unwrap().clone());
    Run { gw, consumer }
}

async fn stop(run: &mut Run, handle: &Arc<Mutex<Option<RouteHandle>>>) {
    *handle.lock().unwrap() = None;
    run.gw.stop().await;
    // Every outcome the stopped run owed its local side arrives before its channel closes.
    tokio::time::timeout(SOON, &mut run.consumer).await.expect("the stopped run's local side did not close").unwrap();
}

/// The configuration of `cluster`'s other gateway instance: the same but
/// for `gateway.name` (alternating between two names).
fn other_instance(cfg: &str, cluster: &str) -> String {
    let (a, b) = (format!("name = \"gw-{cluster}\""), format!("name = \"gw-{cluster}-b\""));
    if cfg.contains(&a) {
        cfg.replace(&a, &b)
    } else {
        cfg.replace(&b, &a)
    }
}

async fn soak(secs: u64) {
    let certs = Certs::new(&["dc1", "dc2"]);
    // Windows small enough that failovers resend a lot, big enough to flow.
    let knobs = "window_messages = 4096\nwindow_bytes = 16777216\n";
    let mut dc2_cfg =
        format!("{}{}[[route]]\ncluster = \"dc1\"\n{knobs}", gateway_table("dc2", true), certs.tls_table("dc2"));
    let book = Arc::new(Mutex::new(Book::default()));
    let h1 = Arc::new(Mutex::new(None));
    let h2 = Arc::new(Mutex::new(None));
    let mut dc2 = start("dc2", &dc2_cfg, 1, "dc1", &book, &h2).await;
    let paths = [Forwarder::start(Some(dc2.gw.peer_addr())), Forwarder::start(Some(dc2.gw.peer_addr()))];
    let mut dc1_cfg = format!(
        "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\", \"{}\"]\nstandby = 1\n{knobs}",
        gateway_table("dc1", false),
        certs.tls_table("dc1"),
        paths[0].addr,
        paths[1].addr
    );
    let mut dc1 = start("dc1", &dc1_cfg, 0, "dc2", &book, &h1).await;
    dc1.gw.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;

    let stop_flag = Arc::new(AtomicBool::new(false));
    let producers = [
        produce(0, h1.clone(), book.clone(), stop_flag.clone()),
        produce(1, h2.clone(), book.clone(), stop_flag.clone()),
    ];
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    // RSS samples: the peak of the first part after warm-up (20-60 % of the
    // run) against the peak of the rest; steady state shows the same peaks.
    let (mut rss_early, mut rss_late) = (0u64, 0u64);
    let mut faults = std::collections::BTreeMap::<&str, u32>::new();
    let mut rng = fastrand::Rng::with_seed(secs ^ u64::from(std::process::id()));
    while Instant::now() < end {
        let at = started.elapsed().as_secs_f64() / secs as f64;
        if (0.2..0.6).contains(&at) {
            rss_early = rss_early.max(rss_kib());
        } else if at >= 0.6 {
            rss_late = rss_late.max(rss_kib());
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        let which = rng.u32(0..100);
        let kind = match which {
            0..=29 => {
                paths[rng.usize(0..2)].cut();
                "cut"
            }
            30..=49 => {
                let p = &paths[rng.usize(0..2)];
                p.blackhole(true);
                tokio::time::sleep(Duration::from_millis(rng.u64(200..3000))).await;
                p.blackhole(false);
                "blackhole"
            }
            50..=69 => {
                for p in &paths {
                    p.delay(Duration::from_millis(50), Duration::from_millis(30));
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
                for p in &paths {
                    p.delay(Duration::ZERO, Duration::ZERO);
                }
                "latency 50-80 ms"
            }
            // Half of the restarts come back as the cluster's other gateway
            // instance (another `gateway.name`): the peer's route moves to
            // it (a new session under a fresh epoch) instead of restarting.
            70..=84 => {
                stop(&mut dc1, &h1).await;
                let other = rng.bool();
                if other {
                    dc1_cfg = other_instance(&dc1_cfg, "dc1");
                }
                dc1 = start("dc1", &dc1_cfg, 0, "dc2", &book, &h1).await;
                if other {
                    "dc1 (dialer) replaced by another instance"
                } else {
                    "restart dc1 (dialer)"
                }
            }
            _ => {
                stop(&mut dc2, &h2).await;
                let other = rng.bool();
                if other {
                    dc2_cfg = other_instance(&dc2_cfg, "dc2");
                }
                dc2 = start("dc2", &dc2_cfg, 1, "dc1", &book, &h2).await;
                for p in &paths {
                    p.set_target(dc2.gw.peer_addr());
                }
                if other {
                    "dc2 (acceptor) replaced by another instance"
                } else {
                    "restart dc2 (acceptor)"
                }
            }
        };
        *faults.entry(kind).or_default() += 1;
    }
    stop_flag.store(true, Ordering::Relaxed);
    let mut sent = [0u64; 2];
    for (i, p) in producers.into_iter().enumerate() {
        sent[i] = p.await.unwrap();
    }
    // Heal, and wait (bounded) for every message to have its outcome.
    for p in &paths {
        p.blackhole(false);
        p.delay(Duration::ZERO, Duration::ZERO);
    }
    let settle = Instant::now();
    loop {
        let open: u64 = {
            let b = book.lock().unwrap();
            (0..2)
                .map(|d| (0..sent[d]).filter(|t| b.state[d][*t as usize] & (CONFIRMED | FAILED) == 0).count() as u64)
                .sum()
        };
        if open == 0 {
            break;
        }
        assert!(settle.elapsed() < Duration::from_secs(60), "{open} messages still without an outcome after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_end = rss_kib();
    rss_late = rss_late.max(rss_end);
    stop(&mut dc1, &h1).await;
    stop(&mut dc2, &h2).await;

    let b = book.lock().unwrap();
    let mut delivered = 0u64;
    let mut failed = 0u64;
    let mut failed_but_received = 0u64;
    let mut problems = b.problems.clone();
    for (d, &n) in sent.iter().enumerate() {
        for t in 0..n {
            let s = b.state[d][t as usize];
            match (s & CONFIRMED != 0, s & FAILED != 0) {
                (true, false) if s & RECEIVED == 0 => {
                    problems.push(format!("dir {d} token {t} confirmed, never received"))
                }
                (true, false) => delivered += 1,
                (false, true) => {
                    failed += 1;
                    if s & RECEIVED != 0 {
                        failed_but_received += 1;
                    }
                }
                _ => problems.push(format!("dir {d} token {t}: state {s:#b}")),
            }
        }
        if b.state[d].len() as u64 > n && b.state[d][n as usize..].iter().any(|s| *s & RECEIVED != 0) {
            problems.push(format!("dir {d}: received a token never sent"));
        }
    }
    let rss_early = if rss_early == 0 { rss_late } else { rss_early };
    let total_faults: u32 = faults.values().sum();
    println!(
        "soak {secs} s: {} messages sent ({} dc1->dc2, {} dc2->dc1); {delivered} delivered exactly once and confirmed; \
         {failed} reported failed ({} peer_restarted, {} shutdown; {failed_but_received} of them had arrived); \
         0 lost silently; {} duplicated; {total_faults} faults injected {faults:?}; \
         RSS peak {rss_early} KiB in 20-60 % of the run, {rss_late} KiB after, {rss_end} KiB at the end",
        sent[0] + sent[1],
        sent[0],
        sent[1],
        b.failed_restart,
        b.failed_shutdown,
        b.duplicates,
    );
    assert!(problems.is_empty(), "{} problems, first: {:?}", problems.len(), &problems[..problems.len().min(10)]);
    assert!(sent[0] > 0 && sent[1] > 0, "no traffic");
    assert!(delivered > failed, "more failed than delivered: {delivered} / {failed}");
    // Allocator slack, not growth: the later peak within 50 % (or 48 MiB) of
    // the earlier. (A gateway restarted late in a 20 s run leaves up to ~45
    // MiB of slack behind on this machine, with or without a leak; the leak
    // this caught, histogram samples piling up, grew RSS 2.5x in 180 s.)
    assert!(
        rss_late <= rss_early + (rss_early / 2).max(48 * 1024),
        "RSS grew: peak {rss_early} KiB, then {rss_late} KiB"
    );
}

fn main() {
    let mut secs = 20;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--secs") {
        secs = args.get(i + 1).and_then(|s| s.parse().ok()).expect("--secs N");
    }
    // `cargo test -- --list` and filters: this binary is one test.
    if args.iter().any(|a| a == "--list") {
        println!("soak: test");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(soak(secs));
    println!("test result: ok. soak passed");
}
