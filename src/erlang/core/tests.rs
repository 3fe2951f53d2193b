//! The Erlang side's decisions without nodes or sockets: what a peer may
//! reach, what it may make us hold, what crosses and how.

use std::sync::atomic::AtomicUsize;

use proptest::prelude::*;

use super::*;
use crate::local::Finished;
use crate::route::{Epoch, Seq, Token};

const A1: &str = "a1@h";
const ME: &str = "gw@h";
const EPOCH: Epoch = Epoch(77);

struct World {
    core: Core,
    metrics: Metrics,
    a1: Arc<str>,
    finished: Arc<Finished>,
    counter: Arc<AtomicUsize>,
    next_delivery: u64,
    /// Effects other than node packets, kept for `relays_to`.
    other: Vec<Effect>,
}

fn limits() -> Limits {
    Limits { proxies: 50, handles: 50, monitors: 3, atoms: 20, ..Limits::DEFAULT }
}

fn local(id: u32) -> Pid {
    Pid { node: A1.into(), id, serial: 0, creation: 1 }
}

fn world() -> World {
    world_with(limits())
}

fn world_with(l: Limits) -> World {
    world_of(l, None)
}

fn world_of(l: Limits, claims: Option<(Vec<Arc<str>>, std::time::Duration)>) -> World {
    let metrics = Metrics::new();
    let peers =
        ["dc2", "dc3"].iter().map(|n| PeerSetup { name: (*n).into(), export: Filter::all(), limits: l }).collect();
    let setup = Setup {
        me: ME.into(),
        creation: 9,
        scopes: vec!["wan".into(), "pg".into()],
        nodes: vec![A1.into()],
        peers,
        claims,
    };
    let mut core = Core::new(setup, metrics.clone());
    let a1: Arc<str> = A1.into();
    core.node_up(&a1);
    for p in 0..2 {
        core.from_route(p, ToLocal::Up { peer: core.peer_name(p).clone(), epoch: EPOCH });
    }
    core.take_effects();
    let finished = Arc::new(Finished::default());
    finished.reset(EPOCH);
    World { core, metrics, a1, finished, counter: Arc::default(), next_delivery: 1, other: Vec::new() }
}

/// A message payload: `{msg, Term}`.
fn msg(t: Term) -> Vec<u8> {
    etf::encode(&Term::tuple(vec![Term::atom("msg"), t]))
}

impl World {
    /// Applies `p`'s queued membership changes (what the shell does a step
    /// per round).
    fn settle(&mut self, p: PeerIx) {
        for _ in 0..1000 {
            if !self.core.busy(p) {
                return;
            }
            self.core.work(p);
        }
        panic!("membership changes never settled");
    }

    /// a1's pg scope makes itself known (`discover`): joins go to it.
    fn scope_on_a1(&mut self) {
        let scope = Pid { node: A1.into(), id: 50, serial: 0, creation: 1 };
        let discover = Term::tuple(vec![Term::atom("discover"), Term::Pid(scope)]);
        self.core.on_scope_message(&self.a1.clone(), 0, &etf::encode(&discover));
        self.core.take_effects();
    }

    fn rejected(&self, peer: &str, reason: &str) -> f64 {
        crate::test_support::metric(&self.metrics.render(), m::ERLANG_REJECTED, &[("peer", peer), ("reason", reason)])
            .unwrap_or(0.0)
    }

    /// Peer `p`'s member with handle `h` joins group `g` (its proxy, pinned).
    fn peer_member(&mut self, p: PeerIx, g: &str, h: u64) -> Pid {
        let change = Change::Join { group: g.into(), members: vec![Handle(h)] };
        self.core.from_route(p, ToLocal::Members { peer: self.core.peer_name(p).clone(), change });
        self.settle(p);
        self.core.take_effects();
        let key = self.core.proxies.find(p, Handle(h), Kind::Pid).unwrap();
        self.core.proxies.pid(key)
    }

    /// `from` (on a1) sends `payload` to `proxy`; returns what goes to
    /// the peer: (peer, relay, body).
    fn send(&mut self, from: &Pid, proxy: &Pid, payload: &[u8]) -> Option<(PeerIx, Relay, Vec<u8>)> {
        let control = Control::SendSender { from: from.clone(), to: proxy.clone() }.term();
        self.core.node_control(&self.a1.clone(), control, Some(Bytes::copy_from_slice(payload)));
        self.core.take_effects().into_iter().find_map(|e| match e {
            Effect::Peer { peer, payload, .. } => {
                let (r, used) = codec::from_prefix::<Relay>(&payload).unwrap();
                Some((peer, r, payload[used..].to_vec()))
            }
            _ => None,
        })
    }

    /// Peer `p` relays `relay` + `body`; returns the packets for nodes and
    /// whether the message was reported undeliverable.
    fn relay(&mut self, p: PeerIx, relay: Relay, body: &[u8]) -> (Vec<(Arc<str>, Bytes)>, bool) {
        let mut payload = Vec::new();
        codec::encode_value(&relay, &mut payload).unwrap();
        payload.extend_from_slice(body);
        let n = self.next_delivery;
        self.next_delivery += 1;
        let held = Held::take(&self.counter, payload.len(), &self.finished, EPOCH, Seq(n));
        self.core
            .from_route(p, ToLocal::Deliver { peer: self.core.peer_name(p).clone(), payload: payload.into(), held });
        let mut packets = Vec::new();
        for e in self.core.take_effects() {
            match e {
                Effect::Node { node, packet, .. } => packets.push((node, packet)),
                other => self.other.push(other),
            }
        }
        let undeliverable = self.finished.take_undeliverable(EPOCH).contains(&Seq(n));
        (packets, undeliverable)
    }

    fn relays_to(&mut self) -> Vec<(PeerIx, Relay, Vec<u8>)> {
        let mut effects = std::mem::take(&mut self.other);
        effects.extend(self.core.take_effects());
        effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Peer { peer, payload, .. } => {
                    let (r, used) = codec::from_prefix::<Relay>(&payload).unwrap();
                    Some((peer, r, payload[used..].to_vec()))
                }
                _ => None,
            })
            .collect()
    }
}

/// The control term and payload of a distribution packet.
fn open(packet: &[u8]) -> (Control, Term) {
    let (control, used) = etf::decode(&packet[5..]).unwrap();
    let (payload, _) = etf::decode(&packet[5 + used..]).unwrap();
    (Control::parse(&control).unwrap(), payload)
}

fn body(t: &[(u8, u64)]) -> Vec<u8> {
    let mut v = vec![etf::VERSION, 104, t.len() as u8];
    for &(tag, h) in t {
        etf::put_handle(&mut v, tag, h);
    }
    v
}

