//! The Erlang side's async shell around [`Core`]: it owns the channels —
//! one inbox per local node connection and one per route — and carries out
//! the core's effects, never waiting on one node or one peer while others
//! have work.
//!
//! Fairness: inboxes are served in turn, a batch at a time. A source whose
//! effects cannot all be carried out now (a node's queue is full, a peer's
//! queue is at its bound) keeps the rest as its backlog and is not read
//! again until the backlog moves: that node (or route) waits, the others
//! go on. A peer whose queue has not moved for SHED_AFTER is shedding: its
//! messages fail at once (`overload`, counted and confirmed failed) until
//! its queue is half empty again, so a peer that stops acknowledging cannot
//! hold up the local nodes sending to it for good. A peer whose membership
//! change is being applied (in steps, see `Core::work`) is not read until
//! it is done, which keeps its messages in order behind it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::HashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::{Core, Effect, PeerSetup, Reject, Setup};
use super::node::{self, NodeEvent, NodeParams, NodeTx, TrySend};
use super::proxies::PeerIx;
use super::throttle::Budget;
use crate::config::{ErlNode, ErlangConfig, GatewayConfig, RouteConfig};
use crate::local::{Control, Held, Inbox, LocalHandle, RouteHandle, Step, ToLocal, TryGroups, TrySubmit};
use crate::membership::Filter;
use crate::metrics::{self as m, Metrics};
use crate::ratelog::RateLog;
use crate::status;

/// Items taken from one inbox before the next is served.
const BATCH: usize = 32;
/// Events a node connection may queue for the shell before its reader waits.
const NODE_INBOX: usize = 1024;
/// How often blocked effects and queued messages are retried.
const RETRY: Duration = Duration::from_millis(1);
/// A peer whose queue has not moved this long while full is shedding.
const SHED_AFTER: Duration = Duration::from_secs(5);
/// How often the per-peer gauges are refreshed (and scopes not found yet
/// asked for again).
const TICK_EVERY: Duration = Duration::from_secs(1);
/// A sync debt (`Core::flush_sync`) is paid once no large membership step
/// came for this long...
const SYNC_QUIET: Duration = Duration::from_millis(20);
/// ...or once it is this old.
const SYNC_LATEST: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Node(usize),
    Route(PeerIx),
}

struct NodeSlot {
    name: Arc<str>,
    rx: mpsc::Receiver<NodeEvent>,
    tx: Option<NodeTx>,
    backlog: VecDeque<Effect>,
    /// Connected, or found unreachable, at least once.
    tried: bool,
    /// Stops its connection task (a reload removed the node).
    cancel: CancellationToken,
    removed: bool,
    /// Since when it is connected, or not (`/status`).
    since: Instant,
}

/// Where the shell gets what it needs to connect to nodes added later.
struct Spawner {
    params: NodeParams,
    cancel: CancellationToken,
    tracker: TaskTracker,
    metrics: Metrics,
}

struct RouteSlot {
    rx: mpsc::Receiver<ToLocal>,
    handle: Option<RouteHandle>,
    backlog: VecDeque<Effect>,
    /// Messages the route's window had no room for, oldest first.
    pending: VecDeque<(Bytes, Option<crate::route::Token>)>,
    pending_bytes: usize,
    max_pending: usize,
    max_pending_bytes: usize,
    /// When the queue last moved (or was empty).
    moved: Instant,
    shedding: bool,
    failed_overload: metrics::Counter,
    gauges: [metrics::Gauge; 5],
    /// The peer's refusal budget, and while it is spent, until when the
    /// route's inbox is not read.
    budget: Budget,
    held_until: Option<Instant>,
    throttled: metrics::Counter,
}

impl RouteSlot {
    fn full(&self) -> bool {
        self.pending.len() >= self.max_pending || self.pending_bytes >= self.max_pending_bytes
    }

    fn half_empty(&self) -> bool {
        self.pending.len() <= self.max_pending / 2 && self.pending_bytes <= self.max_pending_bytes / 2
    }
}

