//! The Erlang side end to end: real `erl` nodes in two clusters that never
//! connect to each other, two gateways (in this process) as hidden nodes,
//! and applications using only pg, `!`, gen_server:call and monitor.

mod support;

use std::time::Duration;

use support::erl::{dc2_gateway, epmd, pg_node, tag, Epmd, Erl, JOIN_PINGER};
use support::inproc::InProc;
use support::*;

async fn dist_port(epmd: &Epmd, node: &str) -> u16 {
    wandist::erlang::dist::port_please_at(node, epmd.port, Duration::from_secs(5)).await.unwrap()
}

/// The `[erlang]` table of a gateway named `node` joining `nodes` (found at
/// their ports through `epmd`), mirroring the scope `wan`.
async fn erl_table(epmd: &Epmd, node: &str, cookie: &str, nodes: &[&Erl]) -> String {
    let mut entries = Vec::new();
    for n in nodes {
        entries.push(format!("{{ name = \"{}\", port = {} }}", n.name, dist_port(epmd, &n.name).await));
    }
    format!("[erlang]\nnode = \"{node}\"\ncookie = \"{cookie}\"\nscope = \"wan\"\nnodes = [{}]\n", entries.join(", "))
}

/// An in-process gateway of `cluster` (accepting peers if `listen`) with
/// these `[[route]]` tables and this `[erlang]` table.
async fn erlang_gateway(certs: &Certs, cluster: &str, listen: bool, routes: &str, erlang: &str) -> InProc {
    let config = format!("{}{}{routes}{erlang}", gateway_table(cluster, listen), certs.tls_table(cluster));
    InProc::start_erlang(&format!("gw-{cluster}"), &config).await
}

/// a1 in dc1 and b1 in dc2 (each running `wan`; b1 with `JOIN_PINGER`'s
/// `svc` member), and dc2's gateway accepting dc1.
fn two_clusters(t: &str, epmd: &Epmd) -> (Erl, Erl, Certs, Gateway) {
    let a1 = pg_node("a1", t, "cookie_a", epmd);
    let mut b1 = pg_node("b1", t, "cookie_b", epmd);
    assert_eq!(b1.eval(JOIN_PINGER), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let gw2 = dc2_gateway(&certs, t, &b1, epmd);
    (a1, b1, certs, gw2)
}

/// dc1's gateway process dialing dc2 at `gw2`, as the node `wgw1_{t}`,
/// with these `[erlang]` lines after its node and cookie.
fn dc1_gateway(t: &str, certs: &Certs, gw2: &Gateway, epmd: &Epmd, erlang: &str) -> Gateway {
    Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "{}[erlang]\nnode = \"wgw1_{t}@127.0.0.1\"\ncookie = \"cookie_a\"\n{erlang}",
            dialing("dc1", certs, "dc2", gw2.peer_addr())
        ),
        &[("ERL_EPMD_PORT", epmd.port.to_string())],
    )
}

struct World {
    _epmd: Epmd,
    a1: Erl,
    a2: Erl,
    b1: Erl,
    gw1: InProc,
    gw2: InProc,
    gw1_node: String,
}