#[test]
fn a_sender_gets_a_handle_and_only_that_handle_reaches_it() {
    let mut w = world();
    let proxy = w.peer_member(0, "echo", 7);
    let p = local(100);
    let (peer, relay, _) = w.send(&p, &proxy, &msg(Term::atom("hi"))).unwrap();
    assert_eq!(peer, 0);
    let Relay::Send { to: Handle(7), from: Some(h) } = relay else { panic!("{relay:?}") };
    // The peer answers through the handle it was given: delivered to p,
    // from a proxy of the peer's sender.
    let (packets, undeliverable) = w.relay(0, Relay::Send { to: h, from: Some(Handle(9)) }, &msg(Term::atom("re")));
    assert!(!undeliverable);
    assert_eq!(packets.len(), 1);
    let (node, packet) = &packets[0];
    assert_eq!(&**node, A1);
    let (control, payload) = open(packet);
    let Control::SendSender { from, to } = control else { panic!() };
    assert_eq!(to, p);
    assert_eq!(from.node, ME, "the sender is a proxy");
    assert_eq!(payload, Term::tuple(vec![Term::atom("msg"), Term::atom("re")]));
    // The same handle means nothing from another peer.
    let (packets, undeliverable) = w.relay(1, Relay::Send { to: h, from: None }, &msg(Term::atom("x")));
    assert!(packets.is_empty() && undeliverable);
    assert_eq!(w.rejected("dc3", "forged"), 1.0);
}

/// What was found: a peer that knew node names and creations could reach
/// `rex` (`<0.53.0>`) or `init` (`<0.0.0>`) by writing the pid. Now there
/// is nothing to write a pid with: every handle not issued to the peer is
/// refused, counted, and reported back undeliverable.
#[test]
fn forged_destinations_never_reach_a_node() {
    let mut w = world();
    let proxy = w.peer_member(0, "echo", 7);
    w.send(&local(100), &proxy, &msg(Term::atom("hi"))).unwrap();
    let cast = etf::encode(&Term::tuple(vec![
        Term::atom("$gen_cast"),
        Term::tuple(vec![Term::atom("cast"), Term::atom("os"), Term::atom("cmd")]),
    ]));
    for to in [0, 2, 3, 53, 1000, u64::MAX] {
        let (packets, undeliverable) = w.relay(0, Relay::Send { to: Handle(to), from: None }, &cast);
        assert!(packets.is_empty(), "handle {to} reached a node");
        assert!(undeliverable);
        let (packets, _) = w.relay(0, Relay::AliasSend { to: Handle(to), from: None }, &cast);
        assert!(packets.is_empty());
    }
    assert_eq!(w.rejected("dc2", "forged"), 12.0);
    // A pid written out in a payload, going "home": forged too.
    let rex = etf::encode(&Term::tuple(vec![Term::atom("x"), Term::Pid(local(53))]));
    let (packets, undeliverable) = w.relay(0, Relay::Send { to: Handle(1), from: None }, &rex);
    assert!(packets.is_empty() && undeliverable);
    assert_eq!(w.rejected("dc2", "forged"), 13.0);
    // A home handle inside a payload that was never issued.
    let (packets, _) = w.relay(0, Relay::Send { to: Handle(1), from: None }, &body(&[(etf::HOME_PID, 40)]));
    assert!(packets.is_empty());
    // A handle of a pid used as an alias (or the other way): forged.
    let (packets, _) = w.relay(0, Relay::AliasSend { to: Handle(1), from: None }, &msg(Term::Nil));
    assert!(packets.is_empty());
    assert_eq!(w.rejected("dc2", "forged"), 15.0);
    assert_eq!(w.rejected("dc3", "forged"), 0.0, "counted against the peer that did it");
}

#[test]
fn a_call_across_clusters_replies_through_the_alias_it_was_given() {
    let mut w = world();
    let server = w.peer_member(0, "echo", 7);
    let caller = local(100);
    let alias = Ref { node: A1.into(), creation: 1, ids: vec![5, 6, 7] };
    // {'$gen_call', {Caller, [alias | Alias]}, ping}
    let call = etf::encode(&Term::tuple(vec![
        Term::atom("$gen_call"),
        Term::tuple(vec![
            Term::Pid(caller.clone()),
            Term::List(vec![Term::atom("alias")], Box::new(Term::Ref(alias.clone()))),
        ]),
        Term::atom("ping"),
    ]));
    let (_, relay, body) = w.send(&caller, &server, &call).unwrap();
    let Relay::Send { to: Handle(7), from: Some(from) } = relay else { panic!() };
    // The payload names the caller and the alias by handles only.
    let handles: Vec<(u8, u64)> = body
        .windows(9)
        .filter(|b| b[0] == etf::PEER_PID || b[0] == etf::PEER_REF)
        .map(|b| (b[0], u64::from_be_bytes(b[1..9].try_into().unwrap())))
        .collect();
    assert!(handles.contains(&(etf::PEER_PID, from.0)), "{handles:?}");
    let alias_handle = handles.iter().find(|(t, _)| *t == etf::PEER_REF).unwrap().1;
    assert!(!body.windows(A1.len()).any(|b| b == A1.as_bytes()), "no node name crosses");
    // The reply to the alias reaches the caller's node as ALIAS_SEND.
    let (packets, undeliverable) =
        w.relay(0, Relay::AliasSend { to: Handle(alias_handle), from: Some(Handle(7)) }, &msg(Term::atom("pong")));
    assert!(!undeliverable);
    let (control, _) = open(&packets[0].1);
    assert!(matches!(control, Control::AliasSend { alias: a, .. } if a == alias));
}

