//! One task per route: the async shell around [`Route`] and
//! [`PeerMembership`]. It keeps the wanted number of links to the peer
//! (dialing with backoff when it has endpoints, adopting links the listener
//! accepted), handles link failures and failover, membership, timers, and
//! whatever the data path (`super::core`) leaves it, and publishes the
//! route's metrics. Messages and acks normally go through the route state
//! without this task. It never waits on the local side: what is for the
//! local cluster queues in the route state, bounded by the windows.
//!
//! Both sides may dial; they still form one set of links per pair of
//! clusters. The side whose cluster name sorts first trims links beyond what
//! either side wants, newest first; the other side never trims, so the two
//! cannot fight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::{confirm_items, member_items, DataMetrics, RouteCore};
use super::local::{LocalGroups, RouteControl, RouteHandle, ToLocal};
use super::new_epoch;
use crate::config::{GatewayConfig, RouteConfig};
use crate::link::backoff::Backoff;
use crate::link::conn::{self, Link, LinkEvent, LinkParams};
use crate::link::handshake::{self, Established, HandshakeError, Identity, Offer, SessionCheck, OTHER_INSTANCE};
use crate::link::{Close, Timeouts};
use crate::membership::{Change, Filter, ImportLimits, PeerMembership};
use crate::metrics::{self as m, Metrics};
use crate::route::{Admit, Confirmation, DataVerdict, FailReason, LinkId, Outcome, Route, Window};
use crate::status;
use crate::tls;
use crate::wire::packing::{Compression, Policy};
use crate::wire::{Frame, Header, Hello, CAP_REJECT};

/// `/status` is refreshed with heartbeats at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);
const MEMBER_GAUGES_EVERY: Duration = Duration::from_millis(200);
/// Payload bytes the local side may hold (handed over, not yet processed),
/// across all routes of a gateway.
pub(super) const TO_LOCAL_BYTES: usize = 256 * 1024 * 1024;
/// How often deliveries held back by that budget are retried.
const HELD_RETRY: Duration = Duration::from_millis(1);
/// How long a stopping route waits for the local side to take the
/// outcomes it is owed.
const SHUTDOWN_NOTICE: Duration = Duration::from_secs(2);
/// The most messages moved per step without going back to the select loop.
const PUMP_BATCH: usize = 512;

struct Live {
    link: Link,
    peer_wants: u8,
    endpoint: Option<usize>,
    since: Instant,
    /// The last heartbeat's round trip (for `/status`).
    rtt: Option<std::time::Duration>,
}

/// The route's metric handles, resolved once.
struct RouteMetrics {
    route_up: Gauge,
    /// Refused as another instance of our cluster holds the peer's route.
    standby: Gauge,
    primary_up: Gauge,
    standby_up: Gauge,
    failovers: Counter,
    sent: Counter,
    delivered: Counter,
    received: Counter,
    unacked_messages: Gauge,
    unacked_bytes: Gauge,
    retransmitted: Counter,
    duplicates: Counter,
    ack_latency: Histogram,
    groups_exported: Gauge,
    groups_imported: Gauge,
    members_exported: Gauge,
    members_imported: Gauge,
    connects: Counter,
}

