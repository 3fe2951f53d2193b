//! One peer cluster's session, as plain state: links and the primary,
//! sequence numbers, the unacknowledged window, retransmission after
//! failover, duplicate suppression, cumulative acks, confirmations.
//!
//! No I/O and no clock: callers pass `Instant`s in and carry out what the
//! methods return. Invariants:
//! - outbound messages are numbered 1, 2, … per session (per peer epoch) and
//!   leave in that order; the primary link carries them; when the primary
//!   changes, everything unacknowledged is sent again on the new one;
//! - inbound messages are accepted only in order (seq = last + 1), anything
//!   at or below the last accepted is a duplicate;
//! - the peer acknowledges what it has handed to its cluster; a message is
//!   confirmed when acked, or failed when the peer restarted (new epoch)
//!   after it was sent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use crate::wire::{Epoch, Seq};

/// A link, as its owner numbers it (unique within the process, never
/// reused): not a sequence number, not an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The local side's name for a message it submitted, which the outcome
/// (`Confirmation`) carries back: the route never looks inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

/// Limits on messages held: unacknowledged (sending) or undelivered (receiving).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub messages: usize,
    pub bytes: usize,
}

impl Window {
    pub fn min(self, other: Window) -> Window {
        Window { messages: self.messages.min(other.messages), bytes: self.bytes.min(other.bytes) }
    }
}

/// What became of a message that asked for confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Failed(FailReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// The peer gateway restarted after the message was sent to it; whether
    /// it reached the peer's cluster is unknown.
    PeerRestarted,
    /// This gateway is shutting down with the message unacknowledged.
    Shutdown,
    /// The peer gateway could not hand the message to its cluster (e.g.
    /// its destination node is not connected).
    Undeliverable,
}

impl FailReason {
    pub fn label(self) -> &'static str {
        match self {
            FailReason::PeerRestarted => "peer_restarted",
            FailReason::Shutdown => "shutdown",
            FailReason::Undeliverable => "undeliverable",
        }
    }
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A token the local side chose, with what became of its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    pub token: Token,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("data for seq {got} while expecting {expected}: a gap")]
    Gap { expected: u64, got: u64 },
    #[error("peer exceeded the receive window it was given ({0:?})")]
    Overflow(Window),
    #[error("ack for seq {upto}, but only {sent} were ever sent")]
    AckBeyondSent { upto: u64, sent: u64 },
    #[error("reject for seq {seq}, which is not sent and unacked")]
    BadReject { seq: u64 },
}

impl Violation {
    pub fn label(&self) -> &'static str {
        match self {
            Violation::Gap { .. } => "gap",
            Violation::Overflow(_) => "overflow",
            Violation::AckBeyondSent { .. } => "bad_ack",
            Violation::BadReject { .. } => "bad_reject",
        }
    }
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    payload: Bytes,
    token: Option<Token>,
    /// When it was first handed to a link; None = never sent.
    first_sent: Option<Instant>,
    /// The peer reported it could not deliver it.
    undeliverable: bool,
}

/// The result of a link coming up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkUp {
    /// The peer is a new gateway run (or the first ever): a new session.
    pub new_session: bool,
    /// Links to the peer's previous run, to be closed.
    pub stale: Vec<LinkId>,
    /// Messages sent to the previous run and never confirmed.
    pub failed: Vec<Confirmation>,
    pub failed_count: usize,
    /// This link is now the primary (the route was down, or restarted).
    pub primary: bool,
}

/// Whether a link to a run of the peer cluster may join the route, and how.
///
/// A peer cluster may run several gateway instances; the route holds a
/// session with one run of one instance at a time. Sessions are told apart
/// by both sides' epochs: whenever this side ends a session with a run
/// that may still be alive (`Switch`), it takes a fresh epoch first, so
/// that run, if it comes back, sees a new session and cannot take this
/// side's new numbering for its old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The first session.
    New,
    /// The current session's run.
    Same,
    /// The current instance under a new epoch: it restarted, so its old
    /// run is gone; the session restarts (`link_up` does it).
    Restarted,
    /// Another instance, while the route holds links to the current one:
    /// refused (that instance is a standby for this route).
    OtherInstance,
    /// Another instance, and no link to the current one: `switch` to a
    /// fresh epoch, then the link makes a new session.
    Switch,
}

/// The result of a link going away.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LinkDown {
    pub was_primary: bool,
    /// The standby promoted in its place (a failover).
    pub promoted: Option<LinkId>,
    /// No link left.
    pub route_down: bool,
}

/// What to do with a data frame that arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum DataVerdict {
    Accepted,
    Duplicate,
    /// From a link of the peer's previous run: ignore.
    Stale,
}

/// A frame to put on the primary link now.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit {
    pub link: LinkId,
    pub epoch: Epoch,
    pub seq: Seq,
    pub payload: Bytes,
    pub retransmit: bool,
}