#[test]
fn monitors_down_and_demonitor_go_only_through_handles() {
    let mut w = world();
    let proxy = w.peer_member(0, "echo", 7);
    let p = local(100);
    let (_, relay, _) = w.send(&p, &proxy, &msg(Term::atom("hi"))).unwrap();
    let Relay::Send { from: Some(h), .. } = relay else { panic!() };
    // A monitor on a forged target: noproc back, counted, nothing asked of a node.
    let (packets, _) = w.relay(0, Relay::Monitor { target: Handle(999) }, &[]);
    assert!(packets.is_empty());
    let back = w.relays_to();
    assert!(matches!(&back[..], [(0, Relay::Down { target: Handle(999) }, _)]), "{back:?}");
    assert_eq!(w.rejected("dc2", "forged"), 1.0);
    // On the process it was given: a monitor on the node, once.
    let (packets, _) = w.relay(0, Relay::Monitor { target: h }, &[]);
    assert!(matches!(open_control(&packets[0].1), Control::MonitorP { target: Target::Pid(t), .. } if t == p));
    let (again, _) = w.relay(0, Relay::Monitor { target: h }, &[]);
    assert!(again.is_empty(), "one monitor per process and peer");
    // Demonitor by the same handle; a forged one does nothing.
    let (none, _) = w.relay(0, Relay::Demonitor { target: Handle(12345) }, &[]);
    assert!(none.is_empty());
    let (packets, _) = w.relay(0, Relay::Demonitor { target: h }, &[]);
    assert!(matches!(open_control(&packets[0].1), Control::DemonitorP { .. }));
    // A Down for a process nobody here watches mints nothing.
    let before = w.core.proxies();
    for t in 1000..1100 {
        w.relay(0, Relay::Down { target: Handle(t) }, &etf::encode(&Term::atom("bye")));
    }
    assert_eq!(w.core.proxies(), before);
    // The monitor quota (3 here): the fourth is refused with system_limit.
    for id in 200..204 {
        let (_, r, _) = w.send(&local(id), &proxy, &msg(Term::Nil)).unwrap();
        let Relay::Send { from: Some(h), .. } = r else { panic!() };
        w.relay(0, Relay::Monitor { target: h }, &[]);
    }
    assert_eq!(w.core.usage(0).2, 3);
    assert_eq!(w.rejected("dc2", "monitor_quota"), 1.0);
}

fn open_control(packet: &[u8]) -> Control {
    let (control, _) = etf::decode(&packet[5..]).unwrap();
    Control::parse(&control).unwrap()
}

#[test]
fn each_peer_has_its_own_atom_budget() {
    let mut w = world();
    let proxy = w.peer_member(0, "echo", 7);
    let (_, relay, _) = w.send(&local(100), &proxy, &msg(Term::atom("hi"))).unwrap();
    let Relay::Send { from: Some(h), .. } = relay else { panic!() };
    let atoms = |from: usize, n: usize| {
        etf::encode(&Term::list((from..from + n).map(|i| Term::atom(&format!("atom{i}"))).collect()))
    };
    // 20 distinct atoms allowed; the group name "echo" took one.
    let (packets, _) = w.relay(0, Relay::Send { to: h, from: None }, &atoms(0, 19));
    assert_eq!(packets.len(), 1);
    let (packets, undeliverable) = w.relay(0, Relay::Send { to: h, from: None }, &atoms(100, 1));
    assert!(packets.is_empty() && undeliverable);
    assert_eq!(w.rejected("dc2", "atom_budget"), 1.0);
    // Known atoms still pass; the other peer's budget is its own.
    let (packets, _) = w.relay(0, Relay::Send { to: h, from: None }, &atoms(0, 19));
    assert_eq!(packets.len(), 1);
    // Group names count too: past the budget, the group is not imported.
    let change = Change::Join { group: "brand_new_group".into(), members: vec![Handle(8)] };
    w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change });
    w.settle(0);
    assert!(w.core.proxies.find(0, Handle(8), Kind::Pid).is_none());
    assert_eq!(w.rejected("dc2", "atom_budget"), 2.0);
}

#[test]
fn one_peer_flooding_proxies_evicts_only_its_own() {
    let mut w = world();
    // dc3 holds a reply alias; dc2 floods identities.
    let proxy3 = w.peer_member(1, "svc", 1);
    let (_, relay, _) = w.send(&local(100), &proxy3, &msg(Term::Nil)).unwrap();
    let Relay::Send { from: Some(h3), .. } = relay else { panic!() };
    w.relay(1, Relay::Send { to: h3, from: None }, &body(&[(etf::PEER_REF, 42)]));
    let alias3 = w.core.proxies.find(1, Handle(42), Kind::Ref).unwrap();
    let proxy2 = w.peer_member(0, "echo", 7);
    let (_, relay, _) = w.send(&local(101), &proxy2, &msg(Term::Nil)).unwrap();
    let Relay::Send { from: Some(h2), .. } = relay else { panic!() };
    for n in 0..1000 {
        let (packets, _) = w.relay(0, Relay::Send { to: h2, from: Some(Handle(10_000 + n)) }, &msg(Term::Nil));
        assert_eq!(packets.len(), 1, "each message still goes, its sender's proxy within the quota");
    }
    assert_eq!(w.core.usage(0).0, 50);
    assert!(w.core.proxies.home(alias3).is_some(), "dc3's alias survives dc2's flood");
    assert!(w.core.proxies.find(0, Handle(7), Kind::Pid).is_some(), "dc2's member is pinned");
}

/// Joins to one group, one after another, reach a scope in one message
/// (once the batch reaches PIDS_PER_MESSAGE, or the joins end); anything
/// else to the groups goes after the joins before it, in order; the mirror
/// counts each member once.
#[test]
fn joins_are_batched_into_fewer_larger_messages_in_order() {
    let mut w = world_with(Limits { proxies: 400_000, ..limits() });
    w.scope_on_a1();
    let queue = |w: &mut World, group: &str, join: bool, from: u64, n: u64| {
        let members: Vec<Handle> = (from..from + n).map(Handle).collect();
        let change = if join {
            Change::Join { group: group.into(), members }
        } else {
            Change::Leave { group: group.into(), members }
        };
        w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change });
    };
    // 300,000 to g in adverts of 30,000, then 10 to h, then 5 leave g.
    for i in 0..10 {
        queue(&mut w, "g", true, 1 + i * 30_000, 30_000);
    }
    queue(&mut w, "h", true, 500_000, 10);
    queue(&mut w, "g", false, 1, 5);
    let mut told = Vec::new();
    while w.core.busy(0) {
        w.core.work(0);
        for e in w.core.take_effects() {
            let Effect::Node { packet, .. } = e else { continue };
            // {join, Gw, Group, Pids} and {leave, Gw, Pids, [Group]}.
            let t = open(&packet).1.as_tuple().unwrap().to_vec();
            let (group, pids) = if t[0] == Term::atom("join") { (&t[2], &t[3]) } else { (&t[3], &t[2]) };
            let group = match group {
                Term::List(l, _) => l[0].clone(),
                g => g.clone(),
            };
            let Term::List(pids, _) = pids else { panic!("{pids:?}") };
            told.push((t[0].clone(), group, pids.len()));
        }
    }
    let (join, leave) = (Term::atom("join"), Term::atom("leave"));
    assert_eq!(
        told,
        vec![
            // Told once a step takes the batch to PIDS_PER_MESSAGE or past.
            (join.clone(), Term::atom("g"), 270_000),
            (join.clone(), Term::atom("g"), 30_000),
            (join, Term::atom("h"), 10),
            (leave, Term::atom("g"), 5),
        ]
    );
    assert_eq!(w.core.mirrors[0].joined_count(), 300_000 + 10 - 5);
}

