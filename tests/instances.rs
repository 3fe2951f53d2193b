//! Several gateway instances of one cluster: real `wandist run` processes
//! and real Erlang nodes. Two instances of dc1 (same cluster, same local
//! node, distinct `gateway.name` and `[erlang] node`) dial one dc2 gateway.
//! dc2 holds a session with one instance at a time; the other is a
//! standby for the route. No remote process is listed twice in pg, no link
//! flaps, every `delivered` was received, and when the active instance is
//! killed the standby takes the route over.

mod support;

use std::time::{Duration, Instant};

use support::erl::{dc2_gateway, epmd, erlang_table, pg_node, tag, Erl};
use support::*;

/// The integers of the first `[...]` list in `s` at or after `from`; and where it ended.
fn int_list(s: &str, from: usize) -> (Vec<u32>, usize) {
    let start = from + s[from..].find('[').expect("a list");
    let end = start + s[start..].find(']').expect("list end");
    let items = s[start + 1..end].split(',').filter(|x| !x.is_empty()).map(|x| x.trim().parse().unwrap()).collect();
    (items, end + 1)
}

/// `n` confirmed sends from `sender` to the (one) member of `group`,
/// through the gateway node `gw`: (delivered, failed).
fn confirmed_stream(sender: &mut Erl, gw: &str, group: &str, from: u32, n: u32) -> (Vec<u32>, Vec<u32>) {
    let out = sender.eval_within(
        &format!(
            "[Dst{from}] = pg:get_members(wan, {group}), \
             [{{wandist, '{gw}'}} ! {{send_confirmed, self(), I, Dst{from}, {{n, I}}}} || I <- lists:seq({from}, {last})], \
             (fun L(0, D, F) -> {{lists:sort(D), lists:sort(F)}}; \
                  L(K, D, F) -> receive {{wandist_confirm, I, delivered}} -> L(K - 1, [I | D], F); \
                                        {{wandist_confirm, I, {{failed, _}}}} -> L(K - 1, D, [I | F]) \
                                after 30000 -> {{timeout, K}} end end)({n}, [], []).",
            last = from + n - 1
        ),
        SOON * 2,
    );
    assert!(out.starts_with("{["), "the stream did not finish: {out}");
    let (delivered, at) = int_list(&out, 0);
    (delivered, int_list(&out, at).0)
}

/// 2,000 confirmed sends each way, numbered from `from`: a1 -> b1's `sink`
/// through dc1's gateway node `via_dc1`, b1 -> a1's `back` through dc2's
/// `via_dc2`. All are confirmed delivered, and all were received once.
fn both_ways(a1: &mut Erl, b1: &mut Erl, via_dc1: &str, via_dc2: &str, from: u32) {
    let (d1, f1) = confirmed_stream(a1, via_dc1, "sink", from, 2000);
    assert_eq!((d1.len(), f1.len()), (2000, 0), "a1 -> b1 through {via_dc1}");
    let (d2, f2) = confirmed_stream(b1, via_dc2, "back", from, 2000);
    assert_eq!((d2.len(), f2.len()), (2000, 0), "b1 -> a1 through {via_dc2}");
    all_received_once(b1, &d1);
    all_received_once(a1, &d2);
}

/// Every number confirmed `delivered` reached the sink on `node`, and
/// nothing reached it twice.
fn all_received_once(node: &mut Erl, delivered: &[u32]) {
    let (got, dups) = received(node);
    assert_eq!(dups, 0, "the sink on {} got duplicates", node.name);
    assert!(delivered.iter().all(|d| got.binary_search(d).is_ok()), "a confirmed message never arrived");
}

/// What the sink on `node` has received: (numbers, duplicates).
fn received(node: &mut Erl) -> (Vec<u32>, u32) {
    // (In a fun: the shell keeps bindings between evaluations.)
    let out = node.eval("(fun() -> sink ! {report, self()}, receive {sink, G, D} -> {G, D} end end)().");
    let dups = out.rsplit(',').next().unwrap().trim_matches(|c: char| !c.is_ascii_digit()).parse().unwrap();
    (int_list(&out, 0).0, dups)
}

const SINK: &str = "Sink = spawn(fun() -> (fun L(Seen, Dups) -> receive \
    {n, I} -> case maps:is_key(I, Seen) of true -> L(Seen, Dups + 1); false -> L(Seen#{I => true}, Dups) end; \
    {report, P} -> P ! {sink, lists:sort(maps:keys(Seen)), Dups}, L(Seen, Dups) end end)(#{}, 0) end), \
    register(sink, Sink), pg:join(wan, sink, Sink).";

