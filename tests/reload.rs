//! Reload without restart: SIGHUP (or `wandist reload`) re-reads the
//! configuration and the TLS files. New handshakes use the new material,
//! links already up stay up, a bad file is refused with the running
//! configuration kept, what only a restart applies is named, and SIGHUP
//! never stops the process.

mod support;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use support::forward::Forwarder;
use support::inproc::{delivered_in_order, next, InProc};
use support::*;
use wandist::gateway::Reloaded;
use wandist::local::ToLocal;
use wandist::route::Outcome;

/// A `[tls]` table naming these files.
fn tls_table(cert: &Path, key: &Path, ca: &Path) -> String {
    format!("[tls]\ncert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n")
}

fn concat(out: &Path, files: &[std::path::PathBuf]) {
    let all: Vec<u8> = files.iter().flat_map(|f| std::fs::read(f).unwrap()).collect();
    std::fs::write(out, all).unwrap();
}

/// Installs `cluster`'s certificate and key from `from` as dir/own.pem and
/// dir/own.key (the key stays owner-only: `fs::copy` keeps its mode).
fn install(from: &Certs, cluster: &str, dir: &Path) {
    std::fs::copy(from.path(&format!("{cluster}.pem")), dir.join("own.pem")).unwrap();
    std::fs::copy(from.path(&format!("{cluster}.key")), dir.join("own.key")).unwrap();
}

/// The tokens of `gw`'s confirmations as they come: (delivered, failed).
fn collect_outcomes(gw: &mut InProc) -> std::sync::Arc<std::sync::Mutex<(Vec<u64>, Vec<u64>)>> {
    let outcomes: std::sync::Arc<std::sync::Mutex<(Vec<u64>, Vec<u64>)>> = Default::default();
    let mut rx = std::mem::replace(&mut gw.rx, tokio::sync::mpsc::channel(1).1);
    let sink = outcomes.clone();
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            if let ToLocal::Confirm { token, outcome, .. } = item {
                let mut o = sink.lock().unwrap();
                if outcome == Outcome::Delivered {
                    o.0.push(token.0)
                } else {
                    o.1.push(token.0)
                }
            }
        }
    });
    outcomes
}

