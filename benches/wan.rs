//! The link between datacenters, modelled: both paths — direct TLS
//! distribution, and two clusters bridged by two wandist gateways — go
//! through the same userspace link model (`tests/support/forward.rs`):
//! 20 ms each way and 100 Mbit/s each way. Payloads that look like real
//! traffic (`wandist_bench:payloads/3`): chat messages as maps, records
//! serialized with `term_to_binary`, and random bytes (what no codec
//! shrinks). The gateways run with `compression` off, lz4, zstd and auto.
//! For each: messages/s, bytes on the link per message (both ways), the
//! gateways' CPU per message, and the ratio to direct TLS; then lz4's and
//! zstd's own CPU per KiB, timed in this process on the same payloads.
//! Prints a table and appends it to benches/results/wan.md (and .jsonl).
//!
//!     cargo bench --bench wan            (about five minutes)
//!
//! Loopback only; every process it starts is stopped by its handle.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::cpu_secs;
use support::erl::{epmd, Epmd, Erl};
use support::forward::Forwarder;
use support::{Certs, Gateway, SOON};

/// Each way.
const DELAY: Duration = Duration::from_millis(20);
/// 100 Mbit/s, each way.
const RATE: u64 = 100_000_000 / 8;
/// Messages in flight at most (acks every 1,000): enough to keep the
/// link's bandwidth-delay product full at every ratio measured.
const WINDOW: u32 = 20_000;

/// A payload kind and how many messages of it each path sends.
const KINDS: &[(&str, u32)] = &[("chat", 40_000), ("records", 60_000), ("random", 10_000)];
const MODES: &[&str] = &["off", "lz4", "zstd", "auto"];

#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    msgs_per_s: f64,
    /// Bytes the link carried per message, both ways.
    wire_bytes: f64,
    /// CPU µs per message: the two gateways (sending side, receiving side),
    /// or the two Erlang nodes for the direct path.
    cpu_us: [f64; 2],
}

/// The link model, toward `target`: buffering about two bandwidth-delay
/// products each way, as a link's queues would (beyond it, the sender's
/// TCP window closes).
fn link(target: Option<std::net::SocketAddr>) -> Forwarder {
    let f = Forwarder::start(target);
    f.delay(DELAY, Duration::ZERO);
    f.throttle(RATE);
    f.queue_limit((RATE as f64 * DELAY.as_secs_f64() * 2.0) as usize);
    f
}

/// Makes the payloads on `x` (bound as `M_kind`), warms the path up, then
/// streams each kind to `R`. `pids`: whose CPU counts (two processes).
fn run_kinds(x: &mut Erl, link: &Forwarder, pids: [u32; 2]) -> Vec<Figures> {
    let long = Duration::from_secs(600);
    for (kind, n) in KINDS {
        assert_eq!(x.eval_within(&format!("M_{kind} = wandist_bench:payloads({kind}, {n}, 7), ok."), long), "ok");
    }
    x.eval_within("wandist_bench:stream(R, 2000, <<\"warm\">>, 2000).", long);
    let mut out = Vec::new();
    for (kind, n) in KINDS {
        let cpu = || pids.map(cpu_secs);
        let (b0, c0) = (link.bytes(), cpu());
        let us: f64 =
            x.eval_within(&format!("wandist_bench:stream_list(R, M_{kind}, {WINDOW})."), long).parse().unwrap();
        let (b1, c1) = (link.bytes(), cpu());
        let n = f64::from(*n);
        out.push(Figures {
            msgs_per_s: n / (us / 1e6),
            wire_bytes: (b1 - b0) as f64 / n,
            cpu_us: [0, 1].map(|i| (c1[i] - c0[i]) * 1e6 / n),
        });
    }
    out
}

fn pa(beam: &Path) -> [String; 2] {
    ["-pa".into(), beam.display().to_string()]
}