#[test]
fn two_instances_of_a_cluster_share_one_peer_without_duplicates_or_false_confirmations() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    assert_eq!(b1.eval(SINK), "ok");
    assert_eq!(a1.eval(&SINK.replace("pg:join(wan, sink, Sink)", "pg:join(wan, back, Sink)")), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let gw2_node = format!("wgw2_{t}@127.0.0.1");
    let dc2 = dc2_gateway(&certs, &t, &b1, &epmd);
    // (name, [erlang] node, config) of each instance.
    let config = |name: &str| {
        let node = format!("w{name}_{t}@127.0.0.1");
        let body = format!(
            "[gateway]\ncluster = \"dc1\"\nname = \"{name}\"\n{FAST}handshake_timeout_ms = 1000\n\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n{}",
            certs.tls_table("dc1"),
            dc2.peer_addr(),
            erlang_table(&node, "cookie_a", &[&a1])
        );
        (name.to_string(), node, body)
    };
    let configs = [config("gw-a"), config("gw-b")];
    let instance = |i: usize| Gateway::start_with_env(&configs[i].0, &configs[i].2, &env);
    let (gw_a, node_a) = (instance(0), configs[0].1.clone());
    let (gw_b, node_b) = (instance(1), configs[1].1.clone());
    let up = |g: &Gateway| g.metric("wandist_route_up", &[("peer", "dc2")]) == Some(1.0);
    let mut dc1 = [(gw_a, node_a), (gw_b, node_b)];
    wait_for("one dc1 instance holding the route", SOON, || dc1.iter().any(|(g, _)| up(g)).then_some(()));
    // The other is a standby: refused as another instance, counted, and
    // never holding the route at the same time.
    let active = dc1.iter().position(|(g, _)| up(g)).unwrap();
    let standby = 1 - active;
    dc1[standby].0.wait_metric(
        "wandist_handshake_failures_total",
        &[("peer", "dc2"), ("reason", "other_instance")],
        |v| v >= 2.0,
    );
    a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    // Operators see which is which (a standby's route is down by design).
    let standby_gauge = |g: &Gateway| g.metric("wandist_route_standby", &[("peer", "dc2")]);
    assert_eq!(standby_gauge(&dc1[standby].0), Some(1.0));
    assert_eq!(standby_gauge(&dc1[active].0), Some(0.0));

    // Steady state: for 2 s, one member each way (never two), the route held
    // by the same instance, no new link.
    let connects = dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(a1.eval("length(pg:get_members(wan, sink))."), "1");
        assert_eq!(b1.eval("length(pg:get_members(wan, back))."), "1");
        assert!(up(&dc1[active].0) && !up(&dc1[standby].0), "the route changed hands in steady state");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]), connects, "links flapped");

    // Confirmed sends both ways; every `delivered` was received, once.
    both_ways(&mut a1, &mut b1, &dc1[active].1, &gw2_node, 1);

    // kill -9 of the standby: nothing moves. It comes back, a standby again.
    dc1[standby].0.kill();
    assert!(up(&dc1[active].0));
    dc1[standby].0 = instance(standby);
    dc1[standby].0.wait_metric("wandist_route_standby", &[("peer", "dc2")], |v| v == 1.0);
    assert_eq!(
        dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]),
        connects,
        "the standby's restart moved the route"
    );
    assert_eq!(a1.eval("length(pg:get_members(wan, sink))."), "1");

    // kill -9 of the active instance: the standby takes the route over, and
    // the members come back through it (a1 sees a proxy on the standby's
    // node; b1 a new proxy for a1's member, of the new session).
    let old_back = b1.eval("pg:get_members(wan, back).");
    let killed = Instant::now();
    dc1[active].0.kill();
    wait_for("the standby holding the route", SOON, || up(&dc1[standby].0).then_some(()));
    assert_eq!(standby_gauge(&dc1[standby].0), Some(0.0), "holding the route, no longer a standby");
    let standby_node = format!("['{}']", dc1[standby].1);
    a1.eval_until("[node(P) || P <- pg:get_members(wan, sink)].", |v| v == standby_node);
    b1.eval_until("pg:get_members(wan, back).", |v| v != old_back && v.matches('<').count() == 1);
    let took = killed.elapsed();
    both_ways(&mut a1, &mut b1, &dc1[standby].1, &gw2_node, 10_001);
    assert_eq!(a1.eval("length(pg:get_members(wan, sink))."), "1");
    let text = dc2.metrics();
    assert_eq!(metric_sum(&text, "wandist_frames_rejected_total", &[]), 0.0, "frames rejected:\n{text}");
    println!(
        "two dc1 instances, one dc2: one member each way throughout, no link flapped in steady state, 8,000 confirmed \
         messages all received once; after kill -9 of the active instance the standby held the route and the members \
         were back in {took:?} (dead_after 1.5 s)"
    );
}

/// The layout gateway.toml.example shows: one route whose endpoints are two
/// gateway instances of the peer, `standby = 1`. The route holds one
/// instance (its standby link goes to the same one: the other is refused
/// once and then left alone); when that instance stops, the route moves to
/// the other under a new session. Every message is delivered by one
/// instance at most once, and confirmed `delivered` only if it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_two_instances_of_the_peer_holds_one_and_moves_when_it_stops() {
    use support::inproc::{next, InProc};
    use wandist::local::ToLocal;
    use wandist::route::Outcome;

    const TOTAL: u64 = 20_000;
    let certs = Certs::new(&["dc1", "dc2"]);
    let accepting_as = |name: &str| {
        format!(
            "[gateway]\ncluster = \"dc2\"\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{FAST}\n{}[[route]]\ncluster = \"dc1\"\n",
            certs.tls_table("dc2")
        )
    };
    let mut dc2 = [
        InProc::start("gw-a", &accepting_as("gw-a"), 4096).await,
        InProc::start("gw-b", &accepting_as("gw-b"), 4096).await,
    ];
    let dc1 = InProc::start(
        "dc1",
        &format!(
            "{}{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\", \"{}\"]\nstandby = 1\n",
            gateway_table("dc1", false),
            certs.tls_table("dc1"),
            dc2[0].peer_addr(),
            dc2[1].peer_addr()
        ),
        4096,
    )
    .await;
    dc1.wait_metric("wandist_link_up", &[("peer", "dc2"), ("role", "standby")], |v| v == 1.0).await;
    let holder = |g: &InProc| g.metric("wandist_route_up", &[("peer", "dc1")]) == Some(1.0);
    let active = dc2.iter().position(holder).expect("one instance holds the route");
    assert!(!holder(&dc2[1 - active]), "both instances hold the route");
    let connects = dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]);

    // A stream with confirmations; each instance's local side records what it got.
    let route = dc1.running().local().route("dc2").unwrap().clone();
    let producer = tokio::spawn(async move {
        for i in 0..TOTAL {
            route
                .submit(bytes::Bytes::copy_from_slice(&i.to_be_bytes()), Some(wandist::route::Token(i)))
                .await
                .unwrap();
        }
    });
    let mut sinks = Vec::new();
    for g in dc2.iter_mut() {
        let mut rx = std::mem::replace(&mut g.rx, tokio::sync::mpsc::channel(1).1);
        sinks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                if let ToLocal::Deliver { payload, .. } = item {
                    got.push(u64::from_be_bytes(payload[..].try_into().unwrap()));
                }
            }
            got
        }));
    }
    dc1.wait_metric("wandist_messages_delivered_total", &[("peer", "dc2")], |v| v >= (TOTAL / 4) as f64).await;
    assert_eq!(dc1.metric("wandist_link_connects_total", &[("peer", "dc2")]), connects, "links flapped");

    // The active instance stops; the route moves to the other.
    dc2[active].stop().await;
    let other = &dc2[1 - active];
    other.wait_metric("wandist_route_up", &[("peer", "dc1")], |v| v == 1.0).await;
    producer.await.unwrap();
    let (mut delivered, mut failed) = (Vec::new(), Vec::new());
    let mut rx = dc1.rx;
    while (delivered.len() + failed.len()) < TOTAL as usize {
        match next(&mut rx, "confirmations").await {
            ToLocal::Confirm { token, outcome: Outcome::Delivered, .. } => delivered.push(token.0),
            ToLocal::Confirm { token, .. } => failed.push(token.0),
            _ => {}
        }
    }
    dc2[1 - active].stop().await;
    let mut received = Vec::new();
    for s in sinks {
        received.extend(s.await.unwrap());
    }
    let set: std::collections::BTreeSet<u64> = received.iter().copied().collect();
    assert_eq!(set.len(), received.len(), "a message delivered twice (across instances)");
    assert!(delivered.iter().all(|d| set.contains(d)), "confirmed delivered, never received");
    let delivered_set: std::collections::BTreeSet<u64> = delivered.iter().copied().collect();
    assert!(failed.iter().all(|f| !delivered_set.contains(f)), "both delivered and failed");
    println!(
        "route to two dc2 instances: one held it (no flap), then the other after it stopped: {} delivered, {} failed \
         (in flight at the stop), every `delivered` received once",
        delivered.len(),
        failed.len()
    );
}