async fn world() -> World {
    let t = tag();
    let epmd = epmd();
    let mut a1 = Erl::start(&format!("a1_{t}"), "cookie_a", &epmd);
    let mut a2 = Erl::start(&format!("a2_{t}"), "cookie_a", &epmd);
    let mut b1 = Erl::start(&format!("b1_{t}"), "cookie_b", &epmd);
    for n in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    assert_eq!(a2.eval(&format!("net_kernel:connect_node('{}').", a1.name)), "true");
    let certs = Certs::new(&["dc1", "dc2"]);
    let gw2_node = format!("wandist_dc2_{t}@127.0.0.1");
    let gw2 = erlang_gateway(
        &certs,
        "dc2",
        true,
        "[[route]]\ncluster = \"dc1\"\n",
        &erl_table(&epmd, &gw2_node, "cookie_b", &[&b1]).await,
    )
    .await;
    let gw1_node = format!("wandist_dc1_{t}@127.0.0.1");
    let gw1 = erlang_gateway(
        &certs,
        "dc1",
        false,
        &format!("[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\nstandby = 1\n", gw2.peer_addr()),
        &erl_table(&epmd, &gw1_node, "cookie_a", &[&a1, &a2]).await,
    )
    .await;
    gw1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 2.0).await;
    gw2.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0).await;
    // An echo server in dc2, found through pg.
    assert_eq!(
        b1.eval(
            "Echo = spawn(fun E() -> receive {'$gen_call', From, Req} -> gen:reply(From, {echo, Req, node()}), E(); \
             {ping, P} -> P ! {pong, node()}, E(); {big, P, B} -> P ! {big_back, erlang:md5(B), byte_size(B)}, E(); \
             stop -> exit(bye) end end), register(echo, Echo), pg:join(wan, echo, Echo)."
        ),
        "ok"
    );
    World { _epmd: epmd, a1, a2, b1, gw1, gw2, gw1_node }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_members_calls_sends_and_large_messages_cross_clusters() {
    let mut w = world().await;
    // dc2's member shows up in pg on every dc1 node, as a proxy on the gateway's node.
    for a in [&mut w.a1, &mut w.a2] {
        a.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
    }
    assert_eq!(w.a1.eval("node(hd(pg:get_members(wan, echo)))."), format!("'{}'", w.gw1_node));
    // The gateway is hidden: not in nodes(), in nodes(hidden).
    assert_eq!(w.a1.eval(&format!("lists:member('{}', nodes()).", w.gw1_node)), "false");
    assert_eq!(w.a1.eval(&format!("lists:member('{}', nodes(hidden)).", w.gw1_node)), "true");
    // The clusters never meet.
    assert_eq!(w.a1.eval(&format!("lists:member('{}', nodes(connected)).", w.b1.name)), "false");

    // gen_server:call (alias-based reply on OTP 24+) across clusters, unchanged.
    let b1 = w.b1.name.clone();
    assert_eq!(
        w.a1.eval("gen_server:call(hd(pg:get_members(wan, echo)), hello, 5000)."),
        format!("{{echo,hello,'{b1}'}}")
    );
    assert_eq!(
        w.a2.eval("gen_server:call(hd(pg:get_members(wan, echo)), {x, [1,2]}, 5000)."),
        format!("{{echo,{{x,[1,2]}},'{b1}'}}")
    );
    // A {reply_to, self()} pattern: the pid inside the message becomes a proxy in dc2.
    assert_eq!(
        w.a1.eval("hd(pg:get_members(wan, echo)) ! {ping, self()}, receive {pong, N} -> N after 5000 -> timeout end."),
        format!("'{b1}'")
    );
    // 20 MB intact.
    assert_eq!(
        w.a1.eval_within(
            "B = binary:copy(<<1,2,3,4,5>>, 4000000), hd(pg:get_members(wan, echo)) ! {big, self(), B}, \
             receive {big_back, M, S} -> {M =:= erlang:md5(B), S} after 30000 -> timeout end.",
            Duration::from_secs(60)
        ),
        "{true,20000000}"
    );
    // Membership the other way, and never transitive: dc2 sees dc1's member, not its own proxies.
    assert_eq!(w.a2.eval("Chat = spawn(fun() -> receive stop -> ok end end), pg:join(wan, chat, Chat)."), "ok");
    w.b1.eval_until("length(pg:get_members(wan, chat)).", |v| v == "1");
    assert_eq!(w.b1.eval("length(pg:get_members(wan, echo))."), "1", "dc2 must not see its own member twice");
    w.gw1.wait_metric("wandist_members", &[("peer", "dc2"), ("direction", "exported")], |v| v == 1.0).await;
    assert!(w.gw1.metric("wandist_erlang_messages_total", &[("direction", "to_peers")]).unwrap() >= 4.0);
    assert!(w.gw2.metric("wandist_proxies", &[]).unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_links_and_confirmed_sends() {
    let mut w = world().await;
    w.a1.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
    // A confirmed send, with no library on the sender's side.
    let confirm = format!(
        "Ref = make_ref(), {{wandist, '{}'}} ! {{send_confirmed, self(), Ref, hd(pg:get_members(wan, echo)), {{ping, self()}}}}, \
         receive {{wandist_confirm, Ref, R}} -> R after 5000 -> timeout end.",
        w.gw1_node
    );
    assert_eq!(w.a1.eval(&confirm), "delivered");
    assert_eq!(w.a1.eval("receive {pong, _} -> got after 5000 -> timeout end."), "got");
    // Not a proxy: the confirmation says so at once.
    assert_eq!(
        w.a1.eval(&format!(
            "Ref2 = make_ref(), {{wandist, '{}'}} ! {{send_confirmed, self(), Ref2, self(), hi}}, \
             receive {{wandist_confirm, Ref2, R2}} -> R2 after 5000 -> timeout end.",
            w.gw1_node
        )),
        "{failed,unknown_proxy}"
    );
    // Not well-formed (the target is not a pid): answered, bad_request.
    assert_eq!(
        w.a1.eval(&format!(
            "Ref3 = make_ref(), {{wandist, '{}'}} ! {{send_confirmed, self(), Ref3, not_a_pid, hi}}, \
             receive {{wandist_confirm, Ref3, R3}} -> R3 after 5000 -> timeout end.",
            w.gw1_node
        )),
        "{failed,bad_request}"
    );
    // A message to a name the gateway node does not have is dropped and counted;
    // the connection stays up.
    assert_eq!(w.a1.eval(&format!("{{no_such_name, '{}'}} ! hello, ok.", w.gw1_node)), "ok");
    w.gw1.wait_metric("wandist_erlang_rejected_total", &[("reason", "unknown_name")], |v| v == 1.0).await;
    assert_eq!(w.gw1.metric("wandist_erlang_nodes_connected", &[]), Some(2.0));

    // monitor/2 on a proxy: DOWN with the real reason when the remote process exits...
    assert_eq!(
        w.b1.eval(
            "V = spawn(fun() -> receive stop -> exit(bye) end end), register(victim, V), pg:join(wan, victim, V)."
        ),
        "ok"
    );
    w.a1.eval_until("length(pg:get_members(wan, victim)).", |v| v == "1");
    assert_eq!(w.a1.eval("VP = hd(pg:get_members(wan, victim)), MR = erlang:monitor(process, VP), ok."), "ok");
    w.gw2.wait_metric("wandist_erlang_messages_total", &[("direction", "from_peers")], |v| v >= 1.0).await;
    // (the monitor request travels in order with messages; a ping round trip proves it arrived)
    assert_eq!(
        w.a1.eval("gen_server:call(hd(pg:get_members(wan, echo)), sync, 5000)."),
        format!("{{echo,sync,'{}'}}", w.b1.name)
    );
    assert_eq!(w.b1.eval("victim ! stop, ok."), "ok");
    assert_eq!(w.a1.eval("receive {'DOWN', MR, process, VP, Why} -> Why after 5000 -> timeout end."), "bye");
    // ...and noproc for one that no longer exists.
    assert_eq!(
        w.a1.eval("MR2 = erlang:monitor(process, VP), receive {'DOWN', MR2, process, VP, Why2} -> Why2 after 5000 -> timeout end."),
        "noproc"
    );
    // demonitor cleans up: no DOWN arrives after it.
    assert_eq!(
        w.a1.eval("MR3 = erlang:monitor(process, hd(pg:get_members(wan, echo))), erlang:demonitor(MR3), ok."),
        "ok"
    );
    // Links are refused with an immediate exit signal.
    assert_eq!(
        w.a1.eval(
            "process_flag(trap_exit, true), EP = hd(pg:get_members(wan, echo)), link(EP), \
             receive {'EXIT', EP, LR} -> LR after 5000 -> timeout end."
        ),
        "{wandist,links_not_supported}"
    );

    // The route is lost: monitors fire noconnection, members are withdrawn.
    assert_eq!(w.a1.eval("MR4 = erlang:monitor(process, hd(pg:get_members(wan, echo))), ok."), "ok");
    w.gw2.stop().await;
    assert_eq!(
        w.a1.eval("receive {'DOWN', MR4, process, _, Why4} -> Why4 after 10000 -> timeout end."),
        "noconnection"
    );
    w.a1.eval_until("length(pg:get_members(wan, echo)).", |v| v == "0");
    w.a2.eval_until("length(pg:get_members(wan, echo)).", |v| v == "0");
}

/// `delivered` means the destination node has the message: while b1 is
/// frozen (SIGSTOP) its socket still takes bytes, but no confirmation comes;
/// once it runs again, the confirmation does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_means_the_receiving_node_has_the_message() {
    let mut w = world().await;
    w.a1.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
    let send = |r: &str| {
        format!(
            "{r} = make_ref(), {{wandist, '{}'}} ! {{send_confirmed, self(), {r}, hd(pg:get_members(wan, echo)), {{ping, self()}}}}, ok.",
            w.gw1_node
        )
    };
    // Warm: a confirmed send while b1 runs.
    assert_eq!(w.a1.eval(&send("R0")), "ok");
    assert_eq!(w.a1.eval("receive {wandist_confirm, R0, C0} -> C0 after 5000 -> timeout end."), "delivered");
    let pid = w.b1.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    assert_eq!(w.a1.eval(&send("R1")), "ok");
    // gw-dc2 has queued it on its connection to b1 (it counts it), but b1 has not taken it.
    w.gw2.wait_metric("wandist_erlang_messages_total", &[("direction", "from_peers")], |v| v >= 2.0).await;
    assert_eq!(
        w.a1.eval("receive {wandist_confirm, R1, C1} -> C1 after 1000 -> none end."),
        "none",
        "confirmed while the receiving node could not have the message"
    );
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert_eq!(w.a1.eval("receive {wandist_confirm, R1, C2} -> C2 after 5000 -> timeout end."), "delivered");
}

/// A confirmed send the receiving gateway cannot deliver (the destination
/// node is gone) is reported `{failed, undeliverable}`, not `delivered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_send_to_a_node_that_is_gone_fails_as_undeliverable() {
    let mut w = world().await;
    w.a1.eval_until("length(pg:get_members(wan, echo)).", |v| v == "1");
    assert_eq!(w.a1.eval("Gone = hd(pg:get_members(wan, echo)), ok."), "ok");
    let b1_node = w.b1.name.clone();
    assert_eq!(w.gw2.metric("wandist_erlang_node_up", &[("node", &b1_node)]), Some(1.0));
    w.b1.kill();
    w.gw2.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 0.0).await;
    // Which node is down, by name.
    assert_eq!(w.gw2.metric("wandist_erlang_node_up", &[("node", &b1_node)]), Some(0.0));
    assert_eq!(w.gw2.metric("wandist_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert_eq!(
        w.a1.eval(&format!(
            "Rg = make_ref(), {{wandist, '{}'}} ! {{send_confirmed, self(), Rg, Gone, hello}}, \
             receive {{wandist_confirm, Rg, Cg}} -> Cg after 5000 -> timeout end.",
            w.gw1_node
        )),
        "{failed,undeliverable}"
    );
    w.gw1
        .wait_metric("wandist_messages_failed_total", &[("peer", "dc2"), ("reason", "undeliverable")], |v| v == 1.0)
        .await;
    w.gw2.wait_metric("wandist_erlang_rejected_total", &[("reason", "node_not_connected")], |v| v >= 1.0).await;
}