/// Direct TLS distribution from x to y through the link model: y listens
/// on a port found free by binding 0; x does not listen and finds y at the
/// link's port (`-erl_epmd_port`).
fn direct(epmd: &Epmd, beam: &Path, optfile: &Path, t: &str) -> Vec<Figures> {
    let tls = ["-proto_dist".into(), "inet_tls".into(), "-ssl_dist_optfile".into(), optfile.display().to_string()];
    let y_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let args = |more: &[String]| -> Vec<String> {
        pa(beam).into_iter().chain(tls.iter().cloned()).chain(more.iter().cloned()).collect()
    };
    let y_args = args(&["-erl_epmd_port".into(), y_port.to_string()]);
    let mut y =
        Erl::start_with(&format!("wy_{t}"), "bench", epmd, &y_args.iter().map(String::as_str).collect::<Vec<_>>());
    let wan = link(Some(([127, 0, 0, 1], y_port).into()));
    let x_args = args(&["-erl_epmd_port".into(), wan.addr.port().to_string(), "-dist_listen".into(), "false".into()]);
    let mut x =
        Erl::start_with(&format!("wx_{t}"), "bench", epmd, &x_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(y.eval("register(rcv, wandist_bench:receiver())."), "true");
    assert_eq!(x.eval_within(&format!("net_kernel:connect_node('{}').", y.name), SOON), "true");
    assert_eq!(x.eval(&format!("R = rpc:call('{}', erlang, whereis, [rcv]), is_pid(R).", y.name)), "true");
    assert!(wan.forwarded() >= 1, "direct TLS did not go through the link model");
    let pids = [x.pid(), y.pid()];
    run_kinds(&mut x, &wan, pids)
}

/// Two clusters, two gateways with `compression = mode`, the link model
/// between the gateways (the Erlang nodes reach their gateways directly).
fn gateways(epmd: &Epmd, beam: &Path, certs: &Certs, mode: &str, t: &str) -> Vec<Figures> {
    let pa = pa(beam);
    let pa: Vec<&str> = pa.iter().map(String::as_str).collect();
    let mut y = Erl::start_with(&format!("gy_{mode}_{t}"), "cookie_b", epmd, &pa);
    let mut x = Erl::start_with(&format!("gx_{mode}_{t}"), "cookie_a", epmd, &pa);
    for n in [&mut x, &mut y] {
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    assert_eq!(y.eval("pg:join(wan, bench, wandist_bench:receiver())."), "ok");
    let erlang = |node: &str, cookie: &str, of: &Erl| {
        format!("[erlang]\nnode = \"{node}_{mode}_{t}@127.0.0.1\"\ncookie = \"{cookie}\"\nnodes = [\"{}\"]\n", of.name)
    };
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let gw2 = Gateway::start_with_env(
        "gw-dc2",
        &format!(
            "[gateway]\ncluster = \"dc2\"\nlisten = \"127.0.0.1:0\"\n{}[[route]]\ncluster = \"dc1\"\ncompression = \"{mode}\"\n{}",
            certs.tls_table("dc2"),
            erlang("wgw2", "cookie_b", &y)
        ),
        &env,
    );
    let wan = link(Some(gw2.peer_addr()));
    let gw1 = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "[gateway]\ncluster = \"dc1\"\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\ncompression = \"{mode}\"\n{}",
            certs.tls_table("dc1"),
            wan.addr,
            erlang("wgw1", "cookie_a", &x)
        ),
        &env,
    );
    gw1.wait_log("route up", SOON);
    x.eval_until("length(pg:get_members(wan, bench)).", |v| v == "1");
    assert_eq!(x.eval("R = hd(pg:get_members(wan, bench)), ok."), "ok");
    let figures = run_kinds(&mut x, &wan, [gw1.pid(), gw2.pid()]);
    // What went packed, per codec (the sending side).
    let m = gw1.metrics();
    let bytes = |codec: &str, stage: &str| {
        support::metric_sum(&m, "wandist_compression_bytes_total", &[("codec", codec), ("stage", stage)])
    };
    eprintln!(
        "wan: {mode}: lz4 {:.0} -> {:.0} bytes, zstd {:.0} -> {:.0} bytes",
        bytes("lz4", "raw"),
        bytes("lz4", "packed"),
        bytes("zstd", "raw"),
        bytes("zstd", "packed")
    );
    figures
}

