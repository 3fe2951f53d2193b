//! The part of a route the data path works on directly, under one lock.
//!
//! A message the local side submits goes into the route state and onto the
//! primary link's data lane in the submitter's task; a whole data message a
//! link reads goes into the route state and on to the local side in the
//! link's reader task. Neither passes through the route task, which does
//! everything else (links, failover, retransmits, acks, membership, timers)
//! and picks up whatever the data path could not finish — a full lane, a
//! full local queue, messages waiting for window — when `wake` tells it to.
//!
//! Order is kept by two rules, both decided under the lock: a submit goes
//! straight in only while nothing waits in `pending`, and a link's frames
//! are taken only while no earlier batch waits for the route task
//! (`events_queued`). Items for the local side are sent under the lock, so
//! a delivery never overtakes a notice (`Lost`, `Members`) queued before it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use metrics::Counter;
use tokio::sync::{mpsc, Notify};

use super::local::{Finished, Held, RouteGone, Submit, ToLocal, TrySubmit};
use super::peer::TO_LOCAL_BYTES;
use crate::link::conn::FrameSink;
use crate::route::{Confirmation, DataVerdict, FailReason, Route};
use crate::wire::{Frame, Header};

/// Messages the local side may queue toward a route beyond its window.
pub(super) const SUBMIT_QUEUE: usize = 256;

pub(crate) struct RouteCore {
    state: Mutex<CoreState>,
    /// The route task has work the data path left it.
    pub(super) wake: Notify,
    /// Room in `pending` again, or the route closed (for waiting submitters).
    room: Notify,
    pub(super) peer: Arc<str>,
    pub(super) to_local: mpsc::Sender<ToLocal>,
    /// Payload bytes handed to the local side and not yet dropped by it.
    pub(super) held: Arc<AtomicUsize>,
    /// Deliveries the local side has finished with (what acks may cover).
    pub(super) finished: Arc<Finished>,
    pub(super) sent: Counter,
    pub(super) received: Counter,
    pub(super) retransmitted: Counter,
}

pub(crate) struct CoreState {
    pub route: Route,
    /// Submitted while the window was full (or behind others that were):
    /// the route task moves them into `route` as acks make room.
    pub pending: VecDeque<Submit>,
    /// The route is shutting down: no more submits, no more deliveries.
    pub closed: bool,
    /// Data lanes of the live links, by link id.
    pub lanes: Vec<(u64, mpsc::Sender<Frame>)>,
    /// Notices for the local side; deliveries wait behind them.
    pub outbox: VecDeque<ToLocal>,
    /// Batches of frames a link left for the route task and it has not
    /// handled yet: while any, later frames wait their turn behind them.
    pub events_queued: usize,
}

impl std::fmt::Debug for RouteCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteCore({})", self.peer)
    }
}