fn applied(r: Reloaded) -> Vec<String> {
    match r {
        Reloaded::Applied(plan) => plan.restart,
        Reloaded::Refused(p) => panic!("reload refused: {p:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_to_a_new_ca_by_reload_is_used_by_new_links_and_no_message_fails() {
    const TOTAL: u64 = 100_000;
    let old = Certs::new(&["dc1", "dc2"]);
    let new = Certs::new(&["dc1", "dc2"]);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (d, cluster) in [(&d1, "dc1"), (&d2, "dc2")] {
        install(&old, cluster, d.path());
        concat(&d.path().join("trust.pem"), &[old.path("ca.pem")]);
    }
    let table = |d: &tempfile::TempDir| {
        tls_table(&d.path().join("own.pem"), &d.path().join("own.key"), &d.path().join("trust.pem"))
    };
    let mut dc2 = InProc::start(
        "dc2",
        &format!("{}{}[[route]]\ncluster = \"dc1\"\n", gateway_table("dc2", true), table(&d2)),
        4096,
    )
    .await;
    let path = Forwarder::start(Some(dc2.peer_addr()));
    let mut dc1 = InProc::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n",
            gateway_table("dc1", false),
            table(&d1),
            path.addr
        ),
        4096,
    )
    .await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;
    let connects = |g: &InProc| g.metric("wandist_link_connects_total", &[("peer", "dc2")]).unwrap_or(0.0);
    let first = connects(&dc1);

    // Confirmed messages dc1 -> dc2 throughout; dc2 takes them in order.
    let route = dc1.running().local().route("dc2").unwrap().clone();
    let producer = tokio::spawn(async move {
        for i in 0..TOTAL {
            route.submit(Bytes::copy_from_slice(&i.to_be_bytes()), Some(wandist::route::Token(i))).await.unwrap();
        }
    });
    let mut rx2 = std::mem::replace(&mut dc2.rx, tokio::sync::mpsc::channel(1).1);
    let consumer = tokio::spawn(async move {
        let mut expect = 0;
        while expect < TOTAL {
            match next(&mut rx2, &format!("message {expect}")).await {
                ToLocal::Deliver { payload, .. } => {
                    assert_eq!(u64::from_be_bytes(payload[..].try_into().unwrap()), expect, "out of order or twice");
                    expect += 1;
                }
                // The route goes down while a link is refused (below).
                ToLocal::Lost { .. } | ToLocal::Members { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        rx2
    });
    dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v >= (TOTAL / 10) as f64).await;

    // 1. Both trust the old and the new CA. 2. dc1 takes its new
    // certificate. 3. dc2 trusts only the new CA. Each reload applies with
    // nothing left for a restart, and the link up meanwhile stays up.
    for d in [&d1, &d2] {
        concat(&d.path().join("trust.pem"), &[old.path("ca.pem"), new.path("ca.pem")]);
    }
    assert_eq!(applied(dc1.reload()), Vec::<String>::new());
    assert_eq!(applied(dc2.reload()), Vec::<String>::new());
    install(&new, "dc1", d1.path());
    assert_eq!(applied(dc1.reload()), Vec::<String>::new());
    concat(&d2.path().join("trust.pem"), &[new.path("ca.pem")]);
    assert_eq!(applied(dc2.reload()), Vec::<String>::new());
    assert_eq!(connects(&dc1), first, "a reload touched the link that was up");
    assert_eq!(dc1.metric("wandist_config_reloads_total", &[("result", "applied")]), Some(2.0));

    // A new link: only dc1's new certificate can make it.
    let at_cut = dc1.metric("wandist_messages_delivered_total", &[("peer", "dc2")]).unwrap_or(0.0);
    path.cut();
    dc1.wait_metric("wandist_link_connects_total", &[("peer", "dc2")], |v| v > first).await;
    let refused_before = dc2.metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "tls")]);

    // The control: dc1 back on its old certificate (files and reload) is
    // refused by dc2 now, so the link above was made with the new one.
    install(&old, "dc1", d1.path());
    assert_eq!(applied(dc1.reload()), Vec::<String>::new());
    let up = connects(&dc1);
    path.cut();
    dc2.wait_metric("wandist_handshake_failures_total", &[("peer", "unknown"), ("reason", "tls")], |v| {
        v > refused_before.unwrap_or(0.0)
    })
    .await;
    assert_eq!(connects(&dc1), up, "a link was made with the old certificate after dc2 stopped trusting its CA");
    install(&new, "dc1", d1.path());
    assert_eq!(applied(dc1.reload()), Vec::<String>::new());
    dc1.wait_metric("wandist_link_connects_total", &[("peer", "dc2")], |v| v > up).await;

    // Every message delivered once, in order, and confirmed delivered.
    producer.await.unwrap();
    delivered_in_order(&mut dc1.rx, TOTAL, "confirmations").await;
    consumer.await.unwrap();
    let text = dc1.running().metrics.render();
    assert_eq!(metric_sum(&text, "wandist_messages_failed_total", &[("peer", "dc2")]), 0.0, "failures:\n{text}");
    assert!(at_cut < TOTAL as f64, "the stream was over before the rotation's first new link");
    println!(
        "{TOTAL} confirmed messages through a rotation to a new CA (reloads on both sides, 3 new links, the first \
         after {at_cut} were confirmed): all delivered once, in order, none failed"
    );
    dc1.stop().await;
    dc2.stop().await;
}

