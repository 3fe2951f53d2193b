//! The contract between the gateway's routes and the local side (the
//! Erlang side, or a test's in-memory one). Both depend on this module;
//! neither on the other: `app` composes them.
//!
//! The local side submits messages for a peer cluster through a
//! [`RouteHandle`], reports its own cluster's group changes to each route
//! (as handles issued to that peer), and receives everything else as
//! [`ToLocal`], on one bounded [`Inbox`] per route: so it can serve the
//! routes in turn, and a busy peer's items never queue ahead of another's.
//! The gateway tells it what a reload or a hand-over changes as
//! [`Control`]; with several instances of the cluster, the local side
//! tells the gateway which routes this instance holds ([`Step`]).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{ErlNode, RouteConfig};
use crate::membership::Change;
use crate::route::{Epoch, Outcome, Seq, Token};
use crate::wire::Member;

/// A route, acking what the local side finished with (the gateway's route
/// state implements it).
pub(crate) trait Acks: Send + Sync {
    /// Acks now, from the caller's task; must never wait for a lock its
    /// caller may hold.
    fn ack_now(&self);
}

/// Stands in for a route in a `Finished` of none.
struct NoRoute;

impl Acks for NoRoute {
    fn ack_now(&self) {}
}

/// What the local side has finished with, per route: deliveries are
/// numbered per peer session, and a route acks only the contiguous prefix
/// that is done, so a message still inside this gateway (queued for an
/// Erlang node, say) is never acked and a crash cannot lose a message its
/// sender was told was delivered.
pub(crate) struct Finished {
    state: Mutex<FinishedState>,
    /// Told when the prefix grows outside a batch (`Held::finish_all`).
    pub(crate) notify: Notify,
    /// The route, to ack a finished batch at once.
    route: Weak<dyn Acks>,
}

impl Default for Finished {
    /// Of no route (tests drive the local side with these).
    fn default() -> Self {
        Finished::for_route(Weak::<NoRoute>::new())
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished").field("state", &self.state).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct FinishedState {
    /// The peer session (its epoch) the numbers belong to.
    session: Option<Epoch>,
    upto: u64,
    /// Done out of order (e.g. sent to different Erlang nodes).
    ahead: BTreeSet<u64>,
    /// Done, but the local side could not deliver them.
    undeliverable: Vec<Seq>,
}

impl Finished {
    pub(crate) fn for_route(route: Weak<dyn Acks>) -> Finished {
        Finished { state: Mutex::default(), notify: Notify::new(), route }
    }

    /// A batch of deliveries is finished: ack them now, in the caller's
    /// task (or have the route task do it, if the route is gone).
    fn flush(&self) {
        match self.route.upgrade() {
            Some(core) => core.ack_now(),
            None => self.notify.notify_one(),
        }
    }

    /// A new peer session: numbering starts again; older marks are ignored.
    pub(crate) fn reset(&self, session: Epoch) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = FinishedState { session: Some(session), ..Default::default() };
    }

    /// Deliveries of `session` the local side could not deliver, so far
    /// (the route holds them until an ack covers them).
    pub(crate) fn take_undeliverable(&self, session: Epoch) -> Vec<Seq> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.session != Some(session) {
            return Vec::new();
        }
        std::mem::take(&mut s.undeliverable)
    }

    /// (session, contiguous prefix done).
    pub(crate) fn upto(&self) -> (Option<Epoch>, Seq) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.session, Seq(s.upto))
    }

    /// Marks delivery `n` finished; tells the route task when the prefix
    /// grew, if `notify`.
    fn mark(&self, session: Epoch, Seq(n): Seq, undeliverable: bool, notify: bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.session != Some(session) || n <= s.upto {
            return;
        }
        if undeliverable {
            s.undeliverable.push(Seq(n));
        }
        if n != s.upto + 1 {
            s.ahead.insert(n);
            return;
        }
        s.upto = n;
        loop {
            let next = s.upto + 1;
            if !s.ahead.remove(&next) {
                break;
            }
            s.upto = next;
        }
        drop(s);
        if notify {
            self.notify.notify_one();
        }
    }
}

/// A message handed to the local side: its payload bytes count against the
/// gateway's budget for such messages, and dropping it tells its route the
/// local side is done with it (delivered, or dropped for a reason it logged
/// and counted). Keep it until then.
pub struct Held {
    counter: Arc<AtomicUsize>,
    bytes: usize,
    finished: Option<(Arc<Finished>, Epoch, Seq)>,
    undeliverable: bool,
}

impl Held {
    pub(crate) fn take(
        counter: &Arc<AtomicUsize>,
        bytes: usize,
        finished: &Arc<Finished>,
        session: Epoch,
        n: Seq,
    ) -> Held {
        counter.fetch_add(bytes, Ordering::Relaxed);
        Held { counter: counter.clone(), bytes, finished: Some((finished.clone(), session, n)), undeliverable: false }
    }