struct Shell {
    core: Core,
    nodes: Vec<NodeSlot>,
    node_ix: HashMap<Arc<str>, usize>,
    routes: Vec<RouteSlot>,
    connected: metrics::Gauge,
    proxies: metrics::Gauge,
    /// `run_effects`' buffer, kept between calls.
    effects: VecDeque<Effect>,
    /// Set by the ticker each period (read once per round, so a busy
    /// shell sees it too), and its wake-up for an idle one.
    ticked: Arc<AtomicBool>,
    tick_rx: mpsc::Receiver<()>,
    throttle_log: RateLog<PeerIx>,
    /// Cancelled once every node has been tried: the gateway takes peer
    /// links from then on (so nothing a peer sends arrives before the
    /// nodes it is for could be reached).
    ready: Option<CancellationToken>,
    /// Messages for a node whose connection is gone, dropped here
    /// (reported undeliverable to their peer), counted and said.
    node_gone: metrics::Counter,
    node_gone_log: RateLog<()>,
    /// What the gateway tells it (`local::Control`).
    control: mpsc::Receiver<Control>,
    /// `[erlang] dns`: the nodes its name resolves to now (`poll_dns`);
    /// None without `dns` (nothing to poll on the shell's every wait).
    dns: Option<mpsc::Receiver<Vec<Arc<str>>>>,
    /// Where this instance's claims on routes are decided (`claims`):
    /// the gateway starts and stops routes by them.
    claims: Option<mpsc::Sender<Step>>,
    /// Who waits for a hand-over's withdrawal (`Effect::Left`).
    left: Vec<(Option<PeerIx>, tokio::sync::oneshot::Sender<()>)>,
    spawner: Spawner,
    /// The nodes of `[erlang] nodes`; with discovery, the seeds.
    configured: Vec<ErlNode>,
    /// `[erlang] discover = "cluster"`: nodes the connected ones see.
    discover_cluster: bool,
    cluster_nodes: BTreeSet<Arc<str>>,
    /// `[erlang] dns`: nodes its name resolved to.
    dns_nodes: BTreeSet<Arc<str>>,
}

/// A route's slot in the shell, and its gauges.
fn route_slot(
    route: &RouteConfig,
    rx: mpsc::Receiver<ToLocal>,
    handle: Option<RouteHandle>,
    metrics: &Metrics,
) -> RouteSlot {
    let peer = route.cluster.as_str();
    let gauge = |quota| metrics.gauge(m::PEER_QUOTA_USED, &[("peer", peer), ("quota", quota)]);
    for (quota, limit) in [
        ("proxies", route.limits.proxies),
        ("handles", route.limits.handles),
        ("monitors", route.limits.monitors),
        ("atoms", route.limits.atoms),
        ("pending", route.limits.pending),
        ("refusals_per_second", route.limits.refusals),
    ] {
        metrics.gauge(m::PEER_QUOTA_LIMIT, &[("peer", peer), ("quota", quota)]).set(limit as f64);
    }
    RouteSlot {
        rx,
        handle,
        backlog: VecDeque::new(),
        pending: VecDeque::new(),
        pending_bytes: 0,
        max_pending: route.limits.pending,
        max_pending_bytes: route.limits.pending_bytes,
        moved: Instant::now(),
        shedding: false,
        failed_overload: metrics.counter(m::MESSAGES_FAILED, &[("peer", peer), ("reason", Reject::Overload.label())]),
        gauges: [gauge("proxies"), gauge("handles"), gauge("monitors"), gauge("atoms"), gauge("pending")],
        budget: Budget::new(route.limits.refusals),
        held_until: None,
        throttled: metrics.counter(m::PEER_THROTTLED, &[("peer", peer)]),
    }
}

fn peer_setup(route: &RouteConfig) -> PeerSetup {
    PeerSetup {
        name: route.cluster.as_str().into(),
        export: Filter::from_patterns(&route.export),
        limits: route.limits,
    }
}

impl Spawner {
    fn node(&self, n: &ErlNode) -> NodeSlot {
        let (tx, rx) = mpsc::channel(NODE_INBOX);
        let cancel = self.cancel.child_token();
        self.tracker.spawn(node::run(n.clone(), self.params.clone(), tx, cancel.clone()));
        NodeSlot {
            name: n.name.as_str().into(),
            rx,
            tx: None,
            backlog: VecDeque::new(),
            tried: false,
            cancel,
            removed: false,
            since: Instant::now(),
        }
    }
}