/// The effect of an ack.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// Delivered.
    pub messages: usize,
    /// Acked, but reported undeliverable by the peer before.
    pub undeliverable: usize,
    pub confirmations: Vec<Confirmation>,
    /// First transmission to ack, per acked message.
    pub latencies: Vec<Duration>,
}

#[derive(Debug)]
pub struct Route {
    our_epoch: Epoch,
    send_window: Window,
    recv_window: Window,
    /// Links in the order they came up, with the peer epoch each reached.
    links: Vec<(LinkId, Epoch)>,
    peer_epoch: Option<Epoch>,
    /// The peer gateway instance of the session (its `gateway.name`).
    peer_instance: Option<String>,
    /// The peer's receive window, from its hello.
    peer_window: Window,

    next_seq: u64,
    acked_upto: u64,
    /// Highest seq handed to the current primary.
    sent_upto: u64,
    unacked: VecDeque<Pending>,
    unacked_bytes: usize,

    received_upto: u64,
    /// Handed to the local side.
    delivered_upto: u64,
    /// The local side is done with (e.g. taken by the Erlang node): what
    /// acks, and so confirmations, promise.
    done_upto: u64,
    ack_sent_upto: u64,
    ack_forced: bool,
    /// Deliveries the local side could not deliver, not yet told the peer.
    rejects_new: Vec<u64>,
    /// Rejects told the peer that it may not have processed yet.
    rejects_sent: VecDeque<u64>,
    /// The primary changed: tell `rejects_sent` again before the next ack.
    rejects_resend: bool,
    inbound: VecDeque<Bytes>,
    inbound_bytes: usize,
}

impl Route {
    /// `send_window` bounds what we keep unacknowledged; `recv_window` is
    /// what we let the peer have undelivered with us (told in our hello).
    pub fn new(our_epoch: Epoch, send_window: Window, recv_window: Window) -> Route {
        Route {
            our_epoch,
            send_window,
            recv_window,
            links: Vec::new(),
            peer_epoch: None,
            peer_instance: None,
            peer_window: send_window,
            next_seq: 1,
            acked_upto: 0,
            sent_upto: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            received_upto: 0,
            delivered_upto: 0,
            done_upto: 0,
            ack_sent_upto: 0,
            ack_forced: false,
            rejects_new: Vec::new(),
            rejects_sent: VecDeque::new(),
            rejects_resend: false,
            inbound: VecDeque::new(),
            inbound_bytes: 0,
        }
    }

    // ---- links ----

    pub fn primary(&self) -> Option<LinkId> {
        self.links.first().map(|l| l.0)
    }

