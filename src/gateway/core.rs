//! The part of a route the data path works on directly, under one lock.
//!
//! A message the local side submits goes into the route state and onto the
//! primary link's data lane in the submitter's task; a whole data message a
//! link reads goes into the route state and on to the local side in the
//! link's reader task; the peer's acks are applied there too, and what the
//! local side finished with is acked from its task (`ack_now`). None of it
//! passes through the route task, which does everything else (links,
//! failover, retransmits, membership, timers) and picks up whatever the
//! data path could not finish — a full lane, a full local queue, messages
//! waiting for window, frames it does not take — when `wake` tells it to.
//!
//! Order is kept by rules decided under the lock: a submit goes straight in
//! only while nothing waits in `pending`; a link's frames are taken only
//! while no earlier batch waits for the route task (`events_queued`), and
//! every frame after one left for it waits too. Items for the local side
//! are sent under the lock, so a delivery never overtakes a notice (`Lost`,
//! `Members`) queued before it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{mpsc, Notify};

use super::handle::Submit;
use super::peer::TO_LOCAL_BYTES;
use crate::link::conn::{FrameSink, Lanes};
use crate::local::{Acks, Finished, Held, RouteGone, ToLocal, TrySubmit};
use crate::membership::{Change, PeerMembership};
use crate::route::{
    Admit, Confirmation, DataVerdict, Epoch, FailReason, LinkDown, LinkId, LinkUp, Route, Seq, Token, Violation, Window,
};
use crate::wire::{Frame, Header, Hello, CAP_REJECT};

/// Sequence numbers per `Reject` frame.
const REJECT_CHUNK: usize = 4096;
/// Under load, an ack goes out at least every this many delivered messages.
const ACK_EVERY: u64 = 256;

/// The route metrics the data path keeps up to date.
pub(super) struct DataMetrics {
    pub sent: Counter,
    /// Handed to the local side.
    pub received: Counter,
    pub retransmitted: Counter,
    /// Acked by the peer as delivered.
    pub delivered: Counter,
    /// Acked by the peer as undeliverable (failed, reason undeliverable).
    pub undeliverable: Counter,
    pub ack_latency: Histogram,
    pub unacked_messages: Gauge,
    pub unacked_bytes: Gauge,
}

/// Messages the local side may queue toward a route beyond its window.
pub(super) const SUBMIT_QUEUE: usize = 256;

/// Membership changes of `peer`, as items for the local side.
pub(super) fn member_items(peer: &Arc<str>, changes: Vec<Change>) -> impl Iterator<Item = ToLocal> + '_ {
    changes.into_iter().map(|change| ToLocal::Members { peer: peer.clone(), change })
}

/// Outcomes of messages to `peer`, as items for the local side.
pub(super) fn confirm_items(peer: &Arc<str>, confirmations: Vec<Confirmation>) -> impl Iterator<Item = ToLocal> + '_ {
    confirmations.into_iter().map(|c| ToLocal::Confirm { peer: peer.clone(), token: c.token, outcome: c.outcome })
}

pub(crate) struct RouteCore {
    state: Mutex<CoreState>,
    /// The route task has work the data path left it.
    pub(super) wake: Notify,
    /// Room in `pending` again, or the route closed (for waiting submitters).
    room: Notify,
    pub(super) peer: Arc<str>,
    to_local: mpsc::Sender<ToLocal>,
    /// Payload bytes handed to the local side and not yet dropped by it.
    held: Arc<AtomicUsize>,
    /// Deliveries the local side has finished with (what acks may cover).
    pub(super) finished: Arc<Finished>,
    m: DataMetrics,
    /// Under load, ack at least every this many delivered messages.
    ack_every: u64,
}

/// Everything under the route's lock. Only `RouteCore`'s methods see it:
/// each takes the lock once, does one whole step and lets go before it
/// returns, and calls nothing outside this module meanwhile (items for the
/// local side and frames for links go into channels, which never lock).
/// So no caller can hold it across an `.await`, or take it twice.
struct CoreState {
    route: Route,
    /// Submitted while the window was full (or behind others that were):
    /// the route task moves them into `route` as acks make room.
    pending: VecDeque<Submit>,
    /// The route is shutting down: no more submits, no more deliveries.
    closed: bool,
    /// The gateway is stopping: no more submits; what was accepted is
    /// still sent and confirmed (`drain`).
    draining: bool,
    /// The lanes of the live links.
    lanes: Vec<Lanes>,
    /// Notices for the local side; deliveries wait behind them.
    outbox: VecDeque<ToLocal>,
    /// Batches of frames a link left for the route task and it has not
    /// handled yet: while any, later frames wait their turn behind them
    /// (`take` counts them, `batch_handled` counts them off).
    events_queued: usize,
    /// The `upto` of the last ack sent, for coalescing.
    acked_at: u64,
    /// The peer understands `Reject` (capability `reject-v1`).
    peer_rejects: bool,
}