/// Starts the Erlang side: one connection task per node and the shell.
/// `inboxes` are the routes' queues toward the local side, one per route.
#[allow(clippy::too_many_arguments)] // the parts of the gateway it plugs into, each once
pub fn start(
    cfg: &ErlangConfig,
    dist_tls: Option<Arc<rustls::ClientConfig>>,
    g: &GatewayConfig,
    routes: &[RouteConfig],
    local: LocalHandle,
    inboxes: Vec<Inbox>,
    metrics: Metrics,
    cancel: CancellationToken,
    ready: CancellationToken,
    tracker: &TaskTracker,
    claims: Option<mpsc::Sender<Step>>,
) -> mpsc::Sender<Control> {
    let me: Arc<str> = cfg.node.as_str().into();
    let creation = fastrand::u32(1..);
    let params = NodeParams {
        me: me.clone(),
        creation,
        cookie: cfg.cookie.clone(),
        max_packet: g.max_frame_bytes,
        reconnect_min: g.reconnect_min,
        reconnect_max: g.reconnect_max,
        tls: dist_tls,
    };
    let spawner = Spawner { params, cancel: cancel.clone(), tracker: tracker.clone(), metrics: metrics.clone() };
    let nodes: Vec<NodeSlot> = cfg.nodes.iter().map(|n| spawner.node(n)).collect();
    let mut peers = Vec::new();
    let mut slots = Vec::new();
    for inbox in inboxes {
        let Some(route) = routes.iter().find(|r| *r.cluster == *inbox.peer) else { continue };
        peers.push(peer_setup(route));
        slots.push(route_slot(route, inbox.rx, local.route(&inbox.peer).cloned(), &metrics));
    }
    let setup = Setup {
        me: me.clone(),
        creation,
        scopes: cfg.scopes.clone(),
        nodes: nodes.iter().map(|n| n.name.clone()).collect(),
        peers,
        claims: claims
            .is_some()
            .then(|| (routes.iter().map(|r| Arc::<str>::from(r.cluster.as_str())).collect(), g.dead_after)),
    };
    let ticked = Arc::new(AtomicBool::new(false));
    let (tick_tx, tick_rx) = mpsc::channel(1);
    let (control_tx, control_rx) = mpsc::channel(16);
    tracker.spawn(ticker(ticked.clone(), tick_tx, cancel.clone()));
    let mut shell = Shell {
        node_ix: nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect(),
        nodes,
        routes: slots,
        connected: metrics.gauge(m::ERLANG_NODES_CONNECTED, &[]),
        proxies: metrics.gauge(m::PROXIES, &[]),
        core: Core::new(setup, metrics.clone()),
        effects: VecDeque::new(),
        ticked,
        tick_rx,
        throttle_log: RateLog::default(),
        ready: Some(ready),
        node_gone: metrics
            .counter(m::ERLANG_REJECTED, &[("peer", m::LOCAL_PEER), ("reason", Reject::NodeNotConnected.label())]),
        node_gone_log: RateLog::default(),
        control: control_rx,
        dns: None,
        spawner,
        claims,
        left: Vec::new(),
        configured: cfg.nodes.clone(),
        discover_cluster: cfg.discover_cluster,
        cluster_nodes: BTreeSet::new(),
        dns_nodes: BTreeSet::new(),
    };
    if let Some((name, host)) = cfg.dns.clone() {
        let (tx, rx) = mpsc::channel(1);
        shell.dns = Some(rx);
        tracker.spawn(poll_dns(name, host, tx, cancel.clone()));
    }
    shell.connected.set(0.0);
    shell.proxies.set(0.0);
    shell.publish_status();
    tracing::info!(node = %me, creation, scopes = ?cfg.scopes, "Erlang side started");
    shell.maybe_ready();
    tracker.spawn(shell.run(cancel));
    control_tx
}

/// How often `[erlang] dns` is looked up.
const DNS_EVERY: Duration = Duration::from_secs(2);

/// `[erlang] dns = "name@host"`: looks `host` up every DNS_EVERY and tells
/// the shell the nodes `name@ADDRESS` it resolves to. A failed lookup
/// changes nothing (a DNS blip must not disconnect a cluster); it is said.
async fn poll_dns(name: String, host: String, tx: mpsc::Sender<Vec<Arc<str>>>, cancel: CancellationToken) {
    let mut failing = false;
    loop {
        let found = tokio::select! {
            _ = cancel.cancelled() => return,
            found = tokio::time::timeout(DNS_EVERY * 5, tokio::net::lookup_host((host.as_str(), 0))) => found,
        };
        match found {
            Ok(Ok(addrs)) => {
                if failing {
                    tracing::info!(host = %host, "[erlang] dns: looked up again");
                    failing = false;
                }
                let mut nodes: Vec<Arc<str>> = addrs
                    .map(|a| format!("{name}@{}", a.ip()))
                    .filter(|n| crate::config::check_node_name(n).is_ok())
                    .map(Arc::from)
                    .collect();
                nodes.sort();
                nodes.dedup();
                nodes.truncate(super::core::MAX_CLUSTER_NODES);
                if tx.send(nodes).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(host = %host, "[erlang] dns: cannot look up {host}: {e}; the nodes stay as they were");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(host = %host, "[erlang] dns: looking up {host} timed out; the nodes stay as they were");
            }
            _ => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(DNS_EVERY) => {}
        }
    }
}

/// Marks a tick every TICK_EVERY (and wakes the shell if it waits) until
/// cancelled. A task of its own, so that no timer is polled on the
/// shell's per-message path.
async fn ticker(ticked: Arc<AtomicBool>, tx: mpsc::Sender<()>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(TICK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        ticked.store(true, Ordering::Relaxed);
        if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
            return;
        }
    }
}

/// What the shell waits for.
enum Input {
    Node(usize, NodeEvent),
    Route(PeerIx, ToLocal),
    /// The ticker's period passed (publish gauges, rediscover scopes).
    Tick,
    /// A change the gateway tells.
    Control(Control),
    /// `[erlang] dns` answered.
    Dns(Vec<Arc<str>>),
}