#[test]
fn sighup_reloads_refuses_a_bad_file_names_what_needs_a_restart_and_never_kills() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let dc2 = Gateway::start("gw-dc2", &accepting("dc2", &certs, "dc1"));
    let body = dialing("dc1", &certs, "dc2", dc2.peer_addr());
    let mut dc1 = Gateway::start("gw-dc1", &body);
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    let connects = dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]);
    let reloads = |result| dc1.metric("wandist_config_reloads_total", &[("result", result)]).unwrap_or(0.0);

    // The same file: applied, nothing needs a restart, the link untouched.
    dc1.signal("HUP");
    dc1.wait_metric("wandist_config_reloads_total", &[("result", "applied")], |v| v == 1.0);
    assert_eq!(dc1.metric("wandist_config_restart_needed", &[]), Some(0.0));

    // A broken file: refused, said why, the running configuration kept.
    std::fs::write(dc1.config_path(), "[gateway]\ncluster = 7\n").unwrap();
    dc1.signal("HUP");
    dc1.wait_metric("wandist_config_reloads_total", &[("result", "error")], |v| v == 1.0);
    dc1.wait_log("reload refused; the running configuration is kept", SOON);

    // A change only a restart applies: named, and the gauge says so.
    dc1.rewrite(&body.replace("heartbeat_ms = 100", "heartbeat_ms = 150"));
    dc1.signal("HUP");
    dc1.wait_metric("wandist_config_reloads_total", &[("result", "applied")], |v| v == 2.0);
    assert!(dc1.wait_log("need a restart", SOON).contains("gateway.heartbeat_ms"));
    assert_eq!(dc1.metric("wandist_config_restart_needed", &[]), Some(1.0));

    // `wandist reload` checks the file first and signals only this process.
    std::fs::write(dc1.config_path(), "[gateway]\n").unwrap();
    let out = Command::new(BIN).args(["reload", "--config"]).arg(dc1.config_path()).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not reloaded"));
    dc1.rewrite(&body);
    let out = Command::new(BIN).args(["reload", "--config"]).arg(dc1.config_path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("sent SIGHUP to {}", dc1.pid()));
    dc1.wait_metric("wandist_config_reloads_total", &[("result", "applied")], |v| v == 3.0);
    assert_eq!(dc1.metric("wandist_config_restart_needed", &[]), Some(0.0));
    assert_eq!(reloads("error"), 1.0);

    // Through all of it: one link, never dropped; the process alive.
    assert_eq!(dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]), connects);
    assert_eq!(dc1.metric("wandist_route_up", &[("peer", "dc2")]), Some(1.0));
    assert!(dc1.wait_exit(std::time::Duration::ZERO).is_none(), "SIGHUP stopped the gateway");
    dc1.signal("TERM");
    let st = dc1.wait_exit(SOON).expect("did not stop on SIGTERM");
    assert!(st.success());
}

#[test]
fn sighup_adds_and_removes_routes_touching_only_their_own_links() {
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let dc2 = Gateway::start("gw-dc2", &accepting("dc2", &certs, "dc1"));
    let dc3 = Gateway::start("gw-dc3", &accepting("dc3", &certs, "dc1"));
    let route =
        |peer: &str, gw: &Gateway| format!("[[route]]\ncluster = \"{peer}\"\nendpoints = [\"{}\"]\n", gw.peer_addr());
    let head = format!("{}{}", gateway_table("dc1", false), certs.tls_table("dc1"));
    let dc1 = Gateway::start("gw-dc1", &format!("{head}{}", route("dc2", &dc2)));
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    let dc2_links = || dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]);
    let before = dc2_links();

    // dc3 added: its route comes up; dc2's link is untouched.
    dc1.rewrite(&format!("{head}{}{}", route("dc2", &dc2), route("dc3", &dc3)));
    dc1.signal("HUP");
    dc1.wait_metric("wandist_route_up", &[("peer", "dc3")], |v| v == 1.0);
    dc3.wait_metric("wandist_route_up", &[("peer", "dc1")], |v| v == 1.0);
    assert_eq!(dc1.metric("wandist_config_restart_needed", &[]), Some(0.0));
    assert_eq!(dc2_links(), before, "adding dc3 touched dc2's link");

    // dc2 removed: its link goes (the peer is told), dc3's stays.
    let dc3_links = dc1.metric("wandist_link_connects_total", &[("peer", "dc3")]);
    dc1.rewrite(&format!("{head}{}", route("dc3", &dc3)));
    dc1.signal("HUP");
    dc2.wait_metric("wandist_route_up", &[("peer", "dc1")], |v| v == 0.0);
    dc1.wait_log("route stopped (reload)", SOON);
    assert_eq!(dc1.metric("wandist_route_up", &[("peer", "dc3")]), Some(1.0));
    assert_eq!(
        dc1.metric("wandist_link_connects_total", &[("peer", "dc3")]),
        dc3_links,
        "removing dc2 touched dc3's link"
    );
    // dc2 is a stranger now: its dialing back in is refused (no route).
    assert_eq!(dc1.metric("wandist_config_reloads_total", &[("result", "applied")]), Some(2.0));
}

