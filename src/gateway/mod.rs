//! Wiring: turns a checked configuration into running parts — one peer task
//! per route, the WAN listener, the metrics endpoint — under one
//! cancellation root, and drains them on shutdown.

mod core;
mod endpoints;
mod handle;
mod peer;
pub mod reload;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Problem};
use crate::link::handshake::{self, Admission, Identity, Offer};
use crate::link::Timeouts;
use crate::local::{Control, Inbox, LocalHandle, Step, Then, ToLocal};
use crate::membership::GroupCheck;
use crate::metrics::{self as m, Metrics};
use crate::tls::{self, Tls};
use handle::{RouteControl, RouteRef};

/// A configuration with everything `run` needs loaded and checked: what
/// `wandist check` validates, without binding a port.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub config: Config,
    pub tls: Option<Tls>,
    /// `[erlang.tls]`: for the distribution connections to local nodes.
    pub dist_tls: Option<Arc<rustls::ClientConfig>>,
}

/// Loads the file and the TLS material it names; every problem at once.
pub fn prepare(path: &Path) -> Result<Prepared, Vec<Problem>> {
    let text = Config::read(path)?;
    let config = match Config::parse_partial(&text, path) {
        (Ok(config), _) => config,
        (Err(mut problems), partial) => {
            // Still check the files the [tls] table names, for a full report.
            if let Some((files, cluster)) = partial {
                if let Err(more) = Tls::load(&files, cluster.as_deref(), path) {
                    problems.extend(more);
                }
            }
            return Err(problems);
        }
    };
    let mut problems = Vec::new();
    let tls = match &config.tls {
        Some(files) => {
            Tls::load(files, Some(&config.gateway.cluster), &config.path).map_err(|p| problems.extend(p)).ok()
        }
        None => None,
    };
    let dist_tls = match config.erlang.as_ref().and_then(|e| e.tls.as_ref()) {
        Some(d) => tls::dist_client(&d.files, d.check_host, &config.path).map_err(|p| problems.extend(p)).ok(),
        None => None,
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Prepared { config, tls, dist_tls })
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), GatewayError> {
    let l = TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { what, addr, source })?;
    let local = l.local_addr().map_err(|source| GatewayError::Bind { what, addr, source })?;
    Ok((l, local))
}

/// A started gateway: where it listens, and the local side's handle.
pub struct Running {
    /// The WAN listener's address (port resolved), if it listens.
    pub peers: Option<SocketAddr>,
    /// The metrics endpoint's address, if configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The route tasks running, by peer cluster (`local` hands the local
    /// side its handles on them).
    routes: HashMap<String, RouteRef>,
    /// Each route's queue toward the local side (for it to take).
    pub inboxes: Vec<Inbox>,
    pub metrics: Metrics,
    /// The configuration running (what a reload compares against).
    config: Config,
    /// The TLS material new handshakes use (a reload replaces it).
    tls: Option<tls::Shared>,
    /// Starts and stops routes (a reload adds and removes them).
    kit: RouteKit,
    /// The local side's controls, if one is attached (`attach`).
    shell: Option<mpsc::Sender<Control>>,
    /// The merged channel (`merged_inbox`), if the local side took one.
    merged: Option<mpsc::Sender<ToLocal>>,
    root: CancellationToken,
    tracker: TaskTracker,
    grace: std::time::Duration,
    /// Several instances of the cluster (`[erlang] coordinate`): routes
    /// run while this instance holds them, by the claims' outcomes.
    coordinated: bool,
    claims: Option<mpsc::Receiver<Step>>,
    /// Links from another instance of a peer, for successor sessions.
    successors: Option<mpsc::Receiver<Box<handshake::Established>>>,
    /// Route tasks whose session a successor took over, until their peer
    /// instance has left: (cluster, handle).
    retiring: Vec<(String, RouteRef)>,
}

impl Running {
    /// Attaches a local side that takes `Control`s (reloads, hand-overs,
    /// the gateway's stop), each route's `Inbox` and `local`; with
    /// `claims` (several instances of the cluster), routes run while this
    /// instance holds them, by the claims' outcomes, and links from
    /// another instance of a peer become successor sessions.
    pub fn attach(&mut self, control: mpsc::Sender<Control>, claims: Option<mpsc::Receiver<Step>>) {
        self.shell = Some(control);
        self.coordinated = claims.is_some();
        if self.coordinated {
            let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
            self.kit.successors = Some(tx);
            self.successors = Some(rx);
        }
        self.claims = claims;
    }

    /// The local side's handle on the routes running now.
    pub fn local(&self) -> LocalHandle {
        let mut local = LocalHandle::default();
        for (cluster, route) in &self.routes {
            local.insert(cluster.clone(), route.for_local());
        }
        local
    }

    /// The session epoch of the route to `peer` (what its hellos carry
    /// now), if it runs.
    pub fn route_epoch(&self, peer: &str) -> Option<crate::route::Epoch> {
        self.routes.get(peer).map(RouteRef::epoch)
    }