#[test]
fn group_membership_is_applied_in_steps_and_leaves_are_cheap() {
    let mut w = world_with(Limits { proxies: 200_000, ..limits() });
    // A scope on a1, so joins are sent to it.
    w.scope_on_a1();
    // A small change: a join message per step.
    let small: Vec<Handle> = (1..=1000).map(Handle).collect();
    let change = Change::Join { group: "small".into(), members: small };
    w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change });
    assert!(w.core.take_effects().is_empty(), "queued, applied by work");
    w.settle(0);
    let effects = w.core.take_effects();
    assert_eq!(effects.len(), 1);
    let Effect::Node { packet, .. } = &effects[0] else { panic!() };
    assert_eq!(open(packet).1.as_tuple().unwrap()[0], Term::atom("join"));
    // A large one: applied in steps, told in join messages of up to
    // PIDS_PER_MESSAGE.
    let members: Vec<Handle> = (1..=100_000).map(Handle).collect();
    let change = Change::Join { group: "big".into(), members: members.clone() };
    w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change });
    let mut steps = 0;
    let mut joins = w.core.take_effects().len();
    while w.core.busy(0) {
        w.core.work(0);
        joins += w.core.take_effects().len();
        steps += 1;
    }
    assert_eq!(steps, 100_000usize.div_ceil(MEMBERS_PER_STEP));
    assert_eq!(joins, 100_000usize.div_ceil(mirror::PIDS_PER_MESSAGE), "joins batched across steps");
    assert_eq!(w.core.sync_debt(), 0);
    assert_eq!(w.core.mirrors[0].joined_count(), 101_000);
    // Leaving, the same: told to no scope until one sync says where it ended.
    let change = Change::Leave { group: "big".into(), members };
    w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change });
    while w.core.busy(0) {
        w.core.work(0);
    }
    assert!(w.core.take_effects().is_empty(), "nothing sent before the sync");
    assert_eq!(w.core.sync_debt(), 100_000);
    w.core.flush_sync();
    let messages = w.core.take_effects();
    assert_eq!(messages.len(), 1, "one sync");
    let Effect::Node { packet, .. } = &messages[0] else { panic!() };
    let Term::Tuple(cast) = open(packet).1 else { panic!() };
    let Term::Tuple(body) = &cast[1] else { panic!() };
    assert_eq!(body[0], Term::atom("sync"));
    let sizes: Vec<usize> =
        body[2].as_list().unwrap().iter().map(|g| g.as_tuple().unwrap()[1].as_list().unwrap().len()).collect();
    assert_eq!(sizes, vec![1000], "every group the gateway still has joined");
    assert_eq!(w.core.sync_debt(), 0);
    assert_eq!(w.core.mirrors[0].joined_count(), 1000);
    assert_eq!(w.core.usage(0).0, 100_000, "unpinned, kept until evicted");
}

#[test]
fn local_members_cross_as_handles_and_groups_holding_pids_stay_home() {
    let mut w = world();
    let scope = Pid { node: A1.into(), id: 50, serial: 0, creation: 1 };
    let room = Term::tuple(vec![Term::atom("room"), Term::Pid(local(5))]);
    let sync = Term::tuple(vec![
        Term::atom("$gen_cast"),
        Term::tuple(vec![
            Term::atom("sync"),
            Term::Pid(scope),
            Term::list(vec![
                Term::tuple(vec![Term::atom("chat"), Term::list(vec![Term::Pid(local(1)), Term::Pid(local(1))])]),
                Term::tuple(vec![room, Term::list(vec![Term::Pid(local(2))])]),
            ]),
        ]),
    ]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&sync));
    let groups: Vec<(PeerIx, LocalGroups)> = w
        .core
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Groups { peer, change } => Some((peer, change)),
            _ => None,
        })
        .collect();
    // Each peer gets "chat" with the member twice, by a handle of its own.
    assert_eq!(groups.len(), 2);
    for (p, change) in &groups {
        let LocalGroups::Join { group, members } = change else { panic!() };
        assert_eq!(group, "chat");
        assert_eq!(members.len(), 2);
        assert_eq!(members[0], members[1]);
        let local_pid = w.core.peers[*p].exports.resolve(members[0], Kind::Pid).unwrap();
        assert_eq!(&local_pid[..], &etf::pid_bytes(&local(1))[..]);
    }
    assert_eq!(w.rejected("local", "group_not_exported"), 1.0);
}

#[test]
fn a_route_added_later_is_told_our_members_and_a_removed_one_is_forgotten() {
    let mut w = world();
    let scope = Pid { node: A1.into(), id: 50, serial: 0, creation: 1 };
    let sync = Term::tuple(vec![
        Term::atom("$gen_cast"),
        Term::tuple(vec![
            Term::atom("sync"),
            Term::Pid(scope),
            Term::list(vec![Term::tuple(vec![Term::atom("chat"), Term::list(vec![Term::Pid(local(1))])])]),
        ]),
    ]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&sync));
    w.core.take_effects();

    // A route added by a reload gets what we have, by handles of its own.
    let p = w.core.add_peer(PeerSetup { name: "dc4".into(), export: Filter::all(), limits: limits() });
    assert_eq!(p, 2);
    let told: Vec<LocalGroups> = w
        .core
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Groups { peer, change } if peer == p => Some(change),
            _ => None,
        })
        .collect();
    let [LocalGroups::Join { group, members }] = &told[..] else { panic!("{told:?}") };
    assert_eq!((group.as_str(), members.len()), ("chat", 1));
    w.core.from_route(p, ToLocal::Up { peer: "dc4".into(), epoch: EPOCH });
    let proxy = w.peer_member(p, "echo", 7);
    let watcher = local(100);
    assert!(w.send(&watcher, &proxy, &msg(Term::Nil)).is_some());

    // Removed: its proxy is out of its group and resolves no more, nothing
    // is taken from it, nothing more is exported to it.
    w.core.remove_peer(p);
    w.settle(p);
    assert!(w.core.accepts(p), "a removed route's last outcomes are still taken");
    assert!(w.core.mirrors[0].joined().all(|(g, _)| g != "echo"), "the removed peer's member is still in its group");
    assert!(w.send(&watcher, &proxy, &msg(Term::Nil)).is_none());
    // A member joins: the others are told, the removed route is not.
    let sync2 = Term::tuple(vec![
        Term::atom("$gen_cast"),
        Term::tuple(vec![
            Term::atom("sync"),
            Term::Pid(Pid { node: A1.into(), id: 50, serial: 0, creation: 1 }),
            Term::list(vec![Term::tuple(vec![
                Term::atom("chat"),
                Term::list(vec![Term::Pid(local(1)), Term::Pid(local(3))]),
            ])]),
        ]),
    ]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&sync2));
    let effects = w.core.take_effects();
    assert!(effects.iter().any(|e| matches!(e, Effect::Groups { peer: 0, .. })), "the others are told");
    assert!(effects.iter().all(|e| !matches!(e, Effect::Groups { peer, .. } if *peer == p)));
    // The others carry on.
    let other = w.peer_member(0, "echo", 7);
    assert!(w.send(&watcher, &other, &msg(Term::Nil)).is_some());
}

