//! The Erlang side's decisions, as plain state with no I/O and no clock:
//! events from the local nodes and from the routes go in, [`Effect`]s come
//! out (packets for nodes, relays for peers, membership for routes), which
//! the async shell (`super::shell`) carries out.
//!
//! The trust boundary is here. A peer names our processes and references
//! only by handles this gateway issued to it ([`Handles`], one table per
//! peer): the destination of a message, an alias, a monitor's target, an
//! identity going home inside a payload. Anything else is refused
//! (`forged`, or `stale_handle` for one issued and since forgotten),
//! counted with the peer's name, logged at most once per period, and
//! reported back to the peer as undeliverable. A peer's own identities
//! become proxies within its quota; its atoms count against its budget;
//! its monitors against its share.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use foldhash::HashMap;

use super::atoms::Atoms;
use super::claims::{self, Claims, Step};
use super::control::{Control, Target};
use super::dist::{ALIAS_SEND, PASS_THROUGH, SEND_SENDER};
use super::etf::{self, scan, Kind, Pid, PidView, Ref, RefView, Refusal, Source, Term};
use super::groups;
use super::handles::Handles;
use super::mirror::{self, LocalChange, Mirror};
use super::monitors::{Held as HeldMonitors, Monitor, Watchers};
use super::node::packet;
use super::proxies::{PeerIx, Proxies};
use crate::config::Limits;
use crate::local::{Held, LocalGroups, ToLocal};
use crate::membership::{Change, Filter};
use crate::metrics::{self as m, Metrics};
use crate::ratelog::RateLog;
use crate::route::{Epoch, Outcome, Token};
use crate::wire::relay::Relay;
use crate::wire::{codec, Handle};

/// The registered name (on the gateway's node) for confirmed sends.
pub const CONFIRM_NAME: &str = "wandist";
/// Key of the gateway's own pg peer process; proxies start above.
const GW_KEY: u64 = 1;
const FIRST_PROXY: u64 = 1000;
/// Tags the third word of the gateway's own references, by use.
const SCOPE_MONITOR: u32 = 0x5343_4f50;
const HELD_MONITOR: u32 = 0x4d4f_4e49;
/// Discovery rounds (one a second) a connected node may go without
/// answering for the scope before that is said.
const SCOPE_MISSING_AFTER: u32 = 3;
/// Tags the gateway's calls to a scope (`{monitor, Group}`, `claims`).
const CLAIM_CALL: u32 = 0x434c_4149;
/// Tags the gateway's `erlang:nodes()` calls (`ask_cluster`).
const NODES_CALL: u32 = 0x4e4f_4445;
/// Most node names taken from one `erlang:nodes()` answer.
pub const MAX_CLUSTER_NODES: usize = 4096;
/// Members of a membership change applied per step (see `work`): a few
/// milliseconds of work, so other peers' messages are not held up.
pub const MEMBERS_PER_STEP: usize = 65_536;
/// A leave of at least this many members is not told to the scopes as a
/// leave message: it adds to the sync debt, paid with one sync of
/// everything once such steps stop coming (`flush_sync`). A scope takes a
/// leave with a list subtraction over the whole group (pg keeps each group
/// as one list): a million members leaving in steps would cost it a pass
/// of the million per step; in one sync, one pass. (Joins go as join
/// messages of a step each: a scope takes those by copying the group once
/// per message, cheap enough, and a sync of a million members would hold
/// up every other message to the node while it is read.)
pub const LARGE_STEP: usize = 4096;
/// Items of one peer held back behind an `Up` or `Lost` waiting for its
/// membership changes, at most; beyond, its route is not read until the
/// changes are applied.
const MAX_DEFERRED: usize = 16;
/// Membership changes of one peer queued, at most, and their members
/// (a million's worth of handles is 8 MiB).
const MAX_JOBS: usize = 1024;
const MAX_QUEUED_MEMBERS: usize = 4_000_000;

/// What the shell is to do.
#[derive(Debug)]
pub enum Effect {
    /// A distribution packet for a local node (with the delivery it
    /// carries). `bulk`: a membership message for its scope, which waits
    /// behind every other message to the node (`node::NodeTx`).
    Node { node: Arc<str>, packet: Bytes, held: Option<Held>, bulk: bool },
    /// A relay for a peer's route. `data`: a message (bounded by the
    /// peer's queue), else a monitor signal (always taken).
    Peer { peer: PeerIx, payload: Bytes, token: Option<Token>, data: bool },
    /// The local cluster's members, as handles issued to that peer.
    Groups { peer: PeerIx, change: LocalGroups },
    /// Several instances of the cluster (`claims`): this one now holds
    /// the route (start it), or no longer does (stop it).
    Claim(Step),
    /// A hand-over (`leave_peer`, or `leave` for `None`) has withdrawn our
    /// members: the route (or gateway) may settle and finish now.
    Left(Option<PeerIx>),
    /// `[erlang] discover = "cluster"`: the nodes a local node sees
    /// (`erlang:nodes()`, checked and bounded), `from` that node.
    ClusterNodes { from: Arc<str>, nodes: Vec<Arc<str>> },
}

/// One route as the Erlang side knows it.
#[derive(Debug, Clone)]
pub struct PeerSetup {
    pub name: Arc<str>,
    pub export: Filter,
    pub limits: Limits,
}

/// Where the core is.
#[derive(Debug, Clone)]
pub struct Setup {
    pub me: Arc<str>,
    pub creation: u32,
    /// The mirrored scopes, the primary first (`ErlangConfig::scopes`).
    pub scopes: Vec<String>,
    pub nodes: Vec<Arc<str>>,
    pub peers: Vec<PeerSetup>,
    /// With several instances of the cluster (`[erlang] coordinate`): the
    /// routes this instance claims, and how long it keeps the ones it
    /// holds with no coordinating node (`claims`).
    pub claims: Option<(Vec<Arc<str>>, std::time::Duration)>,
}

/// A route (or, `peer: None`, the whole gateway) handing over.
#[derive(Debug)]
struct Handing {
    peer: Option<PeerIx>,
}

/// A membership change of a peer, applied in steps.
#[derive(Debug)]
struct Job {
    group: String,
    /// The group term's encoding (no version byte).
    term: Vec<u8>,
    join: bool,
    members: Vec<Handle>,
    done: usize,
}

/// Proxies minted for joins to one group, not yet told to the scopes:
/// steps stay small (`MEMBERS_PER_STEP`) while the scopes get fewer,
/// larger join messages (`mirror::PIDS_PER_MESSAGE`; a scope copies the
/// whole group once per message). The mirror learns them when they are
/// told, so a sync never covers them twice.
#[derive(Debug)]
struct Batch {
    group: String,
    term: Vec<u8>,
    keys: Vec<u64>,
}

#[derive(Debug)]
struct Peer {
    /// Its route was removed (a reload): nothing more comes from it or
    /// goes to it; its index is never reused.
    removed: bool,
    /// Its snapshot has been taken in (`ToLocal::Synced`).
    synced: bool,
    /// Its route is being handed to another instance (`leave_peer`):
    /// nothing more is exported to it or joined for it; what is on its
    /// way still goes through.
    leaving: bool,
    name: Arc<str>,
    export: Filter,
    up: bool,
    /// The peer's run (epoch) our proxies of it belong to.
    session: Option<Epoch>,
    /// What this gateway issued to the peer: the only names it has for us.
    exports: Handles,
    atoms: Atoms,
    max_monitors: usize,
    jobs: VecDeque<Job>,
    /// Items from the route held back, in order, from an `Up` or `Lost`
    /// that waits for the jobs before it (see `from_route`).
    deferred: VecDeque<ToLocal>,
    /// Refusals counted against the peer so far (its refusal budget is
    /// charged by the shell: `erlang::throttle`).
    refused: u64,
    /// Joins minted, not yet told (empty whenever `jobs` is).
    batch: Option<Batch>,
}

impl Peer {
    fn new(p: &PeerSetup) -> Peer {
        Peer {
            removed: false,
            synced: false,
            leaving: false,
            name: p.name.clone(),
            export: p.export.clone(),
            up: false,
            session: None,
            exports: Handles::new(p.limits.handles),
            atoms: Atoms::new(p.limits.atoms),
            max_monitors: p.limits.monitors,
            jobs: VecDeque::new(),
            deferred: VecDeque::new(),
            refused: 0,
            batch: None,
        }
    }
}

/// Who sent a message to a proxy.
#[derive(Debug, Clone)]
pub enum Sender {
    Pid(Pid),
    /// A pid's encoding, as the node wrote it.
    Encoded(Bytes),
}

/// The metric handles the core counts on.
struct Counters {
    metrics: Metrics,
    to_peers: metrics::Counter,
    from_peers: metrics::Counter,
    rejected: HashMap<(Option<PeerIx>, &'static str), metrics::Counter>,
}

pub struct Core {
    me: Arc<str>,
    creation: u32,
    /// The gateway's pg process in the primary scope (also the sender of
    /// its monitors and calls); `gws[i]` is its pg process in scope `i`
    /// (a pid each, so a scope's answers say which scope they are for).
    gw: Pid,
    gws: Vec<Pid>,
    scopes: Vec<String>,
    peers: Vec<Peer>,
    by_name: HashMap<Arc<str>, PeerIx>,
    proxies: Proxies,
    /// One mirror per scope, in `scopes` order; each follows every node's
    /// connection (`mirrors[0]` answers "is it connected").
    mirrors: Vec<Mirror>,
    watchers: Watchers,
    held: HeldMonitors,
    /// Monitors on local scope processes: reference id -> (node, scope).
    scope_monitors: HashMap<u64, (Arc<str>, usize)>,
    /// Which routes this instance holds, with several instances.
    claims: Option<Claims>,
    /// The gateway is stopping (`leave`): nothing more is exported, and
    /// the scopes have been told we have no members.
    leaving: bool,
    left_scopes: bool,
    /// Nodes whose scope ended on a claims call (too old for it).
    no_claims_on: Vec<Arc<str>>,
    /// Connected nodes without a scope: discovery rounds so far.
    scope_waits: HashMap<(Arc<str>, usize), u32>,
    /// `erlang:nodes()` calls (`ask_cluster`): rounds asked, and the call
    /// waiting for its answer (reference id, node asked).
    cluster_asks: usize,
    cluster_call: Option<(u64, Arc<str>)>,
    /// Routes this instance serves (in their serving groups).
    serving: Vec<Arc<str>>,
    /// Routes being handed to another instance, waiting for it to serve
    /// (or for `withdraw_now`) before our members are withdrawn; `None`:
    /// the whole gateway is leaving.
    handing: Vec<Handing>,
    /// Confirmed sends waiting for their outcome: token -> (who, their ref).
    confirms: HashMap<Token, (Pid, Term)>,
    next_token: u64,
    next_ref: u64,
    out: Vec<Effect>,
    /// Members joined or left and not yet told to the scopes (see LARGE_STEP).
    sync_debt: usize,
    counters: Counters,
    log: RateLog<(Option<PeerIx>, &'static str)>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Core({})", self.me)
    }
}

/// Translates a payload leaving for `peer`: our identities become handles
/// issued to it; its own proxies go home as its handles.
struct Outbound<'a> {
    me: &'a str,
    peer: PeerIx,
    proxies: &'a Proxies,
    exports: &'a mut Handles,
}