impl RouteMetrics {
    fn new(m: &Metrics, peer: &str) -> Self {
        let p = [("peer", peer)];
        let g = |name, extra: (&'static str, &str)| m.gauge(name, &[("peer", peer), extra]);
        RouteMetrics {
            route_up: m.gauge(m::ROUTE_UP, &p),
            standby: m.gauge(m::ROUTE_STANDBY, &p),
            primary_up: g(m::LINK_UP, ("role", "primary")),
            standby_up: g(m::LINK_UP, ("role", "standby")),
            failovers: m.counter(m::FAILOVERS, &p),
            sent: m.counter(m::MESSAGES_SENT, &p),
            delivered: m.counter(m::MESSAGES_DELIVERED, &p),
            received: m.counter(m::MESSAGES_RECEIVED, &p),
            unacked_messages: m.gauge(m::UNACKED_MESSAGES, &p),
            unacked_bytes: m.gauge(m::UNACKED_BYTES, &p),
            retransmitted: m.counter(m::RETRANSMITTED, &p),
            duplicates: m.counter(m::DUPLICATES_DROPPED, &p),
            ack_latency: m.histogram(m::ACK_LATENCY, &p),
            groups_exported: g(m::GROUPS, ("direction", "exported")),
            groups_imported: g(m::GROUPS, ("direction", "imported")),
            members_exported: g(m::MEMBERS, ("direction", "exported")),
            members_imported: g(m::MEMBERS, ("direction", "imported")),
            connects: m.counter(m::LINK_CONNECTS, &p),
        }
    }
}

/// Where a route task gets its inputs (messages to send come through
/// its `RouteCore`, see `handle`).
pub(super) struct RouteInputs {
    /// Accepted links and local group changes.
    pub control: mpsc::Receiver<RouteControl>,
    pub to_local: mpsc::Sender<ToLocal>,
    /// Payload bytes handed to the local side and not yet dropped by it.
    pub held: Arc<std::sync::atomic::AtomicUsize>,
    /// With several instances of both clusters (`[erlang] coordinate`):
    /// where a link from another instance of the peer goes, to become a
    /// successor session (`Running::adopt_successor`), instead of being
    /// refused.
    pub successors: Option<mpsc::Sender<Box<Established>>>,
    /// The epoch of the task's route (a successor's is its predecessor's:
    /// the link's hello carried it); None: a fresh one.
    pub epoch: Option<u64>,
}

pub(super) struct PeerTask {
    config: RouteConfig,
    peer: Arc<str>,
    own: Arc<Identity>,
    tls: Option<tls::Shared>,
    params: LinkParams,
    timeouts: Timeouts,
    max_frame: usize,
    /// Accepted links and local group changes.
    control: mpsc::Receiver<RouteControl>,
    events_tx: mpsc::Sender<LinkEvent>,
    events: mpsc::Receiver<LinkEvent>,
    links: Vec<Live>,
    dialing: JoinSet<(usize, Result<Established, HandshakeError>)>,
    backoff: Backoff,
    next_dial: Instant,
    next_endpoint: usize,
    /// Endpoints found to reach another instance of the peer cluster than
    /// the one the route holds a session with, or one standing by: not
    /// dialed while it has links.
    other_instance: Vec<bool>,
    /// Standby refusals in a row (`dial_failed`).
    standby_streak: usize,
    successors: Option<mpsc::Sender<Box<Established>>>,
    /// A successor took over (`RouteControl::Retire`).
    retired: bool,
    /// When endpoints that reached another instance (or a standby) are
    /// dialed again although the route has its links: the next holder of
    /// the peer is found that way, for a successor session.
    next_probe: Instant,
    /// The route state and what the data path shares with it.
    core: Arc<RouteCore>,
    members: PeerMembership,
    /// When the last link went down; members are withdrawn `dead_after` later.
    down_since: Option<Instant>,
    withdrawn: bool,
    /// Membership gauges cost a walk over the groups: refreshed at most
    /// every MEMBER_GAUGES_EVERY while membership churns.
    members_dirty: bool,
    members_published: Instant,
    /// `/status` (`status::Board`): refreshed with the gauges, and with
    /// heartbeats at most every STATUS_EVERY.
    status_published: Instant,
    /// Refused as a standby (another instance holds the peer's session).
    standing_by: bool,
    metrics: Metrics,
    rm: RouteMetrics,
    /// Log lines a peer can cause many of, said once per period.
    refusals: crate::ratelog::RateLog<&'static str>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for PeerTask {
    /// However the task ends (shutdown, or a panic), submitters are told
    /// the route is gone rather than left waiting for room.
    fn drop(&mut self) {
        self.core.mark_closed();
    }
}

impl PeerTask {
    #[allow(clippy::too_many_arguments)] // what a route task is made of, each passed once by its one caller (`RouteKit::spawn_with`)
    pub(super) fn new(
        config: RouteConfig,
        own: Arc<Identity>,
        tls: Option<tls::Shared>,
        g: &GatewayConfig,
        timeouts: Timeouts,
        inputs: RouteInputs,
        metrics: Metrics,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let (events_tx, events) = mpsc::channel(1024);
        let peer: Arc<str> = config.cluster.as_str().into();
        // An epoch of this route task's own (not the run's): a route that a
        // reload stops and starts again is a new session for its peer, which
        // must not take the new numbering for the old one's.
        let route = Route::new(inputs.epoch.unwrap_or_else(new_epoch), config.window, config.window);
        let rm = RouteMetrics::new(&metrics, &config.cluster);
        metrics.gauge(m::WINDOW_MESSAGES, &[("peer", &config.cluster)]).set(config.window.messages as f64);
        let data_metrics = DataMetrics {
            sent: rm.sent.clone(),
            received: rm.received.clone(),
            retransmitted: rm.retransmitted.clone(),
            delivered: rm.delivered.clone(),
            undeliverable: metrics
                .counter(m::MESSAGES_FAILED, &[("peer", &peer), ("reason", FailReason::Undeliverable.label())]),
            ack_latency: rm.ack_latency.clone(),
            unacked_messages: rm.unacked_messages.clone(),
            unacked_bytes: rm.unacked_bytes.clone(),
        };
        let core =
            RouteCore::new(route, peer.clone(), inputs.to_local, inputs.held, data_metrics, config.window.messages);
        let params = LinkParams {
            heartbeat: g.heartbeat,
            dead_after: g.dead_after,
            max_frame_bytes: g.max_frame_bytes,
            peer: config.cluster.clone(),
            metrics: metrics.clone(),
            sink: Some(core.clone()),
            packing: Policy::new(Compression::Off, &[]),
        };
        let l = config.limits;
        let members = PeerMembership::new(
            &own.cluster,
            &config.cluster,
            Filter::from_patterns(&config.export),
            Filter::from_patterns(&config.import),
            ImportLimits { members: l.members, groups: l.groups, bytes: l.member_bytes },
        )
        .with_check(crate::erlang::groups::check);
        PeerTask {
            peer,
            own,
            tls,
            params,
            timeouts,
            max_frame: g.max_frame_bytes,
            control: inputs.control,
            events_tx,
            events,
            links: Vec::new(),
            dialing: JoinSet::new(),
            backoff: Backoff::new(g.reconnect_min, g.reconnect_max),
            next_dial: Instant::now(),
            next_endpoint: 0,
            other_instance: vec![false; config.endpoints.len()],
            standby_streak: 0,
            successors: inputs.successors,
            retired: false,
            next_probe: Instant::now(),
            core,
            members,
            down_since: Some(Instant::now()),
            withdrawn: true,
            members_dirty: true,
            members_published: Instant::now(),
            status_published: Instant::now(),
            standing_by: false,
            metrics,
            rm,
            refusals: crate::ratelog::RateLog::default(),
            cancel,
            tracker,
            config,
        }
    }