#[test]
fn sighup_applies_erlang_nodes_added_and_removed() {
    use support::erl::{dc2_gateway, epmd, erlang_table, pg_node, tag, Erl, JOIN_PINGER};
    let t = tag();
    let epmd = epmd();
    let a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut a2 = pg_node("a2", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    assert_eq!(a2.eval(JOIN_PINGER), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let dc2 = dc2_gateway(&certs, &t, &b1, &epmd);
    let dc1_with = |nodes: &[&Erl]| {
        format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n{}",
            gateway_table("dc1", false),
            certs.tls_table("dc1"),
            dc2.peer_addr(),
            erlang_table(&format!("wgw1_{t}@127.0.0.1"), "cookie_a", nodes)
        )
    };
    let dc1 = Gateway::start_with_env("gw-dc1", &dc1_with(&[&a1]), &env);
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    dc1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    assert_eq!(b1.eval("length(pg:get_members(wan, svc))."), "0", "a2 is not mirrored yet");

    // a2 added: connected, and its member reaches dc2; the route untouched.
    let links = dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]);
    dc1.rewrite(&dc1_with(&[&a1, &a2]));
    dc1.signal("HUP");
    dc1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 2.0);
    b1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    assert_eq!(
        b1.eval("hd(pg:get_members(wan, svc)) ! {ping, self()}, receive {pong, N} -> N after 5000 -> timeout end."),
        format!("'{}'", a2.name)
    );

    // a2 removed: disconnected, its member withdrawn.
    dc1.rewrite(&dc1_with(&[&a1]));
    dc1.signal("HUP");
    dc1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    b1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "0");
    a2.eval_until(&format!("lists:member('wgw1_{t}@127.0.0.1', nodes(hidden))."), |v| v == "false");
    assert_eq!(dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]), links);
    assert_eq!(dc1.metric("wandist_config_restart_needed", &[]), Some(0.0));
}

/// A route changed by a reload is a new session with its peer: nothing the
/// old one sent is confirmed by the new one's numbering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_changed_by_reload_starts_a_new_session_and_confirms_nothing_falsely() {
    const TOTAL: u64 = 30_000;
    let certs = Certs::new(&["dc1", "dc2"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let body = dialing("dc1", &certs, "dc2", dc2.peer_addr());
    let mut dc1 = InProc::start("dc1", &body, 4096).await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;
    let mut rx2 = std::mem::replace(&mut dc2.rx, tokio::sync::mpsc::channel(1).1);
    let received = tokio::spawn(async move {
        let mut got = std::collections::BTreeSet::new();
        while let Some(item) = rx2.recv().await {
            if let ToLocal::Deliver { payload, .. } = item {
                assert!(got.insert(u64::from_be_bytes(payload[..].try_into().unwrap())), "delivered twice");
            }
        }
        got
    });
    let outcomes = collect_outcomes(&mut dc1);
    let send = |dc1: &InProc, from: u64| {
        let route = dc1.running().local().route("dc2").unwrap().clone();
        tokio::spawn(async move {
            for i in from..from + TOTAL {
                if route.submit(Bytes::copy_from_slice(&i.to_be_bytes()), Some(wandist::route::Token(i))).await.is_err()
                {
                    return i - from;
                }
            }
            TOTAL
        })
    };
    let first = send(&dc1, 0);
    dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v >= 1000.0).await;
    // The route changes (its window): stopped and started again, mid-stream.
    std::fs::write(dc1.config_path(), body.replace("[[route]]\n", "[[route]]\nwindow_messages = 30000\n")).unwrap();
    let restart = applied(dc1.reload());
    assert!(restart.is_empty(), "{restart:?}");
    let accepted_first = first.await.unwrap();
    let second = send(&dc1, 1_000_000);
    assert_eq!(second.await.unwrap(), TOTAL, "the new route refused messages");
    let expect = (accepted_first + TOTAL) as usize;
    wait_for("every accepted message's outcome", SOON, || {
        let o = outcomes.lock().unwrap();
        (o.0.len() + o.1.len() >= expect).then_some(())
    });
    dc1.stop().await;
    dc2.stop().await;
    let got = received.await.unwrap();
    let (delivered, failed) = outcomes.lock().unwrap().clone();
    assert_eq!(delivered.len() + failed.len(), expect, "outcomes missing or doubled");
    assert!(delivered.iter().all(|d| got.contains(d)), "confirmed delivered, never received");
    let delivered_set: std::collections::BTreeSet<u64> = delivered.iter().copied().collect();
    assert!(failed.iter().all(|f| !delivered_set.contains(f)), "both delivered and failed");
    assert!(delivered.iter().any(|d| *d >= 1_000_000), "the new route delivered nothing");
    println!(
        "route changed mid-stream after {accepted_first} of the first stream were accepted: {} confirmed delivered \
         (all received), {} failed",
        delivered.len(),
        failed.len()
    );
}