#[test]
fn a_new_run_of_the_peer_forgets_its_proxies() {
    let mut w = world();
    let old = w.peer_member(0, "echo", 7);
    let p = local(100);
    assert!(w.send(&p, &old, &msg(Term::Nil)).is_some());
    w.core.from_route(0, ToLocal::Lost { peer: "dc2".into() });
    w.core.from_route(0, ToLocal::Up { peer: "dc2".into(), epoch: Epoch(EPOCH.0 + 1) });
    w.core.take_effects();
    // A message to the old run's proxy goes nowhere: its handle 7 may be
    // someone else in the new run.
    assert!(w.send(&p, &old, &msg(Term::Nil)).is_none());
    assert_eq!(w.rejected("local", "unknown_proxy"), 1.0);
}

#[test]
fn confirmed_sends_always_get_one_answer() {
    let mut w = world();
    let proxy = w.peer_member(0, "echo", 7);
    let me = local(100);
    let r = Term::Ref(Ref { node: A1.into(), creation: 1, ids: vec![1] });
    let request = |to: Term, extra: bool| {
        let mut items = vec![Term::atom("send_confirmed"), Term::Pid(me.clone()), r.clone(), to, Term::atom("m")];
        if extra {
            items.push(Term::Nil);
        }
        etf::encode(&Term::tuple(items))
    };
    let answers = |w: &mut World, payload: Vec<u8>| -> Vec<Term> {
        let control = Control::RegSend { from: me.clone(), name: CONFIRM_NAME.into() }.term();
        w.core.node_control(&w.a1.clone(), control, Some(payload.into()));
        w.core
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Node { packet, .. } => Some(open(&packet).1),
                _ => None,
            })
            .collect()
    };
    let reply = |result: Term| Term::tuple(vec![Term::atom("wandist_confirm"), r.clone(), result]);
    assert_eq!(answers(&mut w, request(Term::Pid(me.clone()), false)), vec![reply(failed("unknown_proxy"))]);
    assert_eq!(answers(&mut w, request(Term::atom("not_a_pid"), false)), vec![reply(failed("bad_request"))]);
    assert_eq!(answers(&mut w, request(Term::Pid(proxy.clone()), true)), vec![reply(failed("bad_request"))]);
    assert!(answers(&mut w, request(Term::Pid(proxy), false)).is_empty(), "sent: the answer comes with the outcome");
    w.core.from_route(0, ToLocal::Confirm { peer: "dc2".into(), token: Token(1), outcome: Outcome::Delivered });
    let out: Vec<Term> = w
        .core
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Node { packet, .. } => Some(open(&packet).1),
            _ => None,
        })
        .collect();
    assert_eq!(out, vec![reply(Term::atom("delivered"))]);
}

// ---- the property ----

