//! Load spread over a cluster's gateway instances (`[erlang] coordinate`):
//! dc1 has routes to dc2 and dc3 (one gateway each). A sender node a1
//! streams 100 B messages to a receiver in each peer cluster at once (a
//! bounded credit window each), first with one dc1 instance holding both
//! routes, then with a second instance started, which takes one route
//! over. One run, the same processes: messages/s for both streams
//! together, each instance's share of the messages and its CPU per
//! message, and the ratio of the two set-ups.
//!
//!     cargo bench --bench instances          (about a minute)
//!
//! Loopback only; every process it starts is stopped by its handle.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::erl::{epmd, erlang_table, Erl};
use support::{accepting, cpu_secs, wait_for, Certs, Gateway, FAST, SOON};

const N: u64 = 100_000;
const RUNS: usize = 3;

/// Both streams at once from a1; the slower one's time, in seconds. (Each
/// receiver counts from 0 again first: it acks by its running count.)
fn both_streams(a1: &mut Erl) -> f64 {
    let out = a1.eval_within(
        &format!(
            "(fun() -> Me = self(), Small = binary:copy(<<\"x\">>, 100), \
               [Ra] = pg:get_members(wan, rcv2), [Rb] = pg:get_members(wan, rcv3), \
               [spawn(fun() -> R ! reset, Me ! {{done, wandist_bench:stream(R, {N}, Small, 4000)}} end) || R <- [Ra, Rb]], \
               lists:max([receive {{done, T}} -> T end || _ <- [1, 2]]) end)()."
        ),
        Duration::from_secs(600),
    );
    out.trim().parse::<f64>().unwrap_or_else(|_| panic!("not a time: {out}")) / 1e6
}

/// Messages dc1's instance `g` delivered to dc2 and dc3 so far.
fn delivered(g: &Gateway) -> f64 {
    ["dc2", "dc3"].iter().map(|p| g.metric("wandist_messages_delivered_total", &[("peer", p)]).unwrap_or(0.0)).sum()
}

struct Run {
    per_s: f64,
    /// Per dc1 instance: (share of the messages, CPU µs per message it carried).
    instances: Vec<(f64, f64)>,
}