    /// Without a local side: what the routes hand it is logged and dropped.
    pub fn discard_inboxes(&mut self) {
        for inbox in std::mem::take(&mut self.inboxes) {
            drain(inbox, &self.tracker, self.root.clone());
        }
    }

    /// The gateway's cancellation root and task tracker, for a local side
    /// that runs under them.
    pub fn root(&self) -> (CancellationToken, TaskTracker) {
        (self.root.clone(), self.tracker.clone())
    }

    /// Runs until `shutdown` is cancelled, then stops (`stop`). Each item
    /// from `reloads` loads the configuration file again and applies it
    /// (`reload`); claims and successor links are acted on as they come.
    pub async fn serve(mut self, shutdown: CancellationToken, mut reloads: mpsc::Receiver<()>) {
        let path = self.config.path.clone();
        let mut claims = self.claims.take();
        let mut successors = self.successors.take();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(est) = async { successors.as_mut().unwrap().recv().await }, if successors.is_some() => self.adopt_successor(est),
                Some(step) = async { claims.as_mut().unwrap().recv().await }, if claims.is_some() => self.claim_step(step),
                r = reloads.recv() => match r {
                    Some(()) => {
                        tracing::info!(config = %path.display(), "reloading the configuration");
                        // Reading files is blocking work: off the runtime's workers.
                        let p = path.clone();
                        let loaded = tokio::task::spawn_blocking(move || prepare(&p))
                            .await
                            .unwrap_or_else(|e| Err(vec![Problem { file: path.clone(), line: None, message: format!("reload failed: {e}") }]));
                        self.reload(loaded);
                    }
                    None => {
                        shutdown.cancelled().await;
                        break;
                    }
                },
            }
        }
        self.stop().await;
    }

    /// The routes' inboxes merged into one channel (`merge`), for a local
    /// side that does not need them apart.
    pub fn merged_inbox(&mut self, queue: usize) -> mpsc::Receiver<ToLocal> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        for inbox in std::mem::take(&mut self.inboxes) {
            forward(inbox, tx.clone(), &self.tracker);
        }
        // Routes a reload starts later feed the same channel.
        self.merged = Some(tx);
        rx
    }

    /// Applies a configuration loaded again (SIGHUP): new TLS material for
    /// new handshakes (links up stay up), routes stopped and started, and
    /// `[erlang] nodes`; anything else that differs is named in the log as
    /// needing a restart (`reload::plan`). A configuration that did not
    /// load is logged and the running one kept. Counted either way.
    pub fn reload(&mut self, loaded: Result<Prepared, Vec<Problem>>) -> Reloaded {
        let metrics = self.metrics.clone();
        let count = |result| metrics.counter(m::CONFIG_RELOADS, &[("result", result)]).increment(1);
        let loaded = match loaded {
            Ok(p) => p,
            Err(problems) => {
                count("error");
                for p in &problems {
                    tracing::error!("reload: {p}");
                }
                tracing::error!(problems = problems.len(), "reload refused; the running configuration is kept");
                return Reloaded::Refused(problems);
            }
        };
        let plan = reload::plan(&self.config, &loaded.config);
        let Prepared { config: new, tls, .. } = loaded;
        if let (Some(shared), Some(tls)) = (&self.tls, tls) {
            publish_expiry(&self.metrics, &tls);
            shared.replace(tls);
        }
        // What is applied becomes the running configuration; what needs a
        // restart stays as it runs (and is named again at the next reload).
        // (With several instances: a changed route this one holds starts
        // again at once; its claim stands.)
        let held_before: Vec<String> = plan.stop.iter().filter(|c| self.held(c)).cloned().collect();
        for cluster in &plan.stop {
            let removed = !plan.start.contains(cluster);
            if self.coordinated && removed {
                // Its claim is withdrawn: another instance holds it no more either.
                if let Some(shell) = &self.shell {
                    self.tell(shell, Control::Unclaim(cluster.as_str().into()));
                }
            }
            // Removed for good: it refuses new messages and finishes those
            // it accepted first (up to half the grace period), as a
            // stopping gateway does. A changed route stops at once, since
            // its successor starts now.
            self.stop_route(cluster, removed);
            tracing::info!(peer = %cluster, "route stopped (reload)");
        }
        for cluster in &plan.start {
            let Some(route) = new.route(cluster) else { continue };
            if self.coordinated && !held_before.contains(cluster) {
                // Held by another instance (or not yet decided): it stands
                // by; a route added is claimed.
                self.kit.standby(route);
                if !plan.stop.contains(cluster) {
                    if let Some(shell) = &self.shell {
                        self.tell(shell, Control::Claim(cluster.as_str().into()));
                    }
                }
                continue;
            }
            self.start_route(route);
            tracing::info!(peer = %cluster, "route started (reload)");
        }
        if plan.nodes {
            if let (Some(shell), Some(erlang)) = (&self.shell, &new.erlang) {
                self.tell(shell, Control::Nodes(erlang.nodes.clone()));
            }
        }
        self.config.tls = new.tls;
        self.config.routes = new.routes;
        if let (Some(running), Some(new)) = (&mut self.config.erlang, new.erlang) {
            running.nodes = new.nodes;
        }
        count("applied");
        self.metrics.gauge(m::CONFIG_RESTART_NEEDED, &[]).set(if plan.restart.is_empty() { 0.0 } else { 1.0 });
        let (stopped, started, nodes) = (plan.stop.len(), plan.start.len(), plan.nodes);
        if plan.restart.is_empty() {
            tracing::info!(stopped, started, nodes, "configuration reloaded: TLS material re-read for new handshakes");
        } else {
            tracing::warn!(
                stopped,
                started,
                nodes,
                needs_restart = %plan.restart.join(", "),
                "configuration reloaded: TLS material re-read for new handshakes; these changes need a restart and are not applied"
            );
        }
        Reloaded::Applied(plan)
    }

    /// Starts `route`'s task and hands it to the local side.
    fn start_route(&mut self, route: &crate::config::RouteConfig) {
        let cluster = &route.cluster;
        // (With the Erlang side, the route starts once it has been told our
        // members: its first snapshot is all of them.)
        let ready = self.shell.as_ref().map(|_| CancellationToken::new());
        let (handle, inbox) = self.kit.spawn_with(route, None, ready.clone());
        self.routes.insert(cluster.clone(), handle.clone());
        match (&self.shell, &self.merged) {
            (Some(shell), _) => {
                let add = Control::AddRoute {
                    route: Box::new(route.clone()),
                    inbox,
                    handle: handle.for_local(),
                    then: None,
                    ready,
                };
                self.tell(shell, add)
            }
            (None, Some(merged)) => forward(inbox, merged.clone(), &self.tracker),
            (None, None) => drain(inbox, &self.tracker, self.root.clone()),
        }
    }

    /// Stops `cluster`'s route task, if it runs: with `finish`, it first
    /// refuses new messages and finishes those it accepted (up to half the
    /// grace period), else at once. The local side forgets its peer.
    fn stop_route(&mut self, cluster: &str, finish: bool) {
        let cancel = self.kit.stop(cluster);
        let Some(route) = self.routes.remove(cluster) else {
            cancel.inspect(CancellationToken::cancel);
            return;
        };
        match cancel {
            Some(cancel) if finish => {
                route.drain();
                let grace = self.grace;
                let route = route.clone();
                self.tracker.spawn(async move {
                    finish_in_flight(std::slice::from_ref(&route), grace / 2).await;
                    cancel.cancel();
                });
            }
            Some(cancel) => cancel.cancel(),
            None => {}
        }
        if let Some(shell) = &self.shell {
            self.tell(shell, Control::RemoveRoute(route.for_local()));
        }
    }

    /// Hands `cluster`'s route to another instance of this cluster: as a
    /// stopping gateway does, for this route (`Core::leave_peer`, then the
    /// route settles, then it refuses new messages and finishes); its
    /// peer is refused as coming to a standby from now on.
    fn hand_over(&mut self, cluster: &str) {
        let cancel = self.kit.stop(cluster);
        if let Some(route) = self.config.route(cluster).cloned() {
            self.kit.standby(&route);
        }
        let (Some(cancel), Some(route)) = (cancel, self.routes.remove(cluster)) else { return };
        let Some(shell) = self.shell.clone() else { return cancel.cancel() };
        let (done, withdrawn) = tokio::sync::oneshot::channel();
        self.tell(&shell, Control::LeaveRoute(route.for_local(), done));
        let (grace, quiet, wait) = (self.grace, self.quiet(), self.hand_over_wait());
        self.tracker.spawn(async move {
            let routes = std::slice::from_ref(&route);
            let started = tokio::time::Instant::now();
            withdrawal(&shell, Some(route.for_local()), withdrawn, wait, grace / 4).await;
            settle(routes, quiet, (grace / 2).saturating_sub(started.elapsed())).await;
            route.drain();
            finish_in_flight(routes, grace / 4).await;
            cancel.cancel();
            if let Err(e) = shell.send(Control::RemoveRoute(route.for_local())).await {
                tracing::error!("the Erlang side did not take a route's end: {e}");
            }
        });
    }

    /// A link from another instance of a peer cluster than the one a route
    /// holds its session with (`[erlang] coordinate`): that instance holds
    /// our route in its cluster now, and the one we have is handing over.
    /// The link starts a successor session, a route task of its own beside
    /// the old one, which finishes as its instance leaves (its members
    /// leave pg once the successor serves: none is ever missing). A link
    /// from an instance a retiring session is with goes back to it.
    pub fn adopt_successor(&mut self, est: Box<handshake::Established>) {
        let cluster = est.peer.cluster.clone();
        let instance = est.peer.gateway.clone();
        self.retiring.retain(|(_, r)| !r.is_gone());
        let Some(route) = self.config.route(&cluster).cloned() else { return };
        let current = self.routes.get(&cluster).cloned();
        let to = if current.as_ref().and_then(RouteRef::peer_instance).as_deref() == Some(&instance) {
            current
        } else {
            self.retiring
                .iter()
                .find(|(c, r)| *c == cluster && r.peer_instance().as_deref() == Some(&instance))
                .map(|(_, r)| r.clone())
        };
        if let Some(to) = to {
            to.tell(RouteControl::Adopt(est));
            return;
        }
        if self.retiring.iter().any(|(c, _)| *c == cluster) {
            // One hand-over at a time per peer: a peer cannot pile up
            // sessions by naming new instances.
            self.metrics
                .counter(
                    m::HANDSHAKE_FAILURES,
                    &[("peer", &cluster), ("reason", handshake::HandshakeError::OTHER_INSTANCE_LABEL)],
                )
                .increment(1);
            let why = format!("{}: a hand-over is in progress", handshake::OTHER_INSTANCE);
            self.tracker.spawn(handshake::goodbye(*est, why, self.config.gateway.max_frame_bytes));
            return;
        }
        let (Some(old), Some(old_cancel)) = (self.routes.remove(&cluster), self.kit.tasks.remove(&cluster)) else {
            return;
        };
        old.tell(RouteControl::Retire);
        tracing::info!(peer = %cluster, from = %old.peer_instance().unwrap_or_default(), to = %instance, "successor session: the route moves to another instance of the peer, the old session finishes beside it");
        let (handle, inbox) = self.kit.spawn_with(&route, Some(est.our_epoch), None);
        self.routes.insert(cluster.clone(), handle.clone());
        if let Some(shell) = &self.shell {
            // (The link goes to the route once the local side has told it
            // our members: its first snapshot is all of them.)
            let adopt = handle.clone();
            let add = Control::AddRoute {
                route: Box::new(route.clone()),
                inbox,
                handle: handle.for_local(),
                then: Some(Then::new(move || {
                    adopt.tell(RouteControl::Adopt(est));
                })),
                ready: None,
            };
            self.tell(shell, add);
        }
        self.retiring.push((cluster, old.clone()));
        // The old session ends once its instance has left (its links are
        // gone), or at the latest after a generous bound.
        let (shell, bound) = (self.shell.clone(), self.grace * 2 + self.config.gateway.dead_after * 4);
        self.tracker.spawn(async move {
            let until = tokio::time::Instant::now() + bound;
            while old.is_up() && tokio::time::Instant::now() < until {
                tokio::time::sleep(DRAIN_POLL).await;
            }
            old_cancel.cancel();
            if let Some(shell) = shell {
                let _ = shell.send(Control::RemoveRoute(old.for_local())).await;
            }
        });
    }

    /// How long a hand-over waits for the next instance to serve the route
    /// (its session up, the peer's members in pg through it) before our
    /// members are withdrawn anyway: a handshake's deadline or four
    /// heartbeats (the next instance dials, or is found by a probe, within
    /// one), whichever is longer, at most a quarter of the grace period.
    fn hand_over_wait(&self) -> std::time::Duration {
        let g = &self.config.gateway;
        (g.heartbeat * 4).max(g.handshake_timeout).min(self.grace / 4)
    }

    /// How long a stopping route (or gateway) waits with no traffic either
    /// way before it refuses new messages.
    fn quiet(&self) -> std::time::Duration {
        (self.config.gateway.heartbeat * 2).max(std::time::Duration::from_millis(300))
    }

    /// Whether this instance runs `cluster`'s route (with several
    /// instances: holds it).
    fn held(&self, cluster: &str) -> bool {
        self.kit.running(cluster)
    }

    /// With several instances of the cluster: this one now holds a route
    /// (started), or another does (this one finishes what it accepted,
    /// then stands by).
    pub fn claim_step(&mut self, step: Step) {
        match step {
            Step::Hold(cluster) => {
                let Some(route) = self.config.route(&cluster).cloned() else { return };
                if self.held(&cluster) {
                    return;
                }
                self.start_route(&route);
                self.metrics.gauge(m::ROUTE_STANDBY, &[("peer", &cluster)]).set(0.0);
                tracing::info!(peer = %cluster, "route started: this instance holds it");
            }
            Step::Release(cluster) => {
                if !self.held(&cluster) {
                    return;
                }
                self.hand_over(&cluster);
                tracing::info!(peer = %cluster, "route handed over: another instance of this cluster holds it now");
            }
        }
    }

    /// Hands the local side a change (it reads them between rounds; a
    /// full queue of them means it is stuck, which is said).
    fn tell(&self, shell: &mpsc::Sender<Control>, c: Control) {
        if let Err(e) = shell.try_send(c) {
            tracing::error!("the local side did not take a change: {e}");
        }
    }

    /// Finishes what the routes accepted (up to half the grace period),
    /// then closes every link (with a goodbye), fails what is unconfirmed,
    /// and waits up to the grace period for the tasks to finish.
    pub async fn stop(self) {
        tracing::info!(grace = ?self.grace, "shutting down");
        let routes: Vec<RouteRef> = self.routes.values().cloned().collect();
        let mut left = self.grace / 2;
        if let Some(shell) = &self.shell {
            // Senders on both sides stop choosing this gateway (its members
            // and its proxies leave pg; with several instances, another
            // takes the routes), while everything keeps running: what is on
            // its way is carried and delivered. Then no traffic either way
            // for two heartbeats (or half the grace period) before the
            // routes refuse anything new.
            let (done, withdrawn) = tokio::sync::oneshot::channel();
            self.tell(shell, Control::Leave(done));
            let started = tokio::time::Instant::now();
            // (With several instances, the next ones serve the routes first.)
            withdrawal(shell, None, withdrawn, self.hand_over_wait(), self.grace / 4).await;
            let quiet = self.quiet();
            let settled = settle(&routes, quiet, (self.grace / 2).saturating_sub(started.elapsed())).await;
            left = left.saturating_sub(started.elapsed());
            tracing::info!(settled, took = ?started.elapsed(), "members withdrawn; traffic settled");
        }
        // First the routes finish what they accepted (new messages are
        // refused and reported failed at once), for up to half the grace
        // period, while links, nodes and the Erlang side still run.
        routes.iter().for_each(RouteRef::drain);
        let (at_start, left) = finish_in_flight(&routes, left).await;
        if at_start > 0 {
            tracing::info!(
                at_start,
                finished = at_start.saturating_sub(left),
                left,
                "messages in flight finished; closing"
            );
        }
        self.root.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait()).await.is_err() {
            tracing::warn!("tasks still running after the grace period; exiting anyway");
        }
    }
}

