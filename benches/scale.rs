//! The unit costs of a scale model (SCALING.md), each measured in this run
//! on this machine, with real gateways (`wandist run`) and real OTP nodes:
//!
//! 1. Local nodes: a gateway joining 10, then 100 small BEAMs (`+S 1
//!    +P 4096`, 10 members each): time from its start until the peer
//!    gateway holds every member, its RSS and idle CPU; per node, the
//!    difference over the 90 more.
//! 2. Members, both ways at once: a node of dc2 joins 100,000 members (1,000
//!    groups); dc2's gateway mirrors and exports them, dc1's imports them
//!    (a proxy each, joined in pg on a1). Time until a1's pg holds them
//!    all, RSS growth of each gateway per member, CPU of a1's pg and of
//!    each gateway per member; then the route is lost (dc2's gateway
//!    stopped) and dc1 withdraws them all: time, CPU.
//! 3. Routes: 32 clusters in a full mesh (a gateway each, 31 routes each,
//!    one link per route, no Erlang side): time until all 496 routes are
//!    up, RSS and idle CPU per gateway; per route, against a gateway with
//!    no route.
//!
//!     cargo bench --bench scale          (about three minutes)
//!
//! Appends to benches/results/scale.md and scale.jsonl. Loopback only;
//! every process it starts is stopped by its handle.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::erl::{epmd, Epmd, Erl};
use support::{accepting, cpu_secs, proc_kib, wait_for, Certs, Gateway};

const MEMBERS_PER_NODE: u32 = 10;
const NODES: [usize; 2] = [10, 100];
const MEMBERS: u32 = 100_000;
const GROUPS: u32 = 1_000;
const MESH: usize = 32;
/// Idle CPU is read over this long.
const IDLE: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(300);

fn rss_kib(pid: u32) -> f64 {
    proc_kib(pid, "VmRSS:")
}

/// RSS once the allocator has settled (two equal readings 200 ms apart, at
/// most 10 s).
fn settled_rss(pid: u32) -> f64 {
    let mut last = -1.0;
    for _ in 0..50 {
        let now = rss_kib(pid);
        if now == last {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(200));
    }
    last
}

/// CPU seconds of `pids` over IDLE, in ms per second.
fn idle_cpu(pids: &[u32]) -> Vec<f64> {
    let before: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    std::thread::sleep(IDLE);
    pids.iter().zip(before).map(|(&p, b)| (cpu_secs(p) - b) * 1000.0 / IDLE.as_secs_f64()).collect()
}

fn erl_args(beam: &std::path::Path, small: bool) -> Vec<String> {
    let mut a = vec!["-pa".to_string(), beam.display().to_string()];
    if small {
        a.extend(["+S", "1", "+P", "4096", "+A", "1"].map(String::from));
    } else {
        a.extend(["+P", "1048576"].map(String::from));
    }
    a
}

/// Starts `n` nodes named `{prefix}{i}`, `threads` at a time.
fn start_nodes(
    epmd: &Epmd,
    beam: &std::path::Path,
    prefix: &str,
    range: std::ops::Range<usize>,
    cookie: &str,
) -> Vec<Erl> {
    let args = erl_args(beam, true);
    let mut out = Vec::new();
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(8) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|i| {
                    let args = &args;
                    s.spawn(move || {
                        let a: Vec<&str> = args.iter().map(String::as_str).collect();
                        let mut n = Erl::start_with(&format!("{prefix}{i}"), cookie, epmd, &a);
                        let expr = format!(
                            "{{ok, _}} = pg:start(wan), pg:join(wan, g_{i}, [spawn(fun() -> receive stop -> ok end end) || _ <- lists:seq(1, {MEMBERS_PER_NODE})])."
                        );
                        assert_eq!(n.eval(&expr), "ok");
                        n
                    })
                })
                .collect();
            out.extend(handles.into_iter().map(|h| h.join().unwrap()));
        });
    }
    out
}

#[derive(Debug, Default)]
struct NodesFig {
    converge_ms: f64,
    rss_kib: f64,
    idle_ms_per_s: f64,
}