impl RouteCore {
    /// `counters`: messages sent, received (handed to the local side) and retransmitted.
    pub(super) fn new(
        route: Route,
        peer: Arc<str>,
        to_local: mpsc::Sender<ToLocal>,
        held: Arc<AtomicUsize>,
        counters: [Counter; 3],
    ) -> Self {
        let [sent, received, retransmitted] = counters;
        RouteCore {
            state: Mutex::new(CoreState {
                route,
                pending: VecDeque::new(),
                closed: false,
                lanes: Vec::new(),
                outbox: VecDeque::new(),
                events_queued: 0,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            peer,
            to_local,
            held,
            finished: Arc::new(Finished::default()),
            sent,
            received,
            retransmitted,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, CoreState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- toward the peer ----

    /// Takes a message if the route (or its queue) has room, without waiting.
    pub(super) fn try_submit(&self, payload: Bytes, token: Option<u64>) -> Result<(), TrySubmit> {
        let mut st = self.lock();
        if st.closed {
            return Err(TrySubmit::Gone);
        }
        if st.pending.is_empty() && st.route.has_room() {
            self.sent.increment(1);
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
    pub(super) async fn submit(&self, mut payload: Bytes, mut token: Option<u64>) -> Result<(), RouteGone> {
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

    /// Moves queued submits into the route as far as its window allows
    /// (the route task, after acks made room).
    pub(super) fn admit_pending(&self, st: &mut CoreState) {
        let mut moved = false;
        while st.route.has_room() {
            let Some(s) = st.pending.pop_front() else { break };
            self.sent.increment(1);
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

    /// Closed without the route task's shutdown (it ended some other way):
    /// submitters get `RouteGone` instead of waiting forever.
    pub(super) fn mark_closed(&self) {
        self.lock().closed = true;
        self.room.notify_waiters();
    }

    /// The next message for the primary, as a frame.
    pub(super) fn data_frame(&self, st: &mut CoreState) -> Option<Frame> {
        let t = st.route.next_transmit(Instant::now())?;
        if t.retransmit {
            self.retransmitted.increment(1);
        }
        Some(Frame { header: Header::Data { epoch: t.epoch, seq: t.seq, more: false }, body: t.payload })
    }

    /// The primary's data lane.
    pub(super) fn primary_lane(st: &CoreState) -> Option<&mpsc::Sender<Frame>> {
        let id = st.route.primary()?;
        st.lanes.iter().find(|(l, _)| *l == id).map(|(_, lane)| lane)
    }

    /// Puts what the route wants to transmit on the primary's data lane
    /// while the lane has room; what is left, the route task sends later
    /// (woken if `wake`).
    pub(super) fn transmit(&self, st: &mut CoreState, wake: bool) {
        let mut left = false;
        if let Some(lane) = Self::primary_lane(st).cloned() {
            while st.route.wants_transmit() {
                let Ok(permit) = lane.try_reserve() else {
                    left = true;
                    break;
                };
                let Some(frame) = self.data_frame(st) else { break };
                permit.send(frame);
            }
        }
        if left && wake {
            self.wake.notify_one();
        }
    }

    // ---- toward the local side ----

    pub(super) fn over_budget(&self) -> bool {
        self.held.load(Ordering::Relaxed) >= TO_LOCAL_BYTES
    }

    /// Whether there is something to hand to the local side now.
    pub(super) fn local_ready(&self, st: &CoreState) -> bool {
        !st.outbox.is_empty() || (st.route.has_delivery() && !self.over_budget())
    }

    /// The next item for the local side: notices first, then messages while
    /// the local side holds less than TO_LOCAL_BYTES of them.
    pub(super) fn next_local(&self, st: &mut CoreState) -> Option<ToLocal> {
        if let Some(item) = st.outbox.pop_front() {
            return Some(item);
        }
        if self.over_budget() || st.closed {
            return None;
        }
        let session = st.route.peer_epoch()?;
        let (n, payload) = st.route.next_delivery()?;
        self.received.increment(1);
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

impl FrameSink for RouteCore {
    /// Takes whole data messages that are next in order, straight into the
    /// route and on to the local side. Leaves the rest in order for the
    /// route task: control frames, anything after a membership advert, and
    /// any data frame that is not simply accepted (duplicate, stale, or a
    /// violation, which the route task handles and reports).
    fn take(&self, link: u64, frames: &mut Vec<Frame>) {
        let mut st = self.lock();
        if st.events_queued > 0 || st.closed || st.route.peer_epoch().is_none() {
            st.events_queued += 1;
            return;
        }
        let session = st.route.peer_epoch();
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
                // Adverts and deliveries reach the local side in order.
                Header::Advert(_) | Header::Data { .. } => taking = false,
                _ => {}
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
    use crate::route::Window;

    const LINK: u64 = 7;
    const PEER_EPOCH: u64 = 9;

    struct Fixture {
        core: RouteCore,
        lane: mpsc::Receiver<Frame>,
        local: mpsc::Receiver<ToLocal>,
    }

    /// A route up on one link, with a send window of `window` messages and
    /// room for `local_room` items toward the local side.
    fn fixture(window: usize, local_room: usize) -> Fixture {
        let w = Window { messages: window, bytes: 1 << 20 };
        let mut route = Route::new(1, w, Window { messages: 64, bytes: 1 << 20 });
        assert!(route.link_up(LINK, PEER_EPOCH, w).primary);
        let (to_local, local) = mpsc::channel(local_room);
        let core = RouteCore::new(
            route,
            "dc2".into(),
            to_local,
            Arc::default(),
            [Counter::noop(), Counter::noop(), Counter::noop()],
        );
        core.finished.reset(PEER_EPOCH);
        let (lane_tx, lane) = mpsc::channel(16);
        core.lock().lanes.push((LINK, lane_tx));
        Fixture { core, lane, local }
    }

    fn data(seq: u64) -> Frame {
        Frame { header: Header::Data { epoch: PEER_EPOCH, seq, more: false }, body: Bytes::from(vec![seq as u8]) }
    }

    fn seqs_on(lane: &mut mpsc::Receiver<Frame>) -> Vec<u64> {
        std::iter::from_fn(|| lane.try_recv().ok())
            .map(|f| match f.header {
                Header::Data { seq, .. } => seq,
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
        f.core.lock().route.on_ack(1, 1, Instant::now()).unwrap();
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
        assert!(matches!(f.core.try_submit(Bytes::from_static(b"c"), Some(3)), Err(TrySubmit::Full(_, Some(3)))));
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
        let mut frames = vec![Frame::control(Header::Ack { epoch: 1, upto: 0 }), data(1), data(2)];
        f.core.take(LINK, &mut frames);
        assert_eq!(frames.len(), 1);
        assert!(matches!(frames[0].header, Header::Ack { .. }));
        assert_eq!(local_items(&mut f.local), ["msg 1", "msg 2"]);
        // The ack is now queued for the route task: later data waits behind it.
        assert_eq!(f.core.lock().events_queued, 1);
        let mut later = vec![data(3)];
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
            (99, data(2)),
            (LINK, Frame { header: Header::Data { epoch: 3, seq: 2, more: false }, body: Bytes::new() }),
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
}