/// What became of a reload.
#[derive(Debug)]
pub enum Reloaded {
    /// Loaded; the plan says what only a restart would apply.
    Applied(reload::Plan),
    /// Not loaded: the running configuration is kept.
    Refused(Vec<Problem>),
}

/// Publishes when our certificate expires, and warns when that is soon.
fn publish_expiry(metrics: &Metrics, tls: &Tls) {
    metrics.gauge(m::CERT_EXPIRY, &[]).set(tls.not_after as f64);
    let left = tls.not_after - crate::date::today() * 86_400;
    if left < CERT_WARN_DAYS * 86_400 {
        tracing::warn!(expires = %crate::date::ymd(tls.not_after), days_left = left / 86_400, "this gateway's certificate expires soon: renew it (peers refuse expired certificates)");
    }
}

/// How often a stopping gateway (or route) looks whether it has finished
/// what it accepted.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Waits, for up to `within`, while draining `routes` (`RouteRef::drain`:
/// they refuse new messages) send and confirm what they accepted (as long
/// as they are up). How many were in flight at the start, and how many
/// are left.
async fn finish_in_flight(routes: &[RouteRef], within: std::time::Duration) -> (usize, usize) {
    let in_flight = || routes.iter().map(RouteRef::in_flight).sum::<usize>();
    let deadline = tokio::time::Instant::now() + within;
    let at_start = in_flight();
    let mut left = at_start;
    while left > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
        left = in_flight();
    }
    (at_start, left)
}