/// A dc1 gateway joining `nodes`; dc2's gateway (`gw2`) counts what it imports.
fn gateway_over_nodes(certs: &Certs, epmd: &Epmd, gw2: &Gateway, nodes: &[Erl], tag: &str) -> NodesFig {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.name)).collect();
    let body = format!(
        "[gateway]\ncluster = \"dc1\"\nname = \"gw-dc1-{tag}\"\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n\
         [erlang]\nnode = \"wgw1_{tag}@127.0.0.1\"\ncookie = \"scale\"\nnodes = [{}]\n",
        certs.tls_table("dc1"),
        gw2.peer_addr(),
        list.join(", ")
    );
    let want = (nodes.len() as u32 * MEMBERS_PER_NODE) as f64;
    let t0 = Instant::now();
    let gw1 = Gateway::start_with_env("gw-dc1", &body, &[("ERL_EPMD_PORT", epmd.port.to_string())]);
    wait_for("dc2 to import every member", LONG, || {
        gw2.metric("wandist_members", &[("peer", "dc1"), ("direction", "imported")]).filter(|v| *v == want)
    });
    let converge_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let rss_kib = settled_rss(gw1.pid());
    let idle_ms_per_s = idle_cpu(&[gw1.pid()])[0];
    NodesFig { converge_ms, rss_kib, idle_ms_per_s }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale: run with `cargo bench --bench scale`");
        return;
    }
    let epmd = epmd();
    let dir = tempfile::tempdir().unwrap();
    let beam = dir.path().join("beam");
    std::fs::create_dir_all(&beam).unwrap();
    let src: PathBuf = [env!("CARGO_MANIFEST_DIR"), "benches", "erl", "wandist_bench.erl"].iter().collect();
    assert!(Command::new("erlc").arg("-o").arg(&beam).arg(&src).status().unwrap().success(), "erlc failed");
    let t = std::process::id().to_string();
    // WANDIST_SCALE_PARTS=1,3 runs only those parts (all by default).
    let parts = std::env::var("WANDIST_SCALE_PARTS").unwrap_or_else(|_| "1,2,3".into());
    let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let mut out = Report::default();
    let certs = Certs::new(&["dc1", "dc2"]);
    let setup = Setup { epmd: &epmd, beam: &beam, certs: &certs, t: &t };
    if part("1") {
        local_nodes(&setup, &mut out);
    }
    if part("2") {
        members(&setup, &mut out);
    }
    if part("3") {
        mesh(&mut out);
    }
    let Report { text: report, mut json } = out;
    let date = support::utc_now();
    let text =
        format!("### {date} — {}, loopback\n\n`cargo bench --bench scale`\n\n{}\n", support::cpus(), report.join("\n"));
    println!("\n{text}");
    json.insert("date".into(), serde_json::json!(date));
    let file = support::append_results("scale", &text, &serde_json::Value::Object(json));
    eprintln!("scale: appended to {}", file.display());
}

/// What every part uses: the EPMD, the bench module, dc1's and dc2's
/// certificates, the run's tag for node names.
struct Setup<'a> {
    epmd: &'a Epmd,
    beam: &'a std::path::Path,
    certs: &'a Certs,
    t: &'a str,
}

/// A run's report: Markdown paragraphs and the JSON object.
#[derive(Default)]
struct Report {
    text: Vec<String>,
    json: serde_json::Map<String, serde_json::Value>,
}

/// 1. Local nodes.
fn local_nodes(setup: &Setup, out: &mut Report) {
    let Setup { epmd, beam, certs, t } = *setup;
    let (report, json) = (&mut out.text, &mut out.json);
    let gw2 = Gateway::start("gw-dc2", &accepting("dc2", certs, "dc1"));
    eprintln!("scale: starting {} small BEAMs…", NODES[1]);
    let t_nodes = Instant::now();
    let nodes = start_nodes(epmd, beam, &format!("s{t}_"), 0..NODES[1], "scale");
    let started_s = t_nodes.elapsed().as_secs_f64();
    let node_rss: f64 = nodes.iter().map(|n| rss_kib(n.pid())).sum::<f64>() / nodes.len() as f64;
    let mut figs = Vec::new();
    for (k, &n) in NODES.iter().enumerate() {
        eprintln!("scale: a gateway joining {n} nodes…");
        figs.push(gateway_over_nodes(certs, epmd, &gw2, &nodes[..n], &format!("{k}_{t}")));
    }
    let extra = (NODES[1] - NODES[0]) as f64;
    let per_node_kib = (figs[1].rss_kib - figs[0].rss_kib) / extra;
    let per_node_idle = (figs[1].idle_ms_per_s - figs[0].idle_ms_per_s) / extra;
    report.push(format!(
        "1. Local nodes ({} small BEAMs, `+S 1 +P 4096`, {MEMBERS_PER_NODE} members each; started in {started_s:.0} s, {:.0} MiB RSS each):\n\n\
         | nodes | gateway start to the peer holding every member | gateway RSS | gateway idle CPU |\n|---|---|---|---|\n\
         | {} | {:.0} ms | {:.1} MiB | {:.2} ms/s |\n| {} | {:.0} ms | {:.1} MiB | {:.2} ms/s |\n\n\
         Per local node: {per_node_kib:.1} KiB of gateway RSS, {per_node_idle:.3} ms/s of idle gateway CPU, {:.1} ms more to converge.\n",
        NODES[1],
        node_rss / 1024.0,
        NODES[0],
        figs[0].converge_ms,
        figs[0].rss_kib / 1024.0,
        figs[0].idle_ms_per_s,
        NODES[1],
        figs[1].converge_ms,
        figs[1].rss_kib / 1024.0,
        figs[1].idle_ms_per_s,
        (figs[1].converge_ms - figs[0].converge_ms) / extra,
    ));
    json.insert(
        "local_nodes".into(),
        serde_json::json!({
            "nodes": NODES, "converge_ms": [figs[0].converge_ms, figs[1].converge_ms],
            "gateway_rss_kib": [figs[0].rss_kib, figs[1].rss_kib],
            "gateway_idle_ms_per_s": [figs[0].idle_ms_per_s, figs[1].idle_ms_per_s],
            "per_node_rss_kib": per_node_kib, "per_node_idle_ms_per_s": per_node_idle, "node_rss_kib": node_rss,
        }),
    );
    drop(nodes);
    drop(gw2);
}