    /// A message no route waits for (tests and fuzzing drive the local
    /// side with these).
    pub fn detached() -> Held {
        Held { counter: Arc::default(), bytes: 0, finished: None, undeliverable: false }
    }

    /// Whether the local side reported this message undeliverable.
    pub fn is_undeliverable(&self) -> bool {
        self.undeliverable
    }

    /// The local side could not deliver this message (it logged and counted
    /// why): its sender is told it failed, `undeliverable`, instead of
    /// delivered (when the peer gateway understands that).
    pub fn undeliverable(&mut self) {
        self.undeliverable = true;
    }

    /// Finished with a whole batch (say, everything a delivery barrier
    /// covered): each route involved acks once, right away, in this task.
    pub fn finish_all(batch: impl IntoIterator<Item = Held>) {
        let mut routes: Vec<Arc<Finished>> = Vec::new();
        for mut held in batch {
            if let Some(f) = held.release(false) {
                if !routes.iter().any(|r| Arc::ptr_eq(r, &f)) {
                    routes.push(f);
                }
            }
        }
        for f in routes {
            f.flush();
        }
    }

    fn release(&mut self, notify: bool) -> Option<Arc<Finished>> {
        self.counter.fetch_sub(std::mem::take(&mut self.bytes), Ordering::Relaxed);
        let (f, session, n) = self.finished.take()?;
        f.mark(session, n, self.undeliverable, notify);
        Some(f)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release(true);
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({})", self.bytes)
    }
}

/// What routes tell the local side.
#[derive(Debug)]
pub enum ToLocal {
    /// A message from `peer` for the local cluster. Dropping `held` (once
    /// the destination has the message, or it was dropped for a logged
    /// reason) is what lets the route ack it, and so what the sender's
    /// confirmation means.
    Deliver { peer: Arc<str>, payload: Bytes, held: Held },
    /// What became of a message submitted with a token.
    Confirm { peer: Arc<str>, token: Token, outcome: Outcome },
    /// The peer's groups changed (or were withdrawn because the route is down).
    Members { peer: Arc<str>, change: Change },
    /// The route lost every link, or the peer gateway restarted: whatever
    /// the peer was doing for us (monitors) is gone.
    Lost { peer: Arc<str> },
    /// The route has a live link again (after `Lost`, or for the first
    /// time), to the peer's run `epoch`: a new epoch means a new run, whose
    /// handles mean nothing of the old one's.
    Up { peer: Arc<str>, epoch: Epoch },
    /// The peer's whole membership has been handed over (its snapshot,
    /// after the `Members` before this): with several instances, this one
    /// serves the route now.
    Synced { peer: Arc<str> },
}

/// One route's queue toward the local side.
#[derive(Debug)]
pub struct Inbox {
    pub peer: Arc<str>,
    pub rx: mpsc::Receiver<ToLocal>,
}

/// A change in the local cluster's own groups, for one peer: its members
/// are handles the local side issued to that peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalGroups {
    Join { group: String, members: Vec<Member> },
    Leave { group: String, members: Vec<Member> },
}

#[derive(Debug, thiserror::Error)]
#[error("the route is gone (gateway shutting down)")]
pub struct RouteGone;

/// Why `try_groups` did not take a change.
#[derive(Debug)]
pub enum TryGroups {
    /// The route's control queue is full: try again later.
    Full(LocalGroups),
    Gone,
}

/// Why `try_submit` did not take a message.
#[derive(Debug)]
pub enum TrySubmit {
    /// The route's queue is full (its window is full too): try again later.
    Full(Bytes, Option<Token>),
    Gone,
}

/// What a route offers the local side: the gateway's routes implement it.
pub(crate) trait Route: Send + Sync {
    fn try_submit(&self, payload: Bytes, token: Option<Token>) -> Result<(), TrySubmit>;
    fn submit(&self, payload: Bytes, token: Option<Token>) -> BoxFuture<'_, Result<(), RouteGone>>;
    fn try_groups(&self, change: LocalGroups) -> Result<(), TryGroups>;
    fn groups(&self, change: LocalGroups) -> BoxFuture<'_, Result<(), RouteGone>>;
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends messages (and the local cluster's group changes) to one peer cluster.
#[derive(Clone)]
pub struct RouteHandle {
    route: Arc<dyn Route>,
}

impl std::fmt::Debug for RouteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteHandle({:p})", Arc::as_ptr(&self.route))
    }
}

impl RouteHandle {
    pub(crate) fn new(route: Arc<dyn Route>) -> RouteHandle {
        RouteHandle { route }
    }

