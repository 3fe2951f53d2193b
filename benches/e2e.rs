//! End-to-end benchmark: the same two Erlang nodes connected directly (TLS
//! distribution, then plain TCP distribution), through two relays that do
//! no work (the floors: byte-copying threads; Tokio relays with mutual TLS
//! between them) and as two clusters bridged by two wandist gateways over
//! mutual TLS. Measures 100 B messages/s, 64 KiB
//! MB/s (a sender with a bounded credit window) and ping-pong round trips;
//! for the gateways also CPU time per message and peak RSS. Prints a table
//! of ratios and appends it to BENCHMARKS.md.
//!
//!     cargo bench --bench e2e            (a few minutes at most)
//!
//! Loopback only; every process it starts is stopped by its handle.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{cpu_secs, proc_kib};
use wandist::demo::erl::{Epmd, Erl};

const SMALL: u64 = 200_000;
const LARGE: u64 = 4_000;
/// Round trips per path, measured in ROUNDS blocks taken in turn across
/// the paths (all kept running), so that every path sees the same spells
/// of a noisy machine.
const PINGS: u64 = 5_000;
const ROUNDS: u64 = 10;

#[derive(Debug, Default, Clone)]
struct Figures {
    small_per_s: f64,
    large_mb_s: f64,
    /// 64 KiB from a plain sender (`!` as fast as it goes, no window).
    plain_mb_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_f(s: &str) -> f64 {
    s.trim().parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

/// CPU spent by the 100 B stream, in µs per message, per process: the
/// CPU during the stream less the CPU over as long a time without it.
#[derive(Debug, Default, Clone)]
struct Cpu {
    /// The sending and the receiving Erlang node.
    erl: [f64; 2],
    /// The sending-side and the receiving-side gateway (zero for direct runs).
    gw: [f64; 2],
    /// Wall time of the 100 B run, µs per message.
    wall: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.erl.iter().chain(&self.gw).sum()
    }
}

/// Binds the messages (`Small`, `Large`) on `x` and warms up the path (and
/// the gateways' proxies) before anything is measured.
fn warm_up(x: &mut Erl) {
    x.eval("Small = binary:copy(<<\"x\">>, 100), Large = binary:copy(<<\"y\">>, 65536), ok.");
    x.eval_within("wandist_bench:stream(R, 10000, Small, 4000).", Duration::from_secs(300));
}

/// A path whose processes stay up until the round trips are measured:
/// `x` (with the receiver bound as `R`) and whatever else must live.
struct Live {
    x: Erl,
    _keep: Vec<Box<dyn std::any::Any>>,
}

/// Ping-pong round trips through every path, PINGS / ROUNDS at a time,
/// the paths taken in turn (and in a rotated order each round); each
/// path's p50 and p99 over all its samples go into its figures.
fn round_trips(paths: &mut [(&mut Live, &mut Figures)]) {
    let per_round = PINGS / ROUNDS;
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(PINGS as usize); paths.len()];
    for round in 0..ROUNDS as usize {
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            let out = paths[i]
                .0
                .x
                .eval_within(&format!("wandist_bench:round_trips(R, {per_round})."), Duration::from_secs(300));
            let got: Vec<f64> = out.trim_matches(|c| c == '[' || c == ']').split(',').map(parse_f).collect();
            assert_eq!(got.len() as u64, per_round, "round trips: {out}");
            samples[i].extend(got);
        }
    }
    for ((_, f), mut s) in paths.iter_mut().zip(samples) {
        s.sort_by(f64::total_cmp);
        let at = |q: usize| s[(s.len() * q / 100).min(s.len() - 1)];
        f.p50_us = at(50);
        f.p99_us = at(99);
    }
}