impl Outbound<'_> {
    /// A proxy crossing to the peer: one of that peer's goes home as its
    /// handle; another peer's would make identities transitive, and
    /// anything else on the gateway's node is its own.
    fn home(&self, kind: Kind, key: Option<u64>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        match key.and_then(|k| self.proxies.home(k)) {
            Some(h) if h.peer == self.peer && h.kind == kind => {
                let tag = if kind == Kind::Pid { etf::HOME_PID } else { etf::HOME_REF };
                etf::put_handle(out, tag, h.handle.0);
                Ok(())
            }
            Some(_) => Err(Refusal::Transitive),
            None => Err(Refusal::Internal),
        }
    }

    /// An identity of this cluster crossing to the peer: by the handle
    /// issued to it (now, on its first crossing).
    fn issue(&mut self, kind: Kind, canonical: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let h = self.exports.issue(kind, canonical)?;
        etf::put_handle(out, if kind == Kind::Pid { etf::PEER_PID } else { etf::PEER_REF }, h.0);
        Ok(())
    }
}

impl scan::Translator for Outbound<'_> {
    fn pid(&mut self, p: PidView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        if *p.node_utf8() == *self.me.as_bytes() {
            return self.home(Kind::Pid, self.proxies.pid_key_parts(p.id, p.serial, p.creation), out);
        }
        self.issue(Kind::Pid, &p.canonical(), out)
    }

    fn reference(&mut self, r: RefView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        if *r.node_utf8() == *self.me.as_bytes() {
            return self.home(Kind::Ref, self.proxies.ref_key_parts(&r.node_utf8(), r.creation, r.words), out);
        }
        self.issue(Kind::Ref, &r.canonical(), out)
    }
}

/// Translates a payload arriving from `peer`: its identities become
/// proxies (within its quota), ours are resolved through what we issued
/// to it, and its atoms count against its budget.
struct Inbound<'a> {
    peer: PeerIx,
    proxies: &'a mut Proxies,
    exports: &'a Handles,
    atoms: &'a mut Atoms,
}

impl scan::Translator for Inbound<'_> {
    fn handle(&mut self, kind: Kind, home: bool, h: u64, out: &mut Vec<u8>) -> Result<(), Refusal> {
        if home {
            out.extend_from_slice(self.exports.resolve(Handle(h), kind)?);
            return Ok(());
        }
        let key = self.proxies.mint(self.peer, Handle(h), kind)?;
        match kind {
            Kind::Pid => self.proxies.put_pid(out, key),
            Kind::Ref => self.proxies.put_ref(out, key),
        }
        Ok(())
    }

    fn atom(&mut self, text: &[u8]) -> Result<(), Refusal> {
        self.atoms.admit(text)
    }
}

/// The encoding of `cluster`'s claim group term (no version byte).
fn claim_group(cluster: &str) -> Vec<u8> {
    etf::encode(&claims::group_term(cluster))[1..].to_vec()
}

/// `{wandist_confirm, Ref, Result}`.
fn confirm_reply(reply_ref: Term, result: Term) -> Term {
    Term::tuple(vec![Term::atom("wandist_confirm"), reply_ref, result])
}

fn failed(reason: &str) -> Term {
    Term::tuple(vec![Term::atom("failed"), Term::atom(reason)])
}

impl Core {
    pub fn new(setup: Setup, metrics: Metrics) -> Core {
        let quotas: Vec<usize> = setup.peers.iter().map(|p| p.limits.proxies).collect();
        let proxies = Proxies::new(setup.me.clone(), setup.creation, FIRST_PROXY, &quotas);
        let gw = proxies.pid(GW_KEY);
        let gw_for_claims = gw.clone();
        let gws: Vec<Pid> = (0..setup.scopes.len()).map(|i| proxies.pid(GW_KEY + i as u64)).collect();
        let mirrors = setup.scopes.iter().map(|_| Mirror::new(setup.nodes.iter().cloned())).collect();
        let peers: Vec<Peer> = setup.peers.iter().map(Peer::new).collect();
        let counters = Counters {
            to_peers: metrics.counter(m::ERLANG_MESSAGES, &[("direction", "to_peers")]),
            from_peers: metrics.counter(m::ERLANG_MESSAGES, &[("direction", "from_peers")]),
            rejected: HashMap::default(),
            metrics,
        };
        Core {
            by_name: peers.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect(),
            held: HeldMonitors::new(peers.len()),
            me: setup.me,
            creation: setup.creation,
            gw,
            gws,
            scopes: setup.scopes,
            peers,
            proxies,
            mirrors,
            watchers: Watchers::default(),
            scope_monitors: HashMap::default(),
            leaving: false,
            left_scopes: false,
            no_claims_on: Vec::new(),
            scope_waits: HashMap::default(),
            cluster_asks: 0,
            cluster_call: None,
            serving: Vec::new(),
            handing: Vec::new(),
            claims: setup.claims.map(|(clusters, give_up)| {
                let mut c = Claims::new(gw_for_claims, give_up);
                clusters.into_iter().for_each(|cl| {
                    c.claim(cl);
                });
                c
            }),
            confirms: HashMap::default(),
            next_token: 1,
            next_ref: 1,
            out: Vec::new(),
            sync_debt: 0,
            counters,
            log: RateLog::default(),
        }
    }