/// A route removed by a reload finishes what it accepted before it goes,
/// as a stopping gateway does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_removed_by_reload_finishes_its_window_first() {
    const TOTAL: u64 = 20_000;
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let mut dc2 = InProc::start("dc2", &accepting("dc2", &certs, "dc1"), 4096).await;
    let dc3 = InProc::start("dc3", &accepting("dc3", &certs, "dc1"), 4096).await;
    let route = |peer: &str, addr| format!("[[route]]\ncluster = \"{peer}\"\nendpoints = [\"{addr}\"]\n");
    let head = format!("{}{}", gateway_table("dc1", false), certs.tls_table("dc1"));
    let mut dc1 = InProc::start(
        "dc1",
        &format!("{head}{}{}", route("dc2", dc2.peer_addr()), route("dc3", dc3.peer_addr())),
        4096,
    )
    .await;
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0).await;
    let mut rx2 = std::mem::replace(&mut dc2.rx, tokio::sync::mpsc::channel(1).1);
    tokio::spawn(async move { while rx2.recv().await.is_some() {} });
    let outcomes = collect_outcomes(&mut dc1);
    let handle = dc1.running().local().route("dc2").unwrap().clone();
    for i in 0..TOTAL {
        handle.submit(Bytes::copy_from_slice(&i.to_be_bytes()), Some(wandist::route::Token(i))).await.unwrap();
    }
    let unacked = dc1.metric("wandist_unacked_messages", &[("peer", "dc2")]).unwrap_or(0.0);
    std::fs::write(dc1.config_path(), format!("{head}{}", route("dc3", dc3.peer_addr()))).unwrap();
    assert_eq!(applied(dc1.reload()), Vec::<String>::new());
    assert!(
        handle.submit(Bytes::from_static(b"late"), Some(wandist::route::Token(TOTAL))).await.is_err(),
        "a removed route took a message"
    );
    dc2.wait_metric("wandist_route_up", &[("peer", "dc1")], |v| v == 0.0).await;
    wait_for("every outcome", SOON, || {
        let o = outcomes.lock().unwrap();
        (o.0.len() + o.1.len() >= TOTAL as usize).then_some(())
    });
    let (delivered, failed) = outcomes.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failed, first token: {:?}", failed.len(), failed.first());
    assert_eq!(delivered.len() as u64, TOTAL);
    assert_eq!(dc1.metric("wandist_route_up", &[("peer", "dc3")]), Some(1.0));
    println!("route removed with {unacked} of {TOTAL} unconfirmed: all {TOTAL} confirmed delivered first");
}
