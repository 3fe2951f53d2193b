//! Property tests (proptest): the route state machine between a sender and
//! two instances of the receiving cluster under arbitrary interleavings of
//! submits, transmits, losses, failovers, receiver restarts and the
//! sender's route moving between the instances; and the Erlang term translator
//! (translate there and back is the identity, arbitrary bytes never panic).

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use wandist::erlang::etf::{self, Kind, Pid, PidView, Ref, RefView, Refusal, Source, Term, Translator};
use wandist::route::{Admit, DataVerdict, Epoch, FailReason, LinkId, Outcome, Route, Seq, Token, Window};

// ---------------------------------------------------------------- route

#[derive(Debug, Clone)]
enum Op {
    Submit(u8),
    Transmit(u8),
    /// Carry up to n data frames on link i (modulo the links up).
    CarryData(u8, u8),
    /// Receiver instance i hands up to n messages to its local side...
    Consume(u8, u8),
    /// ...which finishes with up to n of them (writes them to the Erlang
    /// node; with `true`, cannot deliver them); the receiver sends its
    /// rejects and acks what is finished.
    Finish(u8, u8, bool),
    CarryAcks(u8, u8),
    LinkDown(u8),
    /// A link to receiver instance i (modulo the instances), if both
    /// sides admit it.
    LinkUp(u8),
    /// Receiver instance i's gateway process is replaced by a new run.
    ReceiverRestart(u8),
}

/// Instances of the receiving cluster, each its own gateway (HA).
const INSTANCES: usize = 2;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..20).prop_map(Op::Submit),
        4 => (1u8..20).prop_map(Op::Transmit),
        4 => (any::<u8>(), 1u8..20).prop_map(|(i, n)| Op::CarryData(i, n)),
        4 => (any::<u8>(), 1u8..20).prop_map(|(i, n)| Op::Consume(i, n)),
        4 => (any::<u8>(), 1u8..20).prop_map(|(i, n)| Op::Finish(i, n, false)),
        1 => (any::<u8>(), 1u8..4).prop_map(|(i, n)| Op::Finish(i, n, true)),
        3 => (any::<u8>(), 1u8..5).prop_map(|(i, n)| Op::CarryAcks(i, n)),
        1 => any::<u8>().prop_map(Op::LinkDown),
        2 => any::<u8>().prop_map(Op::LinkUp),
        1 => any::<u8>().prop_map(Op::ReceiverRestart),
    ]
}

enum Back {
    Ack(Epoch, Seq),
    Reject(Epoch, Vec<Seq>),
}

struct Link {
    id: LinkId,
    /// The receiver instance at its far end.
    to: usize,
    data: VecDeque<(Seq, Bytes)>,
    /// Receiver to sender, in order.
    acks: VecDeque<Back>,
}

/// One instance of the receiving cluster.
struct Receiver {
    name: String,
    route: Route,
    epoch: Epoch,
    /// Handed to its local side, not finished: (delivery number, token).
    handed: VecDeque<(Seq, u64)>,
    /// The last token it delivered in this run (order within a session).
    last: Option<u64>,
}

struct World {
    now: Instant,
    a: Route,
    bs: Vec<Receiver>,
    next_epoch: u64,
    links: Vec<Link>,
    next_link: LinkId,
    submitted: u64,
    /// Tokens delivered (finished by a receiver's local side), across
    /// instances and runs: at most once, whatever happens.
    delivered: Vec<u64>,
    delivered_set: BTreeSet<u64>,
    confirmed: BTreeSet<u64>,
    failed: BTreeSet<u64>,
    /// Finished by a receiver's local side as undeliverable.
    undeliverable: BTreeSet<u64>,
    /// The sender's session changed peers (or the peer's run changed).
    sessions: usize,
}

const A_EPOCH: Epoch = Epoch(1);
const W: Window = Window { messages: 16, bytes: 1 << 20 };