/// Runs the two streaming workloads from `x` against the receiver bound as `R`.
/// `pids` are the processes whose CPU time is read around the 100 B run:
/// sending node, receiving node, then the gateways if any.
fn workloads(x: &mut Erl, pids: &[u32]) -> (Figures, Cpu) {
    let cpu = || pids.iter().map(|&p| cpu_secs(p)).collect::<Vec<f64>>();
    let long = Duration::from_secs(300);
    warm_up(x);
    let before = cpu();
    let small_us = parse_f(&x.eval_within(&format!("wandist_bench:stream(R, {SMALL}, Small, 4000)."), long));
    let after = cpu();
    // The same wall time with no stream: what the processes spend anyway
    // (heartbeats, ticks, the other path's idle links) is subtracted, so
    // the figure is the stream's own cost.
    let idle_before = cpu();
    std::thread::sleep(Duration::from_micros(small_us as u64));
    let idle_after = cpu();
    let small_per_s = SMALL as f64 / (small_us / 1e6);
    let us = parse_f(&x.eval_within(&format!("wandist_bench:stream(R, {LARGE}, Large, 2000)."), long));
    let large_mb_s = (LARGE * 65536) as f64 / (us / 1e6) / 1e6;
    let us = parse_f(&x.eval_within(&format!("wandist_bench:plain(R, {LARGE}, Large)."), long));
    let plain_mb_s = (LARGE * 65536) as f64 / (us / 1e6) / 1e6;
    // Round trips come later, interleaved across the paths (`round_trips`).
    let f = Figures { small_per_s, large_mb_s, plain_mb_s, p50_us: 0.0, p99_us: 0.0 };
    let delta = |a: &[f64], b: &[f64], i: usize| a.get(i).zip(b.get(i)).map(|(a, b)| a - b).unwrap_or(0.0);
    let per_msg =
        |i: usize| (delta(&after, &before, i) - delta(&idle_after, &idle_before, i)).max(0.0) * 1e6 / SMALL as f64;
    let cpu = Cpu { erl: [per_msg(0), per_msg(1)], gw: [per_msg(2), per_msg(3)], wall: small_us / SMALL as f64 };
    (f, cpu)
}

/// Arguments for every Erlang node: the bench module's path, then
/// WANDIST_BENCH_ERL_ARGS (e.g. "+sbwt none"), the same for all three paths.
fn pa(dir: &Path) -> Vec<String> {
    let mut args = vec!["-pa".into(), dir.display().to_string()];
    if let Ok(extra) = std::env::var("WANDIST_BENCH_ERL_ARGS") {
        args.extend(extra.split_whitespace().map(String::from));
    }
    args
}

/// A bench node `name` with the bench module's path and `extra` arguments.
fn bench_node(epmd: &Epmd, beam: &Path, name: &str, extra: &[String]) -> Erl {
    let mut args = pa(beam);
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Erl::start_with(name, "bench", epmd, &args)
}

/// Connects x to y, finds y's receiver from x, and runs the workloads.
/// `relays`: the process whose CPU time counts as the relays' (this one,
/// for the in-process relays of the floors).
fn connect_and_measure(mut x: Erl, mut y: Erl, relays: Option<u32>) -> (Figures, Cpu, Live) {
    assert_eq!(y.eval("register(rcv, wandist_bench:receiver())."), "true");
    assert_eq!(x.eval(&format!("net_kernel:connect_node('{}').", y.name)), "true");
    assert_eq!(x.eval(&format!("R = rpc:call('{}', erlang, whereis, [rcv]), is_pid(R).", y.name)), "true");
    let pids: Vec<u32> = [x.pid(), y.pid()].into_iter().chain(relays).collect();
    let (f, cpu) = workloads(&mut x, &pids);
    (f, cpu, Live { x, _keep: vec![Box::new(y)] })
}

fn direct(epmd: &Epmd, beam: &Path, tag: &str, extra: &[String]) -> (Figures, Cpu, Live) {
    let y = bench_node(epmd, beam, &format!("y_{tag}"), extra);
    let x = bench_node(epmd, beam, &format!("x_{tag}"), extra);
    connect_and_measure(x, y, None)
}

/// A relay that only copies bytes (a thread per direction, 256 KiB reads):
/// what two gateways would cost if they did no work at all.
fn relay(target: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(server) = TcpStream::connect(target) else { continue };
            for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                let _ = from.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    addr
}