    /// The local side's handle for sending to this route's peer
    /// (`control`: the sending end of this task's control queue).
    pub(super) fn handle(&self, control: mpsc::Sender<RouteControl>) -> RouteHandle {
        RouteHandle { core: self.core.clone(), control }
    }

    /// The acceptor's check of an incoming peer run, before its hello is
    /// answered: the route's session epoch, or the instance holding the
    /// route when another one holds it (see `route::Admit`).
    pub(super) fn session_check(&self) -> SessionCheck {
        let core = self.core.clone();
        // (With successors, another instance gets our hello: its link
        // becomes a successor session, `admit`.)
        let successors = self.successors.is_some();
        SessionCheck(Arc::new(move |hello: &Hello| {
            let st = core.lock();
            match st.route.admit(&hello.gateway, hello.epoch) {
                Admit::OtherInstance if !successors => Err(st.route.peer_instance().unwrap_or_default().to_string()),
                _ => Ok(st.route.our_epoch()),
            }
        }))
    }

    fn offer(&self) -> Offer {
        Offer { links_wanted: self.config.links_wanted(), recv_window: self.config.window }
    }

    pub(super) async fn run(mut self) {
        self.publish();
        // Futures that live as long as the loop, not made afresh on each turn
        // (a Notified made and dropped per turn costs two lock round trips;
        // cancellation comes through `stop::on_cancel`, cheap to poll).
        let mut cancelled = crate::stop::on_cancel(&self.cancel);
        let core = self.core.clone();
        let local_done = core.finished.notify.notified();
        tokio::pin!(local_done);
        let woken = core.wake.notified();
        tokio::pin!(woken);
        loop {
            let want_dial = !self.retired
                && !self.config.endpoints.is_empty()
                && self.dialing.is_empty()
                && self.links.len() < self.config.links_wanted() as usize;
            let want_probe = self.successors.is_some()
                && !self.retired
                && !want_dial
                && self.dialing.is_empty()
                && !self.links.is_empty()
                && self.other_instance.iter().any(|o| *o);
            let probe_at = self.next_probe;
            let dial_at = self.next_dial;
            let withdraw_at = self.down_since.filter(|_| !self.withdrawn).map(|t| t + self.params.dead_after);
            // Room on the primary's data lane, and on the local side, is
            // reserved before anything is taken out of the route state.
            let (lane, to_local, held_back) = {
                let st = core.lock();
                let lane = RouteCore::primary_lanes(&st).filter(|_| st.route.wants_transmit()).map(|l| l.data.clone());
                let local = !st.outbox.is_empty() || st.route.has_delivery();
                let held_back = st.route.has_delivery() && core.over_budget();
                (lane, local.then(|| core.to_local.clone()), held_back)
            };
            tokio::select! {
                _ = &mut cancelled => break,
                Some(c) = self.control.recv() => match c {
                    RouteControl::Adopt(est) => self.adopt(*est, None),
                    RouteControl::Retire => self.retired = true,
                    RouteControl::Groups(change) => self.on_local_groups(change),
                },
                Some(joined) = self.dialing.join_next(), if !self.dialing.is_empty() => match joined {
                    Ok((ep, Ok(est))) => {
                        self.next_dial = Instant::now();
                        self.adopt(est, Some(ep));
                    }
                    Ok((ep, Err(e))) => self.dial_failed(ep, &e),
                    Err(e) => tracing::error!(peer = %self.peer, "dial task failed: {e}"),
                },
                Some(ev) = self.events.recv() => self.on_event(ev),
                // The data path left work (queued submits, a full lane or local queue).
                _ = &mut woken => woken.set(core.wake.notified()),
                // The local side finished with deliveries: flush_ack below picks them up.
                _ = &mut local_done => local_done.set(core.finished.notify.notified()),
                Ok(permit) = async { lane.unwrap().reserve_owned().await }, if lane.is_some() => {
                    let mut st = core.lock();
                    if let Some(frame) = core.data_frame(&mut st.route) {
                        permit.send(frame);
                    }
                }
                Ok(permit) = async { to_local.unwrap().reserve_owned().await }, if to_local.is_some() => {
                    let mut st = core.lock();
                    if let Some(item) = core.next_local(&mut st) {
                        permit.send(item);
                    }
                }
                // Deliveries wait for the local side to work through what it holds.
                // (Async blocks: a timer is made only when its branch is enabled.)
                _ = async { tokio::time::sleep(HELD_RETRY).await }, if held_back => {}
                _ = async { tokio::time::sleep_until(dial_at.into()).await }, if want_dial => self.dial(),
                _ = async { tokio::time::sleep_until(probe_at.into()).await }, if want_probe => self.probe(),
                _ = async { tokio::time::sleep_until(withdraw_at.unwrap_or_else(Instant::now).into()).await }, if withdraw_at.is_some() => {
                    self.withdraw();
                }
            }
            self.pump();
            self.flush_ack();
            self.publish_window();
            if self.members_dirty && self.members_published.elapsed() >= MEMBER_GAUGES_EVERY {
                self.publish_members();
            }
        }
        self.shutdown().await;
    }

