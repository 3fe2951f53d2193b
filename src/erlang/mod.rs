//! The local cluster: the gateway as a hidden Erlang node.
//!
//! One task per configured node keeps a distribution connection
//! ([`node`]); this module's [`ErlangSide`] owns everything else: the `pg`
//! scope mirror (discovering every node's scope, tracking its local
//! members, joining proxies for remote members), the proxy table, monitors,
//! confirmations, and the translation of pids and references in messages
//! crossing clusters ([`etf`]).
//!
//! A pid of this cluster crossing to a peer becomes a proxy there; a proxy
//! crossing back becomes the real pid again. Proxies are never advertised:
//! only pids of this cluster's nodes are exported (non-transitive).

pub mod dist;
pub mod etf;
pub mod node;
pub mod proxies;

use std::collections::BTreeMap;

use foldhash::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::dist::*;
use self::etf::{Emit, Found, Pid, Ref, Term};
use self::node::{packet, NodeEvent, NodeParams};
use self::proxies::{Home, Table};
use crate::config::{ErlangConfig, GatewayConfig};
use crate::gateway::{Held, LocalHandle, ToLocal, TrySubmit};
use crate::membership::Change;
use crate::metrics::{self as m, Metrics};
use crate::route::Outcome;
use crate::wire::codec;

/// The registered name (on the gateway's node) for confirmed sends.
pub const CONFIRM_NAME: &str = "wandist";
/// Proxies (pids and references) kept before the oldest unpinned go.
const MAX_PROXIES: usize = 1_000_000;
/// How often pending payloads are retried when nothing else happens.
const PENDING_RETRY: Duration = Duration::from_millis(1);
/// Messages held per peer while its route is full, before senders wait.
const MAX_PENDING: usize = 16_384;
/// Monitors held on local processes for peers, at most.
const MAX_HELD_MONITORS: usize = 1_000_000;
/// Events handled per wake-up before looking at the other inputs again.
const BATCH: usize = 256;
/// Key of the gateway's own pg peer process; proxies start above.
const GW_KEY: u64 = 1;
const FIRST_PROXY: u64 = 1000;