/// Waits up to `wait` for a hand-over's withdrawal (`Core::leave`, or
/// `Core::leave_peer` for `route`), then has the Erlang side withdraw now
/// and waits up to `then` more for that.
async fn withdrawal(
    shell: &mpsc::Sender<Control>,
    route: Option<crate::local::RouteHandle>,
    mut withdrawn: tokio::sync::oneshot::Receiver<()>,
    wait: std::time::Duration,
    then: std::time::Duration,
) {
    if tokio::time::timeout(wait, &mut withdrawn).await.is_ok() {
        return;
    }
    if shell.send(Control::Withdraw(route)).await.is_ok() {
        let _ = tokio::time::timeout(then, withdrawn).await;
    }
}

/// Waits, for up to `within`, until `routes` are settled (`Route::settled`)
/// and have seen no traffic either way for `quiet`. Whether they did.
async fn settle(routes: &[RouteRef], quiet: std::time::Duration, within: std::time::Duration) -> bool {
    let state =
        || routes.iter().map(RouteRef::settle_state).fold((0u64, true), |(a, s), (b, t)| (a.wrapping_add(b), s && t));
    let deadline = tokio::time::Instant::now() + within;
    let (mut last, _) = state();
    let mut since = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
        let (activity, settled) = state();
        if activity != last || !settled {
            last = activity;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
    }
    false
}