/// The real binary, finding nodes through EPMD (ERL_EPMD_PORT), surviving a
/// node restart and a pg scope restart, and re-mirroring both.
#[test]
fn the_gateway_process_finds_nodes_through_epmd_and_survives_node_and_scope_restarts() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    let b1_name = format!("b1_{t}");
    let join = JOIN_PINGER;
    assert_eq!(b1.eval(join), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let gw2 = dc2_gateway(&certs, &t, &b1, &epmd);
    let gw1 = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n[erlang]\nnode = \"wgw1_{t}@127.0.0.1\"\ncookie = \"cookie_a\"\nnodes = [\"{}\"]\n",
            gateway_table("dc1", false),
            certs.tls_table("dc1"),
            gw2.peer_addr(),
            a1.name
        ),
        &env,
    );
    gw1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    // No gap: each gateway took peer links only once its node was reached
    // (a peer's message never arrives before the node it is for could).
    for gw in [&gw1, &gw2] {
        gw.wait_log("link up", SOON);
        let logs = gw.logs();
        let at = |needle: &str| logs.iter().position(|l| l.contains(needle));
        let (node, gate, link) =
            (at("connected to Erlang node"), at("Erlang nodes tried; taking peer links"), at("link up"));
        assert!(
            node.is_some() && node < gate && gate < link,
            "{}: node {node:?}, gate {gate:?}, link {link:?}",
            gw.name
        );
    }

    // b1 is killed and comes back (a new incarnation, a new port from EPMD).
    b1.kill();
    gw2.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 0.0);
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "0");
    let mut b1 = Erl::start(&b1_name, "cookie_b", &epmd);
    assert_eq!(b1.eval("{ok, _} = pg:start(wan), ok."), "ok");
    assert_eq!(b1.eval(join), "ok");
    gw2.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    assert_eq!(
        a1.eval("hd(pg:get_members(wan, svc)) ! {ping, self()}, receive {pong, N1} -> N1 after 5000 -> timeout end."),
        format!("'{}'", b1.name)
    );

    // b1's pg scope process is killed and restarted: the gateway re-mirrors it.
    assert_eq!(b1.eval("exit(whereis(wan), kill), ok."), "ok");
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "0");
    assert_eq!(b1.eval("{ok, _} = pg:start(wan), ok."), "ok");
    assert_eq!(b1.eval(&join.replace("P ", "P2 ").replace("P)", "P2)")), "ok");
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    gw2.wait_log("pg scope process ended", SOON);
}