/// The index of the instance whose route to `peer` is up, if exactly one's is.
fn holder_of(gws: &[Gateway], peer: &str) -> Option<usize> {
    let up: Vec<usize> =
        (0..gws.len()).filter(|&i| gws[i].metric("wandist_route_up", &[("peer", peer)]) == Some(1.0)).collect();
    (up.len() == 1).then(|| up[0])
}

/// The nodes of `group`'s members as `node` sees them.
fn member_nodes(node: &mut Erl, group: &str) -> String {
    node.eval(&format!("[node(P) || P <- pg:get_members(wan, {group})]."))
}

/// Two instances of dc1 (dialing both of dc2's) and two of dc2, each with
/// `[erlang] coordinate = true`; a1 (dc1) has `back`, b1 (dc2) `sink`.
struct TwoByTwo {
    a1: Erl,
    b1: Erl,
    dc1: Vec<Gateway>,
    dc2: Vec<Gateway>,
    t: String,
    configs: [Vec<String>; 2],
    env: [(&'static str, String); 1],
    /// Hand-overs the stopping instance had to end without the next one
    /// serving (it waits a bounded time: `Running::hand_over_wait`), from
    /// the logs of instances replaced since.
    forced: usize,
    _epmd: support::erl::Epmd,
    _certs: Certs,
}

/// The log line of a hand-over that ended without the next instance serving.
const FORCED: &str = "withdrawing our members anyway";

/// Lookups (2 ms apart) a stream may find no member in across its
/// hand-overs without a forced one: seen once or twice in some forty runs
/// on a loaded machine (one lookup each time), cause not found yet.
const MISSING_AT_MOST: u32 = 2;

const DC1_NAMES: [&str; 2] = ["x-1", "x-2"];
const DC2_NAMES: [&str; 2] = ["p-1", "p-2"];

impl TwoByTwo {
    fn start() -> TwoByTwo {
        let t = tag();
        let epmd = epmd();
        let a1 = pg_node("a1", &t, "cookie_a", &epmd);
        let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
        let mut a1 = a1;
        assert_eq!(b1.eval(SINK), "ok");
        assert_eq!(a1.eval(&SINK.replace("pg:join(wan, sink, Sink)", "pg:join(wan, back, Sink)")), "ok");
        let certs = Certs::new(&["dc1", "dc2"]);
        let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
        let erlang = |name: &str, cookie: &str, node: &str| {
            format!(
                "[erlang]\nnode = \"{}\"\ncookie = \"{cookie}\"\nnodes = [\"{node}\"]\ncoordinate = true\n",
                node_name(&t, name)
            )
        };
        let dc2_configs: Vec<String> = DC2_NAMES
            .iter()
            .map(|name| {
                format!(
                    "[gateway]\ncluster = \"dc2\"\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{FAST}handshake_timeout_ms = 1000\n\n{}[[route]]\ncluster = \"dc1\"\n{}",
                    certs.tls_table("dc2"),
                    erlang(name, "cookie_b", &b1.name)
                )
            })
            .collect();
        let dc2: Vec<Gateway> =
            DC2_NAMES.iter().zip(&dc2_configs).map(|(n, c)| Gateway::start_with_env(n, c, &env)).collect();
        let endpoints = format!("\"{}\", \"{}\"", dc2[0].peer_addr(), dc2[1].peer_addr());
        let dc1_configs: Vec<String> = DC1_NAMES
            .iter()
            .map(|name| {
                format!(
                    "[gateway]\ncluster = \"dc1\"\nname = \"{name}\"\n{FAST}handshake_timeout_ms = 1000\n\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [{endpoints}]\nstandby = 1\n{}",
                    certs.tls_table("dc1"),
                    erlang(name, "cookie_a", &a1.name)
                )
            })
            .collect();
        let dc1: Vec<Gateway> =
            DC1_NAMES.iter().zip(&dc1_configs).map(|(n, c)| Gateway::start_with_env(n, c, &env)).collect();
        TwoByTwo {
            a1,
            b1,
            dc1,
            dc2,
            t,
            configs: [dc1_configs, dc2_configs],
            env,
            forced: 0,
            _epmd: epmd,
            _certs: certs,
        }
    }

    /// Stops `side`'s (0: dc1, 1: dc2) instance `i` (SIGTERM: it exits
    /// cleanly) and starts it again (a dc2 instance on the port it had:
    /// dc1 lists it).
    fn replace(&mut self, side: usize, i: usize) {
        let gws = if side == 0 { &mut self.dc1 } else { &mut self.dc2 };
        gws[i].signal("TERM");
        assert!(gws[i].wait_exit(SOON).is_some_and(|s| s.success()), "an instance did not stop cleanly");
        self.forced += gws[i].logs().iter().filter(|l| l.contains(FORCED)).count();
        let config = match gws[i].peer_addr {
            Some(addr) => self.configs[side][i].replace("127.0.0.1:0", &addr.to_string()),
            None => self.configs[side][i].clone(),
        };
        gws[i] = Gateway::start_with_env([DC1_NAMES, DC2_NAMES][side][i], &config, &self.env);
    }

    /// dc1's instance `i` (a new process, after one was killed or stopped).
    fn restart_dc1(&mut self, i: usize) {
        self.dc1[i] = Gateway::start_with_env(DC1_NAMES[i], &self.configs[0][i], &self.env);
    }

    /// The Erlang node of the instance named `name`.
    fn node(&self, name: &str) -> String {
        node_name(&self.t, name)
    }

    /// kill -9 of `side`'s (0: dc1, 1: dc2) holder `h`: the other instance
    /// of that side takes the route, and the remote member is back in pg
    /// through it (and one member the other way). The other's index, and
    /// how long it took.
    fn kill_holder(&mut self, side: usize, h: usize) -> (usize, Duration) {
        let killed = Instant::now();
        let (gws, peer, names) =
            if side == 0 { (&mut self.dc1, "dc2", DC1_NAMES) } else { (&mut self.dc2, "dc1", DC2_NAMES) };
        gws[h].kill();
        let other = 1 - h;
        wait_for("the other instance holding the route", SOON, || {
            (holder_of(&gws[other..=other], peer) == Some(0)).then_some(())
        });
        let want = format!("['{}']", node_name(&self.t, names[other]));
        let (here, there) = if side == 0 { (&mut self.a1, &mut self.b1) } else { (&mut self.b1, &mut self.a1) };
        let (group, back) = if side == 0 { ("sink", "back") } else { ("back", "sink") };
        here.eval_until(&format!("[node(P) || P <- pg:get_members(wan, {group})]."), |v| v == want);
        there.eval_until(&format!("length(pg:get_members(wan, {back}))."), |v| v == "1");
        (other, killed.elapsed())
    }

    /// Waits for one holder on each side: (dc1's, dc2's).
    fn holders(&self) -> (usize, usize) {
        wait_for("one holder on each side", SOON, || Some((holder_of(&self.dc1, "dc2")?, holder_of(&self.dc2, "dc1")?)))
    }
}

fn node_name(t: &str, name: &str) -> String {
    format!("w{}_{t}@127.0.0.1", name.replace('-', "_"))
}

/// Two instances on each side, `[erlang] coordinate = true`: each cluster's
/// instances agree through their own cluster's pg which one holds the
/// route, so one session joins the two clusters and no remote process is
/// listed twice (without the claims, dc1's second instance would reach
/// dc2's second, and every member would be listed twice). kill -9 of the
/// holder on either side, and a SIGTERM, move the route to the other.
#[test]
fn two_instances_on_each_side_agree_through_their_cluster_which_one_holds_the_route() {
    let mut w = TwoByTwo::start();
    // One holder on each side; the others stand by.
    let (h1, h2) = w.holders();
    w.a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    w.b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    assert_eq!(member_nodes(&mut w.a1, "sink"), format!("['{}']", w.node(DC1_NAMES[h1])));
    assert_eq!(member_nodes(&mut w.b1, "back"), format!("['{}']", w.node(DC2_NAMES[h2])));

    // Steady for 2 s (once the holder's standby link is up too): one member
    // each way, the same holders, no new link.
    w.dc1[h1].wait_metric("wandist_link_up", &[("peer", "dc2"), ("role", "standby")], |v| v == 1.0);
    let connects = w.dc2[h2].metric("wandist_link_connects_total", &[("peer", "dc1")]);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(w.a1.eval("length(pg:get_members(wan, sink))."), "1");
        assert_eq!(w.b1.eval("length(pg:get_members(wan, back))."), "1");
        assert_eq!(
            (holder_of(&w.dc1, "dc2"), holder_of(&w.dc2, "dc1")),
            (Some(h1), Some(h2)),
            "the route changed hands"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.dc2[h2].metric("wandist_link_connects_total", &[("peer", "dc1")]), connects, "links flapped");
    // The others stand by, and say so.
    assert_eq!(w.dc1[1 - h1].metric("wandist_route_standby", &[("peer", "dc2")]), Some(1.0));
    assert_eq!(w.dc2[1 - h2].metric("wandist_route_standby", &[("peer", "dc1")]), Some(1.0));
    let (n1, n2) = (w.node(DC1_NAMES[h1]), w.node(DC2_NAMES[h2]));
    both_ways(&mut w.a1, &mut w.b1, &n1, &n2, 1);

    // kill -9 of dc1's holder: the other dc1 instance takes the route.
    let (h1b, dc1_took) = w.kill_holder(0, h1);
    let n1b = w.node(DC1_NAMES[h1b]);
    both_ways(&mut w.a1, &mut w.b1, &n1b, &n2, 10_001);
    // It comes back, and stands by.
    w.restart_dc1(h1);
    w.dc1[h1].wait_metric("wandist_route_standby", &[("peer", "dc2")], |v| v == 1.0);

    // kill -9 of dc2's holder: the other dc2 instance takes the route, and
    // dc1's holder reaches it.
    let (h2b, dc2_took) = w.kill_holder(1, h2);
    let n2b = w.node(DC2_NAMES[h2b]);
    both_ways(&mut w.a1, &mut w.b1, &n1b, &n2b, 20_001);

    // SIGTERM of dc1's holder: it withdraws its claims, finishes, exits; the
    // instance that came back takes the route.
    w.dc1[h1b].signal("TERM");
    assert!(w.dc1[h1b].wait_exit(SOON).is_some_and(|s| s.success()), "the stopped instance exits cleanly");
    wait_for("dc1's restarted instance holding the route", SOON, || {
        (holder_of(&w.dc1[h1..=h1], "dc2") == Some(0)).then_some(())
    });
    let want = format!("['{}']", w.node(DC1_NAMES[h1]));
    w.a1.eval_until("[node(P) || P <- pg:get_members(wan, sink)].", |v| v == want);
    w.b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    let n1 = w.node(DC1_NAMES[h1]);
    both_ways(&mut w.a1, &mut w.b1, &n1, &n2b, 30_001);
    let text = w.dc2[h2b].metrics();
    assert_eq!(metric_sum(&text, "wandist_frames_rejected_total", &[]), 0.0, "frames rejected:\n{text}");
    println!(
        "two instances on each side: one session, one member each way; 16,000 confirmed messages all received once; \
         kill -9 of dc1's holder: back through the other in {dc1_took:?}; of dc2's: {dc2_took:?} (dead_after 1.5 s); \
         SIGTERM of the holder: the other took over"
    );
}

/// Erlang: starts `streamer` on this node, which sends confirmed messages
/// numbered from 1 until it gets `stop`, each to the member of `group`
/// looked up just before (through the gateway node whose proxy it is),
/// one at a time, watching that gateway's `wandist` as a client should;
/// then it sends the caller `{stream, Delivered, Failed, Down, NoAnswer,
/// NoMember}`: the numbers confirmed delivered and failed; how many got
/// DOWN instead (the gateway's node went away before answering); how many
/// got neither in 5 s; lookups that found nobody.
fn start_stream(group: &str) -> String {
    start_stream_as("streamer", group)
}

/// `start_stream`, registered as `name`.
fn start_stream_as(name: &str, group: &str) -> String {
    format!(
        "Me = self(), register({name}, spawn(fun() -> (fun L(I, D, F, G, T, M) -> \
           receive stop -> Me ! {{stream, {name}, lists:reverse(D), lists:reverse(F), G, T, M}} after 0 -> \
           case pg:get_members(wan, {group}) of \
             [] -> timer:sleep(2), L(I, D, F, G, T, M + 1); \
             [Dst | _] -> Gw = {{wandist, node(Dst)}}, R = erlang:monitor(process, Gw), \
               Gw ! {{send_confirmed, self(), I, Dst, {{n, I}}}}, \
               receive {{wandist_confirm, I, delivered}} -> erlang:demonitor(R, [flush]), L(I + 1, [I | D], F, G, T, M); \
                       {{wandist_confirm, I, {{failed, _}}}} -> erlang:demonitor(R, [flush]), L(I + 1, D, [I | F], G, T, M); \
                       {{'DOWN', R, _, _, _}} -> L(I + 1, D, F, G + 1, T, M) \
               after 5000 -> L(I + 1, D, F, G, T + 1, M) end end end end)(1, [], [], 0, 0, 0) end)), ok."
    )
}

/// Stops the `streamer` on `node`: (delivered, failed, [down, unanswered,
/// lookups that found nobody]).
fn stop_stream(node: &mut Erl) -> (Vec<u32>, Vec<u32>, [u32; 3]) {
    stop_stream_as(node, "streamer")
}

/// `stop_stream` of the one registered as `name`.
fn stop_stream_as(node: &mut Erl, name: &str) -> (Vec<u32>, Vec<u32>, [u32; 3]) {
    let out = node.eval_within(
        // (In a fun: the shell keeps bindings between evaluations.)
        &format!(
            "(fun() -> {name} ! stop, receive {{stream, {name}, D, F, G, T, M}} -> {{D, F, G, T, M}} after 30000 -> timeout end end)()."
        ),
        SOON * 2,
    );
    assert!(out.starts_with("{["), "the stream did not finish: {out}");
    let (d, at) = int_list(&out, 0);
    let (f, at) = int_list(&out, at);
    let rest: Vec<u32> =
        out[at..].split(|c: char| !c.is_ascii_digit()).filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect();
    (d, f, [rest[0], rest[1], rest[2]])
}

/// Both streams stopped and checked: every `delivered` arrived once, and
/// nothing failed, went unanswered or was cut off by a node going down.
/// The figures, for the log.
fn both_streams_clean(w: &mut TwoByTwo) -> String {
    let (d1, f1, [g1, t1, m1]) = stop_stream(&mut w.a1);
    let (d2, f2, [g2, t2, m2]) = stop_stream(&mut w.b1);
    all_received_once(&mut w.b1, &d1);
    all_received_once(&mut w.a1, &d2);
    // Hand-overs that ended without the next instance serving (a loaded
    // machine can make it slower than the bounded wait), as the logs say.
    let forced = w.forced
        + w.dc1.iter().chain(&w.dc2).map(|g| g.logs().iter().filter(|l| l.contains(FORCED)).count()).sum::<usize>();
    for (what, f, g, t, m) in [("a1 -> b1", &f1, g1, t1, m1), ("b1 -> a1", &f2, g2, t2, m2)] {
        assert_eq!((f.len(), g, t), (0, 0, 0), "{what}: (failed, DOWN before an answer, unanswered)");
        // The next instance's proxies join before the stopping one's leave:
        // a member is missing only after a hand-over the logs say was
        // forced, or, rarely on a loaded machine, for one lookup or two
        // (2 ms each; RELIABILITY.md: not closed yet).
        assert!(m <= MISSING_AT_MOST || forced > 0, "{what}: {m} lookups found no member, with no forced hand-over");
    }
    format!(
        "a1 -> b1 {} delivered, b1 -> a1 {} delivered, 0 failed, 0 lost, 0 duplicated; lookups that found no member: \
         {m1} / {m2} ({forced} hand-overs forced by the bounded wait)",
        d1.len(),
        d2.len()
    )
}

/// Waits until `gw` has sent and received `n` more messages to and from `peer`.
fn traffic_through(gw: &Gateway, peer: &str, n: f64) {
    let now = |m: &str| gw.metric(m, &[("peer", peer)]).unwrap_or(0.0);
    let (sent, received) = (now("wandist_messages_delivered_total"), now("wandist_messages_received_total"));
    gw.wait_metric("wandist_messages_delivered_total", &[("peer", peer)], |v| v >= sent + n);
    gw.wait_metric("wandist_messages_received_total", &[("peer", peer)], |v| v >= received + n);
}

/// A planned stop (SIGTERM) of dc1's holder while confirmed sends run both
/// ways, each to a target looked up just before: the stopping instance
/// withdraws its members both ways and its claim, carries what is on its
/// way, and leaves once traffic has settled; the other instance takes the
/// route. 0 failed, 0 lost, 0 duplicated. (The members are missing from pg
/// for the switch-over: counted, not yet zero.)
#[test]
fn a_planned_stop_of_the_holder_under_load_fails_nothing() {
    let mut w = TwoByTwo::start();
    let (h1, _) = w.holders();
    w.a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    w.b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    assert_eq!(w.a1.eval(&start_stream("sink")), "ok");
    assert_eq!(w.b1.eval(&start_stream("back")), "ok");
    traffic_through(&w.dc1[h1], "dc2", 300.0);
    w.dc1[h1].signal("TERM");
    assert!(w.dc1[h1].wait_exit(SOON).is_some_and(|s| s.success()), "the stopped instance exits cleanly");
    let other = 1 - h1;
    traffic_through(&w.dc1[other], "dc2", 300.0);
    let figures = both_streams_clean(&mut w);
    let holder = w.node(DC1_NAMES[other]);
    assert_eq!(member_nodes(&mut w.a1, "sink"), format!("['{holder}']"));
    println!("planned stop of dc1's holder under load: {figures}");
}

/// A rolling upgrade under load: every instance of both clusters stopped
/// (SIGTERM) and started again, one at a time, standbys first, while
/// confirmed sends run both ways. 0 failed, 0 lost, 0 duplicated.
#[test]
fn a_rolling_upgrade_of_both_sides_under_load_fails_nothing() {
    let mut w = TwoByTwo::start();
    let (h1, h2) = w.holders();
    w.a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    w.b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    assert_eq!(w.a1.eval(&start_stream("sink")), "ok");
    assert_eq!(w.b1.eval(&start_stream("back")), "ok");
    traffic_through(&w.dc1[h1], "dc2", 200.0);
    // (side, instance) in the order an operator would go: standbys, then holders.
    for (side, i) in [(0, 1 - h1), (1, 1 - h2), (0, h1), (1, h2)] {
        w.replace(side, i);
        let (n1, _) = w.holders();
        traffic_through(&w.dc1[n1], "dc2", 200.0);
    }
    // Every instance was replaced; the route is held on each side by the
    // one that stood by last.
    let (n1, n2) = w.holders();
    assert_eq!((n1, n2), (1 - h1, 1 - h2));
    let figures = both_streams_clean(&mut w);
    println!("rolling upgrade of 2 + 2 instances under load: {figures}");
}

/// Hand-overs one after another under load, as a soak of them: the
/// holder of each side in turn is stopped and started again, eight times,
/// while confirmed sends run both ways. 0 failed, 0 lost, 0 duplicated,
/// and never a lookup that finds no member.
#[test]
fn hand_overs_one_after_another_under_load_fail_nothing() {
    let mut w = TwoByTwo::start();
    w.holders();
    w.a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    w.b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    assert_eq!(w.a1.eval(&start_stream("sink")), "ok");
    assert_eq!(w.b1.eval(&start_stream("back")), "ok");
    const ROUNDS: usize = 8;
    let mut took = Vec::new();
    for round in 0..ROUNDS {
        let side = round % 2;
        let (h1, h2) = w.holders();
        let started = Instant::now();
        w.replace(side, [h1, h2][side]);
        took.push(started.elapsed());
        let (n1, n2) = w.holders();
        assert_eq!([n1, n2][side], 1 - [h1, h2][side], "the other instance holds the route");
        traffic_through(&w.dc1[n1], "dc2", 100.0);
    }
    let figures = both_streams_clean(&mut w);
    took.sort();
    println!(
        "{ROUNDS} hand-overs under load, the holders of each side in turn: {figures}; stop-and-start {:?} - {:?}",
        took[0],
        took[ROUNDS - 1]
    );
}

/// A reload on an instance that coordinates (`[erlang] coordinate`): a
/// route changed while it holds it starts again (its claim stands); one
/// removed gives its claim up and its members leave; one added is
/// claimed, held, and its members come back.
#[test]
fn a_coordinating_instance_applies_route_changes_through_its_claims() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    assert_eq!(b1.eval(SINK), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let dc2 = dc2_gateway(&certs, &t, &b1, &epmd);
    let head = format!(
        "[gateway]\ncluster = \"dc1\"\nname = \"x-1\"\n{FAST}handshake_timeout_ms = 1000\n\n{}",
        certs.tls_table("dc1")
    );
    let erlang = format!("{}coordinate = true\n", erlang_table(&format!("wx1_{t}@127.0.0.1"), "cookie_a", &[&a1]));
    let route = |window: u32| {
        format!("[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\nwindow_messages = {window}\n", dc2.peer_addr())
    };
    let dc1 = Gateway::start_with_env("x-1", &format!("{head}{}{erlang}", route(1024)), &env);
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    let connects = || dc2.metric("wandist_link_connects_total", &[("peer", "dc1")]).unwrap_or(0.0);
    let before = connects();

    // Changed: it starts again at once (a new link), still held.
    dc1.rewrite(&format!("{head}{}{erlang}", route(512)));
    dc1.signal("HUP");
    wait_for("the changed route's new link", SOON, || (connects() > before).then_some(()));
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    assert_eq!(dc1.metric("wandist_route_standby", &[("peer", "dc2")]), Some(0.0));
    a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");

    // Removed: the route stops and dc2's members leave.
    dc1.rewrite(&format!("{head}{erlang}"));
    dc1.signal("HUP");
    dc1.wait_metric("wandist_config_reloads_total", &[("result", "applied")], |v| v == 2.0);
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 0.0);
    a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "0");