/// lz4's and zstd's CPU per KiB of data frames, compressing and
/// decompressing whole writer batches (256 KiB) of the payloads `dump`
/// wrote to `file`: (compress µs/KiB, decompress µs/KiB, ratio) per codec.
fn codec_cost(file: &Path) -> Vec<(&'static str, f64, f64, f64)> {
    use wandist::wire::codec::{self, Packer, Unpacker};
    use wandist::wire::packing::Codec;
    use wandist::wire::Header;
    let bytes = std::fs::read(file).unwrap();
    let mut batches = vec![bytes::BytesMut::new()];
    let (mut at, mut seq) = (0, 0u64);
    while at + 4 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let body = &bytes[at + 4..at + 4 + len];
        at += 4 + len;
        seq += 1;
        let last = batches.last_mut().unwrap();
        codec::encode(
            &Header::Data { epoch: wandist::wire::Epoch(1), seq: wandist::wire::Seq(seq), more: false },
            body,
            1 << 20,
            last,
        )
        .unwrap();
        if last.len() >= 256 * 1024 {
            batches.push(bytes::BytesMut::new());
        }
    }
    let raw: usize = batches.iter().map(|b| b.len()).sum();
    let kib = raw as f64 / 1024.0;
    [("lz4", Codec::Lz4), ("zstd-1", Codec::Zstd(1)), ("zstd-3", Codec::Zstd(3))]
        .into_iter()
        .map(|(name, c)| {
            let (mut packer, mut unpacker) = (Packer::default(), Unpacker::default());
            let mut packed = Vec::new();
            // Best of 5 passes over every batch (the least disturbed by
            // the machine's other work). Decompressing counts beyond what
            // taking the same frames apart costs without compression (the
            // link does that anyway).
            let mut best = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..5 {
                packed.clear();
                let t = Instant::now();
                for b in &batches {
                    let mut out = bytes::BytesMut::new();
                    packer.pack(c, b, 1 << 20, &mut out).unwrap();
                    packed.push(out);
                }
                let pack = t.elapsed().as_secs_f64();
                let t = Instant::now();
                for p in &packed {
                    let f = codec::decode(&mut p.clone(), 1 << 20).unwrap().unwrap();
                    let Header::Packed { packing, raw_len } = f.header else { unreachable!() };
                    let frames = unpacker.unpack(packing, raw_len, &f.body, 1 << 20, 1 << 20).unwrap();
                    assert!(!frames.is_empty());
                }
                let unpack = t.elapsed().as_secs_f64();
                let t = Instant::now();
                for b in &batches {
                    let mut b = b.clone();
                    let mut frames = Vec::new();
                    while let Some(f) = codec::decode(&mut b, 1 << 20).unwrap() {
                        frames.push(f);
                    }
                    assert!(!frames.is_empty());
                }
                let plain = t.elapsed().as_secs_f64();
                best = (best.0.min(pack), best.1.min(unpack), best.2.min(plain));
            }
            let best = (best.0, (best.1 - best.2).max(0.0));
            let out: usize = packed.iter().map(|p| p.len()).sum();
            (name, best.0 * 1e6 / kib, best.1 * 1e6 / kib, raw as f64 / out as f64)
        })
        .collect()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("wan: run with `cargo bench --bench wan`");
        return;
    }
    let epmd = epmd();
    let certs = Certs::new(&["dc1", "dc2"]);
    let dir = tempfile::tempdir().unwrap();
    let beam = dir.path().join("beam");
    std::fs::create_dir_all(&beam).unwrap();
    let src: PathBuf = [env!("CARGO_MANIFEST_DIR"), "benches", "erl", "wandist_bench.erl"].iter().collect();
    assert!(Command::new("erlc").arg("-o").arg(&beam).arg(&src).status().unwrap().success(), "erlc failed");
    // TLS distribution for the direct path: chains verified both ways (the
    // dev certificates name clusters, not 127.0.0.1: the client skips only
    // the host-name match).
    let optfile = dir.path().join("ssl_dist.conf");
    let side = |who: &str, extra: &str| {
        format!(
            "{{{who}, [{{certfile, {:?}}}, {{keyfile, {:?}}}, {{cacertfile, {:?}}}, {{verify, verify_peer}}{extra}]}}",
            certs.path("dc1.pem"),
            certs.path("dc1.key"),
            certs.path("ca.pem")
        )
    };
    let text = format!(
        "[{}, {}].\n",
        side("server", ", {fail_if_no_peer_cert, true}"),
        side("client", ", {customize_hostname_check, [{match_fun, fun(_, _) -> true end}]}")
    );
    std::fs::write(&optfile, text).unwrap();
    let t = std::process::id().to_string();
    // WANDIST_WAN_CODECS_ONLY=1: only the in-process codec costs, printed
    // (appends nothing).
    let codecs_only = std::env::var_os("WANDIST_WAN_CODECS_ONLY").is_some();
    if codecs_only {
        let mut dumper =
            Erl::start_with(&format!("wdump_{t}"), "bench", &epmd, &pa(&beam).each_ref().map(String::as_str));
        for (kind, n) in KINDS {
            let file = dir.path().join(format!("{kind}.etf"));
            let expr = format!(
                "wandist_bench:dump(wandist_bench:payloads({kind}, {n}, 7), {:?}).",
                file.display().to_string()
            );
            dumper.eval_within(&expr, Duration::from_secs(300));
            for (name, pack, unpack, ratio) in codec_cost(&file) {
                println!("wan: {kind}: {name} {pack:.2} + {unpack:.2} µs/KiB ({ratio:.2}x)");
            }
        }
        return;
    }

    eprintln!("wan: direct TLS distribution through the link model…");
    let tls = direct(&epmd, &beam, &optfile, &t);
    let mut gw = Vec::new();
    for mode in MODES {
        eprintln!("wan: gateways, compression = {mode}…");
        gw.push(gateways(&epmd, &beam, &certs, mode, &t));
    }
    eprintln!("wan: codec CPU per KiB, in process…");
    let mut dumper = Erl::start_with(&format!("wdump_{t}"), "bench", &epmd, &pa(&beam).each_ref().map(String::as_str));
    let mut costs = Vec::new();
    for (kind, n) in KINDS {
        let file = dir.path().join(format!("{kind}.etf"));
        let expr =
            format!("wandist_bench:dump(wandist_bench:payloads({kind}, {n}, 7), {:?}).", file.display().to_string());
        dumper.eval_within(&expr, Duration::from_secs(300));
        costs.push(codec_cost(&file));
    }
    drop(dumper);

    let date = support::utc_now();
    let machine = format!("{}, loopback", support::cpus());
    let mut table = format!(
        "### {date} — {}\n\n`cargo bench --bench wan`: {} ms each way, {} Mbit/s each way, at most {WINDOW} messages in flight; \
         {}.\n\n| payload | path | msgs/s | × direct TLS | link bytes / msg | CPU µs / msg (gateways: sending + receiving; direct: the two nodes) |\n|---|---|---|---|---|---|\n",
        machine,
        DELAY.as_millis(),
        RATE * 8 / 1_000_000,
        KINDS.iter().map(|(k, n)| format!("{n} {k} messages")).collect::<Vec<_>>().join(", ")
    );
    let mut json_paths = serde_json::Map::new();
    for (k, (kind, _)) in KINDS.iter().enumerate() {
        let d = tls[k];
        let mut row = |path: &str, f: &Figures| {
            table.push_str(&format!(
                "| {kind} | {path} | {:.0} | {:.2}x | {:.0} | {:.2} + {:.2} |\n",
                f.msgs_per_s,
                f.msgs_per_s / d.msgs_per_s,
                f.wire_bytes,
                f.cpu_us[0],
                f.cpu_us[1]
            ));
            json_paths.insert(
                format!("{kind}/{path}"),
                serde_json::json!({ "msgs_per_s": f.msgs_per_s, "ratio_to_direct_tls": f.msgs_per_s / d.msgs_per_s,
                                    "link_bytes_per_msg": f.wire_bytes, "cpu_us_per_msg": f.cpu_us }),
            );
        };
        row("direct TLS dist", &d);
        for (m, mode) in MODES.iter().enumerate() {
            row(&format!("gateways, {mode}"), &gw[m][k]);
        }
    }
    // What compressing adds to (or saves from) the gateways' CPU in all,
    // per KiB the link carried without it (TLS and writes of fewer bytes
    // offset the codec's work).
    let mut json_net = serde_json::Map::new();
    let net: Vec<String> = KINDS
        .iter()
        .enumerate()
        .map(|(k, (kind, _))| {
            let off = &gw[0][k];
            let per_kib = |m: usize| {
                let f = &gw[m][k];
                (f.cpu_us[0] + f.cpu_us[1] - off.cpu_us[0] - off.cpu_us[1]) / (off.wire_bytes / 1024.0)
            };
            let (lz4, zstd) = (per_kib(1), per_kib(2));
            json_net.insert(kind.to_string(), serde_json::json!({ "lz4": lz4, "zstd": zstd }));
            format!("{kind}: lz4 {lz4:+.2}, zstd {zstd:+.2}")
        })
        .collect();
    table.push_str(&format!(
        "\nGateway CPU that compression adds, both gateways, µs per KiB the link carried uncompressed (vs `off`, same run): {}.\n",
        net.join("; ")
    ));
    table.push_str(
        "\nCodec CPU in this process on the same payloads, whole 256 KiB batches of data frames (best of 5): ",
    );
    let mut json_codecs = serde_json::Map::new();
    let parts: Vec<String> = KINDS
        .iter()
        .zip(&costs)
        .map(|((kind, _), c)| {
            let each: Vec<String> = c
                .iter()
                .map(|(name, pack, unpack, ratio)| {
                    json_codecs.insert(
                        format!("{kind}/{name}"),
                        serde_json::json!({ "compress_us_per_kib": pack, "decompress_us_per_kib": unpack, "ratio": ratio }),
                    );
                    format!("{name} {pack:.2} + {unpack:.2} µs/KiB ({ratio:.1}x)")
                })
                .collect();
            format!("{kind}: {}", each.join(", "))
        })
        .collect();
    table.push_str(&parts.join("; "));
    table.push_str(" (compress + decompress per KiB before compression).\n\n");
    println!("\n{table}");
    let run = serde_json::json!({
        "date": date, "machine": machine, "delay_ms_each_way": DELAY.as_millis() as u64,
        "rate_mbit_s": RATE * 8 / 1_000_000, "window": WINDOW, "paths": json_paths, "codecs": json_codecs,
        "gateway_cpu_added_us_per_kib": json_net,
    });
    let file = support::append_results("wan", &table, &run);
    eprintln!("wan: appended to {}", file.display());
}