    /// Moves what can move without waiting: queued submits into the window,
    /// transmissions onto the primary's data lane and deliveries to the
    /// local side, in batches, so a busy route does not go round the select
    /// loop once per message.
    fn pump(&mut self) {
        let core = self.core.clone();
        {
            let mut st = core.lock();
            core.admit_pending(&mut st);
            core.transmit(&mut st, false);
        }
        for _ in 0..PUMP_BATCH {
            {
                let mut st = core.lock();
                if !core.local_ready(&st) {
                    break;
                }
                let Ok(permit) = core.to_local.try_reserve() else { break };
                match core.next_local(&mut st) {
                    Some(item) => permit.send(item),
                    None => break,
                }
            }
            // Under load, ack as we go rather than only at the end.
            self.flush_ack();
        }
    }

    /// Queues a control frame on the primary (a lane far behind closes it).
    fn send_on_primary(&mut self, frame: Frame) {
        let st = self.core.lock();
        if let Some(lanes) = RouteCore::primary_lanes(&st) {
            lanes.send_control(frame);
        }
    }

    /// Acks what the local side finished with (see `RouteCore::flush_ack`).
    fn flush_ack(&mut self) {
        let mut st = self.core.lock();
        self.core.flush_ack(&mut st);
    }

    fn send_snapshot(&mut self) {
        for advert in self.members.snapshot() {
            self.send_on_primary(Frame::control(Header::Advert(advert)));
        }
        self.members_dirty = true;
    }

    fn on_local_groups(&mut self, change: LocalGroups) {
        // A large change goes as several adverts (each bounded: the peer
        // refuses larger ones).
        let (group, members, join) = match change {
            LocalGroups::Join { group, members } => (group, members, true),
            LocalGroups::Leave { group, members } => (group, members, false),
        };
        for chunk in members.chunks(crate::membership::ADVERT_MEMBERS) {
            let advert =
                if join { self.members.local_join(&group, chunk) } else { self.members.local_leave(&group, chunk) };
            if let Some(advert) = advert {
                self.send_on_primary(Frame::control(Header::Advert(advert)));
            }
        }
        self.members_dirty = true;
    }

    fn changes_to_local(&mut self, changes: Vec<Change>) {
        self.members_dirty = true;
        if !changes.is_empty() {
            self.core.lock().outbox.extend(member_items(&self.peer, changes));
        }
    }

    fn confirmations_to_local(&mut self, confirmations: Vec<Confirmation>) {
        if !confirmations.is_empty() {
            self.core.lock().outbox.extend(confirm_items(&self.peer, confirmations));
        }
    }

    fn withdraw(&mut self) {
        self.withdrawn = true;
        let changes = self.members.withdraw();
        if !changes.is_empty() {
            tracing::warn!(peer = %self.peer, "route down for {:?}: withdrawing its members from the local cluster", self.params.dead_after);
        }
        self.changes_to_local(changes);
    }

