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

use super::core::{confirm_items, member_items, Admission, DataMetrics, RouteCore, View, Waits};
use super::endpoints::{Endpoints, Retry};
use super::handle::{RouteControl, RouteRef};
use super::new_epoch;
use crate::config::{GatewayConfig, RouteConfig};
use crate::link::backoff::Backoff;
use crate::link::conn::{self, Link, LinkEvent, LinkParams};
use crate::link::handshake::{self, Established, HandshakeError, Identity, Offer, SessionCheck, OTHER_INSTANCE};
use crate::link::{Close, Timeouts};
use crate::local::{LocalGroups, ToLocal};
use crate::membership::{Change, Filter, ImportLimits, PeerMembership, Rejected};
use crate::metrics::{self as m, Metrics};
use crate::route::{Confirmation, DataVerdict, Epoch, FailReason, LinkId, Outcome, Route, Window};
use crate::status;
use crate::tls;
use crate::wire::packing::{Compression, Policy};
use crate::wire::{Frame, Header, Hello};

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
    pub epoch: Option<Epoch>,
    /// The group names the local side takes (None: any).
    pub group_check: Option<crate::membership::GroupCheck>,
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
    /// Which endpoint to dial next.
    endpoints: Endpoints,
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
        );
        let members = match inputs.group_check {
            Some(check) => members.with_check(check),
            None => members,
        };
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
            endpoints: Endpoints::new(config.endpoints.len()),
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
    pub(super) fn handle(&self, control: mpsc::Sender<RouteControl>) -> RouteRef {
        RouteRef::new(self.core.clone(), control)
    }

    /// The acceptor's check of an incoming peer run, before its hello is
    /// answered: the route's session epoch, or the instance holding the
    /// route when another one holds it (see `route::Admit`).
    pub(super) fn session_check(&self) -> SessionCheck {
        let core = self.core.clone();
        // (With successors, another instance gets our hello: its link
        // becomes a successor session, `admit`.)
        let successors = self.successors.is_some();
        SessionCheck(Arc::new(move |hello: &Hello| core.check_session(hello, successors)))
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
                && self.endpoints.probing();
            let probe_at = self.next_probe;
            let dial_at = self.next_dial;
            let withdraw_at = self.down_since.filter(|_| !self.withdrawn).map(|t| t + self.params.dead_after);
            // Room on the primary's data lane, and on the local side, is
            // reserved before anything is taken out of the route state.
            let Waits { lane, to_local, held_back } = core.waits();
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
                Ok(permit) = async { lane.unwrap().reserve_owned().await }, if lane.is_some() => core.send_data(permit),
                Ok(permit) = async { to_local.unwrap().reserve_owned().await }, if to_local.is_some() => core.send_local(permit),
                // Deliveries wait for the local side to work through what it holds.
                // (Async blocks: a timer is made only when its branch is enabled.)
                _ = async { tokio::time::sleep(HELD_RETRY).await }, if held_back => {}
                _ = async { tokio::time::sleep_until(dial_at.into()).await }, if want_dial => self.dial(),
                _ = async { tokio::time::sleep_until(probe_at.into()).await }, if want_probe => self.probe(),
                _ = async { tokio::time::sleep_until(withdraw_at.unwrap_or_else(Instant::now).into()).await }, if withdraw_at.is_some() => {
                    self.withdraw();
                }
            }
            core.pump(PUMP_BATCH);
            core.flush_ack();
            self.publish_window();
            if self.members_dirty && self.members_published.elapsed() >= MEMBER_GAUGES_EVERY {
                self.publish_members();
            }
        }
        self.shutdown().await;
    }

    fn send_snapshot(&mut self) {
        for advert in self.members.snapshot() {
            self.core.send_control(Frame::control(Header::Advert(advert)));
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
                self.core.send_control(Frame::control(Header::Advert(advert)));
            }
        }
        self.members_dirty = true;
    }

    fn changes_to_local(&mut self, changes: Vec<Change>) {
        self.members_dirty = true;
        if !changes.is_empty() {
            self.core.tell_local(member_items(&self.peer, changes));
        }
    }

    fn confirmations_to_local(&mut self, confirmations: Vec<Confirmation>) {
        if !confirmations.is_empty() {
            self.core.tell_local(confirm_items(&self.peer, confirmations));
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
                .counter(m::MESSAGES_FAILED, &[("peer", &self.peer), ("reason", FailReason::Shutdown.label())])
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
        let mut outbox = self.core.take_outcomes();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_NOTICE;
        while let Some(item) = outbox.pop_front() {
            match tokio::time::timeout_at(deadline, self.core.send_outcome(item)).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::warn!(peer = %self.peer, outcomes = outbox.len() + 1, "the local side did not take the outcomes of its messages");
                    break;
                }
            }
        }
    }

    /// Dials, once per heartbeat interval, an endpoint that reached another
    /// instance of the peer (or a standby one) while the route has links:
    /// once that instance holds our route, the link starts a successor
    /// session (`admit`).
    fn probe(&mut self) {
        self.next_probe = Instant::now() + self.params.heartbeat;
        if let Some(ep) = self.endpoints.probe() {
            self.dial_endpoint(ep);
        }
    }

    fn dial(&mut self) {
        let links = &self.links;
        let ep = self.endpoints.pick(!links.is_empty(), |ep| links.iter().any(|l| l.endpoint == Some(ep)));
        self.dial_endpoint(ep);
    }

    fn dial_endpoint(&mut self, ep_index: usize) {
        let dial = self.config.endpoints[ep_index].clone();
        let tls = self.tls.as_ref().map(tls::Shared::current);
        let expect = self.config.cluster.clone();
        let hello = Hello { epoch: self.core.our_epoch(), ..self.own.hello(self.offer()) };
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
            self.next_dial = match self.endpoints.standby(ep) {
                Retry::Heartbeat => Instant::now() + self.params.heartbeat,
                Retry::Now => Instant::now(),
            };
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", e.reason())]).increment(1);
            if let Some(held_back) = self.refusals.allow(&e.reason()) {
                tracing::info!(peer = %self.peer, endpoint = %self.config.endpoints[ep], held_back, "that instance of the peer cluster stands by: trying its other endpoints");
            }
            return;
        }
        self.endpoints.not_standby();
        if let HandshakeError::OtherInstance(holder) = e {
            // A standby instance for this route: tried again each
            // heartbeat, so it takes over soon after the holder is gone.
            self.rm.standby.set(1.0);
            self.standing_by = true;
            self.next_dial = Instant::now() + self.params.heartbeat;
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", e.reason())]).increment(1);
            if let Some(held_back) = self.refusals.allow(&e.reason()) {
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
        let successors = self.successors.is_some() && !self.retired;
        let why = match self.core.admit(&instance, epoch, est.our_epoch, successors, &mut self.members) {
            Admission::Adopt => return Some(est),
            Admission::Successor => {
                if let Some(ep) = endpoint {
                    self.endpoints.other_instance(ep);
                }
                tracing::info!(peer = %self.peer, instance = %instance, "another instance of the peer cluster holds the route now: a successor session starts beside this one");
                let tx = self.successors.clone().expect("successors");
                if let Err(e) = tx.try_send(Box::new(est)) {
                    tracing::error!(peer = %self.peer, "a successor link was not taken: {e}");
                }
                return None;
            }
            Admission::OtherInstance { holder } => {
                if let Some(ep) = endpoint {
                    self.endpoints.other_instance(ep);
                }
                let reason = HandshakeError::OTHER_INSTANCE_LABEL;
                self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", reason)]).increment(1);
                if let Some(held_back) = self.refusals.allow(&reason) {
                    tracing::info!(peer = %self.peer, remote = %est.remote, instance = %instance, held_back, "refused a link to another instance of the peer cluster while this route holds links to its current one");
                }
                format!("{OTHER_INSTANCE}: {holder}")
            }
            admission @ (Admission::Switched { .. } | Admission::Resync) => {
                if let Admission::Switched { from, failed } = admission {
                    self.session_failures(failed);
                    tracing::warn!(peer = %self.peer, from = %from, to = %instance, failed, "the route moves to another instance of the peer cluster: a new session (unconfirmed messages to the previous instance reported failed)");
                }
                if endpoint.is_some() {
                    // Our next hello carries the new epoch: dial again now.
                    self.next_dial = Instant::now();
                }
                "a new session: dial again".to_string()
            }
        };
        self.tracker.spawn(handshake::goodbye(est, why, self.max_frame));
        None
    }

    /// After a session ended (`RouteCore::admit`, `link_up`): what it
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
        let peer_window = send_window(&hello);
        let mut params = self.params.clone();
        params.packing = Policy::new(self.config.compression, &hello.capabilities);
        let link = conn::spawn(est, params, self.events_tx.clone(), &self.tracker);
        // A hard cap, whoever dialed: a peer cannot make this route hold
        // more links than configured (the side that sorts first trims to
        // what both want; this bounds the other side too).
        let max = usize::from(self.config.limits.links);
        if self.links.iter().filter(|l| !l.link.is_closed()).count() >= max {
            let reason = Close::LinkLimit.label();
            self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", &self.peer), ("reason", reason)]).increment(1);
            if let Some(held_back) = self.refusals.allow(&reason) {
                tracing::warn!(peer = %self.peer, max, held_back, "refused a link {info}: the route holds as many links as it may (max_links)");
            }
            link.close(Close::LinkLimit, "the route holds as many links as it may");
            return;
        }
        self.rm.connects.increment(1);
        self.rm.standby.set(0.0);
        self.standing_by = false;
        self.endpoints.not_standby();
        let id = link.id;
        let (was_known, up) = self.core.link_up(link.lanes(), &hello, peer_window, &mut self.members);
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
        let peer_wants = self.links.iter().map(|l| l.peer_wants).max().unwrap_or(0);
        let Some(target) =
            trim_to(&self.own.cluster, &self.peer, peer_wants, self.config.links_wanted(), self.config.limits.links)
        else {
            return;
        };
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
                    if self.core.undelivered() >= PUMP_BATCH {
                        self.core.pump(PUMP_BATCH);
                    }
                }
                // The link's later frames may take the data path again.
                self.core.batch_handled();
            }
        }
    }

    fn link_closed(&mut self, link: LinkId, reason: crate::link::CloseReason) {
        let Some(pos) = self.links.iter().position(|l| l.link.id == link) else { return };
        let live = self.links.remove(pos);
        self.metrics.counter(m::LINK_DISCONNECTS, &[("peer", &self.peer), ("reason", reason.label())]).increment(1);
        let down = self.core.link_down(link);
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
                // (None: from a previous run of the peer, on a stale link.)
                let Some(verdict) = self.core.on_data(link, epoch, seq, frame.body) else { return };
                match verdict {
                    Ok(DataVerdict::Accepted) | Ok(DataVerdict::Stale) => {}
                    Ok(DataVerdict::Duplicate) => self.rm.duplicates.increment(1),
                    Err(v) => self.violation(link, v.label(), v.to_string()),
                }
            }
            Header::Ack { epoch, upto } => {
                if let Err(v) = self.core.on_ack(epoch, upto) {
                    self.violation(link, v.label(), v.to_string());
                }
            }
            Header::Advert(advert) => {
                let origin = advert.origin.clone();
                match self.members.on_advert(advert) {
                    Ok(applied) => {
                        if applied.resync {
                            self.core.send_control(Frame::control(Header::Resync));
                        }
                        for (group, why) in &applied.refused {
                            self.advert_rejected(Rejected::BadGroup.label(), || {
                                format!("group {group:?} not imported: {why}")
                            });
                        }
                        self.changes_to_local(applied.changes);
                        if applied.synced {
                            self.core.tell_local([ToLocal::Synced { peer: self.peer.clone() }]);
                        }
                    }
                    Err(e) => self.advert_rejected(e.label(), || format!("advert from {origin} rejected: {e}")),
                }
            }
            Header::Resync => self.send_snapshot(),
            Header::Reject { epoch, seqs } => {
                if let Err(v) = self.core.on_reject(epoch, &seqs) {
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
        let route_up = if self.core.is_up() { 1.0 } else { 0.0 };
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
        let View { up, peer_instance: peer_gateway, primary, unacked } = self.core.view();
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
        self.core.publish_window();
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

/// Our send window toward the peer: the receive window its hello offers
/// (at least one message and one byte, whatever it says).
fn send_window(hello: &Hello) -> Window {
    Window {
        messages: usize::try_from(hello.recv_window_messages).unwrap_or(usize::MAX).max(1),
        bytes: usize::try_from(hello.recv_window_bytes).unwrap_or(usize::MAX).max(1),
    }
}

/// How many links the route keeps when both sides dialed: what either
/// side wants, within our cap (`max_links`). Only the side whose cluster
/// name sorts first trims (None for the other), so the two never fight.
fn trim_to(own: &str, peer: &str, peer_wants: u8, we_want: u8, max_links: u8) -> Option<usize> {
    (own <= peer).then(|| usize::from(peer_wants.max(we_want).min(max_links)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_side_sorting_first_trims_to_what_either_wants_within_the_cap() {
        assert_eq!(trim_to("dc1", "dc2", 1, 2, 4), Some(2));
        assert_eq!(trim_to("dc1", "dc2", 3, 2, 4), Some(3), "the peer wants more");
        assert_eq!(trim_to("dc1", "dc2", 9, 2, 4), Some(4), "never beyond our cap");
        assert_eq!(trim_to("dc2", "dc1", 1, 2, 4), None, "the other side never trims");
    }

    #[test]
    fn the_send_window_is_what_the_peer_offers_but_never_zero() {
        let own = Identity { cluster: "dc1".into(), gateway: "gw".into(), epoch: Epoch(1) };
        let offer = |messages, bytes| Offer { links_wanted: 1, recv_window: Window { messages, bytes } };
        let w = send_window(&own.hello(offer(100, 1 << 20)));
        assert_eq!((w.messages, w.bytes), (100, 1 << 20));
        let mut zero = own.hello(offer(1, 1));
        (zero.recv_window_messages, zero.recv_window_bytes) = (0, 0);
        let w = send_window(&zero);
        assert_eq!((w.messages, w.bytes), (1, 1));
    }
}