    /// What the shell is to do, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    pub fn has_effects(&self) -> bool {
        !self.out.is_empty()
    }

    /// Moves the effects to the end of `to`, keeping both buffers.
    pub fn drain_effects(&mut self, to: &mut VecDeque<Effect>) {
        to.extend(self.out.drain(..));
    }

    pub fn gw(&self) -> &Pid {
        &self.gw
    }

    pub fn peer_index(&self, name: &str) -> Option<PeerIx> {
        self.by_name.get(name).copied()
    }

    pub fn peer_name(&self, p: PeerIx) -> &Arc<str> {
        &self.peers[p].name
    }

    pub fn proxies(&self) -> usize {
        self.proxies.len()
    }

    /// (proxies, handles, monitors held, atoms) of one peer, for gauges.
    pub fn usage(&self, p: PeerIx) -> (usize, usize, usize, usize) {
        let peer = &self.peers[p];
        (self.proxies.len_of(p), peer.exports.len(), self.held.count(p), peer.atoms.len())
    }

    /// Membership changes of `p` still to apply, or items waiting behind
    /// them: `work` has something to do.
    pub fn busy(&self, p: PeerIx) -> bool {
        !self.peers[p].jobs.is_empty()
            || (!self.peers[p].deferred.is_empty() && !self.held_for_successor(p))
            || self.proxies.retired(p)
    }

    /// Whether `p` is a session a successor took over (another peer of its
    /// name, newer) whose snapshot is not in yet: `p`'s membership changes
    /// (the leaving instance withdrawing its members) wait for it, so the
    /// members are never missing from pg meanwhile.
    fn held_for_successor(&self, p: PeerIx) -> bool {
        let name = &self.peers[p].name;
        self.by_name.get(name).is_some_and(|&q| q != p && !self.peers[q].removed && !self.peers[q].synced)
    }

    /// Whether `p`'s route may hand over more items now: its membership
    /// changes queue here (so that its messages behind them in the route's
    /// queue are read and go on meanwhile), and what must wait behind an
    /// `Up` or `Lost`, up to bounds.
    pub fn accepts(&self, p: PeerIx) -> bool {
        let peer = &self.peers[p];
        if peer.removed {
            return true;
        }
        let queued: usize = peer.jobs.iter().map(|j| j.members.len() - j.done).sum();
        peer.deferred.len() < MAX_DEFERRED && peer.jobs.len() < MAX_JOBS && queued < MAX_QUEUED_MEMBERS
    }

    /// Refusals counted against peer `p` so far.
    pub fn refused(&self, p: PeerIx) -> u64 {
        self.peers[p].refused
    }

    /// The index of the (not removed) peer named `name`.
    pub fn peer_ix(&self, name: &str) -> Option<PeerIx> {
        self.by_name.get(name).copied()
    }

    /// A route added by a reload: its index, and every member we have
    /// that it may see, exported to it.
    pub fn add_peer(&mut self, setup: PeerSetup) -> PeerIx {
        let p = self.proxies.add_peer(setup.limits.proxies);
        debug_assert_eq!(p, self.peers.len());
        self.held.add_peer();
        self.by_name.insert(setup.name.clone(), p);
        self.peers.push(Peer::new(&setup));
        for c in self.local_members() {
            self.export_change(p, &c);
        }
        p
    }

    /// A route removed by a reload: as if its peer were lost for good.
    /// Watchers of its proxies get DOWN, monitors held for it go, its
    /// proxies resolve no more and leave their groups (reclaimed in steps
    /// by `work`), and nothing more is exported to it.
    pub fn remove_peer(&mut self, p: PeerIx) {
        if self.peers[p].removed {
            return;
        }
        self.flush_batch(p);
        let name = self.peers[p].name.clone();
        self.apply(p, ToLocal::Lost { peer: name.clone() });
        let peer = &mut self.peers[p];
        peer.removed = true;
        peer.up = false;
        peer.jobs.clear();
        peer.deferred.clear();
        peer.exports = Handles::new(1);
        // (A route taken back while its predecessor finished has a new
        // peer under the same name.)
        if self.by_name.get(&name) == Some(&p) {
            self.by_name.remove(&name);
        }
        self.proxies.retire_peer(p);
    }

    /// The gateway's node name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The mirrored scopes, the primary first.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The scopes `node` is connected with and answers for.
    pub fn scopes_of(&self, node: &str) -> Vec<String> {
        (0..self.scopes.len())
            .filter(|&i| self.mirrors[i].scope_of(node).is_some())
            .map(|i| self.scopes[i].clone())
            .collect()
    }

    pub fn undiscovered(&self) -> bool {
        self.mirrors.iter().any(|m| !m.undiscovered().is_empty())
    }

    /// Our members in every scope, as changes (joins).
    fn local_members(&self) -> Vec<LocalChange> {
        self.mirrors.iter().flat_map(Mirror::local_members).collect()
    }

    /// The scope a group's name on the wire is in, and its name there: a
    /// bare name is the primary scope's; `scope:name` that scope's (if
    /// mirrored here).
    fn split_group<'a>(&self, wire: &'a str) -> Option<(usize, &'a str)> {
        match wire.split_once(':') {
            None => Some((0, wire)),
            Some((scope, rest)) => self.scopes.iter().position(|s| s == scope).map(|i| (i, rest)),
        }
    }

    /// A group's name on the wire: bare in the primary scope, `scope:name`
    /// in the others.
    fn qualify(&self, ix: usize, name: &str) -> String {
        if ix == 0 {
            name.to_string()
        } else {
            format!("{}:{name}", self.scopes[ix])
        }
    }

    /// The group term a wire name stands for in its scope.
    fn group_term(&self, wire: &str) -> Vec<u8> {
        let local = self.split_group(wire).map_or(wire, |(_, n)| n);
        etf::encode(&groups::term_of(local))[1..].to_vec()
    }

    // ---- counting and saying ----

    /// Counts a rejection (`peer`: whose it was, if a peer's), and says so
    /// at most once per period.
    fn reject(&mut self, peer: Option<PeerIx>, reason: Reject, what: impl FnOnce() -> String) {
        let reason = reason.label();
        if let Some(p) = peer {
            self.peers[p].refused += 1;
        }
        let peers = &self.peers;
        let label = || peer.map(|p| peers[p].name.to_string()).unwrap_or_else(|| m::LOCAL_PEER.to_string());
        let metrics = &self.counters.metrics;
        self.counters
            .rejected
            .entry((peer, reason))
            .or_insert_with(|| metrics.counter(m::ERLANG_REJECTED, &[("peer", &label()), ("reason", reason)]))
            .increment(1);
        if let Some(held_back) = self.log.allow(&(peer, reason)) {
            tracing::warn!(peer = %label(), reason, held_back, "{}", what());
        }
    }

    fn own_ref(&mut self, tag: u32) -> (u64, Ref) {
        let id = self.next_ref;
        self.next_ref += 1;
        (id, Ref { node: self.me.to_string(), creation: self.creation, ids: vec![id as u32, (id >> 32) as u32, tag] })
    }

    fn own_ref_id(&self, r: &Ref, tag: u32) -> Option<u64> {
        (*r.node == *self.me && r.creation == self.creation && r.ids.len() == 3 && r.ids[2] == tag)
            .then(|| r.ids[0] as u64 | ((r.ids[1] as u64) << 32))
    }

    // ---- to nodes ----

    /// Queues a control message (and payload) for a connected node.
    fn send_to_node(&mut self, node: &str, control: Control, payload: Option<&[u8]>) -> bool {
        let Some(node) = self.mirrors[0].node(node) else { return false };
        self.out.push(Effect::Node { node, packet: packet(&control.term(), payload), held: None, bulk: false });
        true
    }

    /// A membership message from the gateway's pg process in scope `ix`
    /// to that scope's process on a node.
    fn send_bulk(&mut self, ix: usize, scope: &Pid, msg: &[u8]) {
        if self.left_scopes {
            // (After `leave` the scopes know nothing of ours: a leave now
            // would name a group they dropped, which crashes a scope.)
            return;
        }
        let Some(node) = self.mirrors[0].node(&scope.node) else { return };
        let control = Control::SendSender { from: self.gws[ix].clone(), to: scope.clone() };
        self.out.push(Effect::Node { node, packet: packet(&control.term(), Some(msg)), held: None, bulk: true });
    }

    fn send_msg(&mut self, to: &Pid, msg: &[u8]) -> bool {
        let control = Control::SendSender { from: self.gw.clone(), to: to.clone() };
        self.send_to_node(&to.node.clone(), control, Some(msg))
    }

    fn discover(&mut self, node: &str, ix: usize) {
        let Some(node) = self.mirrors[0].node(node) else { return };
        let control = Control::RegSend { from: self.gws[ix].clone(), name: self.scopes[ix].clone() };
        let pkt = packet(&control.term(), Some(&mirror::discover(&self.gws[ix])));
        self.out.push(Effect::Node { node, packet: pkt, held: None, bulk: true });
    }

    // ---- events from local nodes ----

    pub fn node_up(&mut self, node: &Arc<str>) {
        for ix in 0..self.mirrors.len() {
            self.mirrors[ix].connected(node);
            self.discover(node, ix);
        }
    }

    /// Discovers the scopes of connected nodes not known yet (on the
    /// shell's timer, once a second). A node still without one after
    /// `SCOPE_MISSING_AFTER` rounds is said, once per connection: it most
    /// likely does not run the scope, and gets nothing across otherwise.
    pub fn rediscover(&mut self) {
        let undiscovered: Vec<(Arc<str>, usize)> = (0..self.mirrors.len())
            .flat_map(|ix| self.mirrors[ix].undiscovered().into_iter().map(move |n| (n, ix)))
            .collect();
        self.scope_waits.retain(|k, _| undiscovered.contains(k));
        for (node, ix) in undiscovered {
            let waited = self.scope_waits.entry((node.clone(), ix)).or_insert(0);
            *waited += 1;
            if *waited == SCOPE_MISSING_AFTER {
                let scope = &self.scopes[ix];
                tracing::warn!(node = %node, scope = %scope, "node {node} does not answer for the pg scope {scope:?}: its members cannot cross clusters, and it sees no remote members. Start the scope there: pg:start_link({scope}) in Erlang, :pg.start_link(:{scope}) in Elixir (or in your supervision tree), or set [erlang] scopes to the ones it runs");
            }
            self.discover(&node, ix);
        }
    }

    /// `[erlang] discover = "cluster"`: asks one connected node (the next
    /// in name order each round) for the nodes it sees, `erlang:nodes()`
    /// through its `rex` server, as `rpc:call` does. Its answer comes as
    /// `Effect::ClusterNodes`. False if no node is connected.
    pub fn ask_cluster(&mut self) -> bool {
        let connected: Vec<Arc<str>> = self.mirrors[0].connected_nodes();
        let Some(node) = connected.get(self.cluster_asks % connected.len().max(1)).cloned() else { return false };
        self.cluster_asks += 1;
        let (id, tag) = self.own_ref(NODES_CALL);
        let call = Term::tuple(vec![
            Term::atom("$gen_call"),
            Term::tuple(vec![Term::Pid(self.gw.clone()), Term::Ref(tag)]),
            Term::tuple(vec![
                Term::atom("call"),
                Term::atom("erlang"),
                Term::atom("nodes"),
                Term::Nil,
                Term::Pid(self.gw.clone()),
            ]),
        ]);
        self.cluster_call = Some((id, node.clone()));
        let control = Control::RegSend { from: self.gw.clone(), name: "rex".into() };
        self.send_to_node(&node, control, Some(&etf::encode(&call)))
    }

    /// `{Tag, Nodes}` answering `ask_cluster`: true if it was one.
    fn cluster_answer(&mut self, from: &Arc<str>, t: &[Term]) -> bool {
        let [Term::Ref(tag), answer] = t else { return false };
        let Some(id) = self.own_ref_id(tag, NODES_CALL) else { return false };
        let Some((_, asked)) = self.cluster_call.take_if(|(waiting, _)| *waiting == id) else { return true };
        if asked != *from {
            return true;
        }
        let Some(list) = answer.as_list() else {
            tracing::warn!(node = %from, "erlang:nodes() through rex answered {answer:?}: nodes are not discovered through it");
            return true;
        };
        let mut nodes = Vec::new();
        for n in list.iter().take(MAX_CLUSTER_NODES) {
            match n.as_atom() {
                Some(name) if crate::config::check_node_name(name).is_ok() && *name != *self.me => {
                    nodes.push(Arc::from(name))
                }
                _ => {}
            }
        }
        if list.len() > MAX_CLUSTER_NODES {
            tracing::warn!(node = %from, seen = list.len(), "the cluster has more nodes than the gateway follows ({MAX_CLUSTER_NODES}); the rest are not mirrored");
        }
        self.out.push(Effect::ClusterNodes { from: from.clone(), nodes });
        true
    }

    pub fn node_down(&mut self, node: &Arc<str>) {
        for ix in 0..self.mirrors.len() {
            for c in self.mirrors[ix].disconnected(node) {
                self.local_change(c);
            }
        }
        // Erlang told its processes `noconnection` itself; forget their monitors.
        for key in self.watchers.node_down(node) {
            self.unwatched(key);
        }
        // Monitors held there for peers end with noconnection.
        for (_, mon) in self.held.take_node(node) {
            self.peers[mon.peer].exports.unpin(mon.target);
            let reason = etf::encode(&Term::atom("noconnection"));
            self.relay(mon.peer, Relay::Down { target: mon.target }, &reason, None, false);
        }
        self.scope_monitors.retain(|_, (n, _)| **n != **node);
        self.scope_waits.retain(|(n, _), _| **n != **node);
        self.recoordinate();
    }

    /// `{SEND_SENDER, From, To}` read in place: to a pid on our node.
    pub fn node_send(&mut self, node: &Arc<str>, from: Bytes, to: (u32, u32, u32), payload: &[u8]) {
        self.send_to_our_pid(node, to, Some(Sender::Encoded(from)), payload);
    }

    pub fn node_control(&mut self, node: &Arc<str>, control: Term, payload: Option<Bytes>) {
        let c = match Control::parse(&control) {
            Ok(c) => c,
            Err(e) => return self.reject(None, Reject::BadControl, || format!("from node {node}: {e}")),
        };
        match c {
            Control::Send { to } | Control::SendSender { to, .. } if *to.node != *self.me => {
                self.reject(None, Reject::UnknownProxy, || format!("from node {node}: a message for {to} reached the gateway"));
            }
            Control::Send { to } => {
                let Some(payload) = payload else { return self.reject(None, Reject::BadControl, String::new) };
                self.send_to_our_pid(node, (to.id, to.serial, to.creation), None, &payload);
            }
            Control::SendSender { from, to } => {
                let Some(payload) = payload else { return self.reject(None, Reject::BadControl, String::new) };
                self.send_to_our_pid(node, (to.id, to.serial, to.creation), Some(Sender::Pid(from)), &payload);
            }
            Control::AliasSend { from, alias } => {
                let Some(payload) = payload else { return self.reject(None, Reject::BadControl, String::new) };
                match self.proxies.ref_key(&alias) {
                    Some(key) => self.send_to_peer(key, Some(Sender::Pid(from)), &payload, None, true),
                    None => self.reject(None, Reject::UnknownProxy, || format!("from node {node}: an alias the gateway never made")),
                }
            }
            Control::RegSend { from, name } => match (name.as_str(), payload) {
                (CONFIRM_NAME, Some(payload)) => self.send_confirmed(&from, &payload),
                _ => self.reject(None, Reject::UnknownName, || format!("from node {node}: a message to {name:?} on the gateway's node, which has only {CONFIRM_NAME:?}")),
            },
            Control::MonitorP { watcher, target: Target::Name(name), mref } => {
                // Only `wandist` exists on the gateway's node (and never ends).
                if name != CONFIRM_NAME {
                    self.monitor_exit(Target::Name(name), &watcher, &mref, "noproc");
                }
            }
            Control::MonitorP { watcher, target: Target::Pid(target), mref } => {
                if self.gws.contains(&target) {
                    return; // a scope watching us: the connection itself tells it
                }
                let home = self.proxies.pid_key(&target).and_then(|k| Some((k, self.proxies.home(k)?)));
                match home {
                    Some((key, h)) if h.kind == Kind::Pid => self.watch(key, h.peer, h.handle, watcher, mref),
                    _ => self.monitor_exit(Target::Pid(target), &watcher, &mref, "noproc"),
                }
            }
            Control::DemonitorP { target: Target::Pid(target), mref, .. } => {
                if let Some(key) = self.proxies.pid_key(&target) {
                    if self.watchers.remove(key, &mref) {
                        self.unwatched(key);
                    }
                }
            }
            Control::MonitorPExit { mref, reason, .. } => self.monitor_ended(node, &mref, etf::encode(&reason)),
            Control::PayloadMonitorPExit { mref, .. } => {
                let reason = payload.map(|p| p.to_vec()).unwrap_or_else(|| etf::encode(&Term::atom("noproc")));
                self.monitor_ended(node, &mref, reason)
            }
            Control::Link { from, to } => {
                // Links across clusters are refused with an immediate exit signal.
                let reason = Term::tuple(vec![Term::atom("wandist"), Term::atom("links_not_supported")]);
                self.send_to_node(&from.node.clone(), Control::Exit { from: to, to: from, reason }, None);
            }
            Control::UnlinkId { id, from, to } => {
                self.send_to_node(&from.node.clone(), Control::UnlinkIdAck { id, from: to, to: from }, None);
            }
            other => tracing::debug!(node = %node, ?other, "ignoring a distribution control message"),
        }
    }

    /// A node sent something the connection could not read (it stays up).
    pub fn node_rejected(&mut self, node: &Arc<str>, why: &str) {
        self.reject(None, Reject::Undecodable, || format!("from node {node}: dropped a distribution packet: {why}"));
    }

    /// A message from `node` to the pid on our node with these parts: to
    /// our scope process, or through a proxy to its peer.
    fn send_to_our_pid(
        &mut self,
        node: &Arc<str>,
        (id, serial, creation): (u32, u32, u32),
        from: Option<Sender>,
        payload: &[u8],
    ) {
        if let Some(ix) = self.gws.iter().position(|g| (id, serial, creation) == (g.id, g.serial, g.creation)) {
            self.on_scope_message(node, ix, payload);
        } else if let Some(key) = self.proxies.pid_key_parts(id, serial, creation) {
            self.send_to_peer(key, from, payload, None, false);
        } else {
            self.reject(None, Reject::UnknownProxy, || {
                format!("from node {node}: a message to a pid of an earlier run of the gateway")
            });
        }
    }

    /// A monitor the gateway holds ended: a scope, or one held for a peer.
    fn monitor_ended(&mut self, node: &Arc<str>, mref: &Ref, reason: Vec<u8>) {
        if let Some((n, ix)) = self.own_ref_id(mref, SCOPE_MONITOR).and_then(|id| self.scope_monitors.remove(&id)) {
            tracing::warn!(node = %n, scope = %self.scopes[ix], "pg scope process ended; re-mirroring when it is back");
            if ix == 0 && self.claims.as_ref().is_some_and(|c| c.waiting() && c.coordinator() == Some(&n)) {
                // A scope older than OTP 25.1 has no pg:monitor/2 and ends
                // on the call: that node orders no claims from now on.
                tracing::error!(node = %n, "the pg scope ended while answering this gateway's pg:monitor/2 call (OTP 25.1 or later is needed for [erlang] coordinate): claims are no longer ordered on that node");
                self.no_claims_on.push(n.clone());
            }
            for c in self.mirrors[ix].scope_ended(&n) {
                self.local_change(c);
            }
            self.recoordinate();
        } else if let Some(mon) = self.own_ref_id(mref, HELD_MONITOR).and_then(|id| self.held.remove(id)) {
            self.peers[mon.peer].exports.unpin(mon.target);
            self.relay(mon.peer, Relay::Down { target: mon.target }, &reason, None, false);
        } else {
            tracing::debug!(node = %node, "an exit for a monitor the gateway does not hold");
        }
    }

    /// Ends a local watcher's monitor at once, with `reason`.
    fn monitor_exit(&mut self, target: Target, watcher: &Pid, mref: &Ref, reason: &str) {
        let exit =
            Control::MonitorPExit { target, watcher: watcher.clone(), mref: mref.clone(), reason: Term::atom(reason) };
        self.send_to_node(&watcher.node.clone(), exit, None);
    }

    // ---- confirmed sends ----

    /// `{send_confirmed, From, Ref, Proxy, Msg}` to `wandist`: exactly one
    /// `{wandist_confirm, Ref, Result}` goes back to From, whatever happens.
    fn send_confirmed(&mut self, sender: &Pid, payload: &[u8]) {
        let msg = match etf::decode(payload) {
            Ok((t, _)) => t,
            Err(_) => {
                return self
                    .reject(None, Reject::BadConfirmRequest, || format!("an undecodable confirmed send from {sender}"))
            }
        };
        let t = msg.as_tuple().unwrap_or_default();
        // (A target that is not a pid is not well formed; a pid that is no
        // proxy is `unknown_proxy`.)
        let well_formed = t.len() == 5 && t[0].as_atom() == Some("send_confirmed") && t[3].as_pid().is_some();
        let from = t.get(1).and_then(Term::as_pid).cloned();
        // Anyone who can be answered is: a request that is not well formed
        // gets {failed, bad_request}.
        let Some(from) = from.filter(|_| t.len() >= 3) else {
            return self.reject(None, Reject::BadConfirmRequest, || {
                format!("a confirmed send from {sender} with nobody to answer")
            });
        };
        let reply_ref = t[2].clone();
        if !well_formed {
            self.reject(None, Reject::BadConfirmRequest, || format!("a malformed confirmed send from {sender}"));
            return self.answer(&from, reply_ref, failed("bad_request"));
        }
        let key = t[3]
            .as_pid()
            .and_then(|p| self.proxies.pid_key(p))
            .filter(|k| self.proxies.home(*k).is_some_and(|h| h.kind == Kind::Pid));
        let Some(key) = key else {
            // Counted like any message to a forgotten proxy, and answered.
            self.reject(None, Reject::UnknownProxy, || format!("a confirmed send from {sender} to an unknown proxy"));
            return self.answer(&from, reply_ref, failed("unknown_proxy"));
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        self.confirms.insert(token, (from.clone(), reply_ref));
        self.send_to_peer(key, Some(Sender::Pid(from)), &etf::encode(&t[4]), Some(token), false);
    }

    fn answer(&mut self, to: &Pid, reply_ref: Term, result: Term) {
        self.send_msg(to, &etf::encode(&confirm_reply(reply_ref, result)));
    }

    /// The outcome of a confirmed send, to whoever asked.
    fn confirm(&mut self, token: Token, result: Term) {
        if let Some((from, reply_ref)) = self.confirms.remove(&token) {
            self.answer(&from, reply_ref, result);
        }
    }

    /// The shell could not hand a message to its peer's route: a confirmed
    /// one is answered now.
    pub fn not_sent(&mut self, peer: PeerIx, token: Option<Token>, reason: Reject) {
        self.reject(Some(peer), reason, || "a message for the peer was not sent".to_string());
        if let Some(t) = token {
            self.confirm(t, failed(reason.label()));
        }
    }

    // ---- crossing to a peer ----

    /// A message from a local process to a proxy (or an alias proxy).
    fn send_to_peer(&mut self, key: u64, from: Option<Sender>, payload: &[u8], token: Option<Token>, alias: bool) {
        let kind = if alias { Kind::Ref } else { Kind::Pid };
        let Some(home) = self.proxies.home(key).filter(|h| h.kind == kind) else {
            self.reject(None, Reject::UnknownProxy, || {
                "a message to a proxy the gateway has forgotten (or never made)".into()
            });
            if let Some(t) = token {
                self.confirm(t, failed("unknown_proxy"));
            }
            return;
        };
        let p = home.peer;
        let me = self.me.clone();
        let sender = match from {
            None => Ok(None),
            Some(Sender::Pid(f)) if *f.node == *me => Ok(None),
            Some(Sender::Pid(f)) => self.peers[p].exports.issue(Kind::Pid, &etf::pid_bytes(&f)).map(Some),
            Some(Sender::Encoded(bytes)) => {
                let view = etf::pid_view_of(&bytes);
                match view {
                    Some(v) if *v.node_utf8() == *me.as_bytes() => Ok(None),
                    Some(v) => self.peers[p].exports.issue(Kind::Pid, &v.canonical()).map(Some),
                    None => Ok(None),
                }
            }
        };
        let from = match sender {
            Ok(f) => f,
            Err(r) => return self.not_sent(p, token, Reject::Refused(r.label())),
        };
        let relay =
            if alias { Relay::AliasSend { to: home.handle, from } } else { Relay::Send { to: home.handle, from } };
        // One buffer: the relay header, then the message translated into it.
        let mut out = Vec::with_capacity(32 + payload.len());
        if codec::encode_value(&relay, &mut out).is_err() {
            return self.not_sent(p, token, Reject::Untranslatable);
        }
        let peer = &mut self.peers[p];
        let mut t = Outbound { me: &me, peer: p, proxies: &self.proxies, exports: &mut peer.exports };
        if let Err(e) = scan::translate(payload, &mut out, &mut t, Source::Node) {
            let name = peer.name.clone();
            self.reject(Some(p), Reject::Refused(e.reason()), || format!("a message for {name} not sent: {e}"));
            if let Some(t) = token {
                self.confirm(t, failed(e.reason()));
            }
            return;
        }
        self.counters.to_peers.increment(1);
        self.out.push(Effect::Peer { peer: p, payload: Bytes::from(out), token, data: true });
    }

    /// A monitor signal (or other relay) for a peer; `body` is a term from
    /// our side (translated for the peer).
    fn relay(&mut self, p: PeerIx, r: Relay, body: &[u8], token: Option<Token>, data: bool) {
        let mut out = Vec::with_capacity(32 + body.len());
        if codec::encode_value(&r, &mut out).is_err() {
            return;
        }
        if !body.is_empty() {
            let me = self.me.clone();
            let mark = out.len();
            let mut t = Outbound { me: &me, peer: p, proxies: &self.proxies, exports: &mut self.peers[p].exports };
            if scan::translate(body, &mut out, &mut t, Source::Node).is_err() {
                // An exit reason that cannot cross (it names a third
                // cluster's process, say): said in general terms.
                out.truncate(mark);
                out.extend_from_slice(&etf::encode(&Term::tuple(vec![
                    Term::atom("wandist"),
                    Term::atom("untranslatable_reason"),
                ])));
            }
        }
        self.out.push(Effect::Peer { peer: p, payload: Bytes::from(out), token, data });
    }

    // ---- local watchers of proxies ----

    fn watch(&mut self, key: u64, p: PeerIx, handle: Handle, watcher: Pid, mref: Ref) {
        // Route down: as with a monitor on a node that is not connected.
        if !self.peers[p].up {
            return self.monitor_exit(Target::Pid(self.proxies.pid(key)), &watcher, &mref, "noconnection");
        }
        if self.watchers.add(key, watcher, mref) {
            self.proxies.pin(key);
            self.relay(p, Relay::Monitor { target: handle }, &[], None, false);
        }
    }

    /// Proxy `key` lost its last local watcher.
    fn unwatched(&mut self, key: u64) {
        let Some(home) = self.proxies.home(key) else { return };
        self.proxies.unpin(key);
        self.relay(home.peer, Relay::Demonitor { target: home.handle }, &[], None, false);
    }

    /// Tells every local watcher of `key` that it is down, with `reason` (ETF).
    fn fire_down(&mut self, key: u64, reason: &[u8]) {
        let list = self.watchers.take(key);
        if list.is_empty() {
            return;
        }
        self.proxies.unpin(key);
        let proxy = self.proxies.pid(key);
        for (watcher, mref) in list {
            let control =
                Control::PayloadMonitorPExit { target: Target::Pid(proxy.clone()), watcher: watcher.clone(), mref };
            self.send_to_node(&watcher.node, control, Some(reason));
        }
    }

    // ---- the local scopes ----

    /// A message to the gateway's pg process in scope `ix` (from that
    /// scope's processes, or answers to the gateway's calls).
    fn on_scope_message(&mut self, node: &Arc<str>, ix: usize, payload: &[u8]) {
        let msg = match etf::decode(payload) {
            Ok((t, _)) => t,
            Err(e) => {
                return self.reject(None, Reject::Undecodable, || format!("from node {node}: a scope message: {e}"))
            }
        };
        let t = msg.as_tuple().unwrap_or_default();
        if matches!(t.first(), Some(Term::Ref(_))) && (self.cluster_answer(node, t) || self.claim_message(t)) {
            return;
        }
        match (t.first().and_then(Term::as_atom), t.len()) {
            (Some("$gen_cast"), 2) => {
                let inner = t[1].as_tuple().unwrap_or_default();
                if inner.first().and_then(Term::as_atom) != Some("sync") || inner.len() != 3 {
                    return tracing::debug!(node = %node, "ignoring a cast to the gateway's scope process");
                }
                let Some(scope) = inner[1].as_pid().cloned() else { return };
                let mut groups = Vec::new();
                for g in inner[2].as_list().unwrap_or_default() {
                    if let Some([group, pids]) = g.as_tuple() {
                        if let Some(name) = self.exportable(node, ix, group) {
                            groups.push((name, self.member_pids(pids)));
                        }
                    }
                }
                self.set_scope(node, ix, &scope);
                for c in self.mirrors[ix].replace(node, groups) {
                    self.local_change(c);
                }
            }
            (Some("discover"), 2 | 3) => {
                let Some(scope) = t[1].as_pid().cloned() else { return };
                self.set_scope(node, ix, &scope);
                self.sync_scope(ix, &scope);
            }
            (Some("join"), 4) => {
                let Some(name) = self.exportable(node, ix, &t[2]) else { return };
                let pids = self.member_pids(&t[3]);
                if let Some(c) = self.mirrors[ix].join(node, &name, pids) {
                    self.local_change(c);
                }
            }
            (Some("leave"), 4) => {
                let pids = self.member_pids(&t[2]);
                let groups: Vec<String> = t[3]
                    .as_list()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(groups::name_of)
                    .map(|g| self.qualify(ix, &g))
                    .collect();
                for c in self.mirrors[ix].leave(node, &pids, &groups) {
                    self.local_change(c);
                }
            }
            _ => tracing::debug!(node = %node, "ignoring a message to the gateway's scope process: {msg:?}"),
        }
    }

    /// A local group's name for peers, or None (said) if it may not cross.
    fn exportable(&mut self, node: &Arc<str>, ix: usize, group: &Term) -> Option<String> {
        if claims::is_claim_group(group) {
            return None; // the gateways' own (`claims`), never a peer's business
        }
        let name = groups::name_of(group).map(|n| self.qualify(ix, &n));
        if name.is_none() {
            self.reject(None, Reject::GroupNotExported, || {
                format!("from node {node}: a pg group holding a pid or reference stays in this cluster: {group:?}")
            });
        }
        name
    }

    /// The members a scope message names: pids of this cluster, canonical.
    fn member_pids(&self, t: &Term) -> Vec<Vec<u8>> {
        let list = match t {
            Term::Pid(p) => vec![Term::Pid(p.clone())],
            other => other.as_list().unwrap_or_default(),
        };
        list.iter().filter_map(Term::as_pid).filter(|p| *p.node != *self.me).map(etf::pid_bytes).collect()
    }

    fn set_scope(&mut self, node: &Arc<str>, ix: usize, scope: &Pid) {
        if !self.mirrors[ix].set_scope(node, scope) {
            return;
        }
        self.scope_waits.remove(&(node.clone(), ix));
        tracing::info!(node = %node, scope = %self.scopes[ix], pid = %scope, "mirroring pg scope");
        let (id, mref) = self.own_ref(SCOPE_MONITOR);
        self.scope_monitors.insert(id, (node.clone(), ix));
        let control = Control::MonitorP { watcher: self.gw.clone(), target: Target::Pid(scope.clone()), mref };
        self.send_to_node(node, control, None);
        self.recoordinate();
    }

    /// Answers a scope's discover: everything the gateway joined, as one sync.
    fn sync_scope(&mut self, ix: usize, scope: &Pid) {
        let msg = self.full_sync(ix);
        self.send_bulk(ix, scope, &msg);
    }

    /// Members joined or left and not yet told to the scopes.
    pub fn sync_debt(&self) -> usize {
        self.sync_debt
    }

    /// Tells every scope everything the gateway joined, in one sync. The
    /// shell calls it once large steps stop coming (join and leave messages
    /// sent meanwhile are consistent with it: a sync replaces them all).
    pub fn flush_sync(&mut self) {
        if self.sync_debt == 0 {
            return;
        }
        self.sync_debt = 0;
        for ix in 0..self.mirrors.len() {
            let msg = self.full_sync(ix);
            for (_, scope) in self.mirrors[ix].scopes() {
                self.send_bulk(ix, &scope, &msg);
            }
        }
    }

    /// A sync of everything the gateway joined in scope `ix` (the claims
    /// and serving groups are in the primary scope).
    fn full_sync(&self, ix: usize) -> Vec<u8> {
        let groups = self.mirrors[ix].joined().map(|(g, keys)| (self.group_term(g), keys.collect()));
        // (A claim's membership never changes while it stands, so a sync
        // never moves it in its group's order.)
        let primary = ix == 0;
        let claims =
            self.claims.iter().filter(|_| primary).flat_map(Claims::clusters).map(|c| (claim_group(c), vec![GW_KEY]));
        let serving = self
            .serving
            .iter()
            .filter(|_| primary)
            .map(|c| (etf::encode(&claims::serving_term(c))[1..].to_vec(), vec![GW_KEY]));
        mirror::sync(&self.gws[ix], groups.chain(claims).chain(serving), |out, k| self.proxies.put_pid(out, k))
    }

    // ---- several instances of the cluster (`claims`) ----

    /// Claims the route to `cluster` (a reload added it): joins its claim
    /// group on every scope, and asks the coordinator for its order.
    pub fn claim(&mut self, cluster: Arc<str>) {
        let Some(c) = self.claims.as_mut() else { return };
        if !c.claim(cluster.clone()) {
            return;
        }
        let msg = mirror::join(&self.gw, &claim_group(&cluster), &[GW_KEY], |out, k| self.proxies.put_pid(out, k));
        for (_, scope) in self.mirrors[0].scopes() {
            self.send_bulk(0, &scope, &msg);
        }
        if let Some(node) = self.claims.as_ref().and_then(|c| c.coordinator().cloned()) {
            self.watch_claim(&node, cluster);
        }
    }

    /// Withdraws the claim on `cluster`'s route (a reload removed it, or
    /// the gateway stops): it leaves the claim group everywhere, so
    /// another instance takes the route at once.
    pub fn unclaim(&mut self, cluster: &str) {
        let Some(c) = self.claims.as_mut() else { return };
        if !c.clusters().any(|c| **c == *cluster) {
            return;
        }
        if let Some(step) = c.unclaim(cluster) {
            self.out.push(Effect::Claim(step));
        }
        let msg = mirror::leave(&self.gw, &claim_group(cluster), &[GW_KEY], |out, k| self.proxies.put_pid(out, k));
        for (_, scope) in self.mirrors[0].scopes() {
            self.send_bulk(0, &scope, &msg);
        }
    }

    /// The gateway is stopping: its claims are withdrawn (another instance
    /// takes the routes); once the next instance serves each route it held
    /// (or at once with none, or after the hand-over wait), the peers are
    /// told our members left (their proxies leave their clusters' pg, so
    /// their senders stop choosing us), and our proxies leave the local
    /// scopes (ours stop choosing them). Everything keeps working
    /// meanwhile: messages already on their way, to a proxy looked up a
    /// moment ago or to one of our members, are carried and delivered.
    /// `Effect::Left(None)` says when the members are withdrawn.
    pub fn leave(&mut self) {
        if self.leaving || self.handing.iter().any(|h| h.peer.is_none()) {
            return;
        }
        self.unclaim_all();
        self.handing.push(Handing { peer: None });
        self.progress_handovers();
    }

    /// `p`'s route goes to another instance of this cluster: as `leave`,
    /// for that route only (`Effect::Left(Some(p))` once withdrawn).
    pub fn leave_peer(&mut self, p: PeerIx) {
        if self.peers[p].removed || self.peers[p].leaving || self.handing.iter().any(|h| h.peer == Some(p)) {
            return;
        }
        self.handing.push(Handing { peer: Some(p) });
        self.progress_handovers();
    }

    /// Whether `p`'s members can be withdrawn now: no other instance
    /// claims its route, or one serves it, or nothing is up to hand over.
    fn handed(&self, p: PeerIx) -> bool {
        let peer = &self.peers[p];
        let Some(c) = self.claims.as_ref() else { return true };
        peer.removed || peer.leaving || !peer.up || !c.another_claims(&peer.name) || c.another_serves(&peer.name)
    }

    /// Withdraws what is handed over.
    fn progress_handovers(&mut self) {
        let mut i = 0;
        while i < self.handing.len() {
            let peer = self.handing[i].peer;
            let ready = match peer {
                Some(p) => self.handed(p),
                None => (0..self.peers.len()).all(|p| self.handed(p)),
            };
            if !ready {
                i += 1;
                continue;
            }
            self.handing.remove(i);
            self.withdraw(peer);
        }
    }

    /// Withdraws a hand-over's members now, served or not (the gateway
    /// waited as long as it would: `Running`).
    pub fn withdraw_now(&mut self, peer: Option<PeerIx>) {
        let Some(i) = self.handing.iter().position(|h| h.peer == peer) else { return };
        self.handing.remove(i);
        let name = peer.map(|p| self.peers[p].name.to_string()).unwrap_or_default();
        tracing::warn!(peer = %name, "no other instance serves the route yet: withdrawing our members anyway");
        self.withdraw(peer);
    }

    fn withdraw(&mut self, peer: Option<PeerIx>) {
        match peer {
            Some(p) => self.withdraw_peer(p),
            None => self.withdraw_all(),
        }
        self.out.push(Effect::Left(peer));
    }

    /// Our members withdrawn from every peer, and the peers' proxies out
    /// of the local scopes (one empty sync; after it nothing more is sent
    /// to a scope: a leave naming a group it dropped would crash it).
    fn withdraw_all(&mut self) {
        if self.leaving {
            return;
        }
        self.serving.clear();
        let ours = self.local_members();
        for p in 0..self.peers.len() {
            for c in &ours {
                self.export_change(p, &LocalChange { join: false, ..c.clone() });
            }
        }
        self.leaving = true;
        for p in 0..self.peers.len() {
            self.flush_batch(p);
        }
        for ix in 0..self.mirrors.len() {
            let empty = mirror::sync(&self.gws[ix], std::iter::empty(), |out, k| self.proxies.put_pid(out, k));
            for (_, scope) in self.mirrors[ix].scopes() {
                self.send_bulk(ix, &scope, &empty);
            }
        }
        self.left_scopes = true;
        tracing::info!("stopping: our members withdrawn from the peers, and the peers' from the local pg scopes");
    }

    /// Our members withdrawn from `p`, and its proxies out of the local
    /// scopes (they still resolve, for messages on their way); nothing
    /// more is exported to it or joined for it.
    fn withdraw_peer(&mut self, p: PeerIx) {
        if self.peers[p].removed || self.peers[p].leaving {
            return;
        }
        self.set_serving(p, false);
        for c in self.local_members() {
            self.export_change(p, &LocalChange { join: false, ..c });
        }
        self.flush_batch(p);
        self.peers[p].leaving = true;
        let mut theirs: Vec<(usize, String, Vec<u64>)> = Vec::new();
        for (ix, m) in self.mirrors.iter().enumerate() {
            for (group, keys) in m.joined() {
                let keys: Vec<u64> = keys.filter(|&k| self.proxies.home(k).is_some_and(|h| h.peer == p)).collect();
                if !keys.is_empty() {
                    theirs.push((ix, group.to_string(), keys));
                }
            }
        }
        for (ix, group, keys) in theirs {
            let gone = self.mirrors[ix].remote_leave(&group, &keys);
            let term = self.group_term(&group);
            for chunk in gone.chunks(mirror::PIDS_PER_MESSAGE) {
                for (_, scope) in self.mirrors[ix].scopes() {
                    let msg = mirror::leave(&self.gws[ix], &term, chunk, |out, k| self.proxies.put_pid(out, k));
                    self.send_bulk(ix, &scope, &msg);
                }
            }
        }
        let name = self.peers[p].name.clone();
        tracing::info!(peer = %name, "handing the route over: our members withdrawn from the peer, its members from the local pg scopes");
    }

    /// Withdraws every claim (the gateway is stopping).
    pub fn unclaim_all(&mut self) {
        let clusters: Vec<Arc<str>> = self.claims.iter().flat_map(Claims::clusters).cloned().collect();
        for c in clusters {
            self.unclaim(&c);
        }
    }

    /// On the shell's timer: routes held with no coordinating node for
    /// too long are given up.
    pub fn claims_tick(&mut self, now: std::time::Instant) {
        let Some(c) = self.claims.as_mut() else { return };
        for step in c.tick(now) {
            tracing::warn!(?step, "no local node's pg scope is known: this instance gives the route up");
            self.out.push(Effect::Claim(step));
        }
    }

    /// Picks the coordinating node again (the connected node with the least
    /// name whose scope is known), after scopes came or went.
    fn recoordinate(&mut self) {
        let Some(c) = self.claims.as_mut() else { return };
        let best =
            self.mirrors[0].scopes().into_iter().map(|(n, _)| n).filter(|n| !self.no_claims_on.contains(n)).min();
        let Some(old) = c.set_coordinator(best.clone()) else { return };
        for (node, watch) in old {
            let call = self.scope_call(Term::tuple(vec![Term::atom("demonitor"), Term::Ref(watch)]));
            self.send_to_node(
                &node,
                Control::RegSend { from: self.gw.clone(), name: self.scopes[0].clone() },
                Some(&call),
            );
        }
        match best {
            Some(node) => {
                tracing::info!(node = %node, "claims on routes are ordered by this node's pg scope");
                self.ask_claims(&node);
            }
            None => tracing::warn!("no local node's pg scope is known: the claims on routes cannot be ordered"),
        }
    }

    fn ask_claims(&mut self, node: &Arc<str>) {
        let clusters: Vec<Arc<str>> = self.claims.iter().flat_map(Claims::clusters).cloned().collect();
        for cluster in clusters {
            self.watch_claim(node, cluster);
        }
    }

    /// `pg:monitor(Scope, Group)` on `node` for the route's claim group and
    /// its serving group, as calls from our pg process.
    fn watch_claim(&mut self, node: &Arc<str>, cluster: Arc<str>) {
        for serving in [false, true] {
            let (id, tag) = self.own_ref(CLAIM_CALL);
            let group = if serving { claims::serving_term(&cluster) } else { claims::group_term(&cluster) };
            let call = Term::tuple(vec![
                Term::atom("$gen_call"),
                Term::tuple(vec![Term::Pid(self.gw.clone()), Term::Ref(tag)]),
                Term::tuple(vec![Term::atom("monitor"), group]),
            ]);
            if let Some(c) = self.claims.as_mut() {
                c.calling(id, cluster.clone(), serving);
            }
            let control = Control::RegSend { from: self.gw.clone(), name: self.scopes[0].clone() };
            self.send_to_node(node, control, Some(&etf::encode(&call)));
        }
    }

    /// `p`'s route serves (its session is up, the peer's members are in pg
    /// through it), or no longer does: told to the other instances through
    /// the serving group.
    fn set_serving(&mut self, p: PeerIx, on: bool) {
        if self.claims.is_none() || self.leaving || self.peers[p].leaving && on {
            return;
        }
        let cluster = self.peers[p].name.clone();
        if on == self.serving.contains(&cluster) {
            return;
        }
        let term = etf::encode(&claims::serving_term(&cluster))[1..].to_vec();
        let msg = if on {
            self.serving.push(cluster);
            mirror::join(&self.gw, &term, &[GW_KEY], |out, k| self.proxies.put_pid(out, k))
        } else {
            self.serving.retain(|c| *c != cluster);
            mirror::leave(&self.gw, &term, &[GW_KEY], |out, k| self.proxies.put_pid(out, k))
        };
        for (_, scope) in self.mirrors[0].scopes() {
            self.send_bulk(0, &scope, &msg);
        }
    }

    /// A call to a scope whose answer is not waited for.
    fn scope_call(&mut self, request: Term) -> Vec<u8> {
        let (_, tag) = self.own_ref(CLAIM_CALL);
        etf::encode(&Term::tuple(vec![
            Term::atom("$gen_call"),
            Term::tuple(vec![Term::Pid(self.gw.clone()), Term::Ref(tag)]),
            request,
        ]))
    }

    /// `{Tag, Reply}` to a call of ours, or `{Watch, join | leave, Group,
    /// Pids}` from a claim group's monitor: true if it was one.
    fn claim_message(&mut self, t: &[Term]) -> bool {
        let call = match t {
            [Term::Ref(tag), _] => match self.own_ref_id(tag, CLAIM_CALL) {
                Some(id) => Some(id),
                None => return false,
            },
            _ => None,
        };
        let Some(c) = self.claims.as_mut() else { return false };
        let pids_of = |t: &Term| -> Vec<Pid> {
            match t {
                Term::Pid(p) => vec![p.clone()],
                other => other.as_list().unwrap_or_default().iter().filter_map(Term::as_pid).cloned().collect(),
            }
        };
        match (t, call) {
            ([_, reply], Some(id)) => match reply.as_tuple() {
                Some([Term::Ref(watch), members]) if c.is_call(id) => c.answered(id, watch.clone(), pids_of(members)),
                _ => {} // a demonitor's `ok`, or a stale answer
            },
            ([Term::Ref(watch), Term::Atom(what), _, pids], None) if what == "join" => c.joined(watch, pids_of(pids)),
            ([Term::Ref(watch), Term::Atom(what), _, pids], None) if what == "leave" => c.left(watch, &pids_of(pids)),
            _ => return false,
        }
        true
    }

    /// Decides who holds what after the claims' changes so far (the shell
    /// calls it once per round); true if anything is to be done.
    pub fn decide_claims(&mut self) -> bool {
        let had = self.out.len();
        if !self.handing.is_empty() {
            self.progress_handovers();
        }
        let Some(c) = self.claims.as_mut() else { return self.out.len() > had };
        let steps = c.decide();
        for step in &steps {
            match step {
                Step::Hold(cl) => tracing::info!(peer = %cl, "this instance holds the route now"),
                Step::Release(cl) => {
                    tracing::info!(peer = %cl, "another instance of this cluster holds the route now: this one hands it over")
                }
            }
        }
        self.out.extend(steps.into_iter().map(Effect::Claim));
        self.out.len() > had
    }

    /// Local members joined or left: each peer that may see the group gets
    /// them as handles issued to it (pinned while they are members).
    fn local_change(&mut self, c: LocalChange) {
        for p in 0..self.peers.len() {
            self.export_change(p, &c);
        }
    }

    /// A change of our members, as peer `p` is told it (if it may see it).
    fn export_change(&mut self, p: PeerIx, c: &LocalChange) {
        if self.leaving || self.peers[p].leaving || self.peers[p].removed || !self.peers[p].export.allows(&c.group) {
            return;
        }
        let mut handles = Vec::with_capacity(c.members.len());
        let mut refused = 0;
        let exports = &mut self.peers[p].exports;
        for m in &c.members {
            if c.join {
                match exports.issue(Kind::Pid, m) {
                    Ok(h) => {
                        exports.pin(h);
                        handles.push(h);
                    }
                    Err(_) => refused += 1,
                }
            } else if let Some(h) = exports.find(m) {
                exports.unpin(h);
                handles.push(h);
            }
        }
        if refused > 0 {
            self.reject(Some(p), Reject::HandleQuota, || {
                format!(
                    "{refused} members of {:?} not exported: the handles issued to the peer are at their quota",
                    c.group
                )
            });
        }
        // (In bounded pieces: one route step each.)
        for chunk in handles.chunks(MEMBERS_PER_STEP) {
            let (group, members) = (c.group.clone(), chunk.to_vec());
            let change =
                if c.join { LocalGroups::Join { group, members } } else { LocalGroups::Leave { group, members } };
            self.out.push(Effect::Groups { peer: p, change });
        }
    }

    // ---- from the routes ----

    /// An item from `p`'s route. Membership changes queue up as jobs,
    /// applied a step at a time by `work` (so no one change holds up the
    /// shell for long); messages and outcomes go on at once, overtaking the
    /// jobs (nothing orders them against pg changes, in Erlang either); but
    /// `Up` and `Lost`, which change what `p`'s handles mean, wait for the
    /// jobs before them, and hold back everything after them.
    pub fn from_route(&mut self, p: PeerIx, item: ToLocal) {
        let peer = &mut self.peers[p];
        if peer.removed {
            // The route's last words: outcomes still answer their senders;
            // a message is not delivered (its peer is told so).
            match item {
                ToLocal::Confirm { .. } => self.apply(p, item),
                ToLocal::Deliver { mut held, .. } => held.undeliverable(),
                _ => {}
            }
            return;
        }
        if !peer.deferred.is_empty() {
            peer.deferred.push_back(item);
            return;
        }
        if matches!(item, ToLocal::Members { .. }) && self.held_for_successor(p) {
            self.peers[p].deferred.push_back(item);
            return;
        }
        let peer = &mut self.peers[p];
        match item {
            ToLocal::Members { change, .. } => self.queue_change(p, change),
            ToLocal::Up { .. } | ToLocal::Lost { .. } | ToLocal::Synced { .. } if !peer.jobs.is_empty() => {
                peer.deferred.push_back(item)
            }
            item => self.apply(p, item),
        }
    }

    /// Queues a membership change of `p` (checking its group's atoms).
    fn queue_change(&mut self, p: PeerIx, change: Change) {
        let (group, members, join) = match change {
            Change::Join { group, members } => (group, members, true),
            Change::Leave { group, members } => (group, members, false),
        };
        // The group's scope must be one mirrored here; its name from now on
        // is ours for it (a peer may name our primary scope by name).
        let Some((ix, local)) = self.split_group(&group) else {
            let name = self.peers[p].name.clone();
            return self.reject(Some(p), Reject::ScopeNotMirrored, || {
                format!("members of {name}'s group {group:?} not imported: this gateway does not mirror its pg scope (add it to [erlang] scopes)")
            });
        };
        let group = self.qualify(ix, local);
        if join {
            // The group's atoms stay in every node's table: they count.
            let atoms = groups::atoms(local);
            if let Err(r) = atoms.iter().try_for_each(|a| self.peers[p].atoms.admit(a.as_bytes())) {
                let name = self.peers[p].name.clone();
                return self.reject(Some(p), Reject::Refused(r.label()), || {
                    format!("members of a group of {name} not imported: {r}")
                });
            }
        }
        let term = self.group_term(&group);
        self.peers[p].jobs.push_back(Job { group, term, join, members, done: 0 });
    }

    fn apply(&mut self, p: PeerIx, item: ToLocal) {
        match item {
            ToLocal::Deliver { payload, held, .. } => self.on_relay(p, &payload, held),
            ToLocal::Confirm { token, outcome, .. } => {
                let result = match outcome {
                    Outcome::Delivered => Term::atom("delivered"),
                    Outcome::Failed(r) => failed(r.label()),
                };
                self.confirm(token, result);
            }
            ToLocal::Members { change, .. } => self.queue_change(p, change),
            ToLocal::Up { epoch, .. } => {
                let peer = &mut self.peers[p];
                peer.up = true;
                if peer.session != Some(epoch) {
                    let restarted = peer.session.is_some();
                    peer.session = Some(epoch);
                    if restarted {
                        // A new run of the peer numbers its handles afresh:
                        // its old proxies resolve no more, now; their memory
                        // goes a step at a time (`work`), and any still in a
                        // group leave it (normally its withdrawal came first).
                        let proxies = self.proxies.len_of(p);
                        self.proxies.retire_peer(p);
                        tracing::info!(peer = %self.peers[p].name, proxies, "peer gateway restarted: its old proxies are forgotten");
                    }
                }
            }
            ToLocal::Synced { .. } => {
                self.peers[p].synced = true;
                self.set_serving(p, true);
            }
            ToLocal::Lost { .. } => {
                self.set_serving(p, false);
                self.peers[p].up = false;
                let reason = etf::encode(&Term::atom("noconnection"));
                let proxies = &self.proxies;
                for key in self.watchers.keys(|k| proxies.home(k).is_some_and(|h| h.peer == p)) {
                    self.fire_down(key, &reason);
                }
                for (id, mon) in self.held.take_peer(p) {
                    self.peers[p].exports.unpin(mon.target);
                    let mref = Ref {
                        node: self.me.to_string(),
                        creation: self.creation,
                        ids: vec![id as u32, (id >> 32) as u32, HELD_MONITOR],
                    };
                    let control =
                        Control::DemonitorP { watcher: self.gw.clone(), target: Target::Pid(mon.pid.clone()), mref };
                    self.send_to_node(&mon.pid.node, control, None);
                }
            }
        }
    }

    /// Applies up to MEMBERS_PER_STEP members of `p`'s oldest membership
    /// change (so a million-member snapshot never holds up other peers'
    /// messages for long). The shell calls it again while `busy(p)`.
    pub fn work(&mut self, p: PeerIx) {
        if self.proxies.retired(p) {
            // Proxies of the peer's earlier run: a step of reclaiming.
            let (pinned, _) = self.proxies.reclaim(p, MEMBERS_PER_STEP);
            if !pinned.is_empty() {
                let pinned: foldhash::HashSet<u64> = pinned.into_iter().collect();
                for m in &mut self.mirrors {
                    self.sync_debt += m.remote_forget(&pinned);
                }
            }
            return;
        }
        self.step(p);
        // Then what waited behind the jobs, in order: changes queue up as
        // jobs, messages go, and the next `Up` or `Lost` waits again for
        // the jobs before it.
        while let Some(item) = self.peers[p].deferred.pop_front() {
            match item {
                ToLocal::Members { .. } if self.held_for_successor(p) => {
                    self.peers[p].deferred.push_front(item);
                    return;
                }
                ToLocal::Members { change, .. } => self.queue_change(p, change),
                ToLocal::Up { .. } | ToLocal::Lost { .. } if !self.peers[p].jobs.is_empty() => {
                    self.peers[p].deferred.push_front(item);
                    return;
                }
                item => self.apply(p, item),
            }
        }
    }

    fn step(&mut self, p: PeerIx) {
        let Some(job) = self.peers[p].jobs.front_mut() else { return };
        let end = (job.done + MEMBERS_PER_STEP).min(job.members.len());
        let slice: Vec<Handle> = job.members[job.done..end].to_vec();
        job.done = end;
        let (group, term, join) = (job.group.clone(), job.term.clone(), job.join);
        let large_leave = !job.join && job.members.len() >= LARGE_STEP;
        if end == job.members.len() {
            self.peers[p].jobs.pop_front();
        }
        // A batch of joins goes before anything else changes the groups.
        if !(join && self.peers[p].batch.as_ref().is_some_and(|b| b.group == group)) {
            self.flush_batch(p);
        }
        if join && self.peers[p].leaving {
            return; // handed over: its members are another instance's to join
        }
        if join {
            let mut keys = Vec::with_capacity(slice.len());
            let mut refused = 0;
            for h in slice {
                match self.proxies.mint(p, h, Kind::Pid) {
                    Ok(k) => {
                        self.proxies.pin(k);
                        keys.push(k);
                    }
                    Err(_) => refused += 1,
                }
            }
            if refused > 0 {
                let name = self.peers[p].name.clone();
                self.reject(Some(p), Reject::ProxyQuota, || {
                    format!("{refused} members of {name} not imported: its proxies are at their quota")
                });
            }
            let peer = &mut self.peers[p];
            let batch = peer.batch.get_or_insert_with(|| Batch { group: group.clone(), term, keys: Vec::new() });
            batch.keys.extend(keys);
            let more = peer.jobs.front().is_some_and(|j| j.join && j.group == group);
            if !more || batch.keys.len() >= mirror::PIDS_PER_MESSAGE {
                self.flush_batch(p);
            }
            return;
        }
        let found: Vec<u64> = slice.iter().filter_map(|&h| self.proxies.find(p, h, Kind::Pid)).collect();
        // (Jobs hold canonical names of mirrored scopes: `queue_change`.)
        let ix = self.split_group(&group).map_or(0, |(ix, _)| ix);
        let keys = self.mirrors[ix].remote_leave(&group, &found);
        for &k in &keys {
            self.proxies.unpin(k);
        }
        if large_leave {
            // The scopes hear it with the next sync (`flush_sync`).
            self.sync_debt += keys.len();
            return;
        }
        if keys.is_empty() {
            return;
        }
        for (_, scope) in self.mirrors[ix].scopes() {
            let msg = mirror::leave(&self.gws[ix], &term, &keys, |out, k| self.proxies.put_pid(out, k));
            self.send_bulk(ix, &scope, &msg);
        }
    }

    /// Tells the scopes (and the mirror) the joins batched for `p`.
    fn flush_batch(&mut self, p: PeerIx) {
        let Some(Batch { group, term, keys }) = self.peers[p].batch.take() else { return };
        if keys.is_empty() {
            return;
        }
        let ix = self.split_group(&group).map_or(0, |(ix, _)| ix);
        self.mirrors[ix].remote_join(&group, &keys);
        for (_, scope) in self.mirrors[ix].scopes() {
            let msg = mirror::join(&self.gws[ix], &term, &keys, |out, k| self.proxies.put_pid(out, k));
            self.send_bulk(ix, &scope, &msg);
        }
    }

    fn on_relay(&mut self, p: PeerIx, payload: &[u8], held: Held) {
        let (relay, used) = match codec::from_prefix::<Relay>(payload) {
            Ok(x) => x,
            Err(e) => return self.undeliverable(p, held, Reject::BadRelay, &format!("an undecodable relay: {e}")),
        };
        let body = &payload[used..];
        match relay {
            Relay::Send { to, from } => self.deliver(p, to, from, body, false, held),
            Relay::AliasSend { to, from } => self.deliver(p, to, from, body, true, held),
            Relay::Monitor { target } => self.peer_monitors(p, target),
            Relay::Demonitor { target } => {
                if let Some(id) = self.held.find(p, target) {
                    if let Some(mon) = self.held.remove(id) {
                        self.peers[p].exports.unpin(target);
                        let mref = Ref {
                            node: self.me.to_string(),
                            creation: self.creation,
                            ids: vec![id as u32, (id >> 32) as u32, HELD_MONITOR],
                        };
                        let control = Control::DemonitorP {
                            watcher: self.gw.clone(),
                            target: Target::Pid(mon.pid.clone()),
                            mref,
                        };
                        self.send_to_node(&mon.pid.node, control, None);
                    }
                }
            }
            Relay::Down { target } => {
                // Only a proxy that exists is told: a Down never mints one.
                let Some(key) = self.proxies.find(p, target, Kind::Pid) else {
                    return tracing::debug!(peer = %self.peers[p].name, %target, "a down for a process nobody here watches");
                };
                let reason = self.inbound(p, body).unwrap_or_else(|_| etf::encode(&Term::atom("noproc")));
                self.fire_down(key, &reason);
            }
        }
    }

    /// A message from peer `p` could not be delivered: counted, said (at
    /// most once per period), and reported back to the peer.
    fn undeliverable(&mut self, p: PeerIx, mut held: Held, reason: Reject, what: &str) {
        held.undeliverable();
        let name = self.peers[p].name.clone();
        self.reject(Some(p), reason, || format!("a message from {name} not delivered: {what}"));
    }

    /// Translates a payload from `p` on its own (an exit reason).
    fn inbound(&mut self, p: PeerIx, body: &[u8]) -> Result<Vec<u8>, etf::EtfError> {
        let mut out = Vec::with_capacity(body.len() + 16);
        let peer = &mut self.peers[p];
        let mut t = Inbound { peer: p, proxies: &mut self.proxies, exports: &peer.exports, atoms: &mut peer.atoms };
        scan::translate(body, &mut out, &mut t, Source::Peer)?;
        Ok(out)
    }

    /// Hands a message from peer `p` to a process (or alias) of ours it
    /// was given.
    fn deliver(&mut self, p: PeerIx, to: Handle, from: Option<Handle>, body: &[u8], alias: bool, held: Held) {
        if body.is_empty() {
            return self.undeliverable(p, held, Reject::BadRelay, "a message without a body");
        }
        let kind = if alias { Kind::Ref } else { Kind::Pid };
        let local = match self.peers[p].exports.resolve(to, kind) {
            Ok(l) => l.clone(),
            Err(r) => {
                return self.undeliverable(p, held, Reject::Refused(r.label()), &format!("its destination {to}: {r}"))
            }
        };
        let node = etf::node_of(&local).and_then(|n| std::str::from_utf8(n).ok()).and_then(|n| self.mirrors[0].node(n));
        let Some(node) = node else {
            return self.undeliverable(
                p,
                held,
                Reject::NodeNotConnected,
                "its destination's node is not connected to the gateway",
            );
        };
        // One buffer: length, pass-through, the control tuple, the message.
        let code = if alias { ALIAS_SEND } else { SEND_SENDER };
        let mut pkt = Vec::with_capacity(96 + body.len());
        pkt.extend_from_slice(&[0, 0, 0, 0, PASS_THROUGH, etf::VERSION, 104, 3, 97, code as u8]);
        let sender = match from {
            Some(h) => self.proxies.mint(p, h, Kind::Pid),
            None => Ok(GW_KEY),
        };
        match sender {
            Ok(k) => self.proxies.put_pid(&mut pkt, k),
            Err(r) => return self.undeliverable(p, held, Reject::Refused(r.label()), &format!("its sender: {r}")),
        }
        pkt.extend_from_slice(&local);
        let peer = &mut self.peers[p];
        let mut t = Inbound { peer: p, proxies: &mut self.proxies, exports: &peer.exports, atoms: &mut peer.atoms };
        if let Err(e) = scan::translate(body, &mut pkt, &mut t, Source::Peer) {
            return self.undeliverable(p, held, Reject::Refused(e.reason()), &e.to_string());
        }
        let len = (pkt.len() - 4) as u32;
        pkt[..4].copy_from_slice(&len.to_be_bytes());
        self.counters.from_peers.increment(1);
        self.out.push(Effect::Node { node, packet: Bytes::from(pkt), held: Some(held), bulk: false });
    }

    /// Peer `p` asks to watch one of our processes it was given.
    fn peer_monitors(&mut self, p: PeerIx, target: Handle) {
        let down = |core: &mut Core, reason: &str| {
            let r = etf::encode(&Term::atom(reason));
            core.relay(p, Relay::Down { target }, &r, None, false);
        };
        let local = match self.peers[p].exports.resolve(target, Kind::Pid) {
            Ok(l) => l.clone(),
            Err(r) => {
                let name = self.peers[p].name.clone();
                self.reject(Some(p), Reject::Refused(r.label()), || format!("a monitor from {name} on {target}: {r}"));
                return down(self, "noproc");
            }
        };
        if self.held.find(p, target).is_some() {
            return; // one monitor per process and peer is enough
        }
        if self.held.count(p) >= self.peers[p].max_monitors {
            let name = self.peers[p].name.clone();
            self.reject(Some(p), Reject::MonitorQuota, || format!("{name} holds as many monitors as it may"));
            return down(self, "system_limit");
        }
        let Ok(pid) = etf::pid_from_bytes(&local) else { return down(self, "noproc") };
        let (id, mref) = self.own_ref(HELD_MONITOR);
        let control = Control::MonitorP { watcher: self.gw.clone(), target: Target::Pid(pid.clone()), mref };
        if self.send_to_node(&pid.node.clone(), control, None) {
            self.held.add(id, Monitor { peer: p, target, pid });
            self.peers[p].exports.pin(target);
        } else {
            down(self, "noconnection");
        }
    }
}