fn measure(a1: &mut Erl, dc1: &[Gateway]) -> Run {
    let before: Vec<(f64, f64)> = dc1.iter().map(|g| (delivered(g), cpu_secs(g.pid()))).collect();
    let secs = both_streams(a1);
    let after: Vec<(f64, f64)> = dc1.iter().map(|g| (delivered(g), cpu_secs(g.pid()))).collect();
    let total: f64 = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
    let instances = after
        .iter()
        .zip(&before)
        .map(|(a, b)| {
            let n = a.0 - b.0;
            (n / total.max(1.0), if n > 0.0 { (a.1 - b.1) * 1e6 / n } else { 0.0 })
        })
        .collect();
    Run { per_s: 2.0 * N as f64 / secs, instances }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("instances: run with `cargo bench --bench instances`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let beam = dir.path().join("beam");
    std::fs::create_dir_all(&beam).unwrap();
    let src: PathBuf = [env!("CARGO_MANIFEST_DIR"), "benches", "erl", "wandist_bench.erl"].iter().collect();
    assert!(Command::new("erlc").arg("-o").arg(&beam).arg(&src).status().expect("erlc").success());
    let pa = ["-pa", beam.to_str().unwrap()];
    let t = std::process::id().to_string();
    let epmd = epmd();
    let node = |name: &str, cookie: &str| {
        let mut n = Erl::start_with(&format!("{name}_{t}"), cookie, &epmd, &pa);
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
        n
    };
    let mut a1 = node("a1", "cookie_a");
    let mut b1 = node("b1", "cookie_b");
    let mut c1 = node("c1", "cookie_c");
    for (n, group) in [(&mut b1, "rcv2"), (&mut c1, "rcv3")] {
        assert_eq!(n.eval(&format!("R = wandist_bench:receiver(), pg:join(wan, {group}, R).")), "ok");
    }
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let peer = |cluster: &str, cookie: &str, n: &Erl| {
        let erlang = erlang_table(&format!("w{cluster}_{t}@127.0.0.1"), cookie, &[n]);
        Gateway::start_with_env(cluster, &format!("{}{erlang}", accepting(cluster, &certs, "dc1")), &env)
    };
    let (dc2, dc3) = (peer("dc2", "cookie_b", &b1), peer("dc3", "cookie_c", &c1));
    let a1_name = a1.name.clone();
    let config = |name: &str| {
        let me = format!("w{}_{t}@127.0.0.1", name.replace('-', "_"));
        let erlang = format!("[erlang]\nnode = \"{me}\"\ncookie = \"cookie_a\"\nnodes = [\"{a1_name}\"]\n");
        format!(
            "[gateway]\ncluster = \"dc1\"\nname = \"{name}\"\n{FAST}\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n\
             [[route]]\ncluster = \"dc3\"\nendpoints = [\"{}\"]\n{erlang}coordinate = true\n",
            certs.tls_table("dc1"),
            dc2.peer_addr(),
            dc3.peer_addr()
        )
    };
    let start = |name: &str| Gateway::start_with_env(name, &config(name), &env);
    let up = |g: &Gateway, p: &str| g.metric("wandist_route_up", &[("peer", p)]) == Some(1.0);
    let mut dc1 = vec![start("x-1")];
    wait_for("x-1 holding both routes", SOON, || (up(&dc1[0], "dc2") && up(&dc1[0], "dc3")).then_some(()));
    a1.eval_until("{length(pg:get_members(wan, rcv2)), length(pg:get_members(wan, rcv3))}.", |v| v == "{1,1}");
    // Warm-up, then one instance holding both routes.
    measure(&mut a1, &dc1);
    let one: Vec<Run> = (0..RUNS).map(|_| measure(&mut a1, &dc1)).collect();

    // A second instance: it takes dc3 over (the routes go round the
    // instances by age).
    dc1.push(start("x-2"));
    wait_for("x-2 holding dc3", SOON, || (up(&dc1[1], "dc3") && !up(&dc1[0], "dc3")).then_some(()));
    // dc3's receiver has a new proxy, on x-2 (each run looks them up).
    a1.eval_until("[node(P) || P <- pg:get_members(wan, rcv3)].", |v| v.contains("wx_2_"));
    measure(&mut a1, &dc1);
    let two: Vec<Run> = (0..RUNS).map(|_| measure(&mut a1, &dc1)).collect();

    let median = |runs: &[Run]| {
        let mut v: Vec<f64> = runs.iter().map(|r| r.per_s).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m1, m2) = (median(&one), median(&two));
    let date = String::from_utf8(Command::new("date").arg("+%Y-%m-%d %H:%M").output().unwrap().stdout).unwrap();
    let fmt_runs = |runs: &[Run]| {
        runs.iter()
            .map(|r| {
                let shares: Vec<String> = r
                    .instances
                    .iter()
                    .enumerate()
                    .map(|(i, (s, cpu))| format!("x-{} {:.0} % at {cpu:.2} µs CPU/msg", i + 1, s * 100.0))
                    .collect();
                format!("{:.0} msgs/s ({})", r.per_s, shares.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let report = format!(
        "\n### Instances run {} (`cargo bench --bench instances`)\n\n\
         Two 100 B streams from a1 at once, to dc2 and dc3, {N} messages each, {RUNS} runs per set-up.\n\n\
         | set-up | messages/s (median) | runs |\n|---|---|---|\n\
         | one dc1 instance, both routes | {m1:.0} | {} |\n\
         | two dc1 instances, a route each | {m2:.0} | {} |\n\n\
         Two instances / one: {:.2}x.\n",
        date.trim(),
        fmt_runs(&one),
        fmt_runs(&two),
        m2 / m1
    );
    println!("{report}");
    let results: PathBuf = [env!("CARGO_MANIFEST_DIR"), "benches", "results", "instances.md"].iter().collect();
    std::fs::create_dir_all(results.parent().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&results).unwrap_or_else(|_| "# `cargo bench --bench instances`\n".into());
    text.push_str(&report);
    std::fs::write(&results, text).unwrap();
    println!("appended to {}", results.display());
}