impl World {
    fn new() -> World {
        let bs = (0..INSTANCES)
            .map(|i| Receiver {
                name: format!("gw-b{i}"),
                route: Route::new(Epoch(1000 + i as u64), W, W),
                epoch: Epoch(1000 + i as u64),
                handed: VecDeque::new(),
                last: None,
            })
            .collect();
        World {
            now: Instant::now(),
            a: Route::new(A_EPOCH, W, W),
            bs,
            next_epoch: 2000,
            links: Vec::new(),
            next_link: LinkId(1),
            submitted: 0,
            delivered: Vec::new(),
            delivered_set: BTreeSet::new(),
            confirmed: BTreeSet::new(),
            failed: BTreeSet::new(),
            undeliverable: BTreeSet::new(),
            sessions: 0,
        }
    }

    fn fresh_epoch(&mut self) -> Epoch {
        self.next_epoch += 1;
        Epoch(self.next_epoch)
    }

    fn fail(&mut self, failed: Vec<wandist::route::Confirmation>) {
        for c in failed {
            assert_eq!(c.outcome, Outcome::Failed(FailReason::PeerRestarted));
            assert!(self.failed.insert(c.token.0), "token {} failed twice", c.token.0);
        }
    }

    /// A link from the sender to receiver instance `to`, as the gateways
    /// admit it: another instance while the route holds links to its
    /// current one is refused; a switch takes a fresh epoch first.
    fn link_up(&mut self, to: usize) {
        let (name, b_epoch) = (self.bs[to].name.clone(), self.bs[to].epoch);
        match self.a.admit(&name, b_epoch) {
            Admit::OtherInstance => return,
            Admit::Switch => {
                let fresh = self.fresh_epoch();
                let sw = self.a.switch(fresh);
                assert!(sw.stale.is_empty(), "a switch with links up");
                self.fail(sw.failed);
            }
            Admit::New | Admit::Same | Admit::Restarted => {}
        }
        let a_epoch = self.a.our_epoch();
        let b = &mut self.bs[to].route;
        assert!(!matches!(b.admit("gw-a", a_epoch), Admit::OtherInstance | Admit::Switch), "one sender instance");
        let id = self.next_link;
        self.next_link.0 += 1;
        let up = self.a.link_up_from(id, Some(&name), b_epoch, W);
        if up.new_session {
            self.sessions += 1;
        }
        self.fail(up.failed);
        for stale in up.stale {
            self.links.retain(|l| l.id != stale);
        }
        let up = self.bs[to].route.link_up_from(id, Some("gw-a"), a_epoch, W);
        if up.new_session {
            // A new session from the sender: order restarts with it, and
            // what the old one handed over is no longer its to finish (the
            // gateway's `Finished` ignores another session's deliveries).
            self.bs[to].last = None;
            self.bs[to].handed.clear();
        }
        for stale in up.stale {
            self.links.retain(|l| l.id != stale);
            self.a.link_down(stale);
        }
        self.links.push(Link { id, to, data: VecDeque::new(), acks: VecDeque::new() });
    }