    /// Whether both are handles of the same route task.
    pub fn same(&self, other: &RouteHandle) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.route), Arc::as_ptr(&other.route))
    }

    /// Hands a message to the route if its window or queue has room,
    /// without waiting. With room in the window (and nothing queued before
    /// it) the message is on its way to the peer when this returns.
    pub fn try_submit(&self, payload: Bytes, token: Option<Token>) -> Result<(), TrySubmit> {
        self.route.try_submit(payload, token)
    }

    /// Hands a message to the route; waits while its window and queue are
    /// full. With a token, a `ToLocal::Confirm` for it follows.
    pub async fn submit(&self, payload: Bytes, token: Option<Token>) -> Result<(), RouteGone> {
        self.route.submit(payload, token).await
    }

    /// Reports a change in the local cluster's groups without waiting.
    /// Never report members learned from a peer here: that is what keeps
    /// membership non-transitive.
    pub fn try_groups(&self, change: LocalGroups) -> Result<(), TryGroups> {
        self.route.try_groups(change)
    }

    /// Reports a change in the local cluster's groups; waits for room.
    pub async fn groups(&self, change: LocalGroups) -> Result<(), RouteGone> {
        self.route.groups(change).await
    }
}

/// The local side's handle on the gateway: routes by peer cluster.
#[derive(Debug, Clone, Default)]
pub struct LocalHandle {
    routes: HashMap<String, RouteHandle>,
}

impl LocalHandle {
    pub fn route(&self, peer: &str) -> Option<&RouteHandle> {
        self.routes.get(peer)
    }

    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    pub(crate) fn insert(&mut self, peer: String, route: RouteHandle) {
        self.routes.insert(peer, route);
    }

    /// Members of the LOCAL cluster joined `group`, as handles issued to
    /// `peer` (see `RouteHandle::try_groups`).
    pub async fn join(&self, peer: &str, group: &str, members: Vec<Member>) {
        if let Some(r) = self.routes.get(peer) {
            let _ = r.groups(LocalGroups::Join { group: group.to_string(), members }).await;
        }
    }

    pub async fn leave(&self, peer: &str, group: &str, members: Vec<Member>) {
        if let Some(r) = self.routes.get(peer) {
            let _ = r.groups(LocalGroups::Leave { group: group.to_string(), members }).await;
        }
    }
}

/// What the gateway tells the local side while it runs: routes started
/// and stopped (a reload, a hand-over between instances), the nodes to
/// connect to, claims, and its own stop.
#[derive(Debug)]
pub enum Control {
    /// A route added: the local side serves its inbox and exports to it.
    AddRoute {
        route: Box<RouteConfig>,
        inbox: Inbox,
        handle: RouteHandle,
        /// Run once the route has been told our members (a successor
        /// session's first link goes to it then, so its first snapshot
        /// has them: the peer takes a snapshot as the whole of our
        /// membership).
        then: Option<Then>,
        /// Cancelled once the route has been told our members (it waits
        /// for that to start).
        ready: Option<CancellationToken>,
    },
    /// A route task stopped (a reload removed or changed it, or another
    /// instance holds it now): its peer is forgotten (its proxies leave
    /// their groups, their watchers get DOWN); what waited for it fails.
    RemoveRoute(RouteHandle),
    /// A route task is handing its route to another instance: members
    /// withdrawn both ways once the next instance serves it (told through
    /// the sender), traffic on its way still carried.
    LeaveRoute(RouteHandle, oneshot::Sender<()>),
    /// The local nodes to connect to, now (the configured ones).
    Nodes(Vec<ErlNode>),
    /// With several instances (`[erlang] coordinate`): a route to claim
    /// (a reload added it), or one whose claim is withdrawn (a reload
    /// removed it).
    Claim(Arc<str>),
    Unclaim(Arc<str>),
    /// A hand-over waited long enough for the next instance: withdraw our
    /// members now (`None`: the gateway's; else the route's).
    Withdraw(Option<RouteHandle>),
    /// The gateway stops: claims withdrawn, so the other instances take
    /// the routes over; members withdrawn both ways once they serve them
    /// (told through the sender), so senders stop choosing this instance
    /// while it finishes.
    Leave(oneshot::Sender<()>),
}

/// Something to run once, later (`Control::AddRoute`).
pub struct Then(Box<dyn FnOnce() + Send>);

impl Then {
    pub(crate) fn new(f: impl FnOnce() + Send + 'static) -> Then {
        Then(Box::new(f))
    }

    pub fn run(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Then {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Then")
    }
}

/// With several instances of the cluster: what the gateway is to do with
/// a route, as the local side's claims decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// This instance holds the route now: start it.
    Hold(Arc<str>),
    /// Another instance holds it (or nobody can be asked): stop it.
    Release(Arc<str>),
}
