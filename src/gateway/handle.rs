//! The gateway's own handle on a route task ([`RouteRef`]): what the local
//! side may do with it (`local::Route`, behind a `local::RouteHandle`), and
//! what only the gateway does (drain it, hand it a link, ask how far it
//! got).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::core::RouteCore;
use crate::link::handshake::Established;
use crate::local::{self, BoxFuture, LocalGroups, RouteGone, TryGroups, TrySubmit};
use crate::route::{Epoch, Token};

/// A message for the peer, queued while the route's window is full.
#[derive(Debug)]
pub(crate) struct Submit {
    pub payload: Bytes,
    pub token: Option<Token>,
}

/// What else a route task is told, in one queue (so that its loop polls
/// one channel for both): a link the listener accepted for it, or a change
/// in the local cluster's own groups.
pub(crate) enum RouteControl {
    Adopt(Box<Established>),
    Groups(LocalGroups),
    /// A successor session took the route over (another instance of the
    /// peer): this task dials no more, publishes no gauges, and ends once
    /// its peer instance has left.
    Retire,
}

/// One route task, as the gateway holds it.
#[derive(Debug, Clone)]
pub(crate) struct RouteRef(Arc<Parts>);

#[derive(Debug)]
struct Parts {
    core: Arc<RouteCore>,
    control: mpsc::Sender<RouteControl>,
}

impl RouteRef {
    pub(super) fn new(core: Arc<RouteCore>, control: mpsc::Sender<RouteControl>) -> RouteRef {
        RouteRef(Arc::new(Parts { core, control }))
    }

    /// The local side's handle on this route.
    pub(crate) fn for_local(&self) -> local::RouteHandle {
        local::RouteHandle::new(self.0.clone())
    }

    /// The peer instance the route's session is with, if any.
    pub(crate) fn peer_instance(&self) -> Option<String> {
        self.0.core.peer_instance()
    }

    /// The route's session epoch: what its hellos carry now.
    pub(crate) fn epoch(&self) -> Epoch {
        self.0.core.our_epoch()
    }

    /// Whether the route has a live link.
    pub(crate) fn is_up(&self) -> bool {
        self.0.core.is_up()
    }

    /// Whether the route task has ended.
    pub(crate) fn is_gone(&self) -> bool {
        self.0.control.is_closed()
    }

    /// Hands the route task a link (or tells it to retire): false if it is gone.
    pub(crate) fn tell(&self, c: RouteControl) -> bool {
        self.0.control.try_send(c).is_ok()
    }

    /// Refuses new messages from now on; those accepted go on (stopping).
    pub(crate) fn drain(&self) {
        self.0.core.drain();
    }

    /// Accepted and not yet confirmed, while the route is up.
    pub(crate) fn in_flight(&self) -> usize {
        self.0.core.in_flight()
    }

    /// (activity, settled): see `RouteCore::settle_state`.
    pub(crate) fn settle_state(&self) -> (u64, bool) {
        self.0.core.settle_state()
    }
}

impl local::Route for Parts {
    fn try_submit(&self, payload: Bytes, token: Option<Token>) -> Result<(), TrySubmit> {
        self.core.try_submit(payload, token)
    }

    fn submit(&self, payload: Bytes, token: Option<Token>) -> BoxFuture<'_, Result<(), RouteGone>> {
        Box::pin(self.core.submit(payload, token))
    }

    fn try_groups(&self, change: LocalGroups) -> Result<(), TryGroups> {
        match self.control.try_send(RouteControl::Groups(change)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(RouteControl::Groups(c))) => Err(TryGroups::Full(c)),
            Err(_) => Err(TryGroups::Gone),
        }
    }

    fn groups(&self, change: LocalGroups) -> BoxFuture<'_, Result<(), RouteGone>> {
        Box::pin(async move { self.control.send(RouteControl::Groups(change)).await.map_err(|_| RouteGone) })
    }
}