impl Shell {
    async fn run(mut self, cancel: CancellationToken) {
        let mut cancelled = crate::stop::on_cancel(&cancel);
        let mut cursor = 0usize;
        // (since, last grew, size) of the current sync debt.
        let mut debt: Option<(Instant, Instant, usize)> = None;
        loop {
            self.retry();
            // (The clock is read only while there is a debt: not per message.)
            match (self.core.sync_debt(), debt) {
                (0, None) => {}
                (0, Some(_)) => debt = None,
                (n, None) => {
                    let now = Instant::now();
                    debt = Some((now, now, n));
                }
                (n, Some((since, _, was))) if n != was => debt = Some((since, Instant::now(), n)),
                (_, Some((since, last, _))) => {
                    let now = Instant::now();
                    if now.duration_since(last) >= SYNC_QUIET || now.duration_since(since) >= SYNC_LATEST {
                        self.core.flush_sync();
                        self.run_effects(None);
                        debt = None;
                    }
                }
            }
            // Ticks are seen here whether or not the loop waits below: a
            // busy shell still publishes and rediscovers.
            if self.ticked.load(Ordering::Relaxed) {
                self.tick();
            }
            let mut progressed = self.step_jobs();
            progressed |= self.take_ready(&mut cursor);
            // Claims are decided once per round, after whatever arrived
            // together (a stopped instance's claims leave in one burst).
            if self.core.decide_claims() {
                self.run_effects(None);
            }
            if progressed {
                self.proxies.set(self.core.proxies() as f64);
                // Others (links, nodes' writers) get their turn between rounds.
                tokio::task::yield_now().await;
                continue;
            }
            let waiting = self.waiting() || debt.is_some();
            let input = {
                let this = &mut self;
                let start = cursor;
                let wait = std::future::poll_fn(|cx| this.poll_input(cx, start));
                tokio::select! {
                    biased;
                    _ = &mut cancelled => return,
                    input = wait => Some(input),
                    _ = async { tokio::time::sleep(RETRY).await }, if waiting => None,
                }
            };
            match input {
                Some(Input::Tick) => self.tick(),
                Some(Input::Control(c)) => self.control(c),
                Some(Input::Dns(found)) => self.dns_found(found),
                Some(input) => cursor = self.handle(input).wrapping_add(1),
                None => {}
            }
            self.proxies.set(self.core.proxies() as f64);
        }
    }

    /// The `k`th source of the round that starts at `start`.
    fn source(&self, start: usize, k: usize) -> Src {
        let i = (start + k) % (self.nodes.len() + self.routes.len());
        if i < self.nodes.len() {
            Src::Node(i)
        } else {
            Src::Route(i - self.nodes.len())
        }
    }

    fn sources_len(&self) -> usize {
        self.nodes.len() + self.routes.len()
    }

    fn readable(&self, src: Src) -> bool {
        match src {
            Src::Node(i) => self.nodes[i].backlog.is_empty() && !self.nodes[i].removed,
            Src::Route(p) => {
                let r = &self.routes[p];
                r.backlog.is_empty() && r.held_until.is_none() && self.core.accepts(p)
            }
        }
    }

    /// Charges peer `p`'s refusal budget with what it was refused since
    /// `before` (`Core::refused`); past the budget, its inbox waits.
    fn charge(&mut self, p: PeerIx, before: u64) {
        let n = self.core.refused(p) - before;
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let slot = &mut self.routes[p];
        if let Some(wait) = slot.budget.spend(n, now) {
            slot.held_until = Some(now + wait);
            slot.throttled.increment(1);
            if let Some(held_back) = self.throttle_log.allow_at(&p, now) {
                tracing::warn!(
                    peer = %self.core.peer_name(p),
                    ?wait,
                    held_back,
                    "the peer's messages are refused faster than its max_refusals_per_second: it is read no further for now"
                );
            }
        }
    }

    fn index(&self, src: Src) -> usize {
        match src {
            Src::Node(i) => i,
            Src::Route(p) => self.nodes.len() + p,
        }
    }

    fn poll_input(&mut self, cx: &mut std::task::Context<'_>, start: usize) -> Poll<Input> {
        if let Poll::Ready(Some(c)) = self.control.poll_recv(cx) {
            return Poll::Ready(Input::Control(c));
        }
        if let Some(Poll::Ready(Some(found))) = self.dns.as_mut().map(|dns| dns.poll_recv(cx)) {
            return Poll::Ready(Input::Dns(found));
        }
        for k in 0..self.sources_len() {
            let src = self.source(start, k);
            if !self.readable(src) {
                continue;
            }
            match src {
                Src::Node(i) => {
                    if let Poll::Ready(Some(ev)) = self.nodes[i].rx.poll_recv(cx) {
                        return Poll::Ready(Input::Node(i, ev));
                    }
                }
                Src::Route(p) => {
                    if let Poll::Ready(Some(item)) = self.routes[p].rx.poll_recv(cx) {
                        return Poll::Ready(Input::Route(p, item));
                    }
                }
            }
        }
        // After the sources: a tick waits for a round with nothing to do.
        if let Poll::Ready(Some(())) = self.tick_rx.poll_recv(cx) {
            return Poll::Ready(Input::Tick);
        }
        Poll::Pending
    }