/// Waits for `gate` (if any) to open; false if `cancel` came first.
async fn after_gate(gate: Option<CancellationToken>, cancel: &CancellationToken) -> bool {
    let Some(gate) = gate else { return true };
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = gate.cancelled() => true,
    }
}

/// A certificate expiring within this many days is logged at start.
const CERT_WARN_DAYS: i64 = 30;

/// Starts the gateway: binds its listeners, starts one task per route, and
/// returns. Everything for the local cluster arrives in `Running::inboxes`,
/// one per route, each holding up to `queue` items. (`app::start` starts it
/// with the Erlang side.)
pub async fn start(prepared: Prepared, metrics: Metrics, queue: usize) -> Result<Running, GatewayError> {
    start_with(prepared, metrics, Options::new(queue)).await
}

/// How `start_with` starts the gateway.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of each route's queue toward the local side.
    pub queue: usize,
    /// No peer link is accepted or dialed until this is cancelled (the
    /// local side is ready to take what peers send): peers' messages wait
    /// in their windows meanwhile, instead of arriving at a local side
    /// that cannot deliver them yet.
    pub gate: Option<CancellationToken>,
    /// Routes start at once; without, every route stands by until this
    /// instance holds it (`Running::claim_step`).
    pub routes_now: bool,
    /// The group names the local side takes from peers (a peer's advert
    /// of any other is refused, `bad_group`).
    pub group_check: Option<GroupCheck>,
}

