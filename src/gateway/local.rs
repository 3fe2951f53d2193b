//! The narrow interface between routes and the local cluster.
//!
//! The local side (the Erlang side, or a test's in-memory one) submits
//! messages for a peer cluster through a [`RouteHandle`], reports its own
//! cluster's group changes to each route (as handles issued to that peer),
//! and receives everything else as [`ToLocal`], on one bounded [`Inbox`]
//! per route: so it can serve the routes in turn, and a busy peer's items
//! never queue ahead of another's.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use crate::membership::Change;
use crate::route::Outcome;
use crate::wire::Member;

/// What the local side has finished with, per route: deliveries are
/// numbered per peer session, and a route acks only the contiguous prefix
/// that is done, so a message still inside this gateway (queued for an
/// Erlang node, say) is never acked and a crash cannot lose a message its
/// sender was told was delivered.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    state: Mutex<FinishedState>,
    /// Told when the prefix grows outside a batch (`Held::finish_all`).
    pub(crate) notify: Notify,
    /// The route, to ack a finished batch at once.
    route: Weak<super::core::RouteCore>,
}

#[derive(Debug, Default)]
struct FinishedState {
    /// The peer session (its epoch) the numbers belong to.
    session: Option<u64>,
    upto: u64,
    /// Done out of order (e.g. sent to different Erlang nodes).
    ahead: BTreeSet<u64>,
    /// Done, but the local side could not deliver them.
    undeliverable: Vec<u64>,
}

impl Finished {
    pub(crate) fn for_route(route: Weak<super::core::RouteCore>) -> Finished {
        Finished { route, ..Default::default() }
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
    pub(crate) fn reset(&self, session: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = FinishedState { session: Some(session), ..Default::default() };
    }

    /// Deliveries of `session` the local side could not deliver, so far
    /// (the route holds them until an ack covers them).
    pub(crate) fn take_undeliverable(&self, session: u64) -> Vec<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.session != Some(session) {
            return Vec::new();
        }
        std::mem::take(&mut s.undeliverable)
    }

    /// (session, contiguous prefix done).
    pub(crate) fn upto(&self) -> (Option<u64>, u64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.session, s.upto)
    }

    /// Marks delivery `n` finished; tells the route task when the prefix
    /// grew, if `notify`.
    fn mark(&self, session: u64, n: u64, undeliverable: bool, notify: bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.session != Some(session) || n <= s.upto {
            return;
        }
        if undeliverable {
            s.undeliverable.push(n);
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
    finished: Option<(Arc<Finished>, u64, u64)>,
    undeliverable: bool,
}

impl Held {
    pub(crate) fn take(
        counter: &Arc<AtomicUsize>,
        bytes: usize,
        finished: &Arc<Finished>,
        session: u64,
        n: u64,
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
    Confirm { peer: Arc<str>, token: u64, outcome: Outcome },
    /// The peer's groups changed (or were withdrawn because the route is down).
    Members { peer: Arc<str>, change: Change },
    /// The route lost every link, or the peer gateway restarted: whatever
    /// the peer was doing for us (monitors) is gone.
    Lost { peer: Arc<str> },
    /// The route has a live link again (after `Lost`, or for the first
    /// time), to the peer's run `epoch`: a new epoch means a new run, whose
    /// handles mean nothing of the old one's.
    Up { peer: Arc<str>, epoch: u64 },
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

/// A message for the peer, queued while the route's window is full.
#[derive(Debug)]
pub(crate) struct Submit {
    pub payload: Bytes,
    pub token: Option<u64>,
}

/// What else a route task is told, in one queue (so that its loop polls
/// one channel for both): a link the listener accepted for it, or a change
/// in the local cluster's own groups.
pub(crate) enum RouteControl {
    Adopt(Box<crate::link::handshake::Established>),
    Groups(LocalGroups),
    /// A successor session took the route over (another instance of the
    /// peer): this task dials no more, publishes no gauges, and ends once
    /// its peer instance has left.
    Retire,
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

/// Sends messages (and the local cluster's group changes) to one peer cluster.
#[derive(Debug, Clone)]
pub struct RouteHandle {
    pub(crate) core: Arc<super::core::RouteCore>,
    pub(crate) control: mpsc::Sender<RouteControl>,
}

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
    Full(Bytes, Option<u64>),
    Gone,
}

impl RouteHandle {
    /// The peer instance the route's session is with, if any.
    pub(crate) fn peer_instance(&self) -> Option<String> {
        self.core.peer_instance()
    }

    /// Whether the route has a live link.
    pub(crate) fn is_up(&self) -> bool {
        self.core.is_up()
    }

    /// Hands the route task a link (or tells it to retire): false if it is gone.
    pub(crate) fn tell(&self, c: RouteControl) -> bool {
        self.control.try_send(c).is_ok()
    }

    /// Hands the route task a link (a successor session's first).
    pub fn adopt(&self, est: Box<crate::link::handshake::Established>) {
        let _ = self.control.try_send(RouteControl::Adopt(est));
    }

    /// Whether both are handles of the same route task.
    pub fn same(&self, other: &RouteHandle) -> bool {
        Arc::ptr_eq(&self.core, &other.core)
    }

    /// The route's session epoch: what its hellos carry now.
    pub fn epoch(&self) -> u64 {
        self.core.our_epoch()
    }

    /// Refuses new messages from now on; those accepted go on (stopping).
    pub(crate) fn drain(&self) {
        self.core.drain();
    }

    /// Accepted and not yet confirmed, while the route is up.
    pub(crate) fn in_flight(&self) -> usize {
        self.core.in_flight()
    }

    /// (activity, settled): see `RouteCore::settle_state`.
    pub(crate) fn settle_state(&self) -> (u64, bool) {
        self.core.settle_state()
    }

    /// Hands a message to the route if its window or queue has room,
    /// without waiting. With room in the window (and nothing queued before
    /// it) the message is on its way to the peer when this returns.
    pub fn try_submit(&self, payload: Bytes, token: Option<u64>) -> Result<(), TrySubmit> {
        self.core.try_submit(payload, token)
    }

    /// Hands a message to the route; waits while its window and queue are
    /// full. With a token, a `ToLocal::Confirm` for it follows.
    pub async fn submit(&self, payload: Bytes, token: Option<u64>) -> Result<(), RouteGone> {
        self.core.submit(payload, token).await
    }

    /// Reports a change in the local cluster's groups without waiting.
    /// Never report members learned from a peer here: that is what keeps
    /// membership non-transitive.
    pub fn try_groups(&self, change: LocalGroups) -> Result<(), TryGroups> {
        match self.control.try_send(RouteControl::Groups(change)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(RouteControl::Groups(c))) => Err(TryGroups::Full(c)),
            Err(_) => Err(TryGroups::Gone),
        }
    }

    /// Reports a change in the local cluster's groups; waits for room.
    pub async fn groups(&self, change: LocalGroups) -> Result<(), RouteGone> {
        self.control.send(RouteControl::Groups(change)).await.map_err(|_| RouteGone)
    }
}

/// The local side's handle on the gateway: routes by peer cluster.
#[derive(Debug, Clone)]
pub struct LocalHandle {
    pub(crate) routes: HashMap<String, RouteHandle>,
}

impl LocalHandle {
    pub fn route(&self, peer: &str) -> Option<&RouteHandle> {
        self.routes.get(peer)
    }

    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
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