    /// The ticker's period passed: gauges published, and scopes not yet
    /// found on their nodes asked for again.
    fn tick(&mut self) {
        self.ticked.store(false, Ordering::Relaxed);
        while self.tick_rx.try_recv().is_ok() {}
        if self.core.undiscovered() {
            self.core.rediscover();
        }
        if self.discover_cluster {
            self.core.ask_cluster();
        }
        self.core.claims_tick(Instant::now());
        self.run_effects(None);
        self.publish();
    }

    /// Handles one input and whatever else that source has ready, up to a
    /// batch; returns the source's index in the round.
    fn handle(&mut self, input: Input) -> usize {
        let src = match input {
            Input::Node(i, ev) => {
                self.node_event(i, ev);
                Src::Node(i)
            }
            Input::Route(p, item) => {
                let before = self.core.refused(p);
                self.core.from_route(p, item);
                self.run_effects(Some(Src::Route(p)));
                self.charge(p, before);
                Src::Route(p)
            }
            Input::Tick | Input::Control(_) | Input::Dns(_) => {
                unreachable!("ticks, controls and DNS answers are handled by the loop")
            }
        };
        self.drain(src, BATCH - 1);
        self.index(src)
    }

    /// Takes up to BATCH ready items from every readable source, in turn,
    /// without waiting; true if any.
    fn take_ready(&mut self, cursor: &mut usize) -> bool {
        let mut any = false;
        for k in 0..self.sources_len() {
            let src = self.source(*cursor, k);
            any |= self.drain(src, BATCH) > 0;
        }
        *cursor = cursor.wrapping_add(1);
        any
    }

    /// Up to `n` items from `src` while it stays readable; how many.
    fn drain(&mut self, src: Src, n: usize) -> usize {
        let before = match src {
            Src::Route(p) => self.core.refused(p),
            Src::Node(_) => 0,
        };
        let done = self.drain_items(src, n);
        if let Src::Route(p) = src {
            self.charge(p, before);
        }
        done
    }

    fn drain_items(&mut self, src: Src, n: usize) -> usize {
        let mut done = 0;
        while done < n && self.readable(src) {
            match src {
                Src::Node(i) => match self.nodes[i].rx.try_recv() {
                    Ok(ev) => self.node_event(i, ev),
                    Err(_) => break,
                },
                Src::Route(p) => match self.routes[p].rx.try_recv() {
                    Ok(item) => {
                        self.core.from_route(p, item);
                        self.run_effects(Some(src));
                    }
                    Err(_) => break,
                },
            }
            done += 1;
        }
        done
    }

    /// A reload's change, applied between rounds.
    fn control(&mut self, c: Control) {
        match c {
            Control::AddRoute { route, inbox, handle, then, ready } => {
                let p = self.core.add_peer(peer_setup(&route));
                debug_assert_eq!(p, self.routes.len());
                self.routes.push(route_slot(&route, inbox.rx, Some(handle.clone()), &self.spawner.metrics));
                tracing::info!(peer = %route.cluster, "route added: its peer is served and told our members");
                // (The exports first: they go ahead of the link, or of the
                // route's start, on its queue.)
                self.run_effects(Some(Src::Route(p)));
                if let Some(then) = then {
                    then.run();
                }
                if let Some(ready) = ready {
                    ready.cancel();
                }
            }
            Control::LeaveRoute(handle, done) => match self.slot_of(&handle) {
                Some(p) => {
                    self.left.push((Some(p), done));
                    self.core.leave_peer(p);
                }
                None => {
                    let _ = done.send(());
                }
            },
            Control::RemoveRoute(handle) => {
                let Some(p) = self.slot_of(&handle) else { return };
                let peer = self.core.peer_name(p).clone();
                self.core.remove_peer(p);
                let slot = &mut self.routes[p];
                // Its inbox is still read: the route's last outcomes
                // (failed `shutdown`) answer their senders. Its backlog is
                // carried out as any other: deliveries still go to their
                // nodes; messages for the peer fail (no handle).
                slot.handle = None;
                slot.pending_bytes = 0;
                let pending = std::mem::take(&mut slot.pending);
                for (_, token) in pending {
                    self.core.not_sent(p, token, Reject::Shutdown);
                }
                tracing::info!(peer = %peer, "route removed: its peer's proxies are forgotten");
            }
            Control::Nodes(wanted) => {
                self.configured = wanted;
                self.apply_nodes();
            }
            Control::Claim(cluster) => self.core.claim(cluster),
            Control::Unclaim(cluster) => self.core.unclaim(&cluster),
            Control::Withdraw(None) => self.core.withdraw_now(None),
            Control::Withdraw(Some(handle)) => {
                if let Some(p) = self.slot_of(&handle) {
                    self.core.withdraw_now(Some(p));
                }
            }
            Control::Leave(done) => {
                self.left.push((None, done));
                self.core.leave();
            }
        }
        self.run_effects(None);
    }