/// Which end of the TLS floor's encrypted leg a relay is.
#[derive(Clone)]
enum TlsEnd {
    /// Accepts TLS (as dc2), forwards in plain.
    Accept(std::sync::Arc<rustls::ServerConfig>),
    /// Accepts plain, forwards over TLS (as dc1, to dc2).
    Dial(std::sync::Arc<rustls::ClientConfig>),
}

/// A relay with one TLS end, on a Tokio runtime of its own with as many
/// workers as a gateway has on this machine by default:
/// `tokio::io::copy_bidirectional`, no other work. Two of them make the TLS
/// floor.
fn tls_relay(target: std::net::SocketAddr, end: TlsEnd) -> std::net::SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let workers = wandist::gateway::worker_threads(0, cpus);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let end = end.clone();
                tokio::spawn(async move {
                    match end {
                        TlsEnd::Accept(config) => {
                            let Ok(mut client) = tokio_rustls::TlsAcceptor::from(config).accept(client).await else {
                                return;
                            };
                            let mut server = server;
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                        TlsEnd::Dial(config) => {
                            let name = wandist::tls::server_name("dc2").unwrap();
                            let Ok(mut server) = tokio_rustls::TlsConnector::from(config).connect(name, server).await
                            else {
                                return;
                            };
                            let mut client = client;
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// The dev certificates of `cluster`, as a gateway loads them.
fn tls_of(certs: &Path, cluster: &str) -> wandist::tls::Tls {
    let at = |f: String| wandist::config::PathAt { path: certs.join(f), line: None };
    let files =
        wandist::config::TlsFiles::new(at(format!("{cluster}.pem")), at(format!("{cluster}.key")), at("ca.pem".into()));
    wandist::tls::Tls::load(&files, Some(cluster), Path::new("bench")).unwrap_or_else(|p| panic!("{p:?}"))
}

/// The floors for any pair of gateways: the same two nodes with plain TCP
/// distribution through two relays (x -> relay -> relay -> y), i.e. the
/// four extra loopback legs and wake-ups a bridged path has. `chain` builds
/// the relays toward y's address and returns the near one's. x does not
/// listen (`-dist_listen false`) and finds y at the near relay's port
/// (`-erl_epmd_port`); y listens on a port found free by binding 0
/// (released just before y takes it).
fn relayed(
    epmd: &Epmd,
    beam: &Path,
    tag: &str,
    chain: impl FnOnce(std::net::SocketAddr) -> std::net::SocketAddr,
) -> (Figures, Cpu, Live) {
    let y_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let y = bench_node(epmd, beam, &format!("y_{tag}"), &["-erl_epmd_port".into(), y_port.to_string()]);
    let near = chain(([127, 0, 0, 1], y_port).into());
    let x_args = ["-erl_epmd_port".into(), near.port().to_string(), "-dist_listen".into(), "false".into()];
    let x = bench_node(epmd, beam, &format!("x_{tag}"), &x_args);
    connect_and_measure(x, y, Some(std::process::id()))
}

struct Gw {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Gw {
    /// Starts `wandist run`; under callgrind (instrumentation off until
    /// switched on) when `callgrind` names its output file.
    fn start(bin: &str, config: &Path, epmd_port: u16, callgrind: Option<&Path>) -> Gw {
        let mut cmd = match callgrind {
            Some(out) => {
                let mut c = Command::new("valgrind");
                c.args(["--tool=callgrind", "--instr-atstart=no"])
                    .arg(format!("--callgrind-out-file={}", out.display()));
                c.arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            // As the Dockerfile runs it (see BENCHMARKS.md).
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
            .env("WANDIST_LOG", "warn,wandist::gateway=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start wandist");
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Gw { child, lines }
    }

    fn wait(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect(needle);
            if l.contains(needle) {
                return l;
            }
        }
    }

    /// Peak RSS in KiB, from /proc.
    fn peak_rss(&self) -> u64 {
        proc_kib(self.child.id(), "VmHWM:") as u64
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_in(line: &str) -> String {
    let at = line.find("addr=").expect("addr=") + 5;
    line[at..].split_whitespace().next().unwrap_or("").to_string()
}

struct GwFigures {
    f: Figures,
    cpu: Cpu,
    rss_kib: [u64; 2],
    members_after: Duration,
    /// The nodes and gateways, kept up for the round trips.
    live: Option<Live>,
}

const MEMBERS: u32 = 10_000;
const IDLE_LINKS: u32 = 64;

/// The memory an idle link costs: a gateway accepting `IDLE_LINKS` routes
/// (one link each, heartbeating, no traffic), RSS before and after, per link.
fn idle_link_kib(dir: &Path) -> f64 {
    let bin = env!("CARGO_BIN_EXE_wandist");
    let clusters: Vec<String> = (0..IDLE_LINKS).map(|i| format!("p{i}")).collect();
    let mut all = clusters.clone();
    all.push("hub".into());
    let certs = dir.join("idle-certs");
    wandist::certs::generate(&certs, &all).unwrap();
    let tls = |c: &str| {
        format!("[tls]\ncert = \"{0}/{c}.pem\"\nkey = \"{0}/{c}.key\"\nca = \"{0}/ca.pem\"\n", certs.display())
    };
    let routes: String = clusters.iter().map(|c| format!("[[route]]\ncluster = \"{c}\"\n")).collect();
    let hub_cfg = dir.join("hub.toml");
    std::fs::write(&hub_cfg, format!("[gateway]\ncluster = \"hub\"\nlisten = \"127.0.0.1:0\"\n{}{routes}", tls("hub")))
        .unwrap();
    let hub = Gw::start(bin, &hub_cfg, 0, None);
    let listen = addr_in(&hub.wait("listening for peer gateways"));
    let settle = || {
        // RSS after the allocator settles (two equal readings 200 ms apart).
        let mut last = 0;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            let now = rss_kib(hub.child.id());
            if now == last {
                break;
            }
            last = now;
        }
        last
    };
    let before = settle();
    let spokes: Vec<Gw> = clusters
        .iter()
        .map(|c| {
            let cfg = dir.join(format!("{c}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "[gateway]\ncluster = \"{c}\"\n{}[[route]]\ncluster = \"hub\"\nendpoints = [\"{listen}\"]\n",
                    tls(c)
                ),
            )
            .unwrap();
            Gw::start(bin, &cfg, 0, None)
        })
        .collect();
    let mut up = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while up < IDLE_LINKS && Instant::now() < deadline {
        if let Ok(l) = hub.lines.recv_timeout(Duration::from_secs(1)) {
            if l.contains("link up") {
                up += 1;
            }
        }
    }
    assert_eq!(up, IDLE_LINKS, "not every idle link came up");
    let after = settle();
    drop(spokes);
    (after.saturating_sub(before)) as f64 / IDLE_LINKS as f64
}

fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "VmRSS:") as u64
}

/// Two clusters through two gateways. With `dist_tls` (the optfile of
/// `-ssl_dist_optfile`), the clusters run TLS distribution and the gateways
/// join them with `[erlang.tls]`.
fn gateway(epmd: &Epmd, beam: &Path, tag: &str, dir: &Path, dist_tls: Option<&Path>) -> GwFigures {
    let bin = env!("CARGO_BIN_EXE_wandist");
    let mut args = pa(beam);
    if let Some(optfile) = dist_tls {
        args.extend([
            "-proto_dist".into(),
            "inet_tls".into(),
            "-ssl_dist_optfile".into(),
            optfile.display().to_string(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut y = Erl::start_with(&format!("gy_{tag}"), "cookie_b", epmd, &args);
    let mut x = Erl::start_with(&format!("gx_{tag}"), "cookie_a", epmd, &args);
    for n in [&mut x, &mut y] {
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    assert_eq!(y.eval("pg:join(wan, bench, wandist_bench:receiver())."), "ok");
    // 10,000 members of one group in dc2, to time how fast they reach dc1's pg.
    assert_eq!(
        y.eval(&format!("Many = [spawn(fun() -> receive stop -> ok end end) || _ <- lists:seq(1, {MEMBERS})], pg:join(wan, many, Many).")),
        "ok"
    );
    // WANDIST_BENCH_THREADS sets the gateways' worker_threads (default: the gateway's own, `gateway::worker_threads`).
    let threads = std::env::var("WANDIST_BENCH_THREADS").map(|t| format!("worker_threads = {t}\n")).unwrap_or_default();
    let tls = |c: &str| {
        format!("[tls]\ncert = \"certs/{c}.pem\"\nkey = \"certs/{c}.key\"\nca = \"certs/ca.pem\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
    };
    // (The dev certificates name clusters, not 127.0.0.1: as the nodes'
    // optfile, only the chain is checked.)
    let erlang_tls = |c: &str| {
        match dist_tls {
        Some(_) => format!(
            "[erlang.tls]\ncert = \"certs/{c}.pem\"\nkey = \"certs/{c}.key\"\nca = \"certs/ca.pem\"\ncheck_host = false\n"
        ),
        None => String::new(),
    }
    };
    let c2 = dir.join("gw2.toml");
    std::fs::write(
        &c2,
        format!(
            "[gateway]\ncluster = \"dc2\"\nlisten = \"127.0.0.1:0\"\n{threads}{}[[route]]\ncluster = \"dc1\"\n[erlang]\nnode = \"wgw2_{tag}@127.0.0.1\"\ncookie = \"cookie_b\"\nnodes = [\"{}\"]\n{}",
            tls("dc2"),
            y.name,
            erlang_tls("dc2")
        ),
    )
    .unwrap();
    let profile = Profile::wanted();
    let callgrind_out = dir.join("callgrind.out");
    let gw2 = Gw::start(bin, &c2, epmd.port, profile.map(|_| callgrind_out.as_path()));
    let listen = addr_in(&gw2.wait("listening for peer gateways"));
    let c1 = dir.join("gw1.toml");
    std::fs::write(
        &c1,
        format!(
            "[gateway]\ncluster = \"dc1\"\n{threads}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{listen}\"]\n[erlang]\nnode = \"wgw1_{tag}@127.0.0.1\"\ncookie = \"cookie_a\"\nnodes = [\"{}\"]\n{}",
            tls("dc1"),
            x.name,
            erlang_tls("dc1")
        ),
    )
    .unwrap();
    let gw1 = Gw::start(bin, &c1, epmd.port, None);
    gw1.wait("route up");
    let route_up = Instant::now();
    x.eval_until(&format!("length(pg:get_members(wan, many)) >= {MEMBERS}."), |v| v == "true");
    let members_after = route_up.elapsed();
    x.eval_until("length(pg:get_members(wan, bench)).", |v| v == "1");
    assert_eq!(x.eval("R = hd(pg:get_members(wan, bench)), ok."), "ok");
    if std::env::var_os("WANDIST_BENCH_GATEWAY_ONLY").is_some() {
        eprintln!("e2e: gateway pids {} (sending) {} (receiving)", gw1.child.id(), gw2.child.id());
    }
    if let Some(what) = profile {
        what.run(&mut x, gw2.child.id(), &callgrind_out);
        return GwFigures { f: Figures::default(), cpu: Cpu::default(), rss_kib: [0, 0], members_after, live: None };
    }
    let pids = [x.pid(), y.pid(), gw1.child.id(), gw2.child.id()];
    let (f, cpu) = workloads(&mut x, &pids);
    let rss = [gw1.peak_rss(), gw2.peak_rss()];
    let live = Live { x, _keep: vec![Box::new(y), Box::new(gw1), Box::new(gw2)] };
    GwFigures { f, cpu, rss_kib: rss, members_after, live: Some(live) }
}

/// WANDIST_BENCH_CALLGRIND=pingpong|small: instead of the workloads, count
/// the receiving gateway's instructions (valgrind's callgrind, switched on
/// for the workload only) per gateway pass of a ping-pong, or per 100 B
/// message of a stream. Instruction counts repeat from run to run where
/// times do not (BENCHMARKS.md, "Round trip").
#[derive(Clone, Copy)]
enum Profile {
    PingPong,
    Small,
}

impl Profile {
    fn wanted() -> Option<Profile> {
        match std::env::var("WANDIST_BENCH_CALLGRIND").ok()?.as_str() {
            "pingpong" => Some(Profile::PingPong),
            "small" => Some(Profile::Small),
            other => panic!("WANDIST_BENCH_CALLGRIND={other}: say pingpong or small"),
        }
    }

    fn run(self, x: &mut Erl, gateway: u32, out: &Path) {
        let long = Duration::from_secs(600);
        warm_up(x);
        let control = |args: &[&str]| {
            let st = Command::new("callgrind_control").args(args).arg(gateway.to_string()).status();
            assert!(st.is_ok_and(|s| s.success()), "callgrind_control {args:?} failed");
        };
        control(&["-i", "on"]);
        // A gateway takes two passes of each round trip; a message of a stream, one.
        let (call, units, per) = match self {
            Profile::PingPong => ("wandist_bench:pingpong(R, 5000).", 10_000, "gateway pass of a ping-pong"),
            Profile::Small => ("wandist_bench:stream(R, 20000, Small, 4000).", 20_000, "100 B message of a stream"),
        };
        x.eval_within(call, long);
        control(&["-d"]);
        let dump = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().starts_with(&format!("{}.", out.display())))
            .expect("no callgrind dump");
        let text = std::fs::read_to_string(&dump).unwrap();
        let total: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("no summary line in the callgrind dump");
        println!(
            "\ne2e: the receiving gateway ran {} instructions per {per} ({total} in all; dump {})",
            total / units,
            dump.display()
        );
    }
}

fn machine() -> String {
    let otp = Command::new("erl")
        .args(["-noshell", "-eval", "io:format(\"~s\", [erlang:system_info(otp_release)]), halt()."])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("{}, OTP {otp}, loopback", support::cpus())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing useful: run only under bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: run with `cargo bench --bench e2e`");
        return;
    }
    assert!(wandist::demo::erl::available(), "needs erl (apt-get install -y erlang-nox)");
    let dir = std::env::temp_dir().join(format!("wandist-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    wandist::certs::generate(&dir.join("certs"), &["dc1".into(), "dc2".into()]).unwrap();
    let beam = dir.join("beam");
    std::fs::create_dir_all(&beam).unwrap();
    let src: PathBuf = [env!("CARGO_MANIFEST_DIR"), "benches", "erl", "wandist_bench.erl"].iter().collect();
    let st = Command::new("erlc").arg("-o").arg(&beam).arg(&src).status().expect("erlc");
    assert!(st.success(), "erlc failed");
    let c = dir.join("certs");
    let optfile = dir.join("ssl_dist.conf");
    let side = |who: &str| {
        format!(
            "{{{who}, [{{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {{cacertfile, \"{}\"}}, {{verify, verify_peer}}{}]}}",
            c.join("dc1.pem").display(),
            c.join("dc1.key").display(),
            c.join("ca.pem").display(),
            // Chains are verified both ways; the dev certificates name clusters,
            // not 127.0.0.1, so the client skips only the host-name match.
            if who == "server" {
                ", {fail_if_no_peer_cert, true}"
            } else {
                ", {customize_hostname_check, [{match_fun, fun(_, _) -> true end}]}"
            }
        )
    };
    std::fs::write(&optfile, format!("[{}, {}].\n", side("server"), side("client"))).unwrap();
    let tag = std::process::id().to_string();
    let epmd = Epmd::start().expect("epmd");

    // WANDIST_BENCH_GATEWAY_ONLY=1 skips the direct runs (for profiling) and
    // appends nothing.
    let gateway_only = std::env::var_os("WANDIST_BENCH_GATEWAY_ONLY").is_some()
        || std::env::var_os("WANDIST_BENCH_CALLGRIND").is_some();
    let mut direct_paths = if gateway_only {
        None
    } else {
        eprintln!("e2e: direct TLS distribution…");
        let tls_args =
            vec!["-proto_dist".into(), "inet_tls".into(), "-ssl_dist_optfile".into(), optfile.display().to_string()];
        let tls = direct(&epmd, &beam, &format!("tls{tag}"), &tls_args);
        eprintln!("e2e: direct TCP distribution…");
        let tcp = direct(&epmd, &beam, &format!("tcp{tag}"), &[]);
        eprintln!("e2e: TCP distribution through two byte-copying relays (the floor)…");
        let floor = relayed(&epmd, &beam, &format!("relay{tag}"), |y| relay(relay(y)));
        eprintln!("e2e: the same through two Tokio relays with mutual TLS between them (the TLS floor)…");
        let (dc1, dc2) = (tls_of(&c, "dc1"), tls_of(&c, "dc2"));
        let tls_floor = relayed(&epmd, &beam, &format!("tlsrelay{tag}"), |y| {
            tls_relay(tls_relay(y, TlsEnd::Accept(dc2.server.clone())), TlsEnd::Dial(dc1.client.clone()))
        });
        Some([tls, tcp, floor, tls_floor])
    };
    eprintln!("e2e: two clusters through two wandist gateways (mutual TLS)…");
    let mut gw = gateway(&epmd, &beam, &tag, &dir, None);
    if Profile::wanted().is_some() {
        return;
    }
    let mut gw_tls = if gateway_only {
        None
    } else {
        eprintln!("e2e: the same, with TLS distribution inside both clusters ([erlang.tls])…");
        Some(gateway(&epmd, &beam, &format!("t{tag}"), &dir, Some(&optfile)))
    };
    eprintln!("e2e: round trips, {ROUNDS} blocks of {} through each path in turn…", PINGS / ROUNDS);
    let mut gw_live = gw.live.take().expect("the gateway path is up");
    let mut gw_tls_live = gw_tls.as_mut().and_then(|g| g.live.take());
    let mut paths: Vec<(&mut Live, &mut Figures)> = vec![(&mut gw_live, &mut gw.f)];
    if let (Some(live), Some(g)) = (gw_tls_live.as_mut(), gw_tls.as_mut()) {
        paths.push((live, &mut g.f));
    }
    if let Some(d) = direct_paths.as_mut() {
        paths.extend(d.iter_mut().map(|(f, _, live)| (live, f)));
    }
    round_trips(&mut paths);
    drop(paths);
    drop(gw_live);
    drop(gw_tls_live);
    let (gw_tls_f, gw_tls_cpu) = gw_tls.map(|g| (g.f, g.cpu)).unwrap_or_default();
    let [(tls, tls_cpu), (tcp, tcp_cpu), (floor, floor_cpu), (tls_floor, tls_floor_cpu)] =
        direct_paths.map(|d| d.map(|(f, c, _)| (f, c))).unwrap_or_default();
    eprintln!("e2e: the memory of {IDLE_LINKS} idle links…");
    let idle = idle_link_kib(&dir);

    let row = |name: &str, f: &Figures| {
        format!(
            "| {name} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} |",
            f.small_per_s, f.large_mb_s, f.plain_mb_s, f.p50_us, f.p99_us
        )
    };
    let ratio = |name: &str, a: &Figures, b: &Figures| {
        format!(
            "| {name} | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            a.small_per_s / b.small_per_s,
            a.large_mb_s / b.large_mb_s,
            a.plain_mb_s / b.plain_mb_s,
            a.p50_us / b.p50_us,
            a.p99_us / b.p99_us
        )
    };
    let erl_args =
        std::env::var("WANDIST_BENCH_ERL_ARGS").map(|a| format!("; every Erlang node with `{a}`")).unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu_row = |name: &str, c: &Cpu| {
        format!(
            "{name} {:.2} µs (Erlang nodes {:.2} + {:.2}, gateways or relays {:.2} + {:.2}) [{:.2} µs]",
            c.total(),
            c.erl[0],
            c.erl[1],
            c.gw[0],
            c.gw[1],
            c.wall
        )
    };
    let date = support::utc_now();
    let table = format!(
        "### {date} — {}\n\n`cargo bench --bench e2e` ({SMALL} × 100 B, {LARGE} × 64 KiB with an ack per 1000 and at most 4000 / 2000 in flight, {LARGE} × 64 KiB from a plain sender (no window, then a ping), {PINGS} pings in {ROUNDS} blocks per path, the paths in turn{erl_args})\n\n\
         | path | 100 B msgs/s | 64 KiB MB/s | 64 KiB plain sender MB/s | RTT p50 µs | RTT p99 µs |\n|---|---|---|---|---|---|\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n\n\
         Gateways (100 B run): CPU per message relayed, the stream alone (less as long without it) {:.2} µs (sending side), {:.2} µs (receiving side); peak RSS {} KiB / {} KiB.\n\
         CPU per 100 B message (the Erlang nodes, and the gateways or both relays; wall time per message on {cores} CPUs in brackets): {}; {}; {}; {}; {}; {}.\n\
         {MEMBERS} members of a dc2 group were all in dc1's pg {:.0} ms after the route came up. An idle link costs {:.1} KiB of RSS \
         (a gateway with {IDLE_LINKS} idle links, heartbeating, against none).\n\n",
        machine(),
        row("direct TLS dist", &tls),
        row("direct TCP dist", &tcp),
        row("TCP dist via 2 byte-copying relays (floor)", &floor),
        row("TCP dist via 2 relays, mTLS between them (TLS floor)", &tls_floor),
        row("gateways (mTLS)", &gw.f),
        row("gateways (mTLS), TLS dist in both clusters", &gw_tls_f),
        ratio("gateway / TLS", &gw.f, &tls),
        ratio("gateway, TLS dist / TLS", &gw_tls_f, &tls),
        ratio("gateway / TCP", &gw.f, &tcp),
        ratio("floor / TLS", &floor, &tls),
        ratio("TLS floor / TLS", &tls_floor, &tls),
        ratio("gateway / floor", &gw.f, &floor),
        ratio("gateway / TLS floor", &gw.f, &tls_floor),
        gw.cpu.gw[0],
        gw.cpu.gw[1],
        gw.rss_kib[0],
        gw.rss_kib[1],
        cpu_row("direct TLS", &tls_cpu),
        cpu_row("direct TCP", &tcp_cpu),
        cpu_row("via relays", &floor_cpu),
        cpu_row("via TLS relays", &tls_floor_cpu),
        cpu_row("gateways", &gw.cpu),
        cpu_row("gateways, TLS dist", &gw_tls_cpu),
        gw.members_after.as_secs_f64() * 1000.0,
        idle,
    );
    println!("\n{table}");
    if gateway_only {
        return;
    }
    // The run's history: a readable table, and one JSON object per run
    // (BENCHMARKS.md keeps the current state against the targets).
    let figures = |f: &Figures, c: &Cpu| {
        serde_json::json!({
            "small_msgs_per_s": f.small_per_s, "large_mb_s": f.large_mb_s, "plain_large_mb_s": f.plain_mb_s,
            "rtt_p50_us": f.p50_us, "rtt_p99_us": f.p99_us,
            "cpu_us_per_small_msg": { "erlang": c.erl, "gateways_or_relays": c.gw, "wall": c.wall },
        })
    };
    let run = serde_json::json!({
        "date": date, "machine": machine(), "erl_args": erl_args,
        "paths": {
            "direct_tls": figures(&tls, &tls_cpu), "direct_tcp": figures(&tcp, &tcp_cpu),
            "floor": figures(&floor, &floor_cpu), "tls_floor": figures(&tls_floor, &tls_floor_cpu),
            "gateways": figures(&gw.f, &gw.cpu), "gateways_tls_dist": figures(&gw_tls_f, &gw_tls_cpu),
        },
        "gateway_peak_rss_kib": gw.rss_kib, "members_10000_ms": gw.members_after.as_secs_f64() * 1000.0,
        "idle_link_kib": idle,
    });
    let file = support::append_results("e2e", &table, &run);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("e2e: appended to {}", file.display());
}