/// What crosses between gateways for the Erlang side. The payload after it
/// (a message or exit reason) is ETF with pids and refs translated.
///
/// The byte fields are `serde_bytes`: the same bytes on the wire as a
/// sequence of u8 (bincode writes a length, then one byte each), but
/// decoded as one slice, not byte by byte (`relay_bytes_are_unchanged_on_the_wire`).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Relay {
    /// To a pid of the receiving cluster (its encoding there).
    Send {
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
        #[serde(with = "serde_bytes")]
        from: Option<Vec<u8>>,
    },
    /// To an alias (a reference of the receiving cluster).
    AliasSend {
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
        #[serde(with = "serde_bytes")]
        from: Option<Vec<u8>>,
    },
    /// Start watching a pid of the receiving cluster for us.
    Monitor {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Demonitor {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A pid of the sending cluster that we watched ended; payload = reason.
    Down {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
}

struct NodeLink {
    tx: Option<node::NodeTx>,
    scope: Option<Pid>,
    /// The node's own members, per group (a pid may appear more than once).
    members: BTreeMap<String, Vec<Pid>>,
}

struct ErlMetrics {
    connected: metrics::Gauge,
    proxies: metrics::Gauge,
    to_peers: metrics::Counter,
    from_peers: metrics::Counter,
    metrics: Metrics,
}

impl ErlMetrics {
    fn reject(&self, reason: &'static str) {
        self.metrics.counter(m::ERLANG_REJECTED, &[("reason", reason)]).increment(1);
    }
}

pub struct ErlangSide {
    me: Arc<str>,
    scope: String,
    creation: u32,
    gw: Pid,
    gateway: LocalHandle,
    nodes: HashMap<Arc<str>, NodeLink>,
    table: Table,
    /// Proxies joined into the local scopes, per group.
    joined: BTreeMap<String, Vec<Pid>>,
    /// Local watchers of proxies: key -> (watcher, monitor ref).
    watched: HashMap<u64, Vec<(Pid, Ref)>>,
    /// Monitors we hold on local pids for peers: our ref -> (peer, target).
    held: HashMap<Ref, (Arc<str>, Pid)>,
    /// The delivered message being relayed: its route may ack it once the
    /// node has the packet carrying it (or it is dropped).
    delivering: Option<Held>,
    /// Monitors we hold on scope processes: our ref -> node.
    scope_monitors: HashMap<Ref, Arc<str>>,
    /// Some connected node's scope may be unknown: rediscovery runs (its
    /// timer is not polled on every turn otherwise).
    undiscovered: bool,
    next_ref: u32,
    confirms: HashMap<u64, (Pid, Term)>,
    next_token: u64,
    /// Relay payloads waiting for a full route, per peer (bounded).
    pending: HashMap<Arc<str>, std::collections::VecDeque<(Bytes, Option<u64>)>>,
    /// Peers whose route is up (told by the routes: `Up` and `Lost`).
    up: HashSet<Arc<str>>,
    m: ErlMetrics,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (s.len() % 2 == 0).then_some(())?;
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A pg group as a route-level group name: atoms by their text, other terms
/// as `~` and the hex of their encoding (round-trips exactly).
pub fn group_name(t: &Term) -> String {
    match t {
        Term::Atom(a) if !a.starts_with('~') => a.clone(),
        other => format!("~{}", hex(&etf::encode(other)[1..])),
    }
}

pub fn group_term(name: &str) -> Term {
    name.strip_prefix('~')
        .and_then(unhex)
        .and_then(|b| {
            let mut v = vec![etf::VERSION];
            v.extend_from_slice(&b);
            etf::decode(&v).ok().map(|(t, _)| t)
        })
        .unwrap_or_else(|| Term::atom(name))
}

/// `a` minus `b`, as multisets (pg counts repeated joins).
fn minus(a: &[Pid], b: &[Pid]) -> Vec<Pid> {
    let mut rest = b.to_vec();
    let mut out = Vec::new();
    for p in a {
        match rest.iter().position(|x| x == p) {
            Some(i) => {
                rest.swap_remove(i);
            }
            None => out.push(p.clone()),
        }
    }
    out
}

fn pids_of(t: &Term) -> Vec<Pid> {
    match t {
        Term::Pid(p) => vec![p.clone()],
        other => other.as_list().unwrap_or_default().iter().filter_map(|x| x.as_pid().cloned()).collect(),
    }
}

/// Starts the Erlang side: one connection task per node and the central task.
pub fn start(
    cfg: &ErlangConfig,
    g: &GatewayConfig,
    gateway: LocalHandle,
    from_gateway: mpsc::Receiver<ToLocal>,
    metrics: Metrics,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    let me: Arc<str> = cfg.node.as_str().into();
    let creation = fastrand::u32(1..);
    let (events_tx, events) = mpsc::channel(4096);
    let params = NodeParams {
        me: me.clone(),
        creation,
        cookie: cfg.cookie.clone(),
        max_packet: g.max_frame_bytes,
        reconnect_min: g.reconnect_min,
        reconnect_max: g.reconnect_max,
    };
    for n in &cfg.nodes {
        tracker.spawn(node::run(n.clone(), params.clone(), events_tx.clone(), cancel.clone()));
    }
    let table = Table::new(me.clone(), creation, FIRST_PROXY, MAX_PROXIES);
    let gw = table.pid(GW_KEY);
    let m = ErlMetrics {
        connected: metrics.gauge(m::ERLANG_NODES_CONNECTED, &[]),
        proxies: metrics.gauge(m::PROXIES, &[]),
        to_peers: metrics.counter(m::ERLANG_MESSAGES, &[("direction", "to_peers")]),
        from_peers: metrics.counter(m::ERLANG_MESSAGES, &[("direction", "from_peers")]),
        metrics,
    };
    m.connected.set(0.0);
    m.proxies.set(0.0);
    let side = ErlangSide {
        me,
        scope: cfg.scope.clone(),
        creation,
        gw,
        gateway,
        nodes: cfg
            .nodes
            .iter()
            .map(|n| (Arc::from(n.name.as_str()), NodeLink { tx: None, scope: None, members: BTreeMap::new() }))
            .collect(),
        table,
        joined: BTreeMap::new(),
        watched: HashMap::default(),
        held: HashMap::default(),
        delivering: None,
        scope_monitors: HashMap::default(),
        undiscovered: true,
        next_ref: 1,
        confirms: HashMap::default(),
        next_token: 1,
        up: Default::default(),
        pending: HashMap::default(),
        m,
    };
    tracker.spawn(side.run(events, from_gateway, cancel));
}

/// Translates what a peer sends into this cluster's terms: its pids and
/// references become proxies (minted on first sight), ours marked as going
/// home become ours again.
struct Inbound<'a> {
    table: &'a mut proxies::Table,
    peer: &'a Arc<str>,
    me: &'a str,
}

impl etf::Translator for Inbound<'_> {
    /// A pid the peer's gateway wrote (always as `etf::pid_bytes` does)
    /// that already has a proxy: found by its bytes, nothing decoded.
    fn known_pid(&mut self, encoded: &[u8], out: &mut Vec<u8>) -> bool {
        match self.table.known(self.peer, encoded) {
            Some(key) => {
                self.table.put_pid(out, key);
                true
            }
            None => false,
        }
    }

    fn found(&mut self, found: Found) -> Result<Emit, String> {
        match found {
            Found::Pid(p) => {
                let key = self.table.key_for(Home { peer: self.peer.clone(), bytes: etf::pid_bytes(&p) });
                Ok(Emit::Pid(self.table.pid(key)))
            }
            Found::Ref(r) => {
                let key = self.table.key_for(Home { peer: self.peer.clone(), bytes: etf::ref_bytes(&r) });
                Ok(Emit::Ref(self.table.reference(key)))
            }
            Found::HomePid(p) if *p.node != *self.me => Ok(Emit::Pid(p)),
            Found::HomeRef(r) if *r.node != *self.me => Ok(Emit::Ref(r)),
            _ => Err("a peer sent one of our own internal identities".into()),
        }
    }
}

/// Who sent a message to a proxy.
enum Sender {
    Pid(Pid),
    /// The encoding of a pid of this cluster on another node than ours, as
    /// the node sent it (`NodeEvent::Send`).
    Encoded(Bytes),
}

impl ErlangSide {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<NodeEvent>,
        mut from_gateway: mpsc::Receiver<ToLocal>,
        cancel: CancellationToken,
    ) {
        tracing::info!(node = %self.me, creation = self.creation, scope = %self.scope, "Erlang side started");
        let mut rediscover = tokio::time::interval(Duration::from_secs(1));
        // Not polled while every scope is known: one tick then, not a burst.
        rediscover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once, not on every turn of the loop.
        let mut cancelled = crate::stop::on_cancel(&cancel);
        loop {
            tokio::select! {
                _ = &mut cancelled => return,
                Some(ev) = events.recv() => {
                    self.on_node_event(ev).await;
                    // Whatever else is ready, without going round the loop.
                    for _ in 0..BATCH {
                        let Ok(ev) = events.try_recv() else { break };
                        self.on_node_event(ev).await;
                    }
                }
                Some(item) = from_gateway.recv() => {
                    self.on_gateway(item).await;
                    for _ in 0..BATCH {
                        let Ok(item) = from_gateway.try_recv() else { break };
                        self.on_gateway(item).await;
                    }
                }
                _ = rediscover.tick(), if self.undiscovered => self.discover_missing().await,
                // (An async block: the timer is made only when something is pending.)
                _ = async { tokio::time::sleep(PENDING_RETRY).await }, if self.has_pending() => {}
            }
            if self.has_pending() {
                self.flush_pending();
            }
            self.m.proxies.set(self.table.len() as f64);
        }
    }

    fn own_ref(&mut self) -> Ref {
        self.next_ref = self.next_ref.wrapping_add(1);
        Ref { node: self.me.to_string(), creation: self.creation, ids: vec![self.next_ref, 0, 0] }
    }

    /// Queues a packet to a node (waits if that node is far behind).
    async fn send(&self, node: &str, control: Term, payload: Option<&[u8]>) -> bool {
        let Some(tx) = self.nodes.get(node).and_then(|n| n.tx.as_ref()) else { return false };
        tx.send(packet(&control, payload)).await
    }

    async fn send_msg(&self, to: &Pid, msg: &Term) -> bool {
        let control = Term::tuple(vec![Term::Int(SEND_SENDER), Term::Pid(self.gw.clone()), Term::Pid(to.clone())]);
        self.send(&to.node, control, Some(&etf::encode(msg))).await
    }

    async fn discover(&self, node: &str) {
        let control =
            Term::tuple(vec![Term::Int(REG_SEND), Term::Pid(self.gw.clone()), Term::atom(""), Term::atom(&self.scope)]);
        let msg = Term::tuple(vec![Term::atom("discover"), Term::Pid(self.gw.clone())]);
        self.send(node, control, Some(&etf::encode(&msg))).await;
    }

    async fn discover_missing(&mut self) {
        let missing: Vec<Arc<str>> =
            self.nodes.iter().filter(|(_, n)| n.tx.is_some() && n.scope.is_none()).map(|(k, _)| k.clone()).collect();
        self.undiscovered = !missing.is_empty();
        for node in missing {
            self.discover(&node).await;
        }
    }

    fn our_sync(&self) -> Term {
        let groups = self
            .joined
            .iter()
            .filter(|(_, pids)| !pids.is_empty())
            .map(|(g, pids)| {
                Term::tuple(vec![group_term(g), Term::list(pids.iter().cloned().map(Term::Pid).collect())])
            })
            .collect();
        Term::tuple(vec![
            Term::atom("$gen_cast"),
            Term::tuple(vec![Term::atom("sync"), Term::Pid(self.gw.clone()), Term::list(groups)]),
        ])
    }

    // ---- events from local nodes ----

    async fn on_node_event(&mut self, ev: NodeEvent) {
        match ev {
            NodeEvent::Up { node, tx } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.tx = Some(tx);
                    n.scope = None;
                }
                self.undiscovered = true;
                self.m.connected.set(self.nodes.values().filter(|n| n.tx.is_some()).count() as f64);
                self.discover(&node).await;
            }
            NodeEvent::Down { node, why } => {
                tracing::warn!(node = %node, "Erlang node down: {why}");
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.tx = None;
                    n.scope = None;
                }
                self.m.connected.set(self.nodes.values().filter(|n| n.tx.is_some()).count() as f64);
                self.replace_members(&node, BTreeMap::new()).await;
                // Erlang told its processes `noconnection` itself; forget their monitors.
                let keys: Vec<u64> = self.watched.keys().copied().collect();
                for k in keys {
                    self.drop_watchers(k, |w| *w.node == *node).await;
                }
                // Monitors we held there for peers end with noconnection.
                let gone: Vec<Ref> =
                    self.held.iter().filter(|(_, (_, p))| *p.node == *node).map(|(r, _)| r.clone()).collect();
                for r in gone {
                    if let Some((peer, target)) = self.held.remove(&r) {
                        let reason = etf::encode(&Term::atom("noconnection"));
                        self.relay(&peer, Relay::Down { target: etf::pid_bytes(&target) }, &reason, None).await;
                    }
                }
                self.scope_monitors.retain(|_, n| **n != *node);
            }
            NodeEvent::Rejected { node, why } => {
                self.m.reject("undecodable");
                tracing::warn!(node = %node, "dropped a distribution packet: {why}");
            }
            NodeEvent::Message { node, control, payload } => self.on_dist(&node, control, payload).await,
            NodeEvent::Send { node, from, to, payload } => {
                self.send_to_our_pid(&node, to, Some(Sender::Encoded(from)), &payload).await
            }
        }
    }

    /// A message from `node` to the pid on our node with this id, serial
    /// and creation: to our scope process, or through a proxy to its peer.
    /// (`SEND*` control messages, read as terms or in place.)
    async fn send_to_our_pid(
        &mut self,
        node: &Arc<str>,
        (id, serial, creation): (u32, u32, u32),
        from: Option<Sender>,
        payload: &[u8],
    ) {
        if (id, serial, creation) == (self.gw.id, self.gw.serial, self.gw.creation) {
            self.on_scope_message(node, payload).await;
        } else if let Some(key) = self.table.pid_key_parts(id, serial, creation) {
            self.send_to_peer(key, from, payload, None, false).await;
        } else {
            self.m.reject("unknown_proxy");
        }
    }

    async fn on_dist(&mut self, node: &Arc<str>, control: Term, payload: Option<Bytes>) {
        tracing::trace!(node = %node, ?control, "distribution message");
        let Some(c) = control.as_tuple() else {
            self.m.reject("bad_control");
            return;
        };
        let code = c.first().and_then(Term::as_int).unwrap_or(-1);
        let pid_at = |i: usize| c.get(i).and_then(Term::as_pid).cloned();
        match code {
            SEND | SEND_TT | SEND_SENDER | SEND_SENDER_TT => {
                let (Some(to), Some(payload)) = (pid_at(2), payload) else { return self.m.reject("bad_control") };
                let from =
                    if code == SEND_SENDER || code == SEND_SENDER_TT { pid_at(1).map(Sender::Pid) } else { None };
                if *to.node == *self.me {
                    self.send_to_our_pid(node, (to.id, to.serial, to.creation), from, &payload).await;
                } else {
                    self.m.reject("unknown_proxy");
                }
            }
            ALIAS_SEND | ALIAS_SEND_TT => {
                let (Some(Term::Ref(alias)), Some(payload)) = (c.get(2), payload) else {
                    return self.m.reject("bad_control");
                };
                match self.table.ref_key(alias) {
                    Some(key) => self.send_to_peer(key, pid_at(1).map(Sender::Pid), &payload, None, true).await,
                    None => self.m.reject("unknown_proxy"),
                }
            }
            REG_SEND | REG_SEND_TT => {
                let name = c.get(3).and_then(Term::as_atom).unwrap_or("");
                match (name, payload) {
                    (CONFIRM_NAME, Some(payload)) => self.send_confirmed(&payload).await,
                    _ => {
                        self.m.reject("unknown_name");
                        tracing::debug!(name, "message to an unknown registered name on the gateway node");
                    }
                }
            }
            MONITOR_P if matches!(c.get(2), Some(Term::Atom(_))) => {
                // By name on the gateway node: only `wandist` exists (and never ends).
                let (Some(watcher), Some(Term::Atom(name)), Some(Term::Ref(mref))) = (pid_at(1), c.get(2), c.get(3))
                else {
                    return;
                };
                if name != CONFIRM_NAME {
                    self.monitor_exit(Term::atom(name), &watcher, mref, "noproc").await;
                }
            }
            MONITOR_P => {
                let (Some(watcher), Some(target), Some(Term::Ref(mref))) = (pid_at(1), pid_at(2), c.get(3)) else {
                    return;
                };
                if target == self.gw {
                    return; // a scope watching us: the connection itself tells it
                }
                match self.table.pid_key(&target).filter(|k| self.table.home(*k).is_some()) {
                    Some(key) => self.watch(key, watcher, mref.clone()).await,
                    None => self.monitor_exit(Term::Pid(target), &watcher, mref, "noproc").await,
                }
            }
            DEMONITOR_P => {
                let (Some(target), Some(Term::Ref(mref))) = (pid_at(2), c.get(3)) else { return };
                if let Some(key) = self.table.pid_key(&target) {
                    let mref = mref.clone();
                    self.unwatch(key, &mref).await;
                }
            }
            MONITOR_P_EXIT | PAYLOAD_MONITOR_P_EXIT => {
                let Some(Term::Ref(mref)) = c.get(3) else { return };
                let reason = if code == MONITOR_P_EXIT {
                    c.get(4).map(etf::encode).unwrap_or_else(|| etf::encode(&Term::atom("noproc")))
                } else {
                    payload.map(|p| p.to_vec()).unwrap_or_else(|| etf::encode(&Term::atom("noproc")))
                };
                if let Some(n) = self.scope_monitors.remove(mref) {
                    tracing::warn!(node = %n, "pg scope process ended; re-mirroring when it is back");
                    if let Some(link) = self.nodes.get_mut(&n) {
                        link.scope = None;
                    }
                    self.undiscovered = true;
                    self.replace_members(&n, BTreeMap::new()).await;
                } else if let Some((peer, target)) = self.held.remove(mref) {
                    self.relay(&peer, Relay::Down { target: etf::pid_bytes(&target) }, &reason, None).await;
                }
            }
            LINK => {
                let (Some(from), Some(to)) = (pid_at(1), pid_at(2)) else { return };
                // Links across clusters are refused with an immediate exit signal.
                let reason = Term::tuple(vec![Term::atom("wandist"), Term::atom("links_not_supported")]);
                self.send(
                    &from.node,
                    Term::tuple(vec![Term::Int(EXIT), Term::Pid(to), Term::Pid(from.clone()), reason]),
                    None,
                )
                .await;
            }
            UNLINK_ID => {
                let (Some(id), Some(from), Some(to)) = (c.get(1), pid_at(2), pid_at(3)) else { return };
                let ack =
                    Term::tuple(vec![Term::Int(UNLINK_ID_ACK), id.clone(), Term::Pid(to), Term::Pid(from.clone())]);
                self.send(&from.node, ack, None).await;
            }
            _ => tracing::debug!(node = %node, code, "ignoring distribution control message"),
        }
    }

    /// Drops a monitor we hold on a local process.
    async fn demonitor(&self, target: &Pid, mref: Ref) {
        let control = Term::tuple(vec![
            Term::Int(DEMONITOR_P),
            Term::Pid(self.gw.clone()),
            Term::Pid(target.clone()),
            Term::Ref(mref),
        ]);
        self.send(&target.node, control, None).await;
    }

    /// Ends a local watcher's monitor at once, with `reason` (e.g. `noproc`
    /// for something that does not exist here).
    async fn monitor_exit(&self, target: Term, watcher: &Pid, mref: &Ref, reason: &str) {
        let exit = Term::tuple(vec![
            Term::Int(MONITOR_P_EXIT),
            target,
            Term::Pid(watcher.clone()),
            Term::Ref(mref.clone()),
            Term::atom(reason),
        ]);
        self.send(&watcher.node, exit, None).await;
    }

    async fn on_scope_message(&mut self, node: &Arc<str>, payload: &[u8]) {
        let Ok((msg, _)) = etf::decode(payload) else { return self.m.reject("undecodable") };
        let t = msg.as_tuple().unwrap_or_default();
        match (t.first().and_then(Term::as_atom), t.len()) {
            (Some("$gen_cast"), 2) => {
                let inner = t[1].as_tuple().unwrap_or_default();
                if inner.first().and_then(Term::as_atom) == Some("sync") && inner.len() == 3 {
                    let Some(scope) = inner[1].as_pid().cloned() else { return };
                    let mut members: BTreeMap<String, Vec<Pid>> = BTreeMap::new();
                    for g in inner[2].as_list().unwrap_or_default() {
                        if let Some([group, pids]) = g.as_tuple().map(|x| x.to_vec()).as_deref() {
                            let local: Vec<Pid> = pids_of(pids).into_iter().filter(|p| *p.node != *self.me).collect();
                            members.entry(group_name(group)).or_default().extend(local);
                        }
                    }
                    self.set_scope(node, scope).await;
                    self.replace_members(node, members).await;
                }
            }
            (Some("discover"), 2 | 3) => {
                let Some(scope) = t[1].as_pid().cloned() else { return };
                self.set_scope(node, scope.clone()).await;
                let sync = self.our_sync();
                self.send_msg(&scope, &sync).await;
            }
            (Some("join"), 4) => {
                let group = group_name(&t[2]);
                let pids: Vec<Pid> = pids_of(&t[3]).into_iter().filter(|p| *p.node != *self.me).collect();
                if let Some(n) = self.nodes.get_mut(node) {
                    n.members.entry(group.clone()).or_default().extend(pids.iter().cloned());
                }
                self.gateway.join(&group, pids.iter().map(etf::pid_bytes).collect()).await;
            }
            (Some("leave"), 4) => {
                let pids: Vec<Pid> = pids_of(&t[2]).into_iter().filter(|p| *p.node != *self.me).collect();
                for g in t[3].as_list().unwrap_or_default() {
                    let group = group_name(&g);
                    let mut gone = Vec::new();
                    if let Some(list) = self.nodes.get_mut(node).and_then(|n| n.members.get_mut(&group)) {
                        for p in &pids {
                            if let Some(i) = list.iter().position(|x| x == p) {
                                gone.push(list.remove(i));
                            }
                        }
                    }
                    if !gone.is_empty() {
                        self.gateway.leave(&group, gone.iter().map(etf::pid_bytes).collect()).await;
                    }
                }
            }
            _ => tracing::debug!(node = %node, "ignoring a message to the gateway's scope process: {msg:?}"),
        }
    }

    async fn set_scope(&mut self, node: &Arc<str>, scope: Pid) {
        let known = self.nodes.get(node).and_then(|n| n.scope.clone());
        if known.as_ref() == Some(&scope) {
            return;
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.scope = Some(scope.clone());
        }
        tracing::info!(node = %node, scope = %scope, "mirroring pg scope");
        let mref = self.own_ref();
        self.scope_monitors.insert(mref.clone(), node.clone());
        let control =
            Term::tuple(vec![Term::Int(MONITOR_P), Term::Pid(self.gw.clone()), Term::Pid(scope), Term::Ref(mref)]);
        self.send(node, control, None).await;
    }

    /// Replaces what a node's scope told us, reporting the differences.
    async fn replace_members(&mut self, node: &Arc<str>, new: BTreeMap<String, Vec<Pid>>) {
        let Some(n) = self.nodes.get_mut(node) else { return };
        let old = std::mem::replace(&mut n.members, new.clone());
        let empty = Vec::new();
        for (group, pids) in &old {
            let gone = minus(pids, new.get(group).unwrap_or(&empty));
            if !gone.is_empty() {
                self.gateway.leave(group, gone.iter().map(etf::pid_bytes).collect()).await;
            }
        }
        for (group, pids) in &new {
            let came = minus(pids, old.get(group).unwrap_or(&empty));
            if !came.is_empty() {
                self.gateway.join(group, came.iter().map(etf::pid_bytes).collect()).await;
            }
        }
    }

    // ---- crossing to a peer ----

    /// Translates a payload leaving this cluster for `peer`.
    fn outbound(&self, peer: &Arc<str>, input: &[u8]) -> Result<Vec<u8>, etf::EtfError> {
        let mut out = Vec::with_capacity(input.len() + 64);
        self.outbound_into(peer, input, &mut out)?;
        Ok(out)
    }

    /// As `outbound`, appending to `out`.
    fn outbound_into(&self, peer: &Arc<str>, input: &[u8], out: &mut Vec<u8>) -> Result<(), etf::EtfError> {
        let table = &self.table;
        let me = &self.me;
        etf::translate(
            input,
            out,
            &mut |found| {
                let (key, is_pid) = match &found {
                    Found::Pid(p) if *p.node != **me => return Ok(Emit::Pid(p.clone())),
                    Found::Ref(r) if *r.node != **me => return Ok(Emit::Ref(r.clone())),
                    Found::Pid(p) => (table.pid_key(p), true),
                    Found::Ref(r) => (table.ref_key(r), false),
                    _ => return Err("marker in a local payload".into()),
                };
                let home = key.and_then(|k| table.home(k)).ok_or("a gateway-internal identity cannot cross")?;
                if home.peer != *peer {
                    return Err(format!("an identity of cluster {} cannot be passed to {peer} (membership and identities are not transitive)", home.peer));
                }
                if is_pid {
                    etf::pid_from_bytes(&home.bytes).map(Emit::HomePid).map_err(|e| e.to_string())
                } else {
                    etf::ref_from_bytes(&home.bytes).map(Emit::HomeRef).map_err(|e| e.to_string())
                }
            },
            false,
        )?;
        Ok(())
    }

    /// Translates a payload arriving from `peer` for this cluster.
    fn inbound(&mut self, peer: &Arc<str>, input: &[u8]) -> Result<Vec<u8>, etf::EtfError> {
        let mut out = Vec::with_capacity(input.len() + 64);
        self.inbound_into(peer, input, &mut out)?;
        Ok(out)
    }

    /// As `inbound`, appending to `out`.
    fn inbound_into(&mut self, peer: &Arc<str>, input: &[u8], out: &mut Vec<u8>) -> Result<(), etf::EtfError> {
        let mut t = Inbound { table: &mut self.table, peer, me: &self.me };
        etf::translate_with(input, out, &mut t, true)?;
        Ok(())
    }

    async fn relay(&mut self, peer: &Arc<str>, r: Relay, body: &[u8], token: Option<u64>) -> bool {
        let mut payload = Vec::with_capacity(64 + body.len());
        if codec::encode_value(&r, &mut payload).is_err() {
            return false;
        }
        payload.extend_from_slice(body);
        self.submit(peer, payload, token).await
    }

    /// Hands a relay payload to the peer's route. When the route is full
    /// (its window is), the payload waits in that peer's pending queue, so a
    /// slow peer does not hold up the others; only when that queue is at its
    /// bound does this wait, pushing back on the local nodes.
    async fn submit(&mut self, peer: &Arc<str>, payload: Vec<u8>, token: Option<u64>) -> bool {
        let Some(route) = self.gateway.route(peer) else { return false };
        let payload = Bytes::from(payload);
        // Straight to the route unless earlier ones wait (the common case:
        // no clone of the handle, no entry made).
        let (payload, token) = if self.pending.get(peer).is_none_or(|q| q.is_empty()) {
            match route.try_submit(payload, token) {
                Ok(()) => return true,
                Err(TrySubmit::Gone) => return false,
                Err(TrySubmit::Full(p, t)) => (p, t),
            }
        } else {
            (payload, token)
        };
        let route = route.clone();
        self.pending.entry(peer.clone()).or_default().push_back((payload, token));
        while self.pending.get(peer).is_some_and(|q| q.len() > MAX_PENDING) {
            let Some((p, t)) = self.pending.get_mut(peer).and_then(|q| q.pop_front()) else { break };
            if route.submit(p, t).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Moves pending payloads to routes that have room again.
    fn flush_pending(&mut self) {
        for (peer, q) in self.pending.iter_mut() {
            let Some(route) = self.gateway.route(peer) else {
                q.clear();
                continue;
            };
            while let Some((p, t)) = q.pop_front() {
                match route.try_submit(p, t) {
                    Ok(()) | Err(TrySubmit::Gone) => {}
                    Err(TrySubmit::Full(p, t)) => {
                        q.push_front((p, t));
                        break;
                    }
                }
            }
        }
    }

    fn has_pending(&self) -> bool {
        self.pending.values().any(|q| !q.is_empty())
    }

    /// A message from a local process to a proxy (or an alias proxy).
    async fn send_to_peer(&mut self, key: u64, from: Option<Sender>, payload: &[u8], token: Option<u64>, alias: bool) {
        let Some(home) = self.table.home(key) else { return self.m.reject("unknown_proxy") };
        let (peer, to) = (home.peer.clone(), home.bytes.clone());
        let from = from.and_then(|f| match f {
            Sender::Pid(f) if *f.node == *self.me => self.outbound(&peer, &etf::encode(&Term::Pid(f))).ok(),
            // A pid of this cluster: sent as it is (the common case).
            Sender::Pid(f) => {
                let mut b = vec![etf::VERSION];
                etf::put_pid(&mut b, &f);
                Some(b)
            }
            Sender::Encoded(f) => Some([&[etf::VERSION][..], &f].concat()),
        });
        let r = if alias { Relay::AliasSend { to, from } } else { Relay::Send { to, from } };
        // One buffer: the relay header, then the message translated into it.
        let mut out = Vec::with_capacity(96 + payload.len());
        if codec::encode_value(&r, &mut out).is_err() {
            return self.m.reject("untranslatable");
        }
        if let Err(e) = self.outbound_into(&peer, payload, &mut out) {
            self.m.reject(e.reason());
            tracing::warn!(peer = %peer, "message not sent: {e}");
            return;
        }
        if self.submit(&peer, out, token).await {
            self.m.to_peers.increment(1);
        }
    }

    async fn send_confirmed(&mut self, payload: &[u8]) {
        let Ok((msg, _)) = etf::decode(payload) else { return self.m.reject("undecodable") };
        let t = msg.as_tuple().unwrap_or_default();
        let ok = t.len() == 5 && t[0].as_atom() == Some("send_confirmed");
        let (Some(from), Some(proxy)) =
            (t.get(1).and_then(Term::as_pid).filter(|_| ok), t.get(3).and_then(Term::as_pid))
        else {
            return self.m.reject("bad_confirm_request");
        };
        let reply_ref = t[2].clone();
        let Some(key) = self.table.pid_key(proxy).filter(|k| self.table.home(*k).is_some()) else {
            let reply = Term::tuple(vec![
                Term::atom("wandist_confirm"),
                reply_ref,
                Term::tuple(vec![Term::atom("failed"), Term::atom("unknown_proxy")]),
            ]);
            self.send_msg(from, &reply).await;
            return;
        };
        let token = self.next_token;
        self.next_token += 1;
        self.confirms.insert(token, (from.clone(), reply_ref));
        self.send_to_peer(key, Some(Sender::Pid(from.clone())), &etf::encode(&t[4]), Some(token), false).await;
    }

    // ---- monitors ----

    async fn watch(&mut self, key: u64, watcher: Pid, mref: Ref) {
        // Route down: as with a monitor on a node that is not connected.
        if self.table.home(key).is_some_and(|h| !self.up.contains(&h.peer)) {
            self.monitor_exit(Term::Pid(self.table.pid(key)), &watcher, &mref, "noconnection").await;
            return;
        }
        let first = !self.watched.contains_key(&key);
        self.watched.entry(key).or_default().push((watcher, mref));
        if first {
            self.table.pin(key);
            if let Some(home) = self.table.home(key).cloned() {
                self.relay(&home.peer, Relay::Monitor { target: home.bytes }, &[], None).await;
            }
        }
    }

    async fn unwatch(&mut self, key: u64, mref: &Ref) {
        if let Some(list) = self.watched.get_mut(&key) {
            list.retain(|(_, r)| r != mref);
            if list.is_empty() {
                self.watched.remove(&key);
                self.table.unpin(key);
                if let Some(home) = self.table.home(key).cloned() {
                    self.relay(&home.peer, Relay::Demonitor { target: home.bytes }, &[], None).await;
                }
            }
        }
    }

    /// Drops watchers of `key` matching `gone` (e.g. on a node that went down).
    async fn drop_watchers(&mut self, key: u64, gone: impl Fn(&Pid) -> bool) {
        let refs: Vec<Ref> = self
            .watched
            .get(&key)
            .map(|l| l.iter().filter(|(w, _)| gone(w)).map(|(_, r)| r.clone()).collect())
            .unwrap_or_default();
        for r in refs {
            self.unwatch(key, &r).await;
        }
    }

    /// Tells every local watcher of `key` that it is down, with `reason` (ETF).
    async fn fire_down(&mut self, key: u64, reason: &[u8]) {
        let Some(list) = self.watched.remove(&key) else { return };
        self.table.unpin(key);
        let proxy = self.table.pid(key);
        for (watcher, mref) in list {
            let control = Term::tuple(vec![
                Term::Int(PAYLOAD_MONITOR_P_EXIT),
                Term::Pid(proxy.clone()),
                Term::Pid(watcher.clone()),
                Term::Ref(mref),
            ]);
            self.send(&watcher.node, control, Some(reason)).await;
        }
    }

    // ---- from the gateway ----

    async fn on_gateway(&mut self, item: ToLocal) {
        match item {
            // `held` goes with the packet to the node's writer (see `deliver`),
            // or is released when this arm ends (control relays, drops).
            ToLocal::Deliver { peer, payload, held } => {
                let (r, used) = match codec::from_prefix::<Relay>(&payload) {
                    Ok(x) => x,
                    Err(e) => {
                        self.m.reject("undecodable");
                        tracing::warn!(peer = %peer, "undecodable relay message: {e}");
                        return;
                    }
                };
                self.delivering = Some(held);
                self.on_relay(&peer, r, &payload[used..]).await;
                self.delivering = None;
            }
            ToLocal::Confirm { token, outcome, .. } => {
                let Some((from, reply_ref)) = self.confirms.remove(&token) else { return };
                let result = match outcome {
                    Outcome::Delivered => Term::atom("delivered"),
                    Outcome::Failed(r) => Term::tuple(vec![Term::atom("failed"), Term::atom(r.label())]),
                };
                let reply = Term::tuple(vec![Term::atom("wandist_confirm"), reply_ref, result]);
                self.send_msg(&from, &reply).await;
            }
            ToLocal::Members { peer, change } => self.remote_members(&peer, change).await,
            ToLocal::Up { peer } => {
                self.up.insert(peer);
            }
            ToLocal::Lost { peer } => {
                self.up.remove(&peer);
                let reason = etf::encode(&Term::atom("noconnection"));
                let keys: Vec<u64> = self
                    .watched
                    .keys()
                    .copied()
                    .filter(|k| self.table.home(*k).is_some_and(|h| h.peer == peer))
                    .collect();
                for k in keys {
                    self.fire_down(k, &reason).await;
                }
                let held: Vec<Ref> =
                    self.held.iter().filter(|(_, (p, _))| *p == peer).map(|(r, _)| r.clone()).collect();
                for r in held {
                    if let Some((_, target)) = self.held.remove(&r) {
                        self.demonitor(&target, r).await;
                    }
                }
            }
        }
    }

    async fn on_relay(&mut self, peer: &Arc<str>, r: Relay, body: &[u8]) {
        match r {
            Relay::Send { to, from } | Relay::AliasSend { to, from } if body.is_empty() => {
                let _ = (to, from);
                self.m.reject("bad_relay");
            }
            Relay::Send { to, from } => {
                let Ok(pid) = etf::pid_from_bytes(&to) else { return self.m.reject("bad_relay") };
                self.deliver(peer, &pid.node, &to, from, body, SEND_SENDER).await;
            }
            Relay::AliasSend { to, from } => {
                let Ok(alias) = etf::ref_from_bytes(&to) else { return self.m.reject("bad_relay") };
                self.deliver(peer, &alias.node, &to, from, body, ALIAS_SEND).await;
            }
            Relay::Monitor { target } => {
                let Ok(target) = etf::pid_from_bytes(&target) else { return self.m.reject("bad_relay") };
                if self.held.len() >= MAX_HELD_MONITORS {
                    // A peer asking for more monitors than any real system needs.
                    self.m.reject("too_many_monitors");
                    let reason = etf::encode(&Term::atom("system_limit"));
                    self.relay(peer, Relay::Down { target: etf::pid_bytes(&target) }, &reason, None).await;
                    return;
                }
                let mref = self.own_ref();
                let control = Term::tuple(vec![
                    Term::Int(MONITOR_P),
                    Term::Pid(self.gw.clone()),
                    Term::Pid(target.clone()),
                    Term::Ref(mref.clone()),
                ]);
                if self.send(&target.node, control, None).await {
                    self.held.insert(mref, (peer.clone(), target));
                } else {
                    let reason = etf::encode(&Term::atom("noconnection"));
                    self.relay(peer, Relay::Down { target: etf::pid_bytes(&target) }, &reason, None).await;
                }
            }
            Relay::Demonitor { target } => {
                let Ok(target) = etf::pid_from_bytes(&target) else { return self.m.reject("bad_relay") };
                let found = self.held.iter().find(|(_, (p, t))| p == peer && *t == target).map(|(r, _)| r.clone());
                if let Some(r) = found {
                    self.held.remove(&r);
                    self.demonitor(&target, r).await;
                }
            }
            Relay::Down { target } => {
                let home = Home { peer: peer.clone(), bytes: target };
                let key = self.table.key_for(home);
                match self.inbound(peer, body) {
                    Ok(reason) => self.fire_down(key, &reason).await,
                    Err(_) => self.fire_down(key, &etf::encode(&Term::atom("noproc"))).await,
                }
            }
        }
    }

    /// The message being relayed cannot be delivered: its sender is told.
    fn undeliverable(&mut self) {
        if let Some(h) = self.delivering.as_mut() {
            h.undeliverable();
        }
    }

    /// Hands a message from `peer` to a local process (or alias).
    /// `to` is the receiver's encoding (a pid or an alias, checked by the
    /// caller), on `node`.
    async fn deliver(&mut self, peer: &Arc<str>, node: &str, to: &[u8], from: Option<Vec<u8>>, body: &[u8], code: i64) {
        if self.nodes.get(node).is_none_or(|n| n.tx.is_none()) {
            self.undeliverable();
            self.m.reject("node_not_connected");
            tracing::debug!(node, "message for a node the gateway is not connected to: dropped");
            return;
        }
        // One buffer: length, pass-through, the control tuple, the message.
        let mut pkt = Vec::with_capacity(96 + body.len());
        pkt.extend_from_slice(&[0, 0, 0, 0, PASS_THROUGH, etf::VERSION, 104, 3, 97, code as u8]);
        // The sender, translated in place (its version byte then dropped),
        // or the gateway itself.
        let mark = pkt.len();
        if from.is_some_and(|f| self.inbound_into(peer, &f, &mut pkt).is_ok() && pkt.len() > mark + 1) {
            pkt.remove(mark);
        } else {
            pkt.truncate(mark);
            etf::put_pid(&mut pkt, &self.gw);
        }
        pkt.extend_from_slice(to);
        if let Err(e) = self.inbound_into(peer, body, &mut pkt) {
            self.undeliverable();
            self.m.reject(e.reason());
            tracing::warn!(peer = %peer, "message from peer not delivered: {e}");
            return;
        }
        let len = (pkt.len() - 4) as u32;
        pkt[..4].copy_from_slice(&len.to_be_bytes());
        let Some(tx) = self.nodes.get(node).and_then(|n| n.tx.as_ref()) else {
            return self.undeliverable();
        };
        if tx.send_delivery(Bytes::from(pkt), self.delivering.take()).await {
            self.m.from_peers.increment(1);
        }
    }

    async fn remote_members(&mut self, peer: &Arc<str>, change: Change) {
        let (group, members, join) = match change {
            Change::Join { group, members } => (group, members, true),
            Change::Leave { group, members } => (group, members, false),
        };
        let mut pids = Vec::new();
        for bytes in members {
            let key = self.table.key_for(Home { peer: peer.clone(), bytes });
            if join {
                self.table.pin(key);
            } else {
                self.table.unpin(key);
            }
            pids.push(self.table.pid(key));
        }
        let list = self.joined.entry(group.clone()).or_default();
        if join {
            list.extend(pids.iter().cloned());
        } else {
            for p in &pids {
                if let Some(i) = list.iter().position(|x| x == p) {
                    list.remove(i);
                }
            }
        }
        let gt = group_term(&group);
        let pid_list = Term::list(pids.into_iter().map(Term::Pid).collect());
        let msg = if join {
            Term::tuple(vec![Term::atom("join"), Term::Pid(self.gw.clone()), gt, pid_list])
        } else {
            Term::tuple(vec![Term::atom("leave"), Term::Pid(self.gw.clone()), pid_list, Term::list(vec![gt])])
        };
        let scopes: Vec<Pid> = self.nodes.values().filter(|n| n.tx.is_some()).filter_map(|n| n.scope.clone()).collect();
        for scope in scopes {
            self.send_msg(&scope, &msg).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiset_difference() {
        let p = |id| Pid { node: "n@h".into(), id, serial: 0, creation: 1 };
        assert_eq!(minus(&[p(1), p(1), p(2)], &[p(1), p(3)]), vec![p(1), p(2)]);
        assert_eq!(minus(&[p(1)], &[p(1), p(1)]), Vec::<Pid>::new());
    }

    /// The relay header as older gateways wrote it: plain `Vec<u8>` fields.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum OldRelay {
        Send { to: Vec<u8>, from: Option<Vec<u8>> },
        AliasSend { to: Vec<u8>, from: Option<Vec<u8>> },
        Monitor { target: Vec<u8> },
        Demonitor { target: Vec<u8> },
        Down { target: Vec<u8> },
    }

    #[test]
    fn relay_bytes_are_unchanged_on_the_wire() {
        let long: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let pairs = [
            (
                Relay::Send { to: long.clone(), from: Some(vec![131, 88]) },
                OldRelay::Send { to: long.clone(), from: Some(vec![131, 88]) },
            ),
            (Relay::AliasSend { to: vec![1], from: None }, OldRelay::AliasSend { to: vec![1], from: None }),
            (Relay::Monitor { target: vec![] }, OldRelay::Monitor { target: vec![] }),
            (Relay::Demonitor { target: vec![9; 3] }, OldRelay::Demonitor { target: vec![9; 3] }),
            (Relay::Down { target: long.clone() }, OldRelay::Down { target: long }),
        ];
        for (new, old) in pairs {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            codec::encode_value(&new, &mut a).unwrap();
            codec::encode_value(&old, &mut b).unwrap();
            assert_eq!(a, b, "{new:?}");
            let (back, used) = codec::from_prefix::<OldRelay>(&a).unwrap();
            assert_eq!((back, used), (old, a.len()));
            let (again, _) = codec::from_prefix::<Relay>(&b).unwrap();
            assert_eq!(format!("{again:?}"), format!("{new:?}"));
        }
    }

    #[test]
    fn group_names_round_trip() {
        for t in [
            Term::atom("chat"),
            Term::tuple(vec![Term::atom("room"), Term::Int(7)]),
            Term::Binary(b"bin".to_vec()),
            Term::atom("~tilde"),
        ] {
            assert_eq!(group_term(&group_name(&t)), t);
        }
        assert_eq!(group_name(&Term::atom("chat")), "chat");
    }
}