    /// `[erlang] dns` answered: the nodes to connect to now. A node gone
    /// from the answer stays while it is connected.
    fn dns_found(&mut self, found: Vec<Arc<str>>) {
        let mut nodes: BTreeSet<Arc<str>> = found.into_iter().collect();
        nodes.extend(self.dns_nodes.iter().filter(|n| self.is_connected(n)).cloned());
        if nodes != self.dns_nodes {
            self.dns_nodes = nodes;
            self.apply_nodes();
        }
    }

    fn is_connected(&self, node: &str) -> bool {
        self.node_ix.get(node).is_some_and(|&i| self.nodes[i].tx.is_some())
    }

    /// Connects to every node configured or discovered (cluster, DNS) and
    /// disconnects from the rest.
    fn apply_nodes(&mut self) {
        // (By name in a set: thousands of discovered nodes must not make
        // each change quadratic.)
        let mut wanted: Vec<ErlNode> = self.configured.clone();
        let mut names: std::collections::HashSet<String> = wanted.iter().map(|w| w.name.clone()).collect();
        for n in self.cluster_nodes.iter().chain(&self.dns_nodes) {
            if names.insert(n.to_string()) {
                wanted.push(ErlNode { name: n.to_string(), port: None });
            }
        }
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if n.removed || names.contains(&*n.name) {
                continue;
            }
            // Its backlog stays: with no connection, each delivery
            // in it is reported undeliverable (`gone`), never dropped
            // (a dropped `Held` would be acked as delivered).
            n.removed = true;
            n.cancel.cancel();
            n.tx = None;
            let name = n.name.clone();
            self.core.node_down(&name);
            tracing::info!(node = %name, "Erlang node no longer configured nor discovered: disconnected");
        }
        for w in &wanted {
            if self.node_ix.get(w.name.as_str()).is_some_and(|&i| !self.nodes[i].removed) {
                continue;
            }
            let slot = self.spawner.node(w);
            self.node_ix.insert(slot.name.clone(), self.nodes.len());
            self.nodes.push(slot);
            let how = if self.configured.iter().any(|c| c.name == w.name) { "configured" } else { "discovered" };
            tracing::info!(node = %w.name, how, "Erlang node added: connecting");
        }
        self.publish_nodes();
    }

    /// The peer index of a route task's slot (its inbox is read as long as
    /// the task runs, so the index stays until the task is gone).
    fn slot_of(&self, handle: &RouteHandle) -> Option<PeerIx> {
        self.routes.iter().position(|r| r.handle.as_ref().is_some_and(|h| h.same(handle)))
    }

    /// Opens the gateway to peer links once every node has been tried.
    fn maybe_ready(&mut self) {
        if self.ready.is_none() || !self.nodes.iter().all(|n| n.tried) {
            return;
        }
        if let Some(ready) = self.ready.take() {
            let up = self.nodes.iter().filter(|n| n.tx.is_some()).count();
            tracing::info!(connected = up, nodes = self.nodes.len(), "Erlang nodes tried; taking peer links");
            ready.cancel();
        }
    }

    fn node_event(&mut self, i: usize, ev: NodeEvent) {
        let name = self.nodes[i].name.clone();
        match ev {
            NodeEvent::Up { tx, .. } => {
                self.nodes[i].tx = Some(tx);
                self.nodes[i].since = Instant::now();
                self.core.node_up(&name);
                self.publish_nodes();
                self.nodes[i].tried = true;
                self.maybe_ready();
            }
            NodeEvent::Unreachable { .. } => {
                self.nodes[i].tried = true;
                self.maybe_ready();
            }
            NodeEvent::Down { why, .. } => {
                self.nodes[i].tx = None;
                self.nodes[i].since = Instant::now();
                tracing::warn!(node = %name, "Erlang node connection lost: {why}");
                self.core.node_down(&name);
                self.publish_nodes();
            }
            NodeEvent::Message { control, payload, .. } => self.core.node_control(&name, control, payload),
            NodeEvent::Send { from, to, payload, .. } => self.core.node_send(&name, from, to, &payload),
            NodeEvent::Rejected { why, .. } => self.core.node_rejected(&name, &why),
        }
        self.run_effects(Some(Src::Node(i)));
    }

    /// One step of each busy peer's membership change; true if any.
    fn step_jobs(&mut self) -> bool {
        let mut any = false;
        for p in 0..self.routes.len() {
            if self.core.busy(p) && self.routes[p].backlog.is_empty() {
                let before = self.core.refused(p);
                self.core.work(p);
                self.run_effects(Some(Src::Route(p)));
                self.charge(p, before);
                any = true;
            }
        }
        any
    }

    fn backlog(&mut self, src: Src) -> &mut VecDeque<Effect> {
        match src {
            Src::Node(i) => &mut self.nodes[i].backlog,
            Src::Route(p) => &mut self.routes[p].backlog,
        }
    }

    /// Carries out the core's effects for `src` (in order behind its
    /// backlog); what cannot go now becomes its backlog. Effects of no
    /// source (timers) never wait: they are of the kinds that do not block
    /// or are dropped with the reason counted.
    fn run_effects(&mut self, src: Option<Src>) {
        if !self.core.has_effects() {
            return;
        }
        // One buffer kept across calls (and the core's): no allocation per
        // message.
        let mut effects = std::mem::take(&mut self.effects);
        self.core.drain_effects(&mut effects);
        if let Some(s) = src {
            if !self.backlog(s).is_empty() {
                self.backlog(s).extend(effects.drain(..));
                self.effects = effects;
                return;
            }
        }
        while let Some(e) = effects.pop_front() {
            match self.try_effect(e) {
                Ok(()) => self.core.drain_effects(&mut effects),
                Err(e) => {
                    let Some(s) = src else {
                        // (A discover to a node whose queue is full: the
                        // next tick sends another.)
                        continue;
                    };
                    let b = self.backlog(s);
                    b.push_back(e);
                    b.extend(effects.drain(..));
                    break;
                }
            }
        }
        self.effects = effects;
    }

    /// A peer's message for a node whose connection went away between the
    /// core's decision and now: reported undeliverable, counted, said.
    fn gone(&mut self, mut held: Held, node: &str) {
        held.undeliverable();
        self.node_gone.increment(1);
        if let Some(held_back) = self.node_gone_log.allow(&()) {
            tracing::warn!(node, held_back, "a message from a peer not delivered: its node's connection is gone");
        }
    }

    /// Carries out one effect now, or gives it back.
    fn try_effect(&mut self, e: Effect) -> Result<(), Effect> {
        match e {
            Effect::Node { node, packet, held, bulk } => {
                let tx = self.node_ix.get(&node).and_then(|&i| self.nodes[i].tx.as_ref());
                let Some(tx) = tx else {
                    if let Some(h) = held {
                        self.gone(h, &node);
                    }
                    return Ok(());
                };
                let sent = if bulk { tx.try_send_bulk(packet) } else { tx.try_send_delivery(packet, held) };
                match sent {
                    Ok(()) => Ok(()),
                    Err(TrySend::Full(packet, held)) => Err(Effect::Node { node, packet, held, bulk }),
                    Err(TrySend::Closed(held)) => {
                        if let Some(h) = held {
                            self.gone(h, &node);
                        }
                        Ok(())
                    }
                }
            }
            Effect::Peer { peer, payload, token, data } => {
                let slot = &mut self.routes[peer];
                if data && slot.shedding {
                    slot.failed_overload.increment(1);
                    self.core.not_sent(peer, token, Reject::Overload);
                    return Ok(());
                }
                let Some(handle) = slot.handle.as_ref() else {
                    // Its route was removed by a reload.
                    self.core.not_sent(peer, token, Reject::Shutdown);
                    return Ok(());
                };
                if slot.pending.is_empty() {
                    match handle.try_submit(payload, token) {
                        Ok(()) => return Ok(()),
                        Err(TrySubmit::Gone) => {
                            self.core.not_sent(peer, token, Reject::Shutdown);
                            return Ok(());
                        }
                        Err(TrySubmit::Full(payload, token)) => {
                            // The queue starts now: SHED_AFTER counts from here.
                            slot.moved = Instant::now();
                            slot.pending_bytes += payload.len();
                            slot.pending.push_back((payload, token));
                            return Ok(());
                        }
                    }
                }
                if data && slot.full() {
                    return Err(Effect::Peer { peer, payload, token, data });
                }
                slot.pending_bytes += payload.len();
                slot.pending.push_back((payload, token));
                Ok(())
            }
            Effect::ClusterNodes { from, nodes } => {
                if self.discover_cluster {
                    // What `from` sees, itself, and whatever it does not see
                    // but the gateway is still connected to.
                    let mut seen: BTreeSet<Arc<str>> = nodes.into_iter().collect();
                    seen.insert(from);
                    seen.extend(self.cluster_nodes.iter().filter(|n| self.is_connected(n)).cloned());
                    seen.retain(|n| !self.configured.iter().any(|c| *c.name == **n));
                    if seen != self.cluster_nodes {
                        self.cluster_nodes = seen;
                        self.apply_nodes();
                    }
                }
                Ok(())
            }
            Effect::Left(peer) => {
                while let Some(i) = self.left.iter().position(|(p, _)| *p == peer) {
                    let _ = self.left.swap_remove(i).1.send(());
                }
                Ok(())
            }
            Effect::Claim(step) => {
                if let Some(tx) = &self.claims {
                    // (Rare, and the queue is sized for every route twice
                    // over; a gateway that stopped reading is stopping.)
                    if let Err(e) = tx.try_send(step) {
                        tracing::error!("a claim's outcome was not taken by the gateway: {e}");
                    }
                }
                Ok(())
            }
            Effect::Groups { peer, change } => {
                let Some(handle) = self.routes[peer].handle.as_ref() else { return Ok(()) };
                match handle.try_groups(change) {
                    Ok(()) | Err(TryGroups::Gone) => Ok(()),
                    Err(TryGroups::Full(change)) => Err(Effect::Groups { peer, change }),
                }
            }
        }
    }

    /// Moves queued messages to routes with room, retries backlogs, and
    /// sheds peers whose queues have not moved for SHED_AFTER.
    fn retry(&mut self) {
        if !self.waiting() && !self.routes.iter().any(|r| r.shedding) {
            return;
        }
        let now = Instant::now();
        for slot in &mut self.routes {
            if slot.held_until.is_some_and(|t| now >= t) {
                slot.held_until = None;
            }
        }
        for p in 0..self.routes.len() {
            let slot = &mut self.routes[p];
            let Some(handle) = slot.handle.as_ref() else { continue };
            while let Some((payload, token)) = slot.pending.pop_front() {
                let len = payload.len();
                match handle.try_submit(payload, token) {
                    Ok(()) => {
                        slot.pending_bytes -= len;
                        slot.moved = now;
                    }
                    Err(TrySubmit::Full(payload, token)) => {
                        slot.pending.push_front((payload, token));
                        break;
                    }
                    Err(TrySubmit::Gone) => {
                        slot.pending_bytes -= len;
                        self.core.not_sent(p, token, Reject::Shutdown);
                        self.run_effects(None);
                        break;
                    }
                }
            }
            let slot = &mut self.routes[p];
            if slot.pending.is_empty() {
                slot.moved = now;
            }
            if !slot.shedding && slot.full() && now.duration_since(slot.moved) >= SHED_AFTER {
                slot.shedding = true;
                tracing::warn!(peer = %self.core.peer_name(p), queued = slot.pending.len(), "the peer has taken nothing for {SHED_AFTER:?} with its queue full: its messages fail (overload) until it catches up");
            } else if slot.shedding && slot.half_empty() {
                slot.shedding = false;
                tracing::info!(peer = %self.core.peer_name(p), "the peer is catching up: its messages are accepted again");
            }
        }
        for k in 0..self.sources_len() {
            let src = self.source(0, k);
            if self.backlog(src).is_empty() {
                continue;
            }
            let mut effects = std::mem::take(self.backlog(src));
            while let Some(e) = effects.pop_front() {
                match self.try_effect(e) {
                    Ok(()) => self.core.drain_effects(&mut effects),
                    Err(e) => {
                        let b = self.backlog(src);
                        b.push_back(e);
                        b.extend(effects);
                        break;
                    }
                }
            }
        }
    }

    /// Something is blocked or queued: retry soon.
    fn waiting(&self) -> bool {
        self.nodes.iter().any(|n| !n.backlog.is_empty())
            || self.routes.iter().any(|r| !r.backlog.is_empty() || !r.pending.is_empty() || r.held_until.is_some())
    }

    fn publish_nodes(&self) {
        self.connected.set(self.nodes.iter().filter(|n| n.tx.is_some()).count() as f64);
        for n in &self.nodes {
            let up = if n.tx.is_some() { 1.0 } else { 0.0 };
            self.spawner.metrics.gauge(m::ERLANG_NODE_UP, &[("node", &n.name)]).set(up);
        }
        self.publish_status();
    }

    /// The Erlang side's part of `/status`.
    fn publish_status(&self) {
        let scopes = self.core.scopes().to_vec();
        let now = Instant::now();
        let nodes = self
            .nodes
            .iter()
            .filter(|n| !n.removed)
            .map(|n| status::NodeStatus {
                name: n.name.to_string(),
                up: n.tx.is_some(),
                since_secs: now.duration_since(n.since).as_secs_f64(),
                scopes: self.core.scopes_of(&n.name),
                how: if self.configured.iter().any(|c| *c.name == *n.name) { "configured" } else { "discovered" }
                    .into(),
            })
            .collect();
        self.spawner.metrics.board().set_erlang(status::ErlangStatus {
            node: self.core.me().to_string(),
            scopes,
            nodes,
        });
    }

    fn publish(&self) {
        self.publish_status();
        self.proxies.set(self.core.proxies() as f64);
        for (p, slot) in self.routes.iter().enumerate() {
            let (proxies, handles, monitors, atoms) = self.core.usage(p);
            for (g, v) in slot.gauges.iter().zip([proxies, handles, monitors, atoms, slot.pending.len()]) {
                g.set(v as f64);
            }
        }
    }
}