/// 2. Members, both ways at once.
fn members(setup: &Setup, out: &mut Report) {
    let Setup { epmd, beam, certs, t } = *setup;
    let (report, json) = (&mut out.text, &mut out.json);
    eprintln!("scale: {MEMBERS} members mirrored by dc2, imported by dc1…");
    let args = erl_args(beam, false);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a1 = Erl::start_with(&format!("a1_{t}"), "cookie_a", epmd, &a);
    let mut b1 = Erl::start_with(&format!("b1_{t}"), "cookie_b", epmd, &a);
    for n in [&mut a1, &mut b1] {
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    let erlang = |node: &str, cookie: &str, of: &Erl| {
        format!("[erlang]\nnode = \"{node}_{t}@127.0.0.1\"\ncookie = \"{cookie}\"\nnodes = [\"{}\"]\n", of.name)
    };
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let mut gw2 = Gateway::start_with_env(
        "gw-dc2",
        &format!("{}{}", accepting("dc2", certs, "dc1"), erlang("m2", "cookie_b", &b1)),
        &env,
    );
    let gw1 = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "[gateway]\ncluster = \"dc1\"\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n{}",
            certs.tls_table("dc1"),
            gw2.peer_addr(),
            erlang("m1", "cookie_a", &a1)
        ),
        &env,
    );
    gw1.wait_log("route up", LONG);
    let (rss1, rss2) = (settled_rss(gw1.pid()), settled_rss(gw2.pid()));
    let pids = [a1.pid(), b1.pid(), gw1.pid(), gw2.pid()];
    let cpu = || pids.map(cpu_secs);
    let c0 = cpu();
    let t0 = Instant::now();
    let per_group = MEMBERS / GROUPS;
    assert_eq!(
        b1.eval_within(
            &format!(
                "lists:foreach(fun(G) -> pg:join(wan, {{g, G}}, [spawn(fun() -> receive stop -> ok end end) || _ <- lists:seq(1, {per_group})]) end, lists:seq(1, {GROUPS}))."
            ),
            LONG
        ),
        "ok"
    );
    let count = format!("lists:sum([length(pg:get_members(wan, {{g, G}})) || G <- lists:seq(1, {GROUPS})]).");
    wait_for("a1's pg to hold every member", LONG, || {
        (a1.eval_within(&count, LONG) == MEMBERS.to_string()).then_some(())
    });
    let join_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let c1 = cpu();
    let (rss1b, rss2b) = (settled_rss(gw1.pid()), settled_rss(gw2.pid()));
    // The route lost: dc1 withdraws them all.
    let c2 = cpu();
    let t1 = Instant::now();
    gw2.kill();
    wait_for("a1's pg to hold none", LONG, || (a1.eval_within(&count, LONG) == "0").then_some(()));
    let leave_ms = t1.elapsed().as_secs_f64() * 1000.0;
    let c3 = cpu();
    let us = |a: f64, b: f64| (b - a) * 1e6 / f64::from(MEMBERS);
    let n = f64::from(MEMBERS);
    report.push(format!(
        "2. {MEMBERS} members ({GROUPS} groups) joined on b1 (dc2), mirrored and exported by gw2, imported by gw1 and joined in pg on a1 (dc1):\n\n\
         | | time | a1 CPU / member | b1 CPU / member | gw1 CPU / member | gw2 CPU / member | gw1 RSS / member | gw2 RSS / member |\n|---|---|---|---|---|---|---|---|\n\
         | join (b1's own joins included) | {join_ms:.0} ms | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} B | {:.0} B |\n\
         | route lost: withdrawn from a1 | {leave_ms:.0} ms | {:.1} µs | - | {:.1} µs | - | - | - |\n",
        us(c0[0], c1[0]),
        us(c0[1], c1[1]),
        us(c0[2], c1[2]),
        us(c0[3], c1[3]),
        (rss1b - rss1) * 1024.0 / n,
        (rss2b - rss2) * 1024.0 / n,
        us(c2[0], c3[0]),
        us(c2[2], c3[2]),
    ));
    json.insert(
        "members".into(),
        serde_json::json!({
            "members": MEMBERS, "groups": GROUPS, "join_ms": join_ms, "leave_ms": leave_ms,
            "join_cpu_us_per_member": { "a1": us(c0[0], c1[0]), "b1": us(c0[1], c1[1]), "gw1_import": us(c0[2], c1[2]), "gw2_export": us(c0[3], c1[3]) },
            "leave_cpu_us_per_member": { "a1": us(c2[0], c3[0]), "gw1": us(c2[2], c3[2]) },
            "rss_bytes_per_member": { "gw1_import": (rss1b - rss1) * 1024.0 / n, "gw2_export": (rss2b - rss2) * 1024.0 / n },
        }),
    );
    drop(gw1);
    drop(gw2);
    drop(a1);
    drop(b1);
}