/// One slow peer must not hold up the others: with dc3's cluster stalled
/// (its node stopped with SIGSTOP), dc1 still talks to dc2, and dc3 gets
/// everything, in order, once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_cluster_does_not_hold_up_the_others() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = Erl::start(&format!("a1_{t}"), "cookie_a", &epmd);
    let mut b1 = Erl::start(&format!("b1_{t}"), "cookie_b", &epmd);
    let mut c1 = Erl::start(&format!("c1_{t}"), "cookie_c", &epmd);
    for n in [&mut a1, &mut b1, &mut c1] {
        assert_eq!(n.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    assert_eq!(
        b1.eval("E = spawn(fun L() -> receive {'$gen_call', F, R} -> gen:reply(F, {echo, R}), L() end end), pg:join(wan, echo, E)."),
        "ok"
    );
    assert_eq!(
        c1.eval(
            "S = spawn(fun() -> (fun L(Next) -> receive {n, Next, _} -> L(Next + 1); {get, P} -> P ! {got, Next - 1}, L(Next) end end)(1) end), \
             register(slow, S), pg:join(wan, slow, S)."
        ),
        "ok"
    );
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let small = "window_messages = 50\n";
    let gw2 = erlang_gateway(
        &certs,
        "dc2",
        true,
        "[[route]]\ncluster = \"dc1\"\n",
        &erl_table(&epmd, &format!("w2_{t}@127.0.0.1"), "cookie_b", &[&b1]).await,
    )
    .await;
    let gw3 = erlang_gateway(
        &certs,
        "dc3",
        true,
        &format!("[[route]]\ncluster = \"dc1\"\n{small}"),
        &erl_table(&epmd, &format!("w3_{t}@127.0.0.1"), "cookie_c", &[&c1]).await,
    )
    .await;
    let routes = format!(
        "[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n[[route]]\ncluster = \"dc3\"\nendpoints = [\"{}\"]\n{small}",
        gw2.peer_addr(),
        gw3.peer_addr()
    );
    let erlang = erl_table(&epmd, &format!("w1_{t}@127.0.0.1"), "cookie_a", &[&a1]).await;
    let gw1 = erlang_gateway(&certs, "dc1", false, &routes, &erlang).await;
    a1.eval_until("{length(pg:get_members(wan, echo)), length(pg:get_members(wan, slow))}.", |v| v == "{1,1}");

    // dc3's only node stops reading: what the sockets to it can hold fills
    // (gw-dc3 acks a message only once c1 has taken it), 50
    // wait unacked in gw-dc1's window, and the rest wait in gw-dc1's
    // per-peer queue (16,384 messages) while other routes keep moving.
    let stop = std::process::Command::new("kill").args(["-STOP", &c1.pid().to_string()]).status().unwrap();
    assert!(stop.success());
    assert_eq!(
        a1.eval(
            "Slow = hd(pg:get_members(wan, slow)), Blob = binary:copy(<<1>>, 2000), \
             [Slow ! {n, I, Blob} || I <- lists:seq(1, 15000)], ok."
        ),
        "ok"
    );
    gw1.wait_metric("wandist_unacked_messages", &[("peer", "dc3")], |v| v == 50.0).await;
    // dc2 is unaffected.
    assert_eq!(a1.eval("gen_server:call(hd(pg:get_members(wan, echo)), hi, 5000)."), "{echo,hi}");
    // dc3 resumes and gets all 15000, in order.
    let cont = std::process::Command::new("kill").args(["-CONT", &c1.pid().to_string()]).status().unwrap();
    assert!(cont.success());
    // (REPL bindings persist: a fun keeps the pattern variable fresh.)
    c1.eval("Got = fun() -> slow ! {get, self()}, receive {got, X1} -> X1 after 5000 -> -1 end end, ok.");
    c1.eval_until("Got() >= 15000.", |v| v == "true");
    assert_eq!(c1.eval("Got()."), "15000", "more than was sent, or out of order");
    drop((gw1, gw2, gw3));
}

/// A node that does not run the configured scope is named in a warning
/// after a few seconds, with how to start it; once it runs the scope, it
/// is mirrored.
#[test]
fn a_node_without_the_scope_is_named_in_a_warning_until_it_runs_it() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = Erl::start(&format!("a1_{t}"), "cookie_a", &epmd);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let certs = Certs::new(&["dc1"]);
    let gw = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "{}{}[erlang]\nnode = \"wgw1_{t}@127.0.0.1\"\ncookie = \"cookie_a\"\nnodes = [\"{}\"]\n",
            gateway_table("dc1", false),
            certs.tls_table("dc1"),
            a1.name
        ),
        &env,
    );
    gw.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    let line = gw.wait_log("does not answer for the pg scope", SOON);
    assert!(line.contains(&a1.name) && line.contains("pg:start_link(wan)"), "{line}");
    assert_eq!(gw.logs().iter().filter(|l| l.contains("does not answer for the pg scope")).count(), 1, "said once");
    // Started: mirrored.
    assert_eq!(a1.eval("{ok, _} = pg:start(wan), ok."), "ok");
    gw.wait_log(&format!("mirroring pg scope node={}", a1.name), SOON);
}