    pub fn links(&self) -> impl Iterator<Item = LinkId> + '_ {
        self.links.iter().map(|l| l.0)
    }

    pub fn is_up(&self) -> bool {
        !self.links.is_empty()
    }

    pub fn peer_epoch(&self) -> Option<Epoch> {
        self.peer_epoch
    }

    /// This side's epoch for the current session (what our hellos carry).
    pub fn our_epoch(&self) -> Epoch {
        self.our_epoch
    }

    /// The peer instance of the current session.
    pub fn peer_instance(&self) -> Option<&str> {
        self.peer_instance.as_deref()
    }

    /// How a link to `instance`'s run `epoch` may join (see [`Admit`]).
    pub fn admit(&self, instance: &str, epoch: Epoch) -> Admit {
        match (&self.peer_instance, self.peer_epoch) {
            (None, None) => Admit::New,
            (_, Some(e)) if e == epoch => Admit::Same,
            (Some(i), _) if i == instance => Admit::Restarted,
            // An anonymous session (`link_up`) is the instance of whoever
            // comes: the single-instance rules.
            (None, Some(_)) => Admit::Restarted,
            _ if !self.links.is_empty() => Admit::OtherInstance,
            _ => Admit::Switch,
        }
    }

    /// Ends the session with the current instance (no link to it is up):
    /// what it was sent and never confirmed fails, what it never saw is
    /// renumbered for the next session, and this side takes `fresh_epoch`
    /// (see [`Admit`]).
    pub fn switch(&mut self, fresh_epoch: Epoch) -> LinkUp {
        let mut out = LinkUp { new_session: true, ..LinkUp::default() };
        out.stale = self.links.drain(..).map(|l| l.0).collect();
        self.restart_session(&mut out);
        self.our_epoch = fresh_epoch;
        self.peer_epoch = None;
        self.peer_instance = None;
        out
    }

    /// A link to the peer's run `peer_epoch`, of an instance not named (a
    /// peer cluster with one gateway): [`Route::link_up_from`].
    pub fn link_up(&mut self, link: LinkId, peer_epoch: Epoch, peer_window: Window) -> LinkUp {
        self.link_up_from(link, None, peer_epoch, peer_window)
    }

    /// A link to `instance`'s run `peer_epoch`, admitted (`admit` is not
    /// `OtherInstance` or `Switch`; `switch` first for the latter).
    pub fn link_up_from(
        &mut self,
        link: LinkId,
        instance: Option<&str>,
        peer_epoch: Epoch,
        peer_window: Window,
    ) -> LinkUp {
        debug_assert!(
            instance.is_none_or(|i| !matches!(self.admit(i, peer_epoch), Admit::OtherInstance | Admit::Switch)),
            "a link the route does not admit"
        );
        if let Some(i) = instance {
            if self.peer_instance.as_deref() != Some(i) {
                self.peer_instance = Some(i.to_string());
            }
        }
        let mut out = LinkUp::default();
        if self.peer_epoch != Some(peer_epoch) {
            out.new_session = true;
            if self.peer_epoch.is_some() {
                out.stale = self.links.drain(..).map(|l| l.0).collect();
                self.restart_session(&mut out);
            }
            self.peer_epoch = Some(peer_epoch);
        }
        self.peer_window = peer_window;
        if self.links.is_empty() {
            out.primary = true;
            self.sent_upto = self.acked_upto;
            self.ack_forced = true;
            self.rejects_resend = true;
        }
        self.links.push((link, peer_epoch));
        out
    }

    /// The peer restarted: fail what its previous run was sent, renumber
    /// what it never saw, and forget what it sent us.
    fn restart_session(&mut self, out: &mut LinkUp) {
        while self.unacked.front().is_some_and(|p| p.first_sent.is_some()) {
            let Some(p) = self.unacked.pop_front() else { break };
            self.unacked_bytes -= p.payload.len();
            out.failed_count += 1;
            if let Some(token) = p.token {
                out.failed.push(Confirmation { token, outcome: Outcome::Failed(FailReason::PeerRestarted) });
            }
        }
        let mut seq = 0;
        for p in self.unacked.iter_mut() {
            seq += 1;
            p.seq = seq;
        }
        self.next_seq = seq + 1;
        self.acked_upto = 0;
        self.sent_upto = 0;
        self.received_upto = 0;
        self.delivered_upto = 0;
        self.done_upto = 0;
        self.ack_sent_upto = 0;
        self.ack_forced = false;
        self.rejects_new.clear();
        self.rejects_sent.clear();
        self.inbound.clear();
        self.inbound_bytes = 0;
    }

    pub fn link_down(&mut self, link: LinkId) -> LinkDown {
        let Some(pos) = self.links.iter().position(|l| l.0 == link) else { return LinkDown::default() };
        self.links.remove(pos);
        let mut out = LinkDown { was_primary: pos == 0, ..Default::default() };
        if pos == 0 {
            // Whatever the dead primary carried may be lost: send it all again.
            self.sent_upto = self.acked_upto;
            self.ack_forced = true;
            self.rejects_resend = true;
            out.promoted = self.primary();
        }
        out.route_down = self.links.is_empty();
        out
    }

    // ---- sending ----

    fn window(&self) -> Window {
        self.send_window.min(self.peer_window)
    }

    /// Whether one more message may be accepted. The byte limit is checked
    /// before a message is taken, so it may be exceeded by one message; a
    /// message larger than the whole window still goes, alone.
    pub fn has_room(&self) -> bool {
        let w = self.window();
        self.unacked.is_empty() || (self.unacked.len() < w.messages && self.unacked_bytes < w.bytes)
    }

    /// Accepts a message for the peer; returns its sequence number.
    pub fn submit(&mut self, payload: Bytes, token: Option<Token>) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked_bytes += payload.len();
        self.unacked.push_back(Pending { seq, payload, token, first_sent: None, undeliverable: false });
        Seq(seq)
    }

    /// The next message to hand to the primary, if any.
    pub fn next_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let link = self.primary()?;
        let index = (self.sent_upto - self.acked_upto) as usize;
        let p = self.unacked.get_mut(index)?;
        debug_assert_eq!(p.seq, self.sent_upto + 1);
        self.sent_upto = p.seq;
        let retransmit = p.first_sent.is_some();
        p.first_sent.get_or_insert(now);
        Some(Transmit { link, epoch: self.our_epoch, seq: Seq(p.seq), payload: p.payload.clone(), retransmit })
    }

    pub fn wants_transmit(&self) -> bool {
        self.primary().is_some() && ((self.sent_upto - self.acked_upto) as usize) < self.unacked.len()
    }

    /// A cumulative ack from the peer, for our epoch.
    pub fn on_ack(&mut self, epoch: Epoch, Seq(upto): Seq, now: Instant) -> Result<Acked, Violation> {
        let mut out = Acked::default();
        if epoch != self.our_epoch || upto <= self.acked_upto {
            return Ok(out); // for a previous run of ours, or old news
        }
        let ever_sent = self.unacked.iter().rev().find(|p| p.first_sent.is_some()).map_or(self.acked_upto, |p| p.seq);
        if upto > ever_sent {
            return Err(Violation::AckBeyondSent { upto, sent: ever_sent });
        }
        while self.unacked.front().is_some_and(|p| p.seq <= upto) {
            let Some(p) = self.unacked.pop_front() else { break };
            self.unacked_bytes -= p.payload.len();
            let outcome = if p.undeliverable {
                out.undeliverable += 1;
                Outcome::Failed(FailReason::Undeliverable)
            } else {
                out.messages += 1;
                Outcome::Delivered
            };
            if let Some(t) = p.first_sent {
                out.latencies.push(now.saturating_duration_since(t));
            }
            if let Some(token) = p.token {
                out.confirmations.push(Confirmation { token, outcome });
            }
        }
        self.acked_upto = upto;
        self.sent_upto = self.sent_upto.max(upto);
        Ok(out)
    }

    /// The peer could not deliver these messages of our session `epoch`;
    /// they are reported failed when acked. Each must have been sent; ones
    /// already acked are old news (the peer repeats its rejects after a
    /// failover, in case the link that carried them died).
    pub fn on_reject(&mut self, epoch: Epoch, seqs: &[Seq]) -> Result<usize, Violation> {
        if epoch != self.our_epoch {
            return Ok(0);
        }
        let mut n = 0;
        for &Seq(seq) in seqs {
            if seq <= self.acked_upto {
                continue;
            }
            let i = seq - self.acked_upto - 1;
            match self.unacked.get_mut(i as usize) {
                Some(p) if p.seq == seq && p.first_sent.is_some() => {
                    n += usize::from(!p.undeliverable);
                    p.undeliverable = true;
                }
                _ => return Err(Violation::BadReject { seq }),
            }
        }
        Ok(n)
    }

    /// Fails everything still held (gateway shutting down).
    pub fn fail_all(&mut self, reason: FailReason) -> (usize, Vec<Confirmation>) {
        let n = self.unacked.len();
        let confirmations = self
            .unacked
            .drain(..)
            .filter_map(|p| p.token.map(|token| Confirmation { token, outcome: Outcome::Failed(reason) }))
            .collect();
        self.unacked_bytes = 0;
        self.sent_upto = self.acked_upto;
        (n, confirmations)
    }

    pub fn unacked(&self) -> (usize, usize) {
        (self.unacked.len(), self.unacked_bytes)
    }

    // ---- receiving ----

    pub fn on_data(&mut self, link: LinkId, Seq(seq): Seq, payload: Bytes) -> Result<DataVerdict, Violation> {
        let current = self.links.iter().any(|l| l.0 == link && Some(l.1) == self.peer_epoch);
        if !current {
            return Ok(DataVerdict::Stale);
        }
        if seq <= self.received_upto {
            // The sender resent what we have: our ack may have been lost.
            self.ack_forced = true;
            return Ok(DataVerdict::Duplicate);
        }
        if seq != self.received_upto + 1 {
            return Err(Violation::Gap { expected: self.received_upto + 1, got: seq });
        }
        let w = self.recv_window;
        if !self.inbound.is_empty()
            && (self.inbound.len() >= w.messages || self.inbound_bytes + payload.len() > w.bytes)
        {
            return Err(Violation::Overflow(w));
        }
        self.received_upto = seq;
        self.inbound_bytes += payload.len();
        self.inbound.push_back(payload);
        Ok(DataVerdict::Accepted)
    }

    pub fn has_delivery(&self) -> bool {
        !self.inbound.is_empty()
    }

    /// Takes the next message for the local cluster, with its delivery
    /// number in this session (1, 2, ...): report it to `local_done` once
    /// the local side has finished with it.
    pub fn next_delivery(&mut self) -> Option<(Seq, Bytes)> {
        let p = self.inbound.pop_front()?;
        self.inbound_bytes -= p.len();
        self.delivered_upto += 1;
        Some((Seq(self.delivered_upto), p))
    }

    /// The local side is done with every delivery up to `upto` (of this
    /// session): they may be acked. A message the gateway holds but has
    /// not finished with is never acked, so a crash cannot lose a message
    /// its sender was told was delivered.
    pub fn local_done(&mut self, Seq(upto): Seq) {
        self.done_upto = self.done_upto.max(upto.min(self.delivered_upto));
    }

    /// The ack to send, if one is due: (our view of the peer's epoch, upto).
    pub fn pending_ack(&self) -> Option<(Epoch, Seq)> {
        let epoch = self.peer_epoch?;
        let due = self.done_upto > self.ack_sent_upto || (self.ack_forced && self.done_upto > 0);
        due.then_some((epoch, Seq(self.done_upto)))
    }

    pub fn ack_sent(&mut self, Seq(upto): Seq) {
        self.ack_sent_upto = self.ack_sent_upto.max(upto);
        self.ack_forced = false;
    }

    /// The local side could not deliver these deliveries (numbers as
    /// `next_delivery` gave them, which are the peer's seqs).
    pub fn local_undeliverable(&mut self, seqs: impl IntoIterator<Item = Seq>) {
        self.rejects_new.extend(seqs.into_iter().map(|s| s.0));
    }

    /// The rejects to send before an ack for `upto`: the new ones it
    /// covers, and after a change of primary every one the peer may not
    /// have processed (the link that carried them may have died with them).
    /// A reject is forgotten once we received a seq a whole receive window
    /// past it: the peer sent that only after processing an ack beyond it,
    /// and rejects travel ahead of acks.
    pub fn take_rejects(&mut self, Seq(upto): Seq) -> Vec<Seq> {
        let (now, later): (Vec<u64>, Vec<u64>) = self.rejects_new.drain(..).partition(|s| *s <= upto);
        self.rejects_new = later;
        let mut say = Vec::new();
        if std::mem::take(&mut self.rejects_resend) {
            say.extend(self.rejects_sent.iter().copied());
        }
        say.extend(&now);
        self.rejects_sent.extend(now);
        let horizon = self.received_upto.saturating_sub(self.recv_window.messages as u64);
        while self.rejects_sent.front().is_some_and(|s| *s <= horizon) {
            self.rejects_sent.pop_front();
        }
        say.into_iter().map(Seq).collect()
    }

    pub fn undelivered(&self) -> (usize, usize) {
        (self.inbound.len(), self.inbound_bytes)
    }

    /// Grows with every message submitted or received (within a session):
    /// unchanged over a while means no traffic either way meanwhile.
    pub fn activity(&self) -> u64 {
        self.next_seq.wrapping_add(self.received_upto)
    }

    /// Nothing of ours unacknowledged, and everything received delivered
    /// by the local side and acknowledged to the peer.
    pub fn settled(&self) -> bool {
        self.unacked.is_empty()
            && self.inbound.is_empty()
            && self.done_upto == self.received_upto
            && self.ack_sent_upto == self.done_upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Window = Window { messages: 4, bytes: 1000 };
    const OURS: Epoch = Epoch(100);
    const PEER: Epoch = Epoch(200);

    fn msg(n: u8) -> Bytes {
        Bytes::from(vec![n; 10])
    }

    fn route() -> Route {
        Route::new(OURS, W, W)
    }

    #[test]
    fn one_instance_of_the_peer_cluster_at_a_time() {
        let mut r = route();
        let now = Instant::now();
        assert_eq!(r.admit("gw-a", PEER), Admit::New);
        r.link_up_from(LinkId(1), Some("gw-a"), PEER, W);
        assert_eq!(r.admit("gw-a", PEER), Admit::Same);
        // A second instance while the first has a link: refused.
        assert_eq!(r.admit("gw-b", Epoch(PEER.0 + 1)), Admit::OtherInstance);
        // The first instance under a new epoch restarted: admitted.
        assert_eq!(r.admit("gw-a", Epoch(PEER.0 + 2)), Admit::Restarted);

        // gw-a's links are gone (dead, or stopped): gw-b takes over after a
        // switch, which fails what gw-a was sent and renumbers the rest.
        r.submit(msg(1), Some(Token(1)));
        r.submit(msg(2), Some(Token(2)));
        assert_eq!(drain(&mut r, now).len(), 2);
        r.submit(msg(3), Some(Token(3)));
        r.link_down(LinkId(1));
        assert_eq!(r.admit("gw-b", Epoch(PEER.0 + 1)), Admit::Switch);
        let sw = r.switch(Epoch(OURS.0 + 1));
        assert_eq!(sw.failed_count, 2);
        assert_eq!(sw.failed.iter().map(|c| c.token.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(r.our_epoch(), Epoch(OURS.0 + 1), "a fresh epoch for the new session");
        assert_eq!(r.admit("gw-b", Epoch(PEER.0 + 1)), Admit::New);
        assert!(r.link_up_from(LinkId(2), Some("gw-b"), Epoch(PEER.0 + 1), W).primary);
        assert_eq!(r.peer_instance(), Some("gw-b"));
        let t = r.next_transmit(now).unwrap();
        assert_eq!(
            (t.epoch, t.seq, t.payload),
            (Epoch(OURS.0 + 1), Seq(1), msg(3)),
            "the unsent message, first of the new session"
        );
        // gw-a is back (same run): gw-b holds the route.
        assert_eq!(r.admit("gw-a", PEER), Admit::OtherInstance);
    }

    #[test]
    fn a_peer_without_instance_names_keeps_the_single_instance_rules() {
        let mut r = route();
        r.link_up(LinkId(1), PEER, W);
        assert_eq!(r.admit("anyone", PEER), Admit::Same);
        assert_eq!(r.admit("anyone", Epoch(PEER.0 + 1)), Admit::Restarted);
    }

    /// (link number, seq, retransmit) of everything due.
    fn drain(r: &mut Route, now: Instant) -> Vec<(u64, u64, bool)> {
        std::iter::from_fn(|| r.next_transmit(now)).map(|t| (t.link.0, t.seq.0, t.retransmit)).collect()
    }

    /// Two routes wired back to back, as the two gateways would be.
    struct Pair {
        a: Route,
        b: Route,
        delivered_at_b: Vec<Bytes>,
    }

    impl Pair {
        fn new() -> Pair {
            let mut a = Route::new(Epoch(1), W, W);
            let mut b = Route::new(Epoch(2), W, W);
            a.link_up(LinkId(10), Epoch(2), W);
            b.link_up(LinkId(10), Epoch(1), W);
            Pair { a, b, delivered_at_b: Vec::new() }
        }
        /// Moves frames a -> b on the link, delivers at b, and returns b's ack.
        fn pump(&mut self, lose_data: bool, lose_ack: bool) {
            let now = Instant::now();
            while let Some(t) = self.a.next_transmit(now) {
                if !lose_data {
                    let link = self.b.primary().unwrap();
                    let _ = self.b.on_data(link, t.seq, t.payload).unwrap();
                }
            }
            while let Some((n, m)) = self.b.next_delivery() {
                self.b.local_done(n);
                self.delivered_at_b.push(m);
            }
            if let Some((epoch, upto)) = self.b.pending_ack() {
                self.b.ack_sent(upto);
                if !lose_ack {
                    self.a.on_ack(epoch, upto, now).unwrap();
                }
            }
        }
    }

    #[test]
    fn messages_flow_in_order_and_are_confirmed() {
        let mut r = route();
        let now = Instant::now();
        assert!(r.link_up(LinkId(1), PEER, W).primary);
        for i in 0..3 {
            assert_eq!(r.submit(msg(i), Some(Token(i as u64))), Seq(i as u64 + 1));
        }
        assert_eq!(drain(&mut r, now), vec![(1, 1, false), (1, 2, false), (1, 3, false)]);
        let acked = r.on_ack(OURS, Seq(2), now).unwrap();
        assert_eq!(acked.messages, 2);
        assert_eq!(acked.confirmations.iter().map(|c| c.token.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!(acked.confirmations.iter().all(|c| c.outcome == Outcome::Delivered));
        assert_eq!(r.unacked(), (1, 10));
    }

    #[test]
    fn messages_the_peer_rejects_are_reported_failed_when_acked() {
        let mut r = route();
        let now = Instant::now();
        r.link_up(LinkId(1), PEER, W);
        for i in 0..4 {
            r.submit(msg(i), Some(Token(i as u64)));
        }
        drain(&mut r, now);
        assert_eq!(r.on_reject(OURS, &[Seq(2), Seq(3)]), Ok(2));
        assert_eq!(r.on_reject(Epoch(OURS.0 + 1), &[Seq(1)]), Ok(0), "another run of ours: ignored");
        let acked = r.on_ack(OURS, Seq(3), now).unwrap();
        assert_eq!((acked.messages, acked.undeliverable), (1, 2));
        let outcomes: Vec<_> = acked.confirmations.iter().map(|c| (c.token.0, c.outcome.clone())).collect();
        let failed = Outcome::Failed(FailReason::Undeliverable);
        assert_eq!(outcomes, vec![(0, Outcome::Delivered), (1, failed.clone()), (2, failed)]);
        // Acked already: old news (repeated after a failover). Never sent: a violation.
        assert_eq!(r.on_reject(OURS, &[Seq(2), Seq(3)]), Ok(0));
        assert_eq!(r.on_reject(OURS, &[Seq(9)]), Err(Violation::BadReject { seq: 9 }));
        r.submit(msg(5), None);
        assert_eq!(r.on_reject(OURS, &[Seq(5)]), Err(Violation::BadReject { seq: 5 }), "not sent yet");
    }

    #[test]
    fn the_window_limits_messages_and_bytes() {
        let mut r = route();
        r.link_up(LinkId(1), PEER, W);
        for i in 0..4 {
            assert!(r.has_room());
            r.submit(msg(i), None);
        }
        assert!(!r.has_room(), "4 messages fill a 4-message window");
        r.on_ack(OURS, Seq(0), Instant::now()).unwrap();
        assert!(!r.has_room());
        drain(&mut r, Instant::now());
        r.on_ack(OURS, Seq(1), Instant::now()).unwrap();
        assert!(r.has_room());

        let mut r = route();
        r.submit(Bytes::from(vec![0u8; 999]), None);
        assert!(r.has_room(), "999 < 1000 bytes");
        r.submit(Bytes::from(vec![0u8; 5]), None);
        assert!(!r.has_room());
        // A message larger than the whole window goes alone.
        let mut r = route();
        r.submit(Bytes::from(vec![0u8; 5000]), None);
        assert!(!r.has_room());
    }

    #[test]
    fn the_peers_receive_window_caps_ours() {
        let mut r = Route::new(OURS, Window { messages: 100, bytes: 1 << 20 }, W);
        r.link_up(LinkId(1), PEER, Window { messages: 2, bytes: 1 << 20 });
        r.submit(msg(1), None);
        r.submit(msg(2), None);
        assert!(!r.has_room());
    }

    #[test]
    fn failover_resends_everything_unacked_on_the_promoted_link() {
        let mut r = route();
        let now = Instant::now();
        r.link_up(LinkId(1), PEER, W);
        assert!(!r.link_up(LinkId(2), PEER, W).primary, "second link is a standby");
        for i in 0..4 {
            r.submit(msg(i), None);
        }
        assert_eq!(drain(&mut r, now).len(), 4);
        r.on_ack(OURS, Seq(1), now).unwrap();
        let down = r.link_down(LinkId(1));
        assert_eq!(down, LinkDown { was_primary: true, promoted: Some(LinkId(2)), route_down: false });
        assert_eq!(drain(&mut r, now), vec![(2, 2, true), (2, 3, true), (2, 4, true)]);
        // Losing a standby changes nothing.
        assert!(!r.link_up(LinkId(3), PEER, W).new_session);
        assert_eq!(r.link_down(LinkId(3)), LinkDown { was_primary: false, promoted: None, route_down: false });
        assert!(drain(&mut r, now).is_empty());
    }

    #[test]
    fn all_links_down_then_back_resends_on_the_new_link() {
        let mut r = route();
        let now = Instant::now();
        r.link_up(LinkId(1), PEER, W);
        r.submit(msg(1), None);
        drain(&mut r, now);
        assert!(r.link_down(LinkId(1)).route_down);
        assert!(!r.is_up());
        assert!(r.next_transmit(now).is_none(), "nothing goes out with no link");
        r.submit(msg(2), None); // accepted while down
        let up = r.link_up(LinkId(2), PEER, W);
        assert!(up.primary && !up.new_session && up.failed.is_empty());
        assert_eq!(drain(&mut r, now), vec![(2, 1, true), (2, 2, false)]);
    }

    #[test]
    fn a_peer_restart_fails_what_it_was_sent_and_renumbers_the_rest() {
        let mut r = route();
        let now = Instant::now();
        assert!(r.link_up(LinkId(1), PEER, W).new_session);
        r.submit(msg(1), Some(Token(11)));
        r.submit(msg(2), Some(Token(12)));
        r.submit(msg(3), None);
        drain(&mut r, now);
        r.on_ack(OURS, Seq(1), now).unwrap();
        r.link_down(LinkId(1));
        r.submit(msg(4), Some(Token(14))); // never sent to the old run
        let up = r.link_up(LinkId(2), Epoch(PEER.0 + 1), W);
        assert!(up.new_session && up.primary);
        assert_eq!(up.failed_count, 2);
        assert_eq!(
            up.failed,
            vec![Confirmation { token: Token(12), outcome: Outcome::Failed(FailReason::PeerRestarted) }]
        );
        // The unsent message is message 1 of the new session.
        assert_eq!(drain(&mut r, now), vec![(2, 1, false)]);
        let acked = r.on_ack(OURS, Seq(1), now).unwrap();
        assert_eq!(acked.confirmations, vec![Confirmation { token: Token(14), outcome: Outcome::Delivered }]);
    }

    #[test]
    fn a_link_to_a_new_peer_run_makes_old_links_stale() {
        let mut r = route();
        r.link_up(LinkId(1), PEER, W);
        r.link_up(LinkId(2), PEER, W);
        let up = r.link_up(LinkId(3), Epoch(PEER.0 + 1), W);
        assert_eq!(up.stale, vec![LinkId(1), LinkId(2)]);
        assert_eq!(r.links().collect::<Vec<_>>(), vec![LinkId(3)]);
        // Data still arriving on a stale link is ignored.
        assert_eq!(r.on_data(LinkId(1), Seq(1), msg(1)).unwrap(), DataVerdict::Stale);
        assert_eq!(r.on_data(LinkId(3), Seq(1), msg(1)).unwrap(), DataVerdict::Accepted);
    }

    #[test]
    fn receiving_dedups_rejects_gaps_and_acks_cumulatively() {
        let mut r = route();
        r.link_up(LinkId(1), PEER, W);
        r.link_up(LinkId(2), PEER, W);
        assert_eq!(r.on_data(LinkId(1), Seq(1), msg(1)).unwrap(), DataVerdict::Accepted);
        assert_eq!(r.on_data(LinkId(1), Seq(2), msg(2)).unwrap(), DataVerdict::Accepted);
        assert_eq!(r.pending_ack(), None, "acks only what the local side is done with");
        assert_eq!(r.next_delivery(), Some((Seq(1), msg(1))));
        assert_eq!(r.pending_ack(), None, "handed over, not yet done");
        r.local_done(Seq(1));
        assert_eq!(r.pending_ack(), Some((PEER, Seq(1))));
        assert_eq!(r.next_delivery(), Some((Seq(2), msg(2))));
        r.local_done(Seq(7));
        assert_eq!(r.pending_ack(), Some((PEER, Seq(2))), "never beyond what was handed over");
        r.ack_sent(Seq(2));
        assert_eq!(r.pending_ack(), None);
        // The sender failed over and resends 1..2 on the other link.
        assert_eq!(r.on_data(LinkId(2), Seq(1), msg(1)).unwrap(), DataVerdict::Duplicate);
        assert_eq!(r.pending_ack(), Some((PEER, Seq(2))), "a duplicate means our ack was lost: ack again");
        r.ack_sent(Seq(2));
        assert_eq!(r.on_data(LinkId(2), Seq(2), msg(2)).unwrap(), DataVerdict::Duplicate);
        assert_eq!(r.on_data(LinkId(2), Seq(4), msg(4)), Err(Violation::Gap { expected: 3, got: 4 }));
        assert_eq!(r.on_data(LinkId(2), Seq(3), msg(3)).unwrap(), DataVerdict::Accepted);
        assert_eq!(r.undelivered(), (1, 10));
    }

    #[test]
    fn the_receive_window_is_enforced() {
        let mut r = route();
        r.link_up(LinkId(1), PEER, W);
        for seq in 1..=4 {
            r.on_data(LinkId(1), Seq(seq), msg(0)).unwrap();
        }
        assert_eq!(r.on_data(LinkId(1), Seq(5), msg(0)), Err(Violation::Overflow(W)));
        r.next_delivery();
        assert_eq!(r.on_data(LinkId(1), Seq(5), msg(0)).unwrap(), DataVerdict::Accepted);
    }

    #[test]
    fn acks_for_other_epochs_or_unsent_messages() {
        let mut r = route();
        let now = Instant::now();
        r.link_up(LinkId(1), PEER, W);
        r.submit(msg(1), Some(Token(1)));
        r.submit(msg(2), Some(Token(2)));
        assert_eq!(r.on_ack(OURS, Seq(1), now), Err(Violation::AckBeyondSent { upto: 1, sent: 0 }));
        r.next_transmit(now);
        assert_eq!(
            r.on_ack(Epoch(OURS.0 + 1), Seq(1), now).unwrap(),
            Acked::default(),
            "an ack for a previous run of ours"
        );
        assert_eq!(r.on_ack(OURS, Seq(2), now), Err(Violation::AckBeyondSent { upto: 2, sent: 1 }));
        assert_eq!(r.on_ack(OURS, Seq(1), now).unwrap().messages, 1);
        assert_eq!(r.on_ack(OURS, Seq(1), now).unwrap(), Acked::default(), "repeated acks are harmless");
    }

    #[test]
    fn an_ack_during_retransmission_skips_what_it_covers() {
        let mut r = route();
        let now = Instant::now();
        r.link_up(LinkId(1), PEER, W);
        r.link_up(LinkId(2), PEER, W);
        for i in 0..4 {
            r.submit(msg(i), None);
        }
        drain(&mut r, now);
        r.link_down(LinkId(1));
        assert_eq!(r.next_transmit(now).map(|t| t.seq.0), Some(1));
        // A late ack (from before the failover) arrives mid-resend.
        r.on_ack(OURS, Seq(3), now).unwrap();
        assert_eq!(drain(&mut r, now), vec![(2, 4, true)]);
    }

    #[test]
    fn shutdown_fails_everything_held() {
        let mut r = route();
        r.submit(msg(1), Some(Token(7)));
        r.submit(msg(2), None);
        let (n, c) = r.fail_all(FailReason::Shutdown);
        assert_eq!(n, 2);
        assert_eq!(c, vec![Confirmation { token: Token(7), outcome: Outcome::Failed(FailReason::Shutdown) }]);
        assert_eq!(r.unacked(), (0, 0));
    }

    /// Exactly once, in order, whatever is lost, across repeated failovers.
    #[test]
    fn exactly_once_in_order_under_loss_and_failover() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _round in 0..200 {
            let mut p = Pair::new();
            let mut next_link = 11;
            let mut sent = 0u8;
            for _step in 0..60 {
                if sent < 200 && p.a.has_room() {
                    p.a.submit(msg(sent), Some(Token(sent as u64)));
                    sent += 1;
                }
                // TCP loses nothing on a live link: loss only comes with the
                // link's death, which both sides then see.
                let fails = match rng.u8(0..10) {
                    0 => true,
                    1 => {
                        p.pump(true, false);
                        true
                    }
                    2 => {
                        p.pump(false, true);
                        true
                    }
                    _ => {
                        p.pump(false, false);
                        false
                    }
                };
                if fails {
                    let old = p.a.primary().unwrap();
                    p.a.link_down(old);
                    p.b.link_down(old);
                    p.a.link_up(LinkId(next_link), Epoch(2), W);
                    p.b.link_up(LinkId(next_link), Epoch(1), W);
                    next_link += 1;
                }
            }
            for _ in 0..10 {
                p.pump(false, false);
            }
            let want: Vec<Bytes> = (0..sent).map(msg).collect();
            assert_eq!(p.delivered_at_b, want);
            assert_eq!(p.a.unacked(), (0, 0));
        }
    }
}