    // Added again: claimed, held, up, the members back.
    dc1.rewrite(&format!("{head}{}{erlang}", route(1024)));
    dc1.signal("HUP");
    dc1.wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");
    assert!(dc1.find_log("this instance holds the route now").is_some());
}

/// Two instances of dc1 with routes to dc2 and dc3 (one gateway each):
/// the routes spread over the instances (the older holds dc2, the other
/// dc3). When one stops, the other takes its route; when it comes back, it
/// takes its share again, handed over gracefully. Confirmed sends to both
/// peers throughout: 0 failed, 0 lost, 0 duplicated.
#[test]
fn routes_spread_over_the_instances_and_move_without_failing_a_message() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    let mut c1 = pg_node("c1", &t, "cookie_c", &epmd);
    assert_eq!(b1.eval(SINK), "ok");
    assert_eq!(c1.eval(SINK), "ok");
    let certs = Certs::new(&["dc1", "dc2", "dc3"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    // (The peers coordinate too, each with one instance: they take the
    // next dc1 instance as a successor session while the previous one
    // finishes, so no member is ever missing.)
    let peer = |cluster: &str, cookie: &str, node: &Erl| {
        let erlang = erlang_table(&format!("w{cluster}_{t}@127.0.0.1"), cookie, &[node]);
        let body = format!("{}{erlang}coordinate = true\n", accepting(cluster, &certs, "dc1"));
        Gateway::start_with_env(cluster, &body, &env)
    };
    let (dc2, dc3) = (peer("dc2", "cookie_b", &b1), peer("dc3", "cookie_c", &c1));
    let a1_name = a1.name.clone();
    let config = |name: &str| {
        let erlang =
            format!("[erlang]\nnode = \"{}\"\ncookie = \"cookie_a\"\nnodes = [\"{a1_name}\"]\n", node_name(&t, name));
        format!(
            "[gateway]\ncluster = \"dc1\"\nname = \"{name}\"\n{FAST}handshake_timeout_ms = 1000\n\n{}\
             [[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n[[route]]\ncluster = \"dc3\"\nendpoints = [\"{}\"]\n{erlang}coordinate = true\n",
            certs.tls_table("dc1"),
            dc2.peer_addr(),
            dc3.peer_addr(),
        )
    };
    let start = |name: &str| Gateway::start_with_env(name, &config(name), &env);
    let mut dc1 = vec![start("x-1")];
    dc1[0].wait_metric("wandist_route_up", &[("peer", "dc2")], |v| v == 1.0);
    dc1[0].wait_metric("wandist_route_up", &[("peer", "dc3")], |v| v == 1.0);
    dc1.push(start("x-2"));
    // The routes spread: x-1 (the older) keeps dc2, x-2 takes dc3.
    let holds = |g: &Gateway, peer: &str| g.metric("wandist_route_up", &[("peer", peer)]) == Some(1.0);
    wait_for("dc3 moved to x-2", SOON, || (holds(&dc1[1], "dc3") && !holds(&dc1[0], "dc3")).then_some(()));
    assert!(holds(&dc1[0], "dc2") && !holds(&dc1[1], "dc2"));
    let via = |node: &mut Erl, group: &str| member_nodes(node, group);
    a1.eval_until("length(pg:get_members(wan, sink)).", |v| v == "2");
    assert_eq!(via(&mut b1, "back"), "[]");
    let on = |name: &str| format!("'{}'", node_name(&t, name));
    assert!(a1.eval("[node(P) || P <- pg:get_members(wan, sink)].").contains(&on("x-2")));
    // (a1 has a sink of each peer's: dc2's through x-1, dc3's through x-2.)
    assert_eq!(b1.eval("pg:join(wan, tob, whereis(sink))."), "ok");
    assert_eq!(c1.eval("pg:join(wan, toc, whereis(sink))."), "ok");
    a1.eval_until("{length(pg:get_members(wan, tob)), length(pg:get_members(wan, toc))}.", |v| v == "{1,1}");
    assert_eq!(a1.eval(&start_stream_as("s2", "tob")), "ok");
    assert_eq!(a1.eval(&start_stream_as("s3", "toc")), "ok");
    let sent = |g: &Gateway, peer: &str| g.metric("wandist_messages_delivered_total", &[("peer", peer)]).unwrap_or(0.0);
    let traffic = |g: &Gateway, peer: &str| {
        let from = sent(g, peer);
        g.wait_metric("wandist_messages_delivered_total", &[("peer", peer)], |v| v >= from + 200.0);
    };
    traffic(&dc1[0], "dc2");
    traffic(&dc1[1], "dc3");
    let share = (sent(&dc1[0], "dc2") + sent(&dc1[0], "dc3"), sent(&dc1[1], "dc2") + sent(&dc1[1], "dc3"));

    // x-2 stops: x-1 takes dc3.
    dc1[1].signal("TERM");
    assert!(dc1[1].wait_exit(SOON).is_some_and(|s| s.success()));
    let mut forced = dc1[1].logs().iter().filter(|l| l.contains(FORCED)).count();
    wait_for("x-1 holding dc3", SOON, || holds(&dc1[0], "dc3").then_some(()));
    traffic(&dc1[0], "dc3");
    // x-2 comes back, the newest: it takes dc3 again, handed over by x-1.
    dc1[1] = start("x-2");
    wait_for("dc3 back on x-2", SOON, || (holds(&dc1[1], "dc3") && !holds(&dc1[0], "dc3")).then_some(()));
    traffic(&dc1[1], "dc3");
    traffic(&dc1[0], "dc2");
    let mut figures = Vec::new();
    forced += dc1.iter().map(|g| g.logs().iter().filter(|l| l.contains(FORCED)).count()).sum::<usize>();
    for (name, sink) in [("s2", &mut b1), ("s3", &mut c1)] {
        let (d, f, [g, u, m]) = stop_stream_as(&mut a1, name);
        all_received_once(sink, &d);
        assert_eq!((f.len(), g, u), (0, 0, 0), "{name}: (failed, DOWN before an answer, unanswered)");
        // (As in `both_streams_clean`.)
        assert!(m <= MISSING_AT_MOST || forced > 0, "{name}: {m} lookups found no member, with no forced hand-over");
        figures.push(format!("{} delivered, {m} lookups found no member", d.len()));
    }
    println!(
        "two dc1 instances, routes to dc2 and dc3: one each (messages before the moves: x-1 {}, x-2 {}); x-2 stopped and \
         came back, dc3 moved twice; to dc2: {}; to dc3: {}; 0 failed, 0 lost, 0 duplicated; {forced} hand-overs forced",
        share.0, share.1, figures[0], figures[1]
    );
}

/// The node that orders the claims (the least name: a1) goes away: the
/// instances ask the next one (a2) and still agree on one holder; the
/// remote member is listed once on a2 and reachable through the holder.
#[test]
fn when_the_coordinating_node_goes_the_instances_agree_through_the_next() {
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut a2 = pg_node("a2", &t, "cookie_a", &epmd);
    assert_eq!(a2.eval(&format!("net_kernel:connect_node('{}').", a1.name)), "true");
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    assert_eq!(b1.eval(SINK), "ok");
    assert_eq!(a2.eval(&SINK.replace("pg:join(wan, sink, Sink)", "pg:join(wan, back, Sink)")), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let env = [("ERL_EPMD_PORT", epmd.port.to_string())];
    let dc2 = dc2_gateway(&certs, &t, &b1, &epmd);
    let nodes = format!("\"{}\", \"{}\"", a1.name, a2.name);
    let config = |name: &str| {
        format!(
            "[gateway]\ncluster = \"dc1\"\nname = \"{name}\"\n{FAST}handshake_timeout_ms = 1000\n\n{}[[route]]\ncluster = \"dc2\"\nendpoints = [\"{}\"]\n\
             [erlang]\nnode = \"{}\"\ncookie = \"cookie_a\"\nnodes = [{nodes}]\ncoordinate = true\n",
            certs.tls_table("dc1"),
            dc2.peer_addr(),
            node_name(&t, name)
        )
    };
    let dc1: Vec<Gateway> = DC1_NAMES.iter().map(|n| Gateway::start_with_env(n, &config(n), &env)).collect();
    for g in &dc1 {
        g.wait_log(&format!("claims on routes are ordered by this node's pg scope node={}", a1.name), SOON);
    }
    let h = wait_for("one holder", SOON * 2, || holder_of(&dc1, "dc2"));
    a2.eval_until("length(pg:get_members(wan, sink)).", |v| v == "1");

    // a1 goes: both instances turn to a2, and one of them holds the route.
    a1.kill();
    for g in &dc1 {
        g.wait_log(&format!("claims on routes are ordered by this node's pg scope node={}", a2.name), SOON);
    }
    // (a2 may order the claims otherwise than a1 did: the route may move
    // once, handed over. Wait for one holder that stays.)
    let h2 = wait_for("one holder that stays after a1 went", SOON * 2, || {
        let h = holder_of(&dc1, "dc2")?;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if holder_of(&dc1, "dc2") != Some(h) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(h)
    });
    let want = format!("['{}']", node_name(&t, DC1_NAMES[h2]));
    a2.eval_until("[node(P) || P <- pg:get_members(wan, sink)].", |v| v == want);
    b1.eval_until("length(pg:get_members(wan, back)).", |v| v == "1");
    // Steady: one holder, one member, for a moment.
    for _ in 0..10 {
        assert_eq!(holder_of(&dc1, "dc2"), Some(h2));
        assert_eq!(a2.eval("length(pg:get_members(wan, sink))."), "1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (d, f) = confirmed_stream(&mut a2, &node_name(&t, DC1_NAMES[h2]), "sink", 1, 1000);
    assert_eq!((d.len(), f.len()), (1000, 0));
    all_received_once(&mut b1, &d);
    println!(
        "coordinating node gone: holder {} before, {} after; 1,000 confirmed messages through it",
        DC1_NAMES[h], DC1_NAMES[h2]
    );
}