/// A gateway never displaces a node of its name: not a real node (a1
/// keeps a2), not another gateway (the first keeps its connection); it
/// says why it cannot connect.
#[test]
fn a_gateway_never_displaces_a_node_of_its_name() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut a2 = pg_node("a2", &t, "cookie_a", &epmd);
    assert_eq!(a2.eval(&format!("net_kernel:connect_node('{}').", a1.name)), "true");
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let certs = Certs::new(&["dc1"]);
    let a1_name = a1.name.clone();
    let config = |node: &str| {
        format!(
            "{}{}[erlang]\nnode = \"{node}\"\ncookie = \"cookie_a\"\nnodes = [\"{a1_name}\"]\n",
            gateway_table("dc1", false),
            certs.tls_table("dc1"),
        )
    };
    // Named like the real node a2.
    let gw = Gateway::start_with_env("gw-as-a2", &config(&a2.name), &env);
    let line = gw.wait_log("already has a connection from a node named", SOON);
    assert!(line.contains(&a2.name) && line.contains("every gateway needs its own [erlang] node name"), "{line}");
    assert_eq!(a1.eval(&format!("lists:member('{}', nodes()).", a2.name)), "true", "a1 dropped the real a2");
    assert_eq!(a2.eval("node()."), format!("'{}'", a2.name));
    drop(gw);

    // Two gateways with one node name: the first keeps its connection.
    let twin = format!("wtwin_{t}@127.0.0.1");
    let first = Gateway::start_with_env("first", &config(&twin), &env);
    first.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    let second = Gateway::start_with_env("second", &config(&twin), &env);
    second.wait_log("already has a connection from a node named", SOON);
    assert_eq!(first.metric("wandist_erlang_nodes_connected", &[]), Some(1.0));
    assert!(first.find_log("Erlang node connection lost").is_none(), "the first gateway was knocked off");
    assert_eq!(second.metric("wandist_erlang_nodes_connected", &[]), Some(0.0));
}