    /// Fails everything this route accepted and did not get confirmed:
    /// unacked messages and those still queued for it. The local side gets
    /// every outcome it is owed (bounded by SHUTDOWN_NOTICE, in case it has
    /// stopped reading).
    async fn shutdown(&mut self) {
        let (mut n, mut confirmations, queued) = self.core.close(FailReason::Shutdown);
        for s in queued {
            n += 1;
            if let Some(token) = s.token {
                confirmations.push(Confirmation { token, outcome: Outcome::Failed(FailReason::Shutdown) });
            }
        }
        if n > 0 {
            self.metrics
                .counter(m::MESSAGES_FAILED, &[("peer", &self.peer), ("reason", "shutdown")])
                .increment(n as u64);
            tracing::warn!(peer = %self.peer, messages = n, "shutting down with unconfirmed messages: reported failed");
        }
        for live in &self.links {
            live.link.close(Close::Shutdown, "gateway shutting down");
        }
        self.links.clear();
        self.dialing.abort_all();
        // (The route state still counts the links it had: the task is
        // ending, so the route is down, whatever it counts.)
        self.publish();
        if !self.retired {
            // (A route this instance no longer runs is not its to report.)
            self.metrics.board().remove_route(&self.peer);
            for g in [&self.rm.route_up, &self.rm.primary_up, &self.rm.standby_up] {
                g.set(0.0);
            }
        }
        // Outcomes queued for the local side, then these.
        self.confirmations_to_local(confirmations);
        let mut outbox = std::mem::take(&mut self.core.lock().outbox);
        outbox.retain(|item| matches!(item, ToLocal::Confirm { .. }));
        let deadline = tokio::time::Instant::now() + SHUTDOWN_NOTICE;
        while let Some(item) = outbox.pop_front() {
            match tokio::time::timeout_at(deadline, self.core.to_local.send(item)).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::warn!(peer = %self.peer, outcomes = outbox.len() + 1, "the local side did not take the outcomes of its messages");
                    break;
                }
            }
        }
    }

    /// Picks the next endpoint, preferring one no live link uses; while
    /// the route has links, never one that reached another instance.
    fn pick_endpoint(&mut self) -> usize {
        let n = self.config.endpoints.len();
        if self.links.is_empty() {
            self.other_instance.iter_mut().for_each(|o| *o = false);
        }
        let usable = |ep: usize| !self.other_instance[ep];
        for i in 0..n {
            let ep = (self.next_endpoint + i) % n;
            if usable(ep) && !self.links.iter().any(|l| l.endpoint == Some(ep)) {
                self.next_endpoint = ep + 1;
                return ep;
            }
        }
        let ep = (0..n).map(|i| (self.next_endpoint + i) % n).find(|&ep| usable(ep)).unwrap_or(self.next_endpoint % n);
        self.next_endpoint = ep + 1;
        ep
    }

    /// Dials, once per heartbeat interval, an endpoint that reached another
    /// instance of the peer (or a standby one) while the route has links:
    /// once that instance holds our route, the link starts a successor
    /// session (`admit`).
    fn probe(&mut self) {
        self.next_probe = Instant::now() + self.params.heartbeat;
        let n = self.config.endpoints.len();
        let Some(ep) = (0..n).map(|i| (self.next_endpoint + i) % n).find(|&ep| self.other_instance[ep]) else { return };
        self.next_endpoint = ep + 1;
        self.dial_endpoint(ep);
    }

    fn dial(&mut self) {
        let ep_index = self.pick_endpoint();
        self.dial_endpoint(ep_index);
    }

    fn dial_endpoint(&mut self, ep_index: usize) {
        let dial = self.config.endpoints[ep_index].clone();
        let tls = self.tls.as_ref().map(tls::Shared::current);
        let expect = self.config.cluster.clone();
        let hello = Hello { epoch: self.core.lock().route.our_epoch(), ..self.own.hello(self.offer()) };
        let t = self.timeouts;
        let max_frame = self.max_frame;
        tracing::debug!(peer = %expect, endpoint = %dial, "dialing");
        self.dialing.spawn(async move {
            let res = async {
                let tcp = handshake::dial(&dial.endpoint, dial.socks5.as_ref(), &t).await?;
                handshake::client(tcp, tls.as_ref(), &expect, hello, &t, max_frame).await
            }
            .await;
            (ep_index, res)
        });
    }

    fn dial_failed(&mut self, ep: usize, e: &HandshakeError) {
        if let HandshakeError::Standby = e {
            // That instance of the peer stands by (another of its cluster
            // holds our route): the next endpoint now, round the list once,
            // then each heartbeat (the holder may be on its way).
            self.other_instance[ep] = true;
            self.standby_streak += 1;
            self.next_dial = if self.standby_streak >= self.config.endpoints.len() {
                self.standby_streak = 0;
                Instant::now() + self.params.heartbeat
            } else {
                Instant::now()
            };
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", e.reason())]).increment(1);
            if let Some(held_back) = self.refusals.allow(&"standby") {
                tracing::info!(peer = %self.peer, endpoint = %self.config.endpoints[ep], held_back, "that instance of the peer cluster stands by: trying its other endpoints");
            }
            return;
        }
        self.standby_streak = 0;
        if let HandshakeError::OtherInstance(holder) = e {
            // A standby instance for this route: tried again each
            // heartbeat, so it takes over soon after the holder is gone.
            self.rm.standby.set(1.0);
            self.standing_by = true;
            self.next_dial = Instant::now() + self.params.heartbeat;
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", e.reason())]).increment(1);
            if let Some(held_back) = self.refusals.allow(&"other_instance") {
                tracing::info!(peer = %self.peer, endpoint = %self.config.endpoints[ep], held_back, "standby for this route: the peer's route is held by another instance of this cluster ({holder})");
            }
            return;
        }
        // Not refused as a standby: whether another instance holds the
        // route is unknown now.
        self.rm.standby.set(0.0);
        self.standing_by = false;
        let delay = self.backoff.fail(fastrand::f64());
        self.next_dial = Instant::now() + delay;
        self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", e.reason())]).increment(1);
        tracing::warn!(
            peer = %self.peer,
            endpoint = %self.config.endpoints[ep],
            reason = e.reason(),
            retry_in = ?delay,
            "cannot establish link: {e}"
        );
    }

    /// Whether a run of the peer may become a link of this route: a
    /// second instance is refused while another holds the route; a
    /// different instance after the current one is gone ends its session
    /// (what it was sent and never confirmed fails) under a fresh epoch of
    /// ours, and the link is closed so that the next one carries that
    /// epoch; a link whose hello carried an epoch we no longer use is
    /// closed the same way. Returns the link to adopt, if any.
    fn admit(&mut self, est: Established, endpoint: Option<usize>) -> Option<Established> {
        let (instance, epoch) = (est.peer.gateway.clone(), est.peer.epoch);
        let verdict = {
            let mut st = self.core.lock();
            match st.route.admit(&instance, epoch) {
                _ if est.our_epoch != st.route.our_epoch() => Err(("resync", "a new session: dial again".to_string())),
                Admit::OtherInstance if self.successors.is_some() && !self.retired => {
                    drop(st);
                    if let Some(ep) = endpoint {
                        self.other_instance[ep] = true;
                    }
                    tracing::info!(peer = %self.peer, instance = %instance, "another instance of the peer cluster holds the route now: a successor session starts beside this one");
                    let tx = self.successors.clone().expect("successors");
                    if let Err(e) = tx.try_send(Box::new(est)) {
                        tracing::error!(peer = %self.peer, "a successor link was not taken: {e}");
                    }
                    return None;
                }
                Admit::OtherInstance => {
                    let holder = st.route.peer_instance().unwrap_or_default().to_string();
                    Err(("other_instance", format!("{OTHER_INSTANCE}: {holder}")))
                }
                Admit::Switch => {
                    let old = st.route.peer_instance().unwrap_or_default().to_string();
                    let sw = st.route.switch(new_epoch());
                    session_ended(&self.peer, &mut self.members, &mut st, sw.failed);
                    drop(st);
                    self.session_failures(sw.failed_count);
                    tracing::warn!(peer = %self.peer, from = %old, to = %instance, failed = sw.failed_count, "the route moves to another instance of the peer cluster: a new session (unconfirmed messages to the previous instance reported failed)");
                    Err(("resync", "a new session: dial again".to_string()))
                }
                Admit::New | Admit::Same | Admit::Restarted => Ok(()),
            }
        };
        let (reason, why) = match verdict {
            Ok(()) => return Some(est),
            Err(v) => v,
        };
        if reason == "other_instance" {
            if let Some(ep) = endpoint {
                self.other_instance[ep] = true;
            }
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", reason)]).increment(1);
            if let Some(held_back) = self.refusals.allow(&"other_instance") {
                tracing::info!(peer = %self.peer, remote = %est.remote, instance = %instance, held_back, "refused a link to another instance of the peer cluster while this route holds links to its current one");
            }
        } else if endpoint.is_some() {
            // Our next hello carries the new epoch: dial again now.
            self.next_dial = Instant::now();
        }
        self.tracker.spawn(handshake::goodbye(est, why, self.max_frame));
        None
    }

    /// After `session_ended`, outside the lock: what the ended session
    /// was sent and never confirmed is counted failed; the membership
    /// gauges are due.
    fn session_failures(&mut self, failed: usize) {
        if failed > 0 {
            self.metrics
                .counter(m::MESSAGES_FAILED, &[("peer", &self.peer), ("reason", FailReason::PeerRestarted.label())])
                .increment(failed as u64);
        }
        self.members_dirty = true;
    }

    fn adopt(&mut self, est: Established, endpoint: Option<usize>) {
        let Some(est) = self.admit(est, endpoint) else { return };
        let info = format!(
            "{} {} ({}, gateway {})",
            if est.dialed { "to" } else { "from" },
            est.remote,
            if est.tls { "mutual TLS" } else { "PLAINTEXT" },
            est.peer.gateway
        );
        let hello: Hello = est.peer.clone();
        let peer_window = Window {
            messages: (hello.recv_window_messages as usize).max(1),
            bytes: (hello.recv_window_bytes.min(usize::MAX as u64) as usize).max(1),
        };
        let mut params = self.params.clone();
        params.packing = Policy::new(self.config.compression, &hello.capabilities);
        let link = conn::spawn(est, params, self.events_tx.clone(), &self.tracker);
        let id = link.id;
        // A hard cap, whoever dialed: a peer cannot make this route hold
        // more links than configured (the side that sorts first trims to
        // what both want; this bounds the other side too).
        let max = usize::from(self.config.limits.links);
        if self.links.iter().filter(|l| !l.link.is_closed()).count() >= max {
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", "link_limit")]).increment(1);
            if let Some(held_back) = self.refusals.allow(&"link_limit") {
                tracing::warn!(peer = %self.peer, max, held_back, "refused a link {info}: the route holds as many links as it may (max_links)");
            }
            link.close(Close::LinkLimit, "the route holds as many links as it may");
            return;
        }
        self.rm.connects.increment(1);
        self.rm.standby.set(0.0);
        self.standing_by = false;
        self.standby_streak = 0;
        // One step under the lock, so the link's reader cannot hand the
        // local side a message of a new session before the notices that
        // go with it (`Lost` for the old run, `Up`).
        let (was_known, up) = {
            let mut st = self.core.lock();
            st.lanes.push(link.lanes());
            st.peer_rejects = hello.capabilities.iter().any(|c| c == CAP_REJECT);
            let was_known = st.route.peer_epoch().is_some();
            let mut up = st.route.link_up_from(id, Some(&hello.gateway), hello.epoch, peer_window);
            if up.new_session {
                self.core.finished.reset(hello.epoch);
            }
            if up.new_session && was_known {
                session_ended(&self.peer, &mut self.members, &mut st, std::mem::take(&mut up.failed));
            }
            if up.primary {
                st.outbox.push_back(ToLocal::Up { peer: self.peer.clone(), epoch: hello.epoch });
            }
            (was_known, up)
        };
        if !up.stale.is_empty() {
            tracing::warn!(peer = %self.peer, "peer gateway restarted (new epoch): a new session");
        }
        for stale in &up.stale {
            if let Some(l) = self.links.iter().find(|l| l.link.id == *stale) {
                l.link.close(Close::PeerRestarted, "superseded by a link to the peer's new run");
            }
        }
        if up.new_session && was_known {
            self.session_failures(up.failed_count);
            if up.failed_count > 0 {
                tracing::warn!(peer = %self.peer, messages = up.failed_count, "unconfirmed messages to the peer's previous run reported failed");
            }
        }
        let role = if up.primary { "primary" } else { "standby" };
        tracing::info!(peer = %self.peer, link = id.0, role, "link up {info}");
        self.links.push(Live { link, peer_wants: hello.links_wanted, endpoint, since: Instant::now(), rtt: None });
        if up.primary {
            if self.down_since.take().is_some() {
                tracing::info!(peer = %self.peer, "route up");
            }
            self.withdrawn = false;
            self.send_snapshot();
        }
        self.trim();
        self.publish();
    }

    /// Closes links beyond what either side wants, if this side is the one
    /// that trims (its cluster name sorts first).
    fn trim(&mut self) {
        if self.own.cluster.as_str() > &*self.peer {
            return;
        }
        let target = self
            .links
            .iter()
            .map(|l| l.peer_wants)
            .max()
            .unwrap_or(0)
            .max(self.config.links_wanted())
            .min(self.config.limits.links) as usize;
        let open: Vec<&Live> = self.links.iter().filter(|l| !l.link.is_closed()).collect();
        for l in open.iter().skip(target) {
            tracing::info!(peer = %self.peer, link = l.link.id.0, "closing surplus link (both sides dialed)");
            l.link.close(Close::Surplus, "both sides dialed; keeping the older links");
        }
    }

    fn on_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Closed { link, reason } => self.link_closed(link, reason),
            LinkEvent::Rtt { link, rtt } => {
                if let Some(l) = self.links.iter_mut().find(|l| l.link.id == link) {
                    l.rtt = Some(rtt);
                }
                if self.status_published.elapsed() >= STATUS_EVERY {
                    self.publish_status();
                }
            }
            LinkEvent::Frames { link, frames } => {
                for frame in frames {
                    self.on_frame(link, frame);
                    // Keep deliveries and acks flowing within a big batch.
                    let undelivered = self.core.lock().route.undelivered().0;
                    if undelivered >= PUMP_BATCH {
                        self.pump();
                    }
                }
                // The link's later frames may take the data path again.
                let mut st = self.core.lock();
                st.events_queued = st.events_queued.saturating_sub(1);
            }
        }
    }

    fn link_closed(&mut self, link: LinkId, reason: crate::link::CloseReason) {
        let Some(pos) = self.links.iter().position(|l| l.link.id == link) else { return };
        let live = self.links.remove(pos);
        self.metrics.counter(m::LINK_DISCONNECTS, &[("peer", &self.peer), ("reason", reason.label())]).increment(1);
        let down = {
            let mut st = self.core.lock();
            st.lanes.retain(|l| l.id != link);
            let down = st.route.link_down(link);
            if down.route_down {
                st.outbox.push_back(ToLocal::Lost { peer: self.peer.clone() });
            }
            down
        };
        let role = if down.was_primary { "primary" } else { "standby" };
        // (A peer that keeps failing its links would otherwise fill the log.)
        if let Some(held_back) = self.refusals.allow(&reason.label()) {
            tracing::warn!(peer = %self.peer, link = link.0, role, reason = reason.label(), held_back, "link down: {reason}");
        }
        if let Some(promoted) = down.promoted {
            self.rm.failovers.increment(1);
            tracing::warn!(peer = %self.peer, from = link.0, to = promoted.0, "failover: standby promoted to primary");
            self.send_snapshot();
        }
        if down.route_down {
            self.members.pause();
            self.down_since = Some(Instant::now());
            tracing::warn!(peer = %self.peer, "route down: no live link");
        }
        // A link that dies young counts as a failed attempt, so a peer that
        // accepts and then drops us does not make us spin.
        if live.since.elapsed() >= self.params.dead_after {
            self.backoff.reset();
            self.next_dial = self.next_dial.min(Instant::now());
        } else {
            self.next_dial = Instant::now() + self.backoff.fail(fastrand::f64());
        }
        self.publish();
    }

    fn violation(&mut self, link: LinkId, label: &'static str, why: String) {
        if let Some(held_back) = self.refusals.allow(&label) {
            tracing::warn!(peer = %self.peer, link = link.0, held_back, "closing link: protocol violation: {why}");
        }
        self.metrics.counter(m::FRAMES_REJECTED, &[("peer", &self.peer), ("reason", label)]).increment(1);
        if let Some(l) = self.links.iter().find(|l| l.link.id == link) {
            l.link.close(Close::Refused(label), &why);
        }
    }

    fn on_frame(&mut self, link: LinkId, frame: Frame) {
        match frame.header {
            Header::Data { epoch, seq, .. } => {
                let verdict = {
                    let mut st = self.core.lock();
                    if Some(epoch) != st.route.peer_epoch() {
                        return; // from a previous run of the peer, on a stale link
                    }
                    st.route.on_data(link, seq, frame.body)
                };
                match verdict {
                    Ok(DataVerdict::Accepted) | Ok(DataVerdict::Stale) => {}
                    Ok(DataVerdict::Duplicate) => self.rm.duplicates.increment(1),
                    Err(v) => self.violation(link, v.label(), v.to_string()),
                }
            }
            Header::Ack { epoch, upto } => {
                let acked = {
                    let mut st = self.core.lock();
                    self.core.on_ack(&mut st, epoch, upto)
                };
                if let Err(v) = acked {
                    self.violation(link, v.label(), v.to_string());
                }
            }
            Header::Advert(advert) => {
                let origin = advert.origin.clone();
                match self.members.on_advert(advert) {
                    Ok(applied) => {
                        if applied.resync {
                            self.send_on_primary(Frame::control(Header::Resync));
                        }
                        for (group, why) in &applied.refused {
                            self.advert_rejected("bad_group", || format!("group {group:?} not imported: {why}"));
                        }
                        self.changes_to_local(applied.changes);
                        if applied.synced {
                            self.core.lock().outbox.push_back(ToLocal::Synced { peer: self.peer.clone() });
                        }
                    }
                    Err(e) => self.advert_rejected(e.label(), || format!("advert from {origin} rejected: {e}")),
                }
            }
            Header::Resync => self.send_snapshot(),
            Header::Reject { epoch, seqs } => {
                let rejected = self.core.lock().route.on_reject(epoch, &seqs);
                if let Err(v) = rejected {
                    self.violation(link, v.label(), v.to_string());
                }
            }
            other => tracing::debug!(peer = %self.peer, "ignoring {other:?}"),
        }
    }

    /// Counts a refused advert (or group in one) and says so at most once
    /// per reason per period.
    fn advert_rejected(&mut self, reason: &'static str, what: impl FnOnce() -> String) {
        self.metrics.counter(m::ADVERTS_REJECTED, &[("peer", &self.peer), ("reason", reason)]).increment(1);
        if let Some(held_back) = self.refusals.allow(&reason) {
            tracing::warn!(peer = %self.peer, reason, held_back, "{}", what());
        }
    }

    fn publish(&mut self) {
        if self.retired {
            return; // (its successor publishes the route's gauges)
        }
        let up = self.links.iter().filter(|l| !l.link.is_closed()).count();
        let route_up = if self.core.lock().route.is_up() { 1.0 } else { 0.0 };
        self.rm.primary_up.set(route_up);
        self.rm.standby_up.set(up.saturating_sub(1) as f64);
        self.rm.route_up.set(route_up);
        self.publish_window();
        self.publish_members();
        self.publish_status();
    }

    /// This route's part of `/status`.
    fn publish_status(&mut self) {
        self.status_published = Instant::now();
        if self.retired {
            return;
        }
        let now = Instant::now();
        let (up, peer_gateway, primary, unacked) = {
            let st = self.core.lock();
            (st.route.is_up(), st.route.peer_instance().map(str::to_string), st.route.primary(), st.route.unacked().0)
        };
        let links: Vec<status::LinkStatus> = self
            .links
            .iter()
            .filter(|l| !l.link.is_closed())
            .map(|l| status::LinkStatus {
                id: l.link.id.0,
                endpoint: l.endpoint.map_or_else(|| "accepted".to_string(), |e| self.config.endpoints[e].to_string()),
                role: if primary.is_some_and(|p| p == l.link.id) { "primary" } else { "standby" }.to_string(),
                rtt_ms: l.rtt.map(|d| d.as_secs_f64() * 1000.0),
                up_secs: now.duration_since(l.since).as_secs_f64(),
            })
            .collect();
        let up_secs = if up { links.iter().map(|l| l.up_secs).reduce(f64::max) } else { None };
        let (groups_exported, members_exported) = self.members.exported();
        let (groups_imported, members_imported) = self.members.imported();
        let listed = |v: Vec<(String, usize)>| {
            v.into_iter().map(|(group, members)| status::GroupCount { scope: String::new(), group, members }).collect()
        };
        self.metrics.board().set_route(status::RouteStatus {
            peer: self.peer.to_string(),
            up,
            standby: self.standing_by,
            peer_gateway,
            up_secs,
            links,
            unacked_messages: unacked,
            window_messages: self.config.window.messages,
            groups_exported,
            members_exported,
            groups_imported,
            members_imported,
            exported: listed(self.members.exported_groups(status::MAX_GROUPS_LISTED)),
            imported: listed(self.members.imported_groups(status::MAX_GROUPS_LISTED)),
        });
    }

    fn publish_window(&self) {
        if self.retired {
            return; // (its successor publishes the route's gauges)
        }
        let st = self.core.lock();
        self.core.publish_window(&st);
    }

    fn publish_members(&mut self) {
        self.members_dirty = false;
        if self.retired {
            return;
        }
        self.members_published = Instant::now();
        let (g, mm) = self.members.exported();
        self.rm.groups_exported.set(g as f64);
        self.rm.members_exported.set(mm as f64);
        let (g, mm) = self.members.imported();
        self.rm.groups_imported.set(g as f64);
        self.rm.members_imported.set(mm as f64);
    }
}

/// The session with the peer's run ended (it restarted, or the route moved
/// to another instance): queued with that state change, under the route's
/// lock, the outcomes of what it was sent and never confirmed, `Lost`, and
/// the withdrawal of its members.
fn session_ended(
    peer: &Arc<str>,
    members: &mut PeerMembership,
    st: &mut super::core::CoreState,
    failed: Vec<Confirmation>,
) {
    st.outbox.extend(confirm_items(peer, failed));
    st.outbox.push_back(ToLocal::Lost { peer: peer.clone() });
    st.outbox.extend(member_items(peer, members.peer_restarted()));
}