#[derive(Debug, Clone)]
enum Step {
    /// Local process `i` sends to peer `p`'s member (a handle is issued).
    Out {
        p: u8,
        i: u8,
    },
    /// Peer `p` relays to handle `h` (Send or alias), maybe with home
    /// handles inside.
    In {
        p: u8,
        h: u64,
        alias: bool,
        inside: Vec<(bool, u64)>,
    },
    Monitor {
        p: u8,
        h: u64,
    },
    Down {
        p: u8,
        h: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0u8..2, 0u8..8).prop_map(|(p, i)| Step::Out { p, i }),
        4 => (0u8..2, 0u64..40, any::<bool>(), prop::collection::vec((any::<bool>(), 0u64..40), 0..3))
            .prop_map(|(p, h, alias, inside)| Step::In { p, h, alias, inside }),
        1 => (0u8..2, 0u64..40).prop_map(|(p, h)| Step::Monitor { p, h }),
        1 => (0u8..2, 0u64..40).prop_map(|(p, h)| Step::Down { p, h }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No sequence of inbound relays reaches a pid (or reference) that was
    /// never issued to the peer that sent them: every packet the core
    /// writes to a node, on a peer's behalf, is addressed to (and names
    /// only) identities that crossed to that very peer.
    #[test]
    fn no_inbound_relay_reaches_what_was_not_issued_to_its_peer(steps in prop::collection::vec(step(), 1..60)) {
        let mut w = world_with(Limits { proxies: 1000, handles: 1000, monitors: 1000, atoms: 1000, ..Limits::DEFAULT });
        let proxies: Vec<Pid> = (0..2).map(|p| w.peer_member(p, "g", 1)).collect();
        // What crossed to each peer (canonical encodings).
        let mut issued: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for s in steps {
            match s {
                Step::Out { p, i } => {
                    let pid = local(100 + i as u32);
                    let alias = Ref { node: A1.into(), creation: 1, ids: vec![i as u32, 0, 0] };
                    let payload = etf::encode(&Term::tuple(vec![Term::Pid(pid.clone()), Term::Ref(alias.clone())]));
                    if w.send(&pid, &proxies[p as usize], &payload).is_some() {
                        issued[p as usize].push(etf::pid_bytes(&pid));
                        issued[p as usize].push(etf::ref_bytes(&alias));
                    }
                }
                Step::In { p, h, alias, inside } => {
                    let tags: Vec<(u8, u64)> = inside.iter().map(|&(r, h)| (if r { etf::HOME_REF } else { etf::HOME_PID }, h)).collect();
                    let relay = if alias { Relay::AliasSend { to: Handle(h), from: Some(Handle(3)) } } else { Relay::Send { to: Handle(h), from: None } };
                    let (packets, _) = w.relay(p as usize, relay, &body(&tags));
                    for (_, packet) in packets {
                        let (control, payload) = open(&packet);
                        let dest = match control {
                            Control::SendSender { to, .. } => etf::pid_bytes(&to),
                            Control::AliasSend { alias, .. } => etf::ref_bytes(&alias),
                            other => panic!("{other:?}"),
                        };
                        prop_assert!(issued[p as usize].contains(&dest), "delivered to something never given to peer {}", p);
                        for t in payload.as_tuple().unwrap() {
                            let b = match t { Term::Pid(x) if x.node == A1 => etf::pid_bytes(x), Term::Ref(x) if x.node == A1 => etf::ref_bytes(x), _ => continue };
                            prop_assert!(issued[p as usize].contains(&b), "named something never given to peer {}", p);
                        }
                    }
                }
                Step::Monitor { p, h } => {
                    let (packets, _) = w.relay(p as usize, Relay::Monitor { target: Handle(h) }, &[]);
                    for (_, packet) in packets {
                        let Control::MonitorP { target: Target::Pid(t), .. } = open_control(&packet) else { panic!() };
                        prop_assert!(issued[p as usize].contains(&etf::pid_bytes(&t)));
                    }
                }
                Step::Down { p, h } => {
                    let before = w.core.proxies();
                    w.relay(p as usize, Relay::Down { target: Handle(h) }, &etf::encode(&Term::atom("x")));
                    prop_assert_eq!(w.core.proxies(), before, "a Down minted a proxy");
                }
            }
        }
    }
}

/// While a peer's large membership change is applied in steps, its
/// messages go on; a later change waits its turn; `Lost` and `Up` hold back
/// everything after them (they change what the peer's handles mean).
#[test]
fn messages_overtake_membership_changes_but_not_a_new_session() {
    let mut w = world_with(Limits { proxies: 300_000, ..limits() });
    let proxy = w.peer_member(0, "echo", 7);
    let (_, relay, _) = w.send(&local(100), &proxy, &msg(Term::Nil)).unwrap();
    let Relay::Send { from: Some(h), .. } = relay else { panic!() };
    let big = |g: &str| Change::Join { group: g.into(), members: (10..100_010).map(Handle).collect() };
    w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change: big("a") });
    assert!(w.core.busy(0));
    // A message from dc2 is delivered at once, jobs or not.
    let (packets, _) = w.relay(0, Relay::Send { to: h, from: None }, &msg(Term::atom("now")));
    assert_eq!(packets.len(), 1);
    // Another change waits for the first; then a new session of dc2 and a
    // message of it: both held until the changes are applied.
    w.core.from_route(0, ToLocal::Members { peer: "dc2".into(), change: big("b") });
    w.core.from_route(0, ToLocal::Lost { peer: "dc2".into() });
    w.core.from_route(0, ToLocal::Up { peer: "dc2".into(), epoch: Epoch(EPOCH.0 + 1) });
    let (packets, _) = w.relay(0, Relay::Send { to: h, from: Some(Handle(5)) }, &msg(Term::atom("later")));
    assert!(packets.is_empty(), "a message after a new session overtook it");
    assert!(w.core.proxies.find(0, Handle(10), Kind::Pid).is_none(), "nothing applied yet: the shell steps");
    let mut steps = 0;
    let mut delivered = Vec::new();
    while w.core.busy(0) || !w.core.peers[0].deferred.is_empty() {
        w.core.work(0);
        steps += 1;
        for e in w.core.take_effects() {
            if let Effect::Node { packet, .. } = e {
                let (c, payload) = open(&packet);
                if matches!(c, Control::SendSender { .. }) && payload.as_tuple().is_some_and(|t| t.len() == 2) {
                    delivered.push(payload);
                }
            }
        }
        assert!(steps < 100);
    }
    assert_eq!(
        delivered,
        vec![Term::tuple(vec![Term::atom("msg"), Term::atom("later")])],
        "delivered, after the session change"
    );
    assert!(w.core.proxies.find(0, Handle(10), Kind::Pid).is_none(), "the new session forgot the old proxies");
    assert_eq!(w.core.mirrors[0].joined_count(), 0, "and they left every group");
    assert_eq!(w.core.sync_debt(), 200_001, "withdrawn: one sync will say where it ended");
    assert!(w.core.accepts(0));
}