/// Why a message or a change from a node or a peer was not taken;
/// [`Reject::label`] is the metric label (`wandist_erlang_rejected_total`)
/// and, for a confirmed send, the reason in `{failed, Reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A distribution control message the gateway cannot read.
    BadControl,
    /// A message for a proxy (or alias) the gateway does not hold.
    UnknownProxy,
    /// A message to a registered name on the gateway's node it does not have.
    UnknownName,
    /// A distribution packet or scope message that does not decode.
    Undecodable,
    /// A confirmed send that is malformed or names no proxy.
    BadConfirmRequest,
    /// A peer named a group this gateway does not export to it.
    GroupNotExported,
    /// The peer holds as many handles as it may.
    HandleQuota,
    /// Members of a group in a pg scope this gateway does not mirror.
    ScopeNotMirrored,
    /// The peer holds as many proxies as it may.
    ProxyQuota,
    /// The peer holds as many monitors as it may.
    MonitorQuota,
    /// A relay frame from the peer that does not decode.
    BadRelay,
    /// A payload that cannot be carried across (it names something that
    /// has no handle).
    Untranslatable,
    /// The destination's node is not connected to the gateway.
    NodeNotConnected,
    /// The gateway is stopping.
    Shutdown,
    /// The route's queue is full.
    Overload,
    /// Refused by a check with its own reasons (`etf::Refusal`,
    /// `EtfError`, the group checks): its label.
    Refused(&'static str),
}