    fn pick(&self, i: u8) -> Option<usize> {
        (!self.links.is_empty()).then(|| i as usize % self.links.len())
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Submit(n) => {
                for _ in 0..n {
                    if !self.a.has_room() {
                        break;
                    }
                    let token = self.submitted;
                    self.submitted += 1;
                    self.a.submit(Bytes::copy_from_slice(&token.to_be_bytes()), Some(Token(token)));
                }
            }
            Op::Transmit(n) => {
                for _ in 0..n {
                    let Some(t) = self.a.next_transmit(self.now) else { break };
                    let link = self.links.iter_mut().find(|l| l.id == t.link).expect("transmit on a link that is up");
                    link.data.push_back((t.seq, t.payload));
                }
            }
            Op::CarryData(i, n) => {
                let Some(i) = self.pick(i) else { return };
                for _ in 0..n {
                    let Some((seq, payload)) = self.links[i].data.pop_front() else { break };
                    let (id, to) = (self.links[i].id, self.links[i].to);
                    match self.bs[to].route.on_data(id, seq, payload) {
                        Ok(DataVerdict::Accepted | DataVerdict::Duplicate | DataVerdict::Stale) => {}
                        Err(v) => panic!("protocol violation: {v}"),
                    }
                }
            }
            Op::Consume(b, n) => {
                let r = &mut self.bs[b as usize % INSTANCES];
                for _ in 0..n {
                    let Some((seq, p)) = r.route.next_delivery() else { break };
                    r.handed.push_back((seq, u64::from_be_bytes(p[..].try_into().unwrap())));
                }
            }
            Op::Finish(b, n, undeliverable) => {
                let to = b as usize % INSTANCES;
                for _ in 0..n {
                    let r = &mut self.bs[to];
                    let Some((seq, token)) = r.handed.pop_front() else { break };
                    assert!(self.delivered_set.insert(token), "token {token} delivered twice");
                    if let Some(last) = r.last {
                        assert!(token > last, "token {token} after {last}: out of order");
                    }
                    r.last = Some(token);
                    self.delivered.push(token);
                    if undeliverable {
                        self.undeliverable.insert(token);
                        r.route.local_undeliverable([seq]);
                    }
                    r.route.local_done(seq);
                }
                let r = &mut self.bs[to].route;
                if let (Some((epoch, upto)), Some(link)) = (r.pending_ack(), self.links.iter_mut().find(|l| l.to == to))
                {
                    let rejects = r.take_rejects(upto);
                    if !rejects.is_empty() {
                        link.acks.push_back(Back::Reject(epoch, rejects));
                    }
                    link.acks.push_back(Back::Ack(epoch, upto));
                    r.ack_sent(upto);
                }
            }
            Op::CarryAcks(i, n) => {
                let Some(i) = self.pick(i) else { return };
                for _ in 0..n {
                    let (epoch, upto) = match self.links[i].acks.pop_front() {
                        None => break,
                        Some(Back::Reject(epoch, seqs)) => {
                            self.a.on_reject(epoch, &seqs).expect("reject violation");
                            continue;
                        }
                        Some(Back::Ack(epoch, upto)) => (epoch, upto),
                    };
                    let acked = self.a.on_ack(epoch, upto, self.now).expect("ack violation");
                    for c in acked.confirmations {
                        match c.outcome {
                            Outcome::Delivered => {
                                assert!(
                                    self.delivered_set.contains(&c.token.0),
                                    "token {} confirmed, never delivered",
                                    c.token.0
                                );
                                assert!(
                                    !self.undeliverable.contains(&c.token.0),
                                    "token {} undeliverable, confirmed delivered",
                                    c.token.0
                                );
                                assert!(self.confirmed.insert(c.token.0), "token {} confirmed twice", c.token.0);
                            }
                            Outcome::Failed(FailReason::Undeliverable) => {
                                assert!(
                                    self.undeliverable.contains(&c.token.0),
                                    "token {} reported undeliverable",
                                    c.token.0
                                );
                                assert!(self.failed.insert(c.token.0), "token {} failed twice", c.token.0);
                            }
                            other => panic!("token {}: {other:?} on an ack", c.token.0),
                        }
                    }
                }
            }
            Op::LinkDown(i) => {
                let Some(i) = self.pick(i) else { return };
                let link = self.links.remove(i);
                self.a.link_down(link.id);
                self.bs[link.to].route.link_down(link.id);
            }
            Op::LinkUp(to) => {
                if self.links.len() < 3 {
                    self.link_up(to as usize % INSTANCES);
                }
            }
            Op::ReceiverRestart(b) => {
                // What the old run held but had not handed over is lost with it;
                // the sender must report those as failed, never deliver them twice.
                let to = b as usize % INSTANCES;
                let epoch = self.fresh_epoch();
                let r = &mut self.bs[to];
                r.epoch = epoch;
                r.route = Route::new(epoch, W, W);
                r.last = None;
                r.handed.clear();
                let (gone, kept): (Vec<Link>, Vec<Link>) = self.links.drain(..).partition(|l| l.to == to);
                self.links = kept;
                for l in gone {
                    self.a.link_down(l.id);
                }
            }
        }
    }

    /// Heals everything and runs to quiescence.
    fn settle(&mut self) {
        if self.links.is_empty() {
            self.link_up(0);
            if self.links.is_empty() {
                self.link_up(1);
            }
        }
        for _ in 0..10_000 {
            let before = (self.delivered.len(), self.confirmed.len());
            self.apply(&Op::Transmit(255));
            for i in 0..self.links.len() as u8 {
                self.apply(&Op::CarryData(i, 255));
            }
            for b in 0..INSTANCES as u8 {
                self.apply(&Op::Consume(b, 255));
                self.apply(&Op::Finish(b, 255, false));
            }
            for i in 0..self.links.len() as u8 {
                self.apply(&Op::CarryAcks(i, 255));
            }
            if (self.delivered.len(), self.confirmed.len()) == before && !self.a.wants_transmit() {
                break;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Whatever happens — links lost, receiver instances restarting, the
    /// sender's route moving between two live instances of the receiving
    /// cluster — every message is delivered at most once and in order
    /// within a session; once the network heals, every message is either
    /// delivered and confirmed, or reported failed (only after its session
    /// ended), never both and never neither. `delivered` is never said of
    /// a message that was not delivered.
    #[test]
    fn every_message_is_delivered_once_or_reported_failed(ops in prop::collection::vec(op(), 1..200)) {
        let mut w = World::new();
        w.link_up(0);
        for op in &ops {
            w.apply(op);
        }
        w.settle();
        prop_assert_eq!(w.a.unacked().0, 0, "messages still unacked after settling");
        for token in 0..w.submitted {
            let confirmed = w.confirmed.contains(&token);
            let failed = w.failed.contains(&token);
            prop_assert!(confirmed != failed, "token {} confirmed={} failed={}", token, confirmed, failed);
            prop_assert!(!(confirmed && w.undeliverable.contains(&token)));
            if confirmed {
                prop_assert!(w.delivered_set.contains(&token));
            }
        }
        if w.sessions == 1 {
            prop_assert!(w.failed.iter().all(|t| w.undeliverable.contains(t)));
            prop_assert_eq!(w.delivered.clone(), (0..w.submitted).collect::<Vec<_>>());
        }
    }
}

// ---------------------------------------------------------------- terms

fn node() -> impl Strategy<Value = String> {
    // Some non-ASCII: node names may be UTF-8 atoms.
    "[a-zé]{1,8}@[a-z0-9.]{1,12}"
}

fn pid() -> impl Strategy<Value = Pid> {
    (node(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(node, id, serial, creation)| Pid {
        node,
        id,
        serial,
        creation,
    })
}

fn reference() -> impl Strategy<Value = Ref> {
    (node(), any::<u32>(), prop::collection::vec(any::<u32>(), 1..=5)).prop_map(|(node, creation, ids)| Ref {
        node,
        creation,
        ids,
    })
}

fn term() -> impl Strategy<Value = Term> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Term::Int),
        (-1e300f64..1e300).prop_map(Term::Float),
        "\\PC{0,20}".prop_map(Term::Atom),
        pid().prop_map(Term::Pid),
        reference().prop_map(Term::Ref),
        Just(Term::Nil),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Term::Str),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Term::Binary),
    ];
    leaf.prop_recursive(6, 200, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Term::Tuple),
            (prop::collection::vec(inner.clone(), 1..8), inner.clone()).prop_map(|(i, t)| Term::List(i, Box::new(t))),
            // Maps have distinct keys (a node refuses others; so does the scanner).
            prop::collection::vec((inner.clone(), inner), 0..5).prop_map(|pairs| {
                let mut seen = Vec::new();
                Term::Map(
                    pairs
                        .into_iter()
                        .filter(|(k, _)| {
                            let c = etf::canon::canonical(&etf::encode(k)[1..]).unwrap();
                            let new = !seen.contains(&c);
                            seen.push(c);
                            new
                        })
                        .collect(),
                )
            }),
        ]
    })
}