/// The claim steps among effects.
fn claim_steps(effects: Vec<Effect>) -> Vec<claims::Step> {
    effects
        .into_iter()
        .filter_map(|e| match e {
            Effect::Claim(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// The messages to registered names (`RegSend`) among effects: (name, payload).
fn reg_sends(effects: &[Effect]) -> Vec<(String, Term)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Node { packet, .. } => {
                let (control, used) = etf::decode(&packet[5..]).unwrap();
                match Control::parse(&control).unwrap() {
                    Control::RegSend { name, .. } => Some((name, etf::decode(&packet[5 + used..]).unwrap().0)),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect()
}

#[test]
fn claims_join_the_scope_are_ordered_by_it_and_the_oldest_holds() {
    let mut w = world_of(limits(), Some((vec!["dc2".into()], std::time::Duration::from_secs(5))));
    let gw = w.core.gw().clone();
    let group = claims::group_term("dc2");
    // a1's scope makes itself known: our sync carries the claim, and the
    // coordinator (a1, the only scope) is asked for the claim group's order.
    let scope = Pid { node: A1.into(), id: 50, serial: 0, creation: 1 };
    let discover = Term::tuple(vec![Term::atom("discover"), Term::Pid(scope)]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&discover));
    let effects = w.core.take_effects();
    let sync = effects.iter().find_map(|e| match e {
        Effect::Node { packet, bulk: true, .. } => match open(packet) {
            (Control::SendSender { .. }, t) => Some(t),
            _ => None,
        },
        _ => None,
    });
    let claim = Term::tuple(vec![group.clone(), Term::list(vec![Term::Pid(gw.clone())])]);
    assert_eq!(
        sync,
        Some(Term::tuple(vec![
            Term::atom("$gen_cast"),
            Term::tuple(vec![Term::atom("sync"), Term::Pid(gw.clone()), Term::list(vec![claim])])
        ]))
    );
    // Two calls: the claim group's order, and who serves the route.
    let calls = reg_sends(&effects);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let serving_group = claims::serving_term("dc2");
    let mut tags = Vec::new();
    for ((name, call), g) in calls.iter().zip([&group, &serving_group]) {
        assert_eq!(name, "wan");
        let t = call.as_tuple().unwrap();
        assert_eq!(t[0], Term::atom("$gen_call"));
        assert_eq!(t[2], Term::tuple(vec![Term::atom("monitor"), (*g).clone()]));
        tags.push(t[1].as_tuple().unwrap()[1].clone());
    }
    let (tag, serving_tag) = (tags[0].clone(), tags[1].clone());
    assert!(claim_steps(effects).is_empty(), "nothing is held before the scope answers");

    // The scope answers: a sibling's claim is older than ours (pg lists
    // the latest first). We stand by.
    let sibling = Pid { node: "gw2@h".into(), id: 1, serial: 0, creation: 3 };
    let watch = Term::Ref(Ref { node: A1.into(), creation: 1, ids: vec![1, 2, 3] });
    let scope_says = |w: &mut World, t: Term| {
        w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&t));
        w.core.decide_claims();
        claim_steps(w.core.take_effects())
    };
    let reply = Term::tuple(vec![
        tag,
        Term::tuple(vec![watch.clone(), Term::list(vec![Term::Pid(gw.clone()), Term::Pid(sibling.clone())])]),
    ]);
    assert_eq!(scope_says(&mut w, reply), vec![]);
    // The sibling leaves (it stopped): ours is the oldest; this instance holds the route.
    let leave =
        Term::tuple(vec![watch.clone(), Term::atom("leave"), group.clone(), Term::list(vec![Term::Pid(sibling)])]);
    assert_eq!(scope_says(&mut w, leave), vec![claims::Step::Hold("dc2".into())]);
    // A newer claim changes nothing.
    let other = Pid { node: "gw3@h".into(), id: 1, serial: 0, creation: 3 };
    let join = Term::tuple(vec![watch, Term::atom("join"), group.clone(), Term::list(vec![Term::Pid(other.clone())])]);
    assert_eq!(scope_says(&mut w, join), vec![]);
    // Nobody serves dc2 yet; then the route's snapshot is in: we serve it.
    let serving_watch = Term::Ref(Ref { node: A1.into(), creation: 1, ids: vec![4, 5, 6] });
    let reply = Term::tuple(vec![serving_tag, Term::tuple(vec![serving_watch.clone(), Term::Nil])]);
    assert_eq!(scope_says(&mut w, reply), vec![]);
    w.core.from_route(0, ToLocal::Synced { peer: "dc2".into() });
    let joins: Vec<Term> = w
        .core
        .take_effects()
        .iter()
        .filter_map(|e| match e {
            Effect::Node { packet, bulk: true, .. } => Some(open(packet).1),
            _ => None,
        })
        .collect();
    assert_eq!(joins.len(), 1, "{joins:?}");
    assert_eq!(joins[0].as_tuple().unwrap()[0], Term::atom("join"));
    assert_eq!(joins[0].as_tuple().unwrap()[2], serving_group);

    // A local process in a claim group is never exported; a peer's group
    // named like one is refused at import.
    let local_claim = Term::tuple(vec![
        Term::atom("$gen_cast"),
        Term::tuple(vec![
            Term::atom("sync"),
            Term::Pid(Pid { node: A1.into(), id: 50, serial: 0, creation: 1 }),
            Term::list(vec![Term::tuple(vec![group.clone(), Term::list(vec![Term::Pid(local(4))])])]),
        ]),
    ]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&local_claim));
    assert!(!w.core.take_effects().iter().any(|e| matches!(e, Effect::Groups { .. })));
    let name = groups::name_of(&group).unwrap();
    assert!(groups::check(&name).is_err());

    // Stopping: the claim leaves every scope, and the route is released;
    // our members stay until another instance serves the route.
    w.core.leave();
    w.core.decide_claims();
    let effects = w.core.take_effects();
    assert!(!effects.iter().any(|e| matches!(e, Effect::Left(_))), "withdrawn before the next instance serves");
    let leave_sent = effects.iter().any(|e| match e {
        Effect::Node { packet, bulk: true, .. } => {
            matches!(open(packet), (Control::SendSender { .. }, t) if t.as_tuple().is_some_and(|t| t[0] == Term::atom("leave")))
        }
        _ => false,
    });
    assert!(leave_sent, "{effects:?}");
    assert_eq!(claim_steps(effects), vec![claims::Step::Release("dc2".into())]);
    // gw3 serves it now: our members are withdrawn (an empty sync to the scope).
    let serves =
        Term::tuple(vec![serving_watch, Term::atom("join"), serving_group, Term::list(vec![Term::Pid(other)])]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&serves));
    w.core.decide_claims();
    let effects = w.core.take_effects();
    assert!(effects.iter().any(|e| matches!(e, Effect::Left(None))), "{effects:?}");

    // The scope goes away (its node's connection dropped): no
    // coordinator, and nothing more is held.
    w.core.node_down(&w.a1.clone());
    assert!(w.core.claims.as_ref().unwrap().coordinator().is_none());
}

#[test]
fn a_scope_that_ends_on_the_claims_call_is_not_asked_again() {
    let mut w = world_of(limits(), Some((vec!["dc2".into()], std::time::Duration::from_secs(5))));
    let scope = Pid { node: A1.into(), id: 50, serial: 0, creation: 1 };
    let discover = Term::tuple(vec![Term::atom("discover"), Term::Pid(scope.clone())]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&discover));
    let effects = w.core.take_effects();
    assert_eq!(reg_sends(&effects).len(), 2, "the monitor calls");
    // Our monitor on the scope, as the core asked for it.
    let mref = effects
        .iter()
        .find_map(|e| match e {
            Effect::Node { packet, .. } => {
                let (control, _) = etf::decode(&packet[5..]).unwrap();
                match Control::parse(&control).unwrap() {
                    Control::MonitorP { mref, target: Target::Pid(p), .. } if p == scope => Some(mref),
                    _ => None,
                }
            }
            _ => None,
        })
        .expect("a monitor on the scope");
    // The scope ends before it answers (an OTP 25.0 scope would, on the call).
    let exit = Control::MonitorPExit {
        target: Target::Pid(scope.clone()),
        watcher: w.core.gw().clone(),
        mref,
        reason: Term::atom("badarg"),
    };
    w.core.node_control(&w.a1.clone(), exit.term(), None);
    w.core.take_effects();
    assert!(w.core.claims.as_ref().unwrap().coordinator().is_none());
    // The scope is back: it is mirrored again, but not asked again.
    let scope2 = Pid { node: A1.into(), id: 51, serial: 0, creation: 1 };
    let discover = Term::tuple(vec![Term::atom("discover"), Term::Pid(scope2)]);
    w.core.on_scope_message(&w.a1.clone(), 0, &etf::encode(&discover));
    let effects = w.core.take_effects();
    assert!(reg_sends(&effects).is_empty(), "asked again: {effects:?}");
    assert!(w.core.claims.as_ref().unwrap().coordinator().is_none());
}