impl CoreState {
    /// The primary's lanes.
    fn primary_lanes(&self) -> Option<&Lanes> {
        let id = self.route.primary()?;
        self.lanes.iter().find(|l| l.id == id)
    }

    /// The session with the peer's run ended (it restarted, or the route
    /// moved to another instance): queued with that state change, the
    /// outcomes of what it was sent and never confirmed, `Lost`, and the
    /// withdrawal of its members.
    fn session_ended(&mut self, peer: &Arc<str>, members: &mut PeerMembership, failed: Vec<Confirmation>) {
        self.outbox.extend(confirm_items(peer, failed));
        self.outbox.push_back(ToLocal::Lost { peer: peer.clone() });
        self.outbox.extend(member_items(peer, members.peer_restarted()));
    }
}

/// What the route task's loop may wait for room on, this turn.
pub(super) struct Waits {
    /// The primary's data lane, when the route has something to transmit.
    pub lane: Option<mpsc::Sender<Frame>>,
    /// The local side's queue, when there is something for it.
    pub to_local: Option<mpsc::Sender<ToLocal>>,
    /// Deliveries wait for the local side to work through what it holds.
    pub held_back: bool,
}

/// Whether a run of the peer may become a link of this route
/// (`RouteCore::admit`).
pub(super) enum Admission {
    /// Yes: adopt the link.
    Adopt,
    /// Another instance of the peer holds the route now: with successors,
    /// the link starts a successor session.
    Successor,
    /// Refused: another instance (`holder`'s) holds the route.
    OtherInstance { holder: String },
    /// The route moved to another instance: a new session under a fresh
    /// epoch of ours began (what the old one held unconfirmed failed:
    /// `failed`); this link carries the old epoch and is closed.
    Switched { from: String, failed: usize },
    /// The link carries an epoch of ours we no longer use: closed, so the
    /// next one carries the current one.
    Resync,
}

/// The route as `/status` shows it.
pub(super) struct View {
    pub up: bool,
    pub peer_instance: Option<String>,
    pub primary: Option<LinkId>,
    pub unacked: usize,
}

impl std::fmt::Debug for RouteCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteCore({})", self.peer)
    }
}