/// A certificate for the nodes of a TLS-distribution cluster named by
/// address (`name@127.0.0.1`), signed by the `wandist certs` CA in `certs`:
/// OTP checks the host "127.0.0.1" against DNS names only, so it is
/// named both as a DNS name and as an address. Returns (cert, key) paths.
fn node_certificate(certs: &Certs) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.path("ca.key")).unwrap()).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "wandist development CA");
    ca.distinguished_name = dn;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    // (rcgen would take "127.0.0.1" for an address only: both made by hand.)
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::DnsName("127.0.0.1".try_into().unwrap()),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (certs.path("erlang-node.pem"), certs.path("erlang-node.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// An `-ssl_dist_optfile` for nodes of a TLS-distribution cluster: each
/// node presents `cert` and requires a peer certificate chaining to `ca`
/// (and, as a client, one naming the host it dials).
fn ssl_dist_optfile(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &std::path::Path,
) -> String {
    let common = format!("{{certfile,{cert:?}}},{{keyfile,{key:?}}},{{cacertfile,{ca:?}}},{{verify,verify_peer}}");
    let text = format!("[{{server,[{common},{{fail_if_no_peer_cert,true}}]}},{{client,[{common}]}}].\n");
    let path = dir.join("ssl_dist.conf");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A cluster running TLS distribution (`-proto_dist inet_tls`): the
/// gateway joins it with `[erlang.tls]`, verified both ways (the nodes
/// require its certificate, it checks theirs against the CA), and pg,
/// sends and calls cross to a plain cluster. Without `[erlang.tls]` it
/// says the node speaks TLS; with a certificate of another CA the node
/// refuses it.
#[test]
fn a_tls_distribution_cluster_is_joined_with_erlang_tls() {
    let t = tag();
    let epmd = epmd();
    let certs = Certs::new(&["dc1", "dc2"]);
    let (node_cert, node_key) = node_certificate(&certs);
    let optfile = ssl_dist_optfile(certs.dir.path(), &node_cert, &node_key, &certs.path("ca.pem"));
    let tls_args = ["-proto_dist", "inet_tls", "-ssl_dist_optfile", &optfile];
    let mut a1 = Erl::start_with(&format!("a1_{t}"), "cookie_a", &epmd, &tls_args);
    let mut a2 = Erl::start_with(&format!("a2_{t}"), "cookie_a", &epmd, &tls_args);
    for a in [&mut a1, &mut a2] {
        assert_eq!(a.eval("{ok, _} = pg:start(wan), ok."), "ok");
    }
    // The nodes themselves talk TLS to each other.
    assert_eq!(a2.eval(&format!("net_kernel:connect_node('{}').", a1.name)), "true");
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    assert_eq!(b1.eval(JOIN_PINGER), "ok");
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let gw2 = dc2_gateway(&certs, &t, &b1, &epmd);
    let config = |erlang_tls: &str| {
        format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n[erlang]\nnode = \"wgw1_{t}@127.0.0.1\"\ncookie = \"cookie_a\"\nnodes = [\"{}\", \"{}\"]\n{erlang_tls}",
            gateway_table("dc1", false),
            certs.tls_table("dc1"),
            gw2.peer_addr(),
            a1.name,
            a2.name
        )
    };

    // Without [erlang.tls]: not connected, and the log says why.
    let plain = Gateway::start_with_env("gw-dc1-plain", &config(""), &env);
    let line = plain.wait_log("the node speaks TLS", SOON);
    assert!(line.contains("[erlang.tls]"), "{line}");
    assert_eq!(plain.metric("wandist_erlang_nodes_connected", &[]), Some(0.0));
    drop(plain);

    // A certificate the nodes do not trust (another CA): refused.
    let stranger = Certs::new(&["dc1"]);
    let untrusted = format!(
        "[erlang.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        stranger.path("dc1.pem"),
        stranger.path("dc1.key"),
        certs.path("ca.pem")
    );
    let refused = Gateway::start_with_env("gw-dc1-stranger", &config(&untrusted), &env);
    refused.wait_log("TLS distribution with", SOON);
    assert_eq!(refused.metric("wandist_erlang_nodes_connected", &[]), Some(0.0));
    drop(refused);
    // Nodes whose certificate does not chain to the gateway's CA: refused.
    let wrong_ca = format!(
        "[erlang.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        certs.path("dc1.pem"),
        certs.path("dc1.key"),
        stranger.path("ca.pem")
    );
    let refusing = Gateway::start_with_env("gw-dc1-wrong-ca", &config(&wrong_ca), &env);
    let line = refusing.wait_log("TLS distribution with", SOON);
    assert!(line.contains("UnknownIssuer") || line.contains("invalid peer certificate"), "{line}");
    assert_eq!(refusing.metric("wandist_erlang_nodes_connected", &[]), Some(0.0));
    drop(refusing);

    // The gateway's own certificate, under the nodes' CA: joined.
    let good = format!(
        "[erlang.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        certs.path("dc1.pem"),
        certs.path("dc1.key"),
        certs.path("ca.pem")
    );
    let gw1 = Gateway::start_with_env("gw-dc1", &config(&good), &env);
    gw1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 2.0);
    for a in [&mut a1, &mut a2] {
        a.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    }
    assert_eq!(
        a2.eval("hd(pg:get_members(wan, svc)) ! {ping, self()}, receive {pong, N} -> N after 5000 -> timeout end."),
        format!("'{}'", b1.name)
    );
    // And the other way: a member in the TLS cluster, reached from dc2.
    assert_eq!(a1.eval("E = spawn(fun L() -> receive {'$gen_call', F, R} -> gen:reply(F, {tls, R}), L() end end), pg:join(wan, tlsecho, E)."), "ok");
    b1.eval_until("length(pg:get_members(wan, tlsecho)).", |v| v == "1");
    assert_eq!(b1.eval("gen_server:call(hd(pg:get_members(wan, tlsecho)), hi, 5000)."), "{tls,hi}");
    // The node sees the gateway's connection as TLS distribution.
    assert_eq!(
        a1.eval(
            "{ok, I} = net_kernel:node_info('wgw1_T@127.0.0.1'), element(4, element(2, lists:keyfind(address, 1, I)))."
                .replace("T", &t)
                .as_str()
        ),
        "tls"
    );
}

/// `discover = "cluster"`: a node that joins the cluster after the
/// gateway started (it connects to a seed) is mirrored within 5 s both
/// ways; once stopped, its members are withdrawn and the gateway lets it go.
#[test]
fn a_node_joining_the_cluster_later_is_discovered_and_a_stopped_one_withdrawn() {
    let t = tag();
    let epmd = epmd();
    let (mut a1, mut b1, certs, gw2) = two_clusters(&t, &epmd);
    let gw1 = dc1_gateway(&t, &certs, &gw2, &epmd, &format!("nodes = [\"{}\"]\ndiscover = \"cluster\"\n", a1.name));
    gw1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");

    // a2 starts and joins the cluster through a1; nobody tells the gateway.
    let mut a2 = pg_node("a2", &t, "cookie_a", &epmd);
    assert_eq!(a2.eval("P = spawn(fun() -> receive stop -> ok end end), pg:join(wan, late, P)."), "ok");
    let joined = std::time::Instant::now();
    assert_eq!(a2.eval(&format!("net_kernel:connect_node('{}').", a1.name)), "true");
    a2.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    b1.eval_until("length(pg:get_members(wan, late)).", |v| v == "1");
    let took = joined.elapsed();
    assert!(took < Duration::from_secs(5), "a2 was mirrored after {took:?}");
    assert_eq!(
        a2.eval("hd(pg:get_members(wan, svc)) ! {ping, self()}, receive {pong, N} -> N after 5000 -> timeout end."),
        format!("'{}'", b1.name)
    );
    let line = gw1.wait_log(&format!("Erlang node added: connecting node={}", a2.name), SOON);
    assert!(line.contains("how=\"discovered\"") || line.contains("how=discovered"), "{line}");
    assert_eq!(gw1.metric("wandist_erlang_node_up", &[("node", &a2.name)]), Some(1.0));

    // a2 stops: its member leaves dc2's pg, and the gateway lets it go.
    a2.kill();
    b1.eval_until("length(pg:get_members(wan, late)).", |v| v == "0");
    gw1.wait_log(&format!("Erlang node no longer configured nor discovered: disconnected node={}", a2.name), SOON);
    assert_eq!(gw1.metric("wandist_erlang_nodes_connected", &[]), Some(1.0));
    // a1, the seed, stays mirrored.
    assert_eq!(a1.eval("length(pg:get_members(wan, svc))."), "1");
}

/// `dns = "name@host"`: the host's addresses become the nodes
/// `name@ADDRESS` (here localhost: 127.0.0.1), with no `nodes` list.
#[test]
fn nodes_are_found_through_dns() {
    let t = tag();
    let epmd = epmd();
    let (mut a1, _b1, certs, gw2) = two_clusters(&t, &epmd);
    let gw1 = dc1_gateway(&t, &certs, &gw2, &epmd, &format!("dns = \"a1_{t}@localhost\"\n"));
    gw1.wait_metric("wandist_erlang_node_up", &[("node", &a1.name)], |v| v == 1.0);
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
}

/// Several scopes: `scopes = ["wan", "pg"]` on both gateways. A member
/// joined with plain `pg:join/2` (the default scope `pg`) is seen with
/// `pg:get_members/1` in the other cluster and not in `wan`; a `wan` member
/// stays in `wan`; an export pattern naming a scope (`"pg:chat*"`) lets
/// only those groups of that scope out.
#[test]
fn groups_keep_their_scope_across_clusters_and_patterns_can_name_one() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    for n in [&mut a1, &mut b1] {
        assert_eq!(n.eval("{ok, _} = pg:start(pg), ok."), "ok");
    }
    let certs = Certs::new(&["dc1", "dc2"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let scopes = "scopes = [\"wan\", \"pg\"]\n";
    let gw2 = Gateway::start_with_env(
        "gw-dc2",
        &format!(
            "{}{}[[route]]\ncluster = \"dc1\"\nexport = [\"pg:chat*\", \"svc\"]\n[erlang]\nnode = \"wgw2_{t}@127.0.0.1\"\ncookie = \"cookie_b\"\nnodes = [\"{}\"]\n{scopes}",
            gateway_table("dc2", true),
            certs.tls_table("dc2"),
            b1.name
        ),
        &env,
    );
    let gw1 = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "{}[erlang]\nnode = \"wgw1_{t}@127.0.0.1\"\ncookie = \"cookie_a\"\nnodes = [\"{}\"]\n{scopes}",
            dialing("dc1", &certs, "dc2", gw2.peer_addr()),
            a1.name
        ),
        &env,
    );
    gw1.wait_metric("wandist_erlang_nodes_connected", &[], |v| v == 1.0);
    // In dc2: chat and private in the default scope (pg:join/2), svc in wan.
    assert_eq!(
        b1.eval("C = spawn(fun L() -> receive {ping, F} -> F ! {pong, chat}, L() end end), pg:join(chat_room, C)."),
        "ok"
    );
    assert_eq!(b1.eval("Pr = spawn(fun() -> receive stop -> ok end end), pg:join(private, Pr)."), "ok");
    assert_eq!(b1.eval(JOIN_PINGER), "ok");
    a1.eval_until("length(pg:get_members(chat_room)).", |v| v == "1");
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    assert_eq!(
        a1.eval("hd(pg:get_members(chat_room)) ! {ping, self()}, receive {pong, W} -> W after 5000 -> timeout end."),
        "chat"
    );
    // Each in its own scope only, and the group the pattern leaves out stays home.
    assert_eq!(a1.eval("length(pg:get_members(wan, chat_room))."), "0");
    assert_eq!(a1.eval("length(pg:get_members(svc))."), "0");
    assert_eq!(a1.eval("length(pg:get_members(private))."), "0");
    // And the other way: a1's default-scope member is seen in dc2's default scope.
    assert_eq!(a1.eval("D = spawn(fun() -> receive stop -> ok end end), pg:join(from_dc1, D)."), "ok");
    b1.eval_until("length(pg:get_members(from_dc1)).", |v| v == "1");
    assert_eq!(b1.eval("length(pg:get_members(wan, from_dc1))."), "0");
}