impl Options {
    pub fn new(queue: usize) -> Options {
        Options { queue, gate: None, routes_now: true, group_check: None }
    }
}

/// As [`start`], with `options`.
pub async fn start_with(prepared: Prepared, metrics: Metrics, options: Options) -> Result<Running, GatewayError> {
    let Options { queue, gate, routes_now, group_check } = options;
    let Prepared { config, tls, .. } = prepared;
    let tls = tls.map(|t| {
        publish_expiry(&metrics, &t);
        tls::Shared::new(t)
    });
    let g = &config.gateway;
    let root = CancellationToken::new();
    let tracker = TaskTracker::new();
    metrics.gauge(m::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]).set(1.0);
    let own = Arc::new(Identity { cluster: g.cluster.clone(), gateway: g.name.clone(), epoch: new_epoch() });
    let timeouts = Timeouts { connect: g.connect_timeout, handshake: g.handshake_timeout };

    // Bind everything before starting anything, so a bad address fails fast.
    let metrics_listener = match &config.metrics {
        Some(mc) => Some(bind("metrics", mc.listen).await?),
        None => None,
    };
    let peer_listener = match g.listen {
        Some(addr) => Some(bind("peer gateways", addr).await?),
        None => None,
    };

    let mut kit = RouteKit {
        own: own.clone(),
        g: g.clone(),
        timeouts,
        tls: tls.clone(),
        held: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        metrics: metrics.clone(),
        root: root.clone(),
        tracker: tracker.clone(),
        queue,
        gate: gate.clone(),
        admit: Arc::default(),
        inbound: Arc::default(),
        tasks: HashMap::new(),
        successors: None,
        group_check,
    };
    let mut routes = HashMap::new();
    let mut inboxes = Vec::new();
    for route in &config.routes {
        if !routes_now {
            kit.standby(route);
            continue;
        }
        let (handle, inbox) = kit.spawn(route);
        routes.insert(route.cluster.clone(), handle);
        inboxes.push(inbox);
    }

    tracker.spawn(metrics.clone().upkeep(root.clone()));
    let mut metrics_addr = None;
    if let Some((listener, addr)) = metrics_listener {
        metrics_addr = Some(addr);
        tracing::info!(addr = %addr, url = %m::url(addr), "serving metrics");
        tracker.spawn(m::serve(listener, metrics.clone(), root.clone(), tracker.clone()));
    }
    let mut peers = None;
    if let Some((listener, addr)) = peer_listener {
        peers = Some(addr);
        tracing::info!(addr = %addr, "listening for peer gateways");
        let acceptor = Acceptor {
            tls: tls.clone(),
            own: own.clone(),
            admit: kit.admit.clone(),
            inbound: kit.inbound.clone(),
            timeouts,
            max_frame: g.max_frame_bytes,
            pending: Arc::new(Semaphore::new(g.max_pending_handshakes)),
            metrics: metrics.clone(),
            refusals: std::sync::Mutex::new(crate::ratelog::RateLog::default()),
        };
        let (cancel, tracker2) = (root.clone(), tracker.clone());
        tracker.spawn(async move {
            if after_gate(gate, &cancel).await {
                acceptor.run(listener, cancel, tracker2).await
            }
        });
    }
    tracing::info!(cluster = %own.cluster, gateway = %own.gateway, routes = config.routes.len(), "gateway started");
    metrics.board().set_identity(&own.cluster, &own.gateway);
    tracker.spawn(say_ready(metrics.clone(), root.clone()));
    let grace = g.shutdown_grace;
    Ok(Running {
        peers,
        metrics_addr,
        routes,
        inboxes,
        metrics,
        config,
        tls,
        kit,
        shell: None,
        merged: None,
        root,
        tracker,
        grace,
        coordinated: false,
        claims: None,
        successors: None,
        retiring: Vec::new(),
    })
}