/// 3. A full mesh of routes.
fn mesh(out: &mut Report) {
    let (report, json) = (&mut out.text, &mut out.json);
    // 3. A full mesh of routes.
    eprintln!("scale: {MESH} clusters in a full mesh…");
    let names: Vec<String> = (0..MESH).map(|i| format!("c{i:02}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mesh_certs = Certs::new(&name_refs);
    // One gateway with no route: the base every gateway pays.
    let lone = Gateway::start("lone", &format!("[gateway]\ncluster = \"c00\"\n{}", mesh_certs.tls_table("c00")));
    let base_rss = settled_rss(lone.pid());
    let base_idle = idle_cpu(&[lone.pid()])[0];
    drop(lone);
    // Started from the last: each dials the ones after it (already
    // listening) and accepts the ones before it.
    let t0 = Instant::now();
    let mut gws: Vec<Gateway> = Vec::new();
    for i in (0..MESH).rev() {
        let routes: String = (0..MESH)
            .filter(|&j| j != i)
            .map(|j| {
                let dial = if j > i {
                    format!("endpoints = [\"{}\"]\n", gws[MESH - 1 - j].peer_addr())
                } else {
                    String::new()
                };
                format!("[[route]]\ncluster = \"{}\"\n{dial}", names[j])
            })
            .collect();
        let body = format!(
            "[gateway]\ncluster = \"{}\"\nlisten = \"127.0.0.1:0\"\n{}{routes}",
            names[i],
            mesh_certs.tls_table(&names[i])
        );
        gws.push(Gateway::start(&names[i], &body));
    }
    for g in &gws {
        wait_for(&format!("{}: every route up", g.name), LONG, || {
            (support::metric_sum(&g.metrics(), "wandist_route_up", &[]) == (MESH - 1) as f64).then_some(())
        });
    }
    let mesh_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let pids: Vec<u32> = gws.iter().map(Gateway::pid).collect();
    let rss: Vec<f64> = pids.iter().map(|&p| settled_rss(p)).collect();
    let idle = idle_cpu(&pids);
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (rss_avg, idle_avg) = (avg(&rss), avg(&idle));
    let routes = (MESH - 1) as f64;
    report.push(format!(
        "3. {MESH} clusters in a full mesh ({} routes, one link each, default heartbeat), all started at once: every route up after {mesh_ms:.0} ms. \
         Per gateway: RSS {:.1} MiB (max {:.1}), idle CPU {idle_avg:.2} ms/s (max {:.2}); a gateway with no route: {:.1} MiB, {base_idle:.2} ms/s. \
         Per route: {:.1} KiB of RSS, {:.3} ms/s of idle CPU.\n",
        MESH * (MESH - 1) / 2,
        rss_avg / 1024.0,
        rss.iter().cloned().fold(0.0, f64::max) / 1024.0,
        idle.iter().cloned().fold(0.0, f64::max),
        base_rss / 1024.0,
        (rss_avg - base_rss) / routes,
        (idle_avg - base_idle) / routes,
    ));
    json.insert(
        "mesh".into(),
        serde_json::json!({
            "clusters": MESH, "all_routes_up_ms": mesh_ms, "rss_kib_avg": rss_avg, "idle_ms_per_s_avg": idle_avg,
            "base_rss_kib": base_rss, "base_idle_ms_per_s": base_idle,
            "per_route_rss_kib": (rss_avg - base_rss) / routes, "per_route_idle_ms_per_s": (idle_avg - base_idle) / routes,
        }),
    );
    drop(gws);
}