/// `discover = "cluster"`: the gateway asks a connected node's `rex` for
/// `erlang:nodes()`; only the answer to that call counts, names that are
/// not node names (and the gateway's own) are dropped, and at most
/// MAX_CLUSTER_NODES are taken.
#[test]
fn cluster_discovery_takes_only_the_answer_it_asked_for_checked_and_bounded() {
    let mut w = world();
    assert!(w.core.ask_cluster());
    let effects = w.core.take_effects();
    let sends = reg_sends(&effects);
    assert_eq!(sends.len(), 1);
    let (name, call) = &sends[0];
    assert_eq!(name, "rex");
    let t = call.as_tuple().unwrap();
    let tag = t[1].as_tuple().unwrap()[1].clone();
    assert_eq!(
        t[2],
        Term::tuple(vec![
            Term::atom("call"),
            Term::atom("erlang"),
            Term::atom("nodes"),
            Term::Nil,
            Term::Pid(w.core.gw().clone())
        ])
    );
    let answer = |tag: &Term, nodes: Vec<Term>| etf::encode(&Term::tuple(vec![tag.clone(), Term::list(nodes)]));
    let cluster_nodes = |effects: Vec<Effect>| {
        effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::ClusterNodes { from, nodes } => Some((from, nodes)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Another reference of ours (not this call's): not taken.
    let (_, stale) = w.core.own_ref(NODES_CALL);
    w.core.on_scope_message(&w.a1.clone(), 0, &answer(&Term::Ref(stale), vec![Term::atom("x@h")]));
    assert!(cluster_nodes(w.core.take_effects()).is_empty());
    // The answer: bad names and our own dropped.
    let nodes = vec![
        Term::atom("a2@h"),
        Term::atom("not a node"),
        Term::atom(ME),
        Term::Int(7),
        Term::atom("@h"),
        Term::Binary(b"a9@h".to_vec()),
        Term::atom("a3@h"),
    ];
    w.core.on_scope_message(&w.a1.clone(), 0, &answer(&tag, nodes));
    let got = cluster_nodes(w.core.take_effects());
    assert_eq!(got.len(), 1);
    assert_eq!(*got[0].0, *A1);
    assert_eq!(got[0].1.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["a2@h", "a3@h"]);
    // The same answer again: the call is over.
    w.core.on_scope_message(&w.a1.clone(), 0, &answer(&tag, vec![Term::atom("a4@h")]));
    assert!(cluster_nodes(w.core.take_effects()).is_empty());
    // A huge cluster: bounded.
    assert!(w.core.ask_cluster());
    let sends = reg_sends(&w.core.take_effects());
    let tag = sends[0].1.as_tuple().unwrap()[1].as_tuple().unwrap()[1].clone();
    let many: Vec<Term> = (0..MAX_CLUSTER_NODES + 10).map(|i| Term::atom(&format!("n{i}@h"))).collect();
    w.core.on_scope_message(&w.a1.clone(), 0, &answer(&tag, many));
    let got = cluster_nodes(w.core.take_effects());
    assert_eq!(got[0].1.len(), MAX_CLUSTER_NODES);
}

/// Several scopes (the world mirrors `wan`, the primary, and `pg`): a
/// group keeps its scope end to end. Our `pg` scope's groups go out as
/// `pg:name`; a peer's `pg:name` joins the `pg` scope (from the gateway's
/// pg process of that scope, under the bare name), its `wan:name` the
/// primary (named), and a scope not mirrored here is refused.
#[test]
fn groups_keep_their_scope_end_to_end() {
    let mut w = world();
    // The pg scope on a1 (ix 1), found through its discover to our pg process there.
    let pg_scope = Pid { node: A1.into(), id: 60, serial: 0, creation: 1 };
    let discover = Term::tuple(vec![Term::atom("discover"), Term::Pid(pg_scope.clone())]);
    w.core.on_scope_message(&w.a1.clone(), 1, &etf::encode(&discover));
    w.scope_on_a1();
    assert_eq!(w.core.scopes_of(A1), ["wan", "pg"]);
    // The scope monitors our pg process there: never answered noproc
    // (the scope would drop us as its peer).
    let mref = Ref { node: A1.into(), creation: 1, ids: vec![1, 2, 3] };
    let monitor = Control::MonitorP { watcher: pg_scope.clone(), target: Target::Pid(w.core.gws[1].clone()), mref };
    w.core.node_control(&w.a1.clone(), monitor.term(), None);
    assert!(w.core.take_effects().is_empty());
    // A member of chat in a1's pg scope: exported as pg:chat.
    let join = Term::tuple(vec![
        Term::atom("join"),
        Term::Pid(pg_scope.clone()),
        Term::atom("chat"),
        Term::list(vec![Term::Pid(local(1))]),
    ]);
    w.core.on_scope_message(&w.a1.clone(), 1, &etf::encode(&join));
    let exported: Vec<String> = w
        .core
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Groups { change: LocalGroups::Join { group, .. }, .. } => Some(group),
            _ => None,
        })
        .collect();
    assert_eq!(exported, ["pg:chat", "pg:chat"], "one for each peer");

    // A peer's member of pg:room: joined in a1's pg scope, from our pg process there.
    let gw_pg = w.core.gws[1].clone();
    let change = Change::Join { group: "pg:room".into(), members: vec![Handle(7)] };
    w.core.from_route(0, ToLocal::Members { peer: w.core.peer_name(0).clone(), change });
    w.settle(0);
    let sends: Vec<(Pid, Pid, Term)> = w
        .core
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Node { packet, .. } => {
                let (control, used) = etf::decode(&packet[5..]).unwrap();
                match Control::parse(&control).unwrap() {
                    Control::SendSender { from, to } => Some((from, to, etf::decode(&packet[5 + used..]).unwrap().0)),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect();
    assert_eq!(sends.len(), 1, "{sends:?}");
    let (from, to, msg) = &sends[0];
    assert_eq!((from, to), (&gw_pg, &pg_scope));
    let t = msg.as_tuple().unwrap();
    assert_eq!(t[0], Term::atom("join"));
    assert_eq!(t[2], Term::atom("room"));
    assert!(w.core.mirrors[1].joined().any(|(g, _)| g == "pg:room"));
    assert!(w.core.mirrors[0].joined().all(|(g, _)| g != "pg:room" && g != "room"));

    // The primary named by name: the same group as the bare name.
    w.peer_member(0, "wan:lobby", 8);
    assert!(w.core.mirrors[0].joined().any(|(g, _)| g == "lobby"));

    // A scope not mirrored here: refused, counted.
    let change = Change::Join { group: "other:room".into(), members: vec![Handle(9)] };
    w.core.from_route(0, ToLocal::Members { peer: w.core.peer_name(0).clone(), change });
    w.settle(0);
    assert_eq!(w.rejected("dc2", "scope_not_mirrored"), 1.0);
}

/// Rejection labels are what dashboards, alerts and `{failed, Reason}`
/// replies carry: one each, as Prometheus labels and atoms are written.
#[test]
fn every_reject_has_its_own_label() {
    let all = super::Reject::ALL;
    let labels: std::collections::BTreeSet<&str> = all.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), all.len());
    assert!(labels.iter().all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    assert_eq!(super::Reject::Refused("forged").label(), "forged");
}