/// What a gateway does on the way out: each identity becomes a handle
/// (remembered here); and what the receiving side does with what comes
/// back: the handle becomes the identity again.
#[derive(Default)]
struct Handles {
    issued: Vec<Vec<u8>>,
    /// Arbitrary input: what a real table would refuse is refused, not
    /// asserted against (a home handle, handle 0, a kind that differs).
    lenient: bool,
}

impl Translator for Handles {
    fn pid(&mut self, p: PidView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        self.issued.push(p.canonical().to_vec());
        etf::put_handle(out, etf::PEER_PID, self.issued.len() as u64);
        Ok(())
    }
    fn reference(&mut self, r: RefView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        self.issued.push(r.canonical().to_vec());
        etf::put_handle(out, etf::PEER_REF, self.issued.len() as u64);
        Ok(())
    }
    fn handle(&mut self, kind: Kind, home: bool, h: u64, out: &mut Vec<u8>) -> Result<(), Refusal> {
        if self.lenient && (home || h == 0) {
            return Err(Refusal::Forged);
        }
        assert!(!home);
        let id = self.issued.get(h as usize - 1).ok_or(Refusal::Forged)?;
        if self.lenient && (kind == Kind::Pid) != etf::pid_from_bytes(id).is_ok() {
            return Err(Refusal::Forged);
        }
        assert_eq!(kind == Kind::Pid, etf::pid_from_bytes(id).is_ok());
        out.extend_from_slice(id);
        Ok(())
    }
}

