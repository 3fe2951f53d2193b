//! One task per route: keeps the wanted number of links to the peer cluster
//! (dialing with backoff when it has endpoints, adopting links the listener
//! accepted), picks the primary, and publishes link metrics.
//!
//! Both sides may dial; they still form one set of links per pair of
//! clusters. The side whose cluster name sorts first trims links beyond what
//! either side wants, newest first; the other side never trims, so the two
//! cannot fight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{GatewayConfig, RouteConfig};
use crate::link::backoff::Backoff;
use crate::link::conn::{self, Link, LinkEvent, LinkParams};
use crate::link::handshake::{self, Established, HandshakeError, Identity};
use crate::link::Timeouts;
use crate::metrics as m;
use crate::tls::Tls;

struct Live {
    link: Link,
    peer_epoch: u64,
    peer_wants: u8,
    endpoint: Option<usize>,
    since: Instant,
}

pub(super) struct PeerTask {
    route: RouteConfig,
    own: Arc<Identity>,
    tls: Option<Tls>,
    params: LinkParams,
    timeouts: Timeouts,
    max_frame: usize,
    inbound: mpsc::Receiver<Established>,
    events_tx: mpsc::Sender<LinkEvent>,
    events: mpsc::Receiver<LinkEvent>,
    links: Vec<Live>,
    dialing: JoinSet<(usize, Result<Established, HandshakeError>)>,
    backoff: Backoff,
    next_dial: Instant,
    next_endpoint: usize,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl PeerTask {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        route: RouteConfig,
        own: Arc<Identity>,
        tls: Option<Tls>,
        g: &GatewayConfig,
        timeouts: Timeouts,
        inbound: mpsc::Receiver<Established>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let (events_tx, events) = mpsc::channel(1024);
        let params = LinkParams {
            heartbeat: g.heartbeat,
            dead_after: g.dead_after,
            max_frame_bytes: g.max_frame_bytes,
            peer: route.cluster.clone(),
        };
        PeerTask {
            own,
            tls,
            params,
            timeouts,
            max_frame: g.max_frame_bytes,
            inbound,
            events_tx,
            events,
            links: Vec::new(),
            dialing: JoinSet::new(),
            backoff: Backoff::new(g.reconnect_min, g.reconnect_max),
            next_dial: Instant::now(),
            next_endpoint: 0,
            cancel,
            tracker,
            route,
        }
    }

    fn peer(&self) -> &str {
        &self.route.cluster
    }

    pub(super) async fn run(mut self) {
        self.publish();
        let far = Duration::from_secs(3600);
        loop {
            let want_dial = !self.route.endpoints.is_empty()
                && self.dialing.is_empty()
                && self.links.len() < self.route.links_wanted() as usize;
            let wake = if want_dial {
                self.next_dial
            } else {
                Instant::now() + far
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                Some(est) = self.inbound.recv() => self.adopt(est, None),
                Some(joined) = self.dialing.join_next(), if !self.dialing.is_empty() => match joined {
                    Ok((ep, Ok(est))) => {
                        self.next_dial = Instant::now();
                        self.adopt(est, Some(ep));
                    }
                    Ok((ep, Err(e))) => self.dial_failed(ep, &e),
                    Err(e) => tracing::error!(peer = %self.peer(), "dial task failed: {e}"),
                },
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(wake.into()), if want_dial => self.dial(),
            }
        }
        for live in &self.links {
            live.link.close("shutdown", "gateway shutting down");
        }
        self.links.clear();
        self.dialing.shutdown().await;
        self.publish();
    }

    /// Picks the next endpoint, preferring one no live link uses.
    fn pick_endpoint(&mut self) -> usize {
        let n = self.route.endpoints.len();
        for i in 0..n {
            let ep = (self.next_endpoint + i) % n;
            if !self.links.iter().any(|l| l.endpoint == Some(ep)) {
                self.next_endpoint = ep + 1;
                return ep;
            }
        }
        let ep = self.next_endpoint % n;
        self.next_endpoint = ep + 1;
        ep
    }

    fn dial(&mut self) {
        let ep_index = self.pick_endpoint();
        let ep = self.route.endpoints[ep_index].clone();
        let socks = self.route.socks5.clone();
        let tls = self.tls.clone();
        let expect = self.route.cluster.clone();
        let hello = self.own.hello(self.route.links_wanted());
        let t = self.timeouts;
        let max_frame = self.max_frame;
        tracing::debug!(peer = %expect, endpoint = %ep, "dialing");
        self.dialing.spawn(async move {
            let res = async {
                let tcp = handshake::dial(&ep, socks.as_ref(), &t).await?;
                handshake::client(tcp, tls.as_ref(), &expect, hello, &t, max_frame).await
            }
            .await;
            (ep_index, res)
        });
    }