impl Reject {
    /// Every reason of the gateway's own (not `Refused`).
    pub const ALL: [Reject; 15] = [
        Reject::BadControl,
        Reject::UnknownProxy,
        Reject::UnknownName,
        Reject::Undecodable,
        Reject::BadConfirmRequest,
        Reject::GroupNotExported,
        Reject::HandleQuota,
        Reject::ScopeNotMirrored,
        Reject::ProxyQuota,
        Reject::MonitorQuota,
        Reject::BadRelay,
        Reject::Untranslatable,
        Reject::NodeNotConnected,
        Reject::Shutdown,
        Reject::Overload,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::BadControl => "bad_control",
            Reject::UnknownProxy => "unknown_proxy",
            Reject::UnknownName => "unknown_name",
            Reject::Undecodable => "undecodable",
            Reject::BadConfirmRequest => "bad_confirm_request",
            Reject::GroupNotExported => "group_not_exported",
            Reject::HandleQuota => "handle_quota",
            Reject::ScopeNotMirrored => "scope_not_mirrored",
            Reject::ProxyQuota => "proxy_quota",
            Reject::MonitorQuota => "monitor_quota",
            Reject::BadRelay => "bad_relay",
            Reject::Untranslatable => "untranslatable",
            Reject::NodeNotConnected => "node_not_connected",
            Reject::Shutdown => "shutdown",
            Reject::Overload => "overload",
            Reject::Refused(label) => label,
        }
    }
}

#[cfg(test)]
mod tests;