fn count_ids(t: &Term) -> usize {
    match t {
        Term::Pid(_) | Term::Ref(_) => 1,
        Term::Tuple(items) => items.iter().map(count_ids).sum(),
        Term::List(items, tail) => items.iter().map(count_ids).sum::<usize>() + count_ids(tail),
        Term::Map(pairs) => pairs.iter().map(|(k, v)| count_ids(k) + count_ids(v)).sum(),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, .. ProptestConfig::default() })]

    /// Out through one gateway (identities to handles, nothing else
    /// touched) and in through the other (handles to identities, checked as
    /// strictly as a peer's bytes are): the same bytes again.
    #[test]
    fn translating_there_and_back_is_the_identity(t in term()) {
        let bytes = etf::encode(&t);
        let mut h = Handles::default();
        let mut there = Vec::new();
        let used = etf::translate(&bytes, &mut there, &mut h, Source::Node).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(h.issued.len(), count_ids(&t));
        if !h.issued.is_empty() {
            prop_assert_ne!(&there, &bytes);
        }
        let mut again = Vec::new();
        etf::translate(&there, &mut again, &mut h, Source::Peer).unwrap();
        prop_assert_eq!(&again, &bytes);
    }

    #[test]
    fn decoding_and_encoding_again_gives_the_same_bytes(t in term()) {
        let bytes = etf::encode(&t);
        let (decoded, n) = etf::decode(&bytes).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(etf::encode(&decoded), bytes);
    }

    /// Arbitrary bytes (and valid terms with bytes flipped) are an error or
    /// a term, never a panic or a read past the end, from either side.
    #[test]
    fn arbitrary_bytes_never_panic(mut b in prop::collection::vec(any::<u8>(), 0..300), t in term(), flip in any::<(u16, u8)>()) {
        let lenient = || Handles { lenient: true, ..Handles::default() };
        for source in [Source::Node, Source::Peer] {
            let mut o = Vec::new();
            if let Ok(n) = etf::translate(&b, &mut o, &mut lenient(), source) {
                prop_assert!(n <= b.len());
            }
        }
        let _ = etf::decode(&b);
        let mut enc = etf::encode(&t);
        let at = flip.0 as usize % enc.len();
        enc[at] ^= flip.1 | 1;
        b = enc;
        let mut o = Vec::new();
        let _ = etf::translate(&b, &mut o, &mut lenient(), Source::Node);
        let _ = etf::decode(&b);
    }
}