    fn dial_failed(&mut self, ep: usize, e: &HandshakeError) {
        let delay = self.backoff.fail(fastrand::f64());
        self.next_dial = Instant::now() + delay;
        metrics::counter!(m::HANDSHAKE_FAILURES, "peer" => self.peer().to_string(), "reason" => e.reason()).increment(1);
        tracing::warn!(
            peer = %self.peer(),
            endpoint = %self.route.endpoints[ep],
            reason = e.reason(),
            retry_in = ?delay,
            "cannot establish link: {e}"
        );
    }

    fn adopt(&mut self, est: Established, endpoint: Option<usize>) {
        let peer_epoch = est.peer.epoch;
        let stale: Vec<u64> = self
            .links
            .iter()
            .filter(|l| l.peer_epoch != peer_epoch)
            .map(|l| l.link.id)
            .collect();
        if !stale.is_empty() {
            tracing::info!(peer = %self.peer(), "peer gateway restarted (new epoch); dropping links to its previous run");
            for l in self.links.iter().filter(|l| stale.contains(&l.link.id)) {
                l.link.close(
                    "peer_restarted",
                    "superseded by a link to the peer's new run",
                );
            }
        }
        let info = format!(
            "{} {} ({}, gateway {})",
            if est.dialed { "to" } else { "from" },
            est.remote,
            if est.tls { "mutual TLS" } else { "PLAINTEXT" },
            est.peer.gateway
        );
        let peer_wants = est.peer.links_wanted;
        let link = conn::spawn(
            est,
            self.params.clone(),
            self.events_tx.clone(),
            &self.tracker,
        );
        metrics::counter!(m::LINK_CONNECTS, "peer" => self.peer().to_string()).increment(1);
        let role = if self.links.iter().all(|l| stale.contains(&l.link.id)) {
            "primary"
        } else {
            "standby"
        };
        tracing::info!(peer = %self.peer(), link = link.id, role, "link up {info}");
        self.links.push(Live {
            link,
            peer_epoch,
            peer_wants,
            endpoint,
            since: Instant::now(),
        });
        self.trim();
        self.publish();
    }

    /// Closes links beyond what either side wants, if this side is the one
    /// that trims (its cluster name sorts first).
    fn trim(&mut self) {
        if self.own.cluster.as_str() > self.peer() {
            return;
        }
        let target = self
            .links
            .iter()
            .map(|l| l.peer_wants)
            .max()
            .unwrap_or(0)
            .max(self.route.links_wanted()) as usize;
        let open: Vec<&Live> = self.links.iter().filter(|l| !l.link.is_closed()).collect();
        for l in open.iter().skip(target) {
            tracing::info!(peer = %self.peer(), link = l.link.id, "closing surplus link (both sides dialed)");
            l.link
                .close("surplus", "both sides dialed; keeping the older links");
        }
    }

    fn on_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Closed { link, reason } => {
                let Some(pos) = self.links.iter().position(|l| l.link.id == link) else {
                    return;
                };
                let live = self.links.remove(pos);
                metrics::counter!(m::LINK_DISCONNECTS, "peer" => self.peer().to_string(), "reason" => reason.label).increment(1);
                let role = if pos == 0 { "primary" } else { "standby" };
                tracing::warn!(peer = %self.peer(), link, role, reason = reason.label, "link down: {reason}");
                // A link that dies young counts as a failed attempt, so a
                // peer that accepts and then drops us does not make us spin.
                if live.since.elapsed() >= self.params.dead_after {
                    self.backoff.reset();
                    self.next_dial = self.next_dial.min(Instant::now());
                } else {
                    self.next_dial = Instant::now() + self.backoff.fail(fastrand::f64());
                }
                if self.links.is_empty() {
                    tracing::warn!(peer = %self.peer(), "route down: no live link");
                }
                self.publish();
            }
            LinkEvent::Rtt { .. } => {}
            LinkEvent::Frame { .. } => {}
        }
    }

    fn publish(&self) {
        let up = self.links.iter().filter(|l| !l.link.is_closed()).count();
        let peer = self.peer().to_string();
        metrics::gauge!(m::LINK_UP, "peer" => peer.clone(), "role" => "primary").set(if up > 0 {
            1.0
        } else {
            0.0
        });
        metrics::gauge!(m::LINK_UP, "peer" => peer, "role" => "standby")
            .set(up.saturating_sub(1) as f64);
    }
}