impl RouteCore {
    /// `window_messages`: the route's receive window, which sets how often
    /// a busy route acks.
    pub(super) fn new(
        route: Route,
        peer: Arc<str>,
        to_local: mpsc::Sender<ToLocal>,
        held: Arc<AtomicUsize>,
        m: DataMetrics,
        window_messages: usize,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| RouteCore {
            state: Mutex::new(CoreState {
                route,
                pending: VecDeque::new(),
                closed: false,
                draining: false,
                lanes: Vec::new(),
                outbox: VecDeque::new(),
                events_queued: 0,
                acked_at: 0,
                peer_rejects: false,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            peer,
            to_local,
            held,
            finished: Arc::new(Finished::for_route(me.clone() as std::sync::Weak<dyn Acks>)),
            m,
            ack_every: ACK_EVERY.min(window_messages as u64 / 4).max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CoreState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- toward the peer ----

    /// Takes a message if the route (or its queue) has room, without waiting.
    pub(super) fn try_submit(&self, payload: Bytes, token: Option<Token>) -> Result<(), TrySubmit> {
        let mut st = self.lock();
        if st.closed || st.draining {
            return Err(TrySubmit::Gone);
        }
        if st.pending.is_empty() && st.route.has_room() {
            self.m.sent.increment(1);
            st.route.submit(payload, token);
            self.transmit(&mut st, true);
            return Ok(());
        }
        if st.pending.len() >= SUBMIT_QUEUE {
            return Err(TrySubmit::Full(payload, token));
        }
        st.pending.push_back(Submit { payload, token });
        if st.route.has_room() {
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Takes a message; waits while the route's window and queue are full.
    pub(super) async fn submit(&self, mut payload: Bytes, mut token: Option<Token>) -> Result<(), RouteGone> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_submit(payload, token) {
                Ok(()) => return Ok(()),
                Err(TrySubmit::Gone) => return Err(RouteGone),
                Err(TrySubmit::Full(p, t)) => (payload, token) = (p, t),
            }
            room.await;
        }
    }

    /// Moves queued submits into the route as far as its window allows.
    fn admit_pending(&self, st: &mut CoreState) {
        let mut moved = false;
        while st.route.has_room() {
            let Some(s) = st.pending.pop_front() else { break };
            self.m.sent.increment(1);
            st.route.submit(s.payload, s.token);
            moved = true;
        }
        if moved {
            self.room.notify_waiters();
        }
    }

    /// Closes the route to submits and deliveries: fails what it holds
    /// unconfirmed (count, confirmations) and returns what was queued.
    pub(super) fn close(&self, reason: FailReason) -> (usize, Vec<Confirmation>, Vec<Submit>) {
        let mut st = self.lock();
        st.closed = true;
        let (n, confirmations) = st.route.fail_all(reason);
        let queued = std::mem::take(&mut st.pending).into();
        drop(st);
        self.room.notify_waiters();
        (n, confirmations, queued)
    }

    /// The gateway is stopping: new submits are refused (`Gone`: the
    /// local side reports them failed at once), what was accepted goes on.
    pub(super) fn drain(&self) {
        self.lock().draining = true;
        self.room.notify_waiters();
    }

    /// Messages accepted and not yet confirmed, while the route is up (a
    /// route that is down cannot finish them: 0, nothing to wait for).
    pub(super) fn in_flight(&self) -> usize {
        let st = self.lock();
        if st.closed || !st.route.is_up() {
            return 0;
        }
        st.route.unacked().0 + st.pending.len()
    }

    /// (activity, settled) while the route is up (`Route::activity`,
    /// `Route::settled`); a route that is down is settled.
    pub(super) fn settle_state(&self) -> (u64, bool) {
        let st = self.lock();
        if st.closed || !st.route.is_up() {
            return (0, true);
        }
        (st.route.activity(), st.route.settled() && st.pending.is_empty())
    }

    /// Closed without the route task's shutdown (it ended some other way):
    /// submitters get `RouteGone` instead of waiting forever.
    pub(super) fn mark_closed(&self) {
        self.lock().closed = true;
        self.room.notify_waiters();
    }

    /// The next message for the primary, as a frame.
    fn data_frame(&self, route: &mut Route) -> Option<Frame> {
        let t = route.next_transmit(Instant::now())?;
        if t.retransmit {
            self.m.retransmitted.increment(1);
        }
        Some(Frame { header: Header::Data { epoch: t.epoch, seq: t.seq, more: false }, body: t.payload })
    }

    /// Puts what the route wants to transmit on the primary's data lane
    /// while the lane has room; what is left, the route task sends later
    /// (woken if `wake`).
    fn transmit(&self, st: &mut CoreState, wake: bool) {
        let mut left = false;
        let CoreState { route, lanes, .. } = st;
        if let Some(lane) = route.primary().and_then(|id| lanes.iter().find(|l| l.id == id)) {
            while route.wants_transmit() {
                let Ok(permit) = lane.data.try_reserve() else {
                    left = true;
                    break;
                };
                let Some(frame) = self.data_frame(route) else { break };
                permit.send(frame);
            }
        }
        if left && wake {
            self.wake.notify_one();
        }
    }

    fn publish_window_locked(&self, st: &CoreState) {
        let (n, bytes) = st.route.unacked();
        self.m.unacked_messages.set(n as f64);
        self.m.unacked_bytes.set(bytes as f64);
    }

    /// Sets the unacked gauges.
    pub(super) fn publish_window(&self) {
        self.publish_window_locked(&self.lock());
    }

    // ---- the route task's steps ----

    /// What the route task may wait for room on now: the primary's data
    /// lane (something to transmit), the local side's queue (something for
    /// it), and whether deliveries are held back by the byte budget.
    pub(super) fn waits(&self) -> Waits {
        let st = self.lock();
        let lane = st.primary_lanes().filter(|_| st.route.wants_transmit()).map(|l| l.data.clone());
        let local = !st.outbox.is_empty() || st.route.has_delivery();
        let held_back = st.route.has_delivery() && self.over_budget();
        Waits { lane, to_local: local.then(|| self.to_local.clone()), held_back }
    }

    /// Room on the primary's data lane: the next message goes in it.
    pub(super) fn send_data(&self, permit: mpsc::OwnedPermit<Frame>) {
        let mut st = self.lock();
        if let Some(frame) = self.data_frame(&mut st.route) {
            permit.send(frame);
        }
    }

    /// Room on the local side's queue: the next item goes in it.
    pub(super) fn send_local(&self, permit: mpsc::OwnedPermit<ToLocal>) {
        let mut st = self.lock();
        if let Some(item) = self.next_local(&mut st) {
            permit.send(item);
        }
    }

    /// Moves what can move without waiting: queued submits into the window,
    /// transmissions onto the primary's data lane, and up to `batch` items
    /// to the local side (acking as it goes), so a busy route does not go
    /// round its task's loop once per message.
    pub(super) fn pump(&self, batch: usize) {
        {
            let mut st = self.lock();
            self.admit_pending(&mut st);
            self.transmit(&mut st, false);
        }
        for _ in 0..batch {
            let mut st = self.lock();
            if !self.local_ready(&st) {
                break;
            }
            let Ok(permit) = self.to_local.try_reserve() else { break };
            match self.next_local(&mut st) {
                Some(item) => permit.send(item),
                None => break,
            }
            // Under load, ack as we go rather than only at the end.
            self.flush_ack_locked(&mut st);
        }
    }

    /// Queues a control frame on the primary (a lane far behind closes it).
    pub(super) fn send_control(&self, frame: Frame) {
        if let Some(lanes) = self.lock().primary_lanes() {
            lanes.send_control(frame);
        }
    }

    /// Queues notices for the local side (deliveries wait behind them).
    pub(super) fn tell_local(&self, items: impl IntoIterator<Item = ToLocal>) {
        self.lock().outbox.extend(items);
    }

    /// The outcomes still queued for the local side, taken out (a stopping
    /// route hands them over itself; other notices no longer matter).
    pub(super) fn take_outcomes(&self) -> VecDeque<ToLocal> {
        let mut outbox = std::mem::take(&mut self.lock().outbox);
        outbox.retain(|item| matches!(item, ToLocal::Confirm { .. }));
        outbox
    }

    /// Hands the local side one outcome, waiting for room (a stopping
    /// route's last ones).
    pub(super) async fn send_outcome(&self, item: ToLocal) -> Result<(), mpsc::error::SendError<ToLocal>> {
        self.to_local.send(item).await
    }

    /// The epoch our hellos carry now.
    pub(super) fn our_epoch(&self) -> Epoch {
        self.lock().route.our_epoch()
    }

    /// The peer instance the route's session is with, if any.
    pub(super) fn peer_instance(&self) -> Option<String> {
        self.lock().route.peer_instance().map(str::to_string)
    }

    pub(super) fn is_up(&self) -> bool {
        self.lock().route.is_up()
    }

    pub(super) fn view(&self) -> View {
        let st = self.lock();
        View {
            up: st.route.is_up(),
            peer_instance: st.route.peer_instance().map(str::to_string),
            primary: st.route.primary(),
            unacked: st.route.unacked().0,
        }
    }

    /// Messages received and not yet handed to the local side.
    pub(super) fn undelivered(&self) -> usize {
        self.lock().route.undelivered().0
    }

    /// The acceptor's check of a hello before answering it: our session
    /// epoch, or (without `successors`) the holder's name when another
    /// instance of the peer holds the route (see `route::Admit`).
    pub(super) fn check_session(&self, hello: &Hello, successors: bool) -> Result<Epoch, String> {
        let st = self.lock();
        match st.route.admit(&hello.gateway, hello.epoch) {
            Admit::OtherInstance if !successors => Err(st.route.peer_instance().unwrap_or_default().to_string()),
            _ => Ok(st.route.our_epoch()),
        }
    }

    /// Whether a run of the peer (`instance` under `epoch`, on a link
    /// whose hello carried our `link_epoch`) may become a link of this
    /// route; a move to another instance is carried out here, in one step
    /// with its notices (`members`: withdrawn from the local side).
    /// `successors`: another instance's link may start a successor session.
    pub(super) fn admit(
        &self,
        instance: &str,
        epoch: Epoch,
        link_epoch: Epoch,
        successors: bool,
        members: &mut PeerMembership,
    ) -> Admission {
        let mut st = self.lock();
        match st.route.admit(instance, epoch) {
            _ if link_epoch != st.route.our_epoch() => Admission::Resync,
            Admit::OtherInstance if successors => Admission::Successor,
            Admit::OtherInstance => {
                Admission::OtherInstance { holder: st.route.peer_instance().unwrap_or_default().to_string() }
            }
            Admit::Switch => {
                let from = st.route.peer_instance().unwrap_or_default().to_string();
                let sw = st.route.switch(super::new_epoch());
                st.session_ended(&self.peer, members, sw.failed);
                Admission::Switched { from, failed: sw.failed_count }
            }
            Admit::New | Admit::Same | Admit::Restarted => Admission::Adopt,
        }
    }

    /// A link admitted by `admit` is up (its hello: `hello`), in one step:
    /// its lanes join, the route takes it (as primary, standby, or a new
    /// session's first), and the local side's notices are queued, so the
    /// link's reader cannot hand it a message of a new session before them
    /// (`Lost` for the old run, `Up`). (Whether the peer was known, and
    /// what the route said.)
    pub(super) fn link_up(
        &self,
        lanes: Lanes,
        hello: &Hello,
        peer_window: Window,
        members: &mut PeerMembership,
    ) -> (bool, LinkUp) {
        let id = lanes.id;
        let mut st = self.lock();
        st.lanes.push(lanes);
        st.peer_rejects = hello.capabilities.iter().any(|c| c == CAP_REJECT);
        let was_known = st.route.peer_epoch().is_some();
        let mut up = st.route.link_up_from(id, Some(&hello.gateway), hello.epoch, peer_window);
        if up.new_session {
            self.finished.reset(hello.epoch);
        }
        if up.new_session && was_known {
            st.session_ended(&self.peer, members, std::mem::take(&mut up.failed));
        }
        if up.primary {
            st.outbox.push_back(ToLocal::Up { peer: self.peer.clone(), epoch: hello.epoch });
        }
        (was_known, up)
    }

    /// A link is gone: its lanes leave, the route fails over (or is down:
    /// the local side is told `Lost`).
    pub(super) fn link_down(&self, link: LinkId) -> LinkDown {
        let mut st = self.lock();
        st.lanes.retain(|l| l.id != link);
        let down = st.route.link_down(link);
        if down.route_down {
            st.outbox.push_back(ToLocal::Lost { peer: self.peer.clone() });
        }
        down
    }

    /// A data frame the data path left to the route task; None if it is
    /// from a previous run of the peer (on a stale link).
    pub(super) fn on_data(
        &self,
        link: LinkId,
        epoch: Epoch,
        seq: Seq,
        body: Bytes,
    ) -> Option<Result<DataVerdict, Violation>> {
        let mut st = self.lock();
        if Some(epoch) != st.route.peer_epoch() {
            return None;
        }
        Some(st.route.on_data(link, seq, body))
    }

    /// An ack the data path left to the route task.
    pub(super) fn on_ack(&self, epoch: Epoch, upto: Seq) -> Result<(), Violation> {
        self.on_ack_locked(&mut self.lock(), epoch, upto)
    }

    /// A reject from the peer (messages it could not deliver).
    pub(super) fn on_reject(&self, epoch: Epoch, seqs: &[Seq]) -> Result<usize, Violation> {
        self.lock().route.on_reject(epoch, seqs)
    }

    /// The route task has handled a batch of frames a link's reader left
    /// it (`take`): once none waits, the data path takes frames again.
    pub(super) fn batch_handled(&self) {
        let mut st = self.lock();
        st.events_queued = st.events_queued.saturating_sub(1);
    }

    // ---- acks ----

    /// A cumulative ack from the peer: frees window, moves queued submits
    /// in and sends them, and queues the confirmations for the local side.
    fn on_ack_locked(&self, st: &mut CoreState, epoch: Epoch, upto: Seq) -> Result<(), Violation> {
        let acked = st.route.on_ack(epoch, upto, Instant::now())?;
        self.m.delivered.increment(acked.messages as u64);
        if acked.undeliverable > 0 {
            self.m.undeliverable.increment(acked.undeliverable as u64);
        }
        for l in &acked.latencies {
            self.m.ack_latency.record(l.as_secs_f64());
        }
        st.outbox.extend(confirm_items(&self.peer, acked.confirmations));
        self.admit_pending(st);
        self.transmit(st, true);
        self.publish_window_locked(st);
        Ok(())
    }

    /// Acks what the local side finished with (see `flush_ack_locked`),
    /// from the route task.
    pub(super) fn flush_ack(&self) {
        self.flush_ack_locked(&mut self.lock());
    }

    /// Sends the cumulative ack for what the local side finished with,
    /// unless more deliveries are about to follow at once (then every
    /// `ack_every` messages): an idle route acks at once, a busy one not
    /// for each message, and a stalled local side does not hold back acks
    /// for what it already took. Nothing without a primary.
    fn flush_ack_locked(&self, st: &mut CoreState) {
        let Some(primary) = st.route.primary().and_then(|id| st.lanes.iter().position(|l| l.id == id)) else {
            return;
        };
        let (session, done) = self.finished.upto();
        if session.is_some() && st.route.peer_epoch() == session {
            st.route.local_done(done);
        }
        let Some((epoch, upto)) = st.route.pending_ack() else { return };
        // (After a new session `upto` restarts low: the wrap makes it due.)
        let more_now = st.route.has_delivery() && self.to_local.capacity() > 0;
        if more_now && upto.0.wrapping_sub(st.acked_at) < self.ack_every {
            return;
        }
        // What could not be delivered is said first, so the ack after it
        // confirms the rest. (A peer without `reject-v1` sees them acked.)
        st.route.local_undeliverable(self.finished.take_undeliverable(epoch));
        let rejects = st.route.take_rejects(upto);
        let lanes = &st.lanes[primary];
        if st.peer_rejects {
            for seqs in rejects.chunks(REJECT_CHUNK) {
                lanes.send_control(Frame::control(Header::Reject { epoch, seqs: seqs.to_vec() }));
            }
        }
        lanes.send_control(Frame::control(Header::Ack { epoch, upto }));
        st.acked_at = upto.0;
        st.route.ack_sent(upto);
    }

    // ---- toward the local side ----

    fn over_budget(&self) -> bool {
        self.held.load(Ordering::Relaxed) >= TO_LOCAL_BYTES
    }

    /// Whether there is something to hand to the local side now.
    fn local_ready(&self, st: &CoreState) -> bool {
        !st.outbox.is_empty() || (st.route.has_delivery() && !self.over_budget())
    }

    /// The next item for the local side: notices first, then messages while
    /// the local side holds less than TO_LOCAL_BYTES of them.
    fn next_local(&self, st: &mut CoreState) -> Option<ToLocal> {
        if let Some(item) = st.outbox.pop_front() {
            return Some(item);
        }
        if self.over_budget() || st.closed {
            return None;
        }
        let session = st.route.peer_epoch()?;
        let (n, payload) = st.route.next_delivery()?;
        self.m.received.increment(1);
        let held = Held::take(&self.held, payload.len(), &self.finished, session, n);
        Some(ToLocal::Deliver { peer: self.peer.clone(), payload, held })
    }

    /// Hands the local side what it can take now, without waiting; true if
    /// anything is left for the route task (including deliveries held back
    /// by the byte budget, which it retries on a timer).
    fn deliver(&self, st: &mut CoreState) -> bool {
        while self.local_ready(st) {
            let Ok(permit) = self.to_local.try_reserve() else { return true };
            match self.next_local(st) {
                Some(item) => permit.send(item),
                None => break,
            }
        }
        st.route.has_delivery() || !st.outbox.is_empty()
    }
}

impl Acks for RouteCore {
    /// Acks what the local side just finished with, from its task (after a
    /// batch of deliveries was confirmed taken), not the route task's.
    /// It never waits for the lock: if the lock is held — by another task
    /// for a moment, or by a caller up this very stack, which waiting
    /// would deadlock — the route task is told to ack instead.
    fn ack_now(&self) {
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return self.finished.notify.notify_one(),
        };
        if !st.closed {
            self.flush_ack_locked(&mut st);
        }
    }
}

impl FrameSink for RouteCore {
    /// Takes whole data messages that are next in order, straight into the
    /// route and on to the local side, and acks, up to the first frame it
    /// leaves: any other control frame (advert, reject, resync), or a data
    /// or ack frame that is not simply accepted (duplicate, stale, or a
    /// violation, which the route task handles and reports). That frame
    /// and all after it go to the route task, in order.
    fn take(&self, link: LinkId, frames: &mut Vec<Frame>) {
        let mut st = self.lock();
        let session = st.route.peer_epoch();
        if st.events_queued > 0 || st.closed || session.is_none() {
            st.events_queued += 1;
            return;
        }
        let mut taking = true;
        let mut took = false;
        frames.retain(|f| {
            if !taking {
                return true;
            }
            match f.header {
                Header::Data { epoch, seq, .. } if Some(epoch) == session => {
                    if let Ok(DataVerdict::Accepted) = st.route.on_data(link, seq, f.body.clone()) {
                        took = true;
                        return false;
                    }
                    taking = false;
                }
                Header::Ack { epoch, upto } => {
                    if self.on_ack_locked(&mut st, epoch, upto).is_ok() {
                        took = true;
                        return false;
                    }
                    taking = false;
                }
                // Everything after a frame left for the route task waits
                // for it: adverts before later deliveries, a reject before
                // the ack that follows it.
                _ => taking = false,
            }
            true
        });
        if took && self.deliver(&mut st) {
            self.wake.notify_one();
        }
        if !frames.is_empty() {
            st.events_queued += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Outcome, Window};

    const LINK: LinkId = LinkId(7);
    const PEER_EPOCH: Epoch = Epoch(9);

    struct Fixture {
        core: Arc<RouteCore>,
        lane: mpsc::Receiver<Frame>,
        control: mpsc::Receiver<Frame>,
        local: mpsc::Receiver<ToLocal>,
    }

    fn data_metrics() -> DataMetrics {
        DataMetrics {
            sent: Counter::noop(),
            received: Counter::noop(),
            retransmitted: Counter::noop(),
            delivered: Counter::noop(),
            undeliverable: Counter::noop(),
            ack_latency: Histogram::noop(),
            unacked_messages: Gauge::noop(),
            unacked_bytes: Gauge::noop(),
        }
    }

    /// A route up on one link, with a send window of `window` messages and
    /// room for `local_room` items toward the local side.
    fn fixture(window: usize, local_room: usize) -> Fixture {
        let w = Window { messages: window, bytes: 1 << 20 };
        let mut route = Route::new(Epoch(1), w, Window { messages: 64, bytes: 1 << 20 });
        assert!(route.link_up(LINK, PEER_EPOCH, w).primary);
        let (to_local, local) = mpsc::channel(local_room);
        let core = RouteCore::new(route, "dc2".into(), to_local, Arc::default(), data_metrics(), 64);
        core.finished.reset(PEER_EPOCH);
        let (lanes, control, lane) = Lanes::detached(LINK, 16);
        core.lock().lanes.push(lanes);
        Fixture { core, lane, control, local }
    }

    fn data(seq: u64) -> Frame {
        Frame {
            header: Header::Data { epoch: PEER_EPOCH, seq: Seq(seq), more: false },
            body: Bytes::from(vec![seq as u8]),
        }
    }

    fn seqs_on(lane: &mut mpsc::Receiver<Frame>) -> Vec<u64> {
        std::iter::from_fn(|| lane.try_recv().ok())
            .map(|f| match f.header {
                Header::Data { seq, .. } => seq.0,
                other => panic!("not data: {other:?}"),
            })
            .collect()
    }

    /// What reached the local side: deliveries as their first payload
    /// byte, notices by name.
    fn local_items(local: &mut mpsc::Receiver<ToLocal>) -> Vec<String> {
        std::iter::from_fn(|| local.try_recv().ok())
            .map(|item| match item {
                ToLocal::Deliver { payload, .. } => format!("msg {}", payload[0]),
                ToLocal::Lost { .. } => "lost".into(),
                ToLocal::Up { .. } => "up".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn woken(core: &RouteCore) -> bool {
        let n = core.wake.notified();
        tokio::pin!(n);
        n.enable()
    }

    #[test]
    fn submits_go_out_at_once_and_queue_in_order_behind_a_full_window() {
        let mut f = fixture(2, 8);
        for i in 1..=4u8 {
            assert!(f.core.try_submit(Bytes::from(vec![i]), None).is_ok());
        }
        // Two fit the window and are on the lane already; two wait.
        assert_eq!(seqs_on(&mut f.lane), [1, 2]);
        assert_eq!(f.core.lock().pending.len(), 2);
        // An ack makes room, but a new submit still queues behind the
        // waiting ones, not ahead of them.
        f.core.lock().route.on_ack(Epoch(1), Seq(1), Instant::now()).unwrap();
        f.core.try_submit(Bytes::from(vec![5]), None).unwrap();
        assert_eq!(f.core.lock().pending.len(), 3);
        assert!(woken(&f.core), "room in the window with submits waiting wakes the route task");
        let mut st = f.core.lock();
        f.core.admit_pending(&mut st);
        f.core.transmit(&mut st, false);
        drop(st);
        let sent: Vec<u8> = f.lane.try_recv().map(|fr| fr.body[0]).into_iter().collect();
        assert_eq!(sent, [3], "the oldest waiting message goes first");
    }

    #[test]
    fn a_full_queue_refuses_and_a_closed_route_is_gone() {
        let f = fixture(1, 8);
        f.core.try_submit(Bytes::from_static(b"a"), None).unwrap();
        for _ in 0..SUBMIT_QUEUE {
            f.core.try_submit(Bytes::from_static(b"b"), None).unwrap();
        }
        assert!(matches!(
            f.core.try_submit(Bytes::from_static(b"c"), Some(Token(3))),
            Err(TrySubmit::Full(_, Some(Token(3))))
        ));
        let (failed, _, queued) = f.core.close(FailReason::Shutdown);
        assert_eq!((failed, queued.len()), (1, SUBMIT_QUEUE));
        assert!(matches!(f.core.try_submit(Bytes::from_static(b"d"), None), Err(TrySubmit::Gone)));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(f.core.submit(Bytes::from_static(b"e"), None)).is_err());
    }

    #[test]
    fn a_full_lane_leaves_the_rest_to_the_route_task() {
        let mut f = fixture(64, 8);
        for i in 0..20u8 {
            f.core.try_submit(Bytes::from(vec![i]), None).unwrap();
        }
        assert_eq!(seqs_on(&mut f.lane), (1..=16).collect::<Vec<_>>());
        assert!(f.core.lock().route.wants_transmit());
        assert!(woken(&f.core));
    }

    #[test]
    fn data_is_taken_in_order_and_control_frames_are_left() {
        let mut f = fixture(8, 8);
        let mut frames = vec![data(1), data(2), Frame::control(Header::Resync), data(3)];
        f.core.take(LINK, &mut frames);
        assert_eq!(frames.len(), 2, "the resync and what follows it are left");
        assert!(matches!(frames[0].header, Header::Resync));
        assert_eq!(local_items(&mut f.local), ["msg 1", "msg 2"]);
        // They are now queued for the route task: later data waits behind them.
        assert_eq!(f.core.lock().events_queued, 1);
        let mut later = vec![data(4)];
        f.core.take(LINK, &mut later);
        assert_eq!(later.len(), 1);
        assert_eq!(f.core.lock().events_queued, 2);
        assert!(local_items(&mut f.local).is_empty());
    }

    #[test]
    fn an_advert_keeps_later_data_behind_it() {
        let mut f = fixture(8, 8);
        let advert = crate::wire::Advert {
            origin: "dc2".into(),
            counter: 1,
            body: crate::wire::AdvertBody::Join { group: "g".into(), members: vec![] },
        };
        let mut frames = vec![data(1), Frame::control(Header::Advert(advert)), data(2)];
        f.core.take(LINK, &mut frames);
        assert_eq!(frames.len(), 2, "the advert and the data after it are left");
        assert_eq!(local_items(&mut f.local), ["msg 1"]);
    }

    #[test]
    fn what_the_route_must_judge_is_left_untouched() {
        let mut f = fixture(8, 8);
        f.core.take(LINK, &mut vec![data(1)]);
        // A duplicate, a gap, a frame on an unknown link, another epoch.
        for (link, frame) in [
            (LINK, data(1)),
            (LINK, data(5)),
            (LinkId(99), data(2)),
            (LINK, Frame { header: Header::Data { epoch: Epoch(3), seq: Seq(2), more: false }, body: Bytes::new() }),
        ] {
            f.core.lock().events_queued = 0;
            let mut frames = vec![frame];
            f.core.take(link, &mut frames);
            assert_eq!(frames.len(), 1);
        }
        assert_eq!(f.core.lock().route.undelivered().0, 0);
        assert_eq!(local_items(&mut f.local), ["msg 1"]);
    }

    #[test]
    fn deliveries_never_overtake_notices() {
        let mut f = fixture(8, 1);
        f.core.lock().outbox.push_back(ToLocal::Lost { peer: "dc2".into() });
        f.core.take(LINK, &mut vec![data(1)]);
        // Room for one item: the notice goes, the message waits in the route.
        assert_eq!(local_items(&mut f.local), ["lost"]);
        assert_eq!(f.core.lock().route.undelivered().0, 1);
        assert!(woken(&f.core), "the route task is told to deliver the rest");
        f.core.take(LINK, &mut vec![data(2)]);
        assert_eq!(local_items(&mut f.local), ["msg 1"]);
        f.core.take(LINK, &mut vec![data(3)]);
        assert_eq!(local_items(&mut f.local), ["msg 2"]);
    }

    #[test]
    fn acks_free_the_window_send_what_waited_and_confirm() {
        let mut f = fixture(2, 8);
        for i in 1..=4u8 {
            f.core.try_submit(Bytes::from(vec![i]), Some(Token(i as u64))).unwrap();
        }
        assert_eq!(seqs_on(&mut f.lane), [1, 2]);
        let mut frames = vec![Frame::control(Header::Ack { epoch: Epoch(1), upto: Seq(2) })];
        f.core.take(LINK, &mut frames);
        assert!(frames.is_empty(), "the ack is taken");
        assert_eq!(seqs_on(&mut f.lane), [3, 4], "what waited goes out");
        let confirmed: Vec<(u64, Outcome)> = std::iter::from_fn(|| f.local.try_recv().ok())
            .map(|item| match item {
                ToLocal::Confirm { token, outcome, .. } => (token.0, outcome),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(confirmed, [(1, Outcome::Delivered), (2, Outcome::Delivered)]);
        // An ack beyond what was sent is the route task's to report.
        let mut bad = vec![Frame::control(Header::Ack { epoch: Epoch(1), upto: Seq(9) })];
        f.core.take(LINK, &mut bad);
        assert_eq!(bad.len(), 1);
        assert_eq!(f.core.lock().route.unacked().0, 2);
        // A reject is the route task's, and so is the ack after it (which
        // must see the reject first).
        f.core.lock().events_queued = 0;
        let mut frames = vec![
            Frame::control(Header::Reject { epoch: Epoch(1), seqs: vec![Seq(3)] }),
            Frame::control(Header::Ack { epoch: Epoch(1), upto: Seq(3) }),
        ];
        f.core.take(LINK, &mut frames);
        assert_eq!(frames.len(), 2);
        assert_eq!(f.core.lock().route.unacked().0, 2);
    }

    #[test]
    fn a_finished_batch_is_acked_once_at_once() {
        let mut f = fixture(8, 8);
        f.core.take(LINK, &mut vec![data(1), data(2), data(3)]);
        let held: Vec<Held> = std::iter::from_fn(|| f.local.try_recv().ok())
            .map(|item| match item {
                ToLocal::Deliver { held, .. } => held,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(held.len(), 3);
        assert!(f.control.try_recv().is_err(), "nothing is acked before the local side is done");
        Held::finish_all(held);
        let acks: Vec<Header> = std::iter::from_fn(|| f.control.try_recv().ok()).map(|fr| fr.header).collect();
        assert_eq!(acks, [Header::Ack { epoch: PEER_EPOCH, upto: Seq(3) }]);
        assert!(!woken(&f.core), "no route task needed");
    }

    #[test]
    fn finishing_a_batch_under_the_route_lock_leaves_the_ack_to_the_route_task() {
        let mut f = fixture(8, 8);
        f.core.take(LINK, &mut vec![data(1)]);
        let held: Vec<Held> = std::iter::from_fn(|| f.local.try_recv().ok())
            .map(|item| match item {
                ToLocal::Deliver { held, .. } => held,
                other => panic!("{other:?}"),
            })
            .collect();
        let told = f.core.finished.notify.notified();
        tokio::pin!(told);
        told.as_mut().enable();
        // Whoever holds the lock (here: this very thread, which waiting
        // would deadlock), `ack_now` does not wait for it.
        let st = f.core.lock();
        Held::finish_all(held);
        drop(st);
        assert!(f.control.try_recv().is_err(), "not acked in place");
        assert!(told.as_mut().enable(), "the route task is told to ack");
        f.core.flush_ack();
        let acks: Vec<Header> = std::iter::from_fn(|| f.control.try_recv().ok()).map(|fr| fr.header).collect();
        assert_eq!(acks, [Header::Ack { epoch: PEER_EPOCH, upto: Seq(1) }]);
    }
}