/// How often readiness is looked at until it first holds.
const READY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Logs "gateway ready" once readiness (`status::readiness`: every local
/// node up with its scope, every route up) first holds.
async fn say_ready(metrics: Metrics, cancel: CancellationToken) {
    let mut every = tokio::time::interval(READY_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        if metrics.board().first_ready() {
            let s = metrics.board().status();
            tracing::info!(routes = s.routes.len(), nodes = s.erlang.map_or(0, |e| e.nodes.len()), "gateway ready");
            return;
        }
    }
}

/// What it takes to start a route's task, at start or at a reload, and
/// each route task's own stop.
struct RouteKit {
    own: Arc<Identity>,
    g: crate::config::GatewayConfig,
    timeouts: Timeouts,
    tls: Option<tls::Shared>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    metrics: Metrics,
    root: CancellationToken,
    tracker: TaskTracker,
    queue: usize,
    gate: Option<CancellationToken>,
    /// What the acceptor admits, and where it hands each cluster's links.
    admit: Arc<RwLock<HashMap<String, Admission>>>,
    inbound: Arc<RwLock<HashMap<String, mpsc::Sender<RouteControl>>>>,
    tasks: HashMap<String, CancellationToken>,
    /// With `[erlang] coordinate`: links from another instance of a peer
    /// become successor sessions (`Running::adopt_successor`).
    successors: Option<mpsc::Sender<Box<handshake::Established>>>,
    /// What group names the local side takes (`Options::group_check`).
    group_check: Option<GroupCheck>,
}

impl RouteKit {
    /// Starts `route`'s task (after the gate); its handle and inbox.
    fn spawn(&mut self, route: &crate::config::RouteConfig) -> (RouteRef, Inbox) {
        self.spawn_with(route, None, None)
    }

    /// As `spawn`, the route starting with `epoch` (a successor session's:
    /// the one its first link's hello carried), and only once `ready` is
    /// cancelled too (the local side has told it our members, so its first
    /// snapshot has them all).
    fn spawn_with(
        &mut self,
        route: &crate::config::RouteConfig,
        epoch: Option<crate::route::Epoch>,
        ready: Option<CancellationToken>,
    ) -> (RouteRef, Inbox) {
        if route.insecure_plaintext {
            tracing::warn!(peer = %route.cluster, "route uses insecure_plaintext: traffic to and from this cluster is neither encrypted nor authenticated");
        }
        // On the status board from now: down until its task says otherwise.
        self.metrics.board().set_route(crate::status::RouteStatus {
            peer: route.cluster.clone(),
            window_messages: route.window.messages,
            ..Default::default()
        });
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (to_local, rx) = mpsc::channel(self.queue.max(1));
        let cancel = self.root.child_token();
        let task = peer::PeerTask::new(
            route.clone(),
            self.own.clone(),
            if route.insecure_plaintext { None } else { self.tls.clone() },
            &self.g,
            self.timeouts,
            peer::RouteInputs {
                control: control_rx,
                to_local,
                held: self.held.clone(),
                successors: self.successors.clone(),
                epoch,
                group_check: self.group_check,
            },
            self.metrics.clone(),
            cancel.clone(),
            self.tracker.clone(),
        );
        let admission = Admission {
            insecure_plaintext: route.insecure_plaintext,
            offer: Offer { links_wanted: route.links_wanted(), recv_window: route.window },
            session: Some(task.session_check()),
            standby: false,
        };
        write(&self.admit).insert(route.cluster.clone(), admission);
        write(&self.inbound).insert(route.cluster.clone(), control_tx.clone());
        self.tasks.insert(route.cluster.clone(), cancel.clone());
        let handle = task.handle(control_tx);
        let gate = self.gate.clone();
        self.tracker.spawn(async move {
            if after_gate(gate, &cancel).await && after_gate(ready, &cancel).await {
                task.run().await
            }
        });
        (handle, Inbox { peer: route.cluster.as_str().into(), rx })
    }

    /// `route` is held by another instance of this cluster (`[erlang]
    /// coordinate`): its peer's links are refused as coming to a standby,
    /// so the peer tries its other endpoints.
    fn standby(&mut self, route: &crate::config::RouteConfig) {
        let admission = Admission {
            insecure_plaintext: route.insecure_plaintext,
            offer: Offer { links_wanted: route.links_wanted(), recv_window: route.window },
            session: None,
            standby: true,
        };
        write(&self.admit).insert(route.cluster.clone(), admission);
        self.metrics.board().set_route(crate::status::RouteStatus {
            peer: route.cluster.clone(),
            standby: true,
            window_messages: route.window.messages,
            ..Default::default()
        });
        self.metrics.gauge(m::ROUTE_STANDBY, &[("peer", &route.cluster)]).set(1.0);
        self.metrics.gauge(m::ROUTE_UP, &[("peer", &route.cluster)]).set(0.0);
    }

    fn running(&self, cluster: &str) -> bool {
        self.tasks.contains_key(cluster)
    }

    /// Takes `cluster`'s route out: its cluster is refused from now on;
    /// the returned token stops its task (goodbye on its links, what it
    /// held unconfirmed reported failed: `shutdown`) when cancelled.
    fn stop(&mut self, cluster: &str) -> Option<CancellationToken> {
        write(&self.admit).remove(cluster);
        write(&self.inbound).remove(cluster);
        self.tasks.remove(cluster)
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Merges the routes' inboxes into one channel (a local side that does
/// not need them apart: tests, the logging sink). Each route's items keep
/// their order; a forwarding task per route holds at most one item.
pub fn merge(inboxes: Vec<Inbox>, queue: usize, tracker: &TaskTracker) -> mpsc::Receiver<ToLocal> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    for inbox in inboxes {
        forward(inbox, tx.clone(), tracker);
    }
    rx
}

/// One route's items into a merged channel, in order, one held at most.
fn forward(mut inbox: Inbox, tx: mpsc::Sender<ToLocal>, tracker: &TaskTracker) {
    tracker.spawn(async move {
        while let Some(item) = inbox.rx.recv().await {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
}

/// Without a local side: what a route hands it is logged and dropped.
fn drain(mut inbox: Inbox, tracker: &TaskTracker, cancel: CancellationToken) {
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                item = inbox.rx.recv() => match item {
                    Some(item) => tracing::debug!("no [erlang] configured; dropping {item:?}"),
                    None => return,
                },
            }
        }
    });
}

/// The runtime's worker threads: as configured, or (0) one per CPU, but one
/// in all on a host with two CPUs or fewer. There the second worker mostly
/// adds hand-offs between CPUs: measured on two CPUs shared with the Erlang
/// nodes, one worker gave a shorter, steadier round trip, more 100 B
/// messages/s and less CPU per message (BENCHMARKS.md).
pub fn worker_threads(configured: usize, cpus: usize) -> usize {
    match configured {
        0 if cpus <= 2 => 1,
        0 => cpus,
        n => n,
    }
}

/// Accepted links and local group changes queued for one route task.
const CONTROL_QUEUE: usize = 1024;

/// A fresh epoch: the clock mixed with randomness, never 0.
pub(super) fn new_epoch() -> crate::route::Epoch {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    crate::route::Epoch((t ^ fastrand::u64(..)).max(1))
}

/// Accepts peer connections; each handshake runs in its own task, bounded in
/// number, never inside the accept loop.
struct Acceptor {
    tls: Option<tls::Shared>,
    own: Arc<Identity>,
    admit: Arc<RwLock<HashMap<String, Admission>>>,
    inbound: Arc<RwLock<HashMap<String, mpsc::Sender<RouteControl>>>>,
    timeouts: Timeouts,
    max_frame: usize,
    pending: Arc<Semaphore>,
    metrics: Metrics,
    /// Refusals are said at most once per reason per period.
    refusals: std::sync::Mutex<crate::ratelog::RateLog<&'static str>>,
}

impl Acceptor {
    async fn run(self, listener: TcpListener, cancel: CancellationToken, tracker: TaskTracker) {
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                    }
                }
            };
            let Ok(permit) = this.pending.clone().try_acquire_owned() else {
                this.refused(&handshake::HandshakeError::Overload, remote);
                drop(tcp);
                continue;
            };
            let this = this.clone();
            let cancel = cancel.clone();
            tracker.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = this.handshake(tcp, remote) => {}
                }
            });
        }
    }

    async fn handshake(&self, tcp: TcpStream, remote: SocketAddr) {
        let tls = self.tls.as_ref().map(tls::Shared::current);
        // The routes as they are now (a reload may add or remove some).
        let admit = read(&self.admit).clone();
        match handshake::server(tcp, tls.as_ref(), &self.own, &admit, &self.timeouts, self.max_frame).await {
            Ok(est) => {
                let Some(tx) = read(&self.inbound).get(&est.peer.cluster).cloned() else {
                    return;
                };
                if tx.send(RouteControl::Adopt(Box::new(est))).await.is_err() {
                    tracing::debug!(%remote, "route gone while handing over a link");
                }
            }
            Err(e) => self.refused(&e, remote),
        }
    }

    /// Counts a refused connection, and says so at most once per reason
    /// per period (with how many were held back): anyone can connect, so
    /// refusals must not be a log flood.
    fn refused(&self, e: &handshake::HandshakeError, remote: SocketAddr) {
        let reason = e.reason();
        self.metrics.counter(m::HANDSHAKE_FAILURES, &[("peer", m::UNKNOWN_PEER), ("reason", reason)]).increment(1);
        let said = self.refusals.lock().unwrap_or_else(|p| p.into_inner()).allow(&reason);
        if let Some(held_back) = said {
            tracing::warn!(%remote, reason, held_back, "refused incoming connection: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn worker_threads_default_to_one_per_cpu_but_one_on_small_hosts() {
        assert_eq!(super::worker_threads(0, 1), 1);
        assert_eq!(super::worker_threads(0, 2), 1);
        assert_eq!(super::worker_threads(0, 3), 3);
        assert_eq!(super::worker_threads(0, 16), 16);
        // What the config says, always.
        assert_eq!(super::worker_threads(2, 2), 2);
        assert_eq!(super::worker_threads(5, 64), 5);
    }
}
