//! One task per local Erlang node: connect (EPMD or a fixed port), run the
//! handshake as a hidden node, then read and write distribution packets and
//! keep the connection ticking. Reconnects with backoff; reports up, down
//! and every message to the Erlang side.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::dist::{self, PASS_THROUGH};
use super::etf::{self, Term};
use crate::config::{ErlNode, Secret};
use crate::link::backoff::Backoff;
use crate::local::Held;

/// Bytes read from a node at once, at most (its packets, in bulk).
const READ_BUFFER: usize = 32 * 1024;
/// Ticks go out this often (Erlang's default net_ticktime is 60 s: it
/// expects something every 15 s).
const TICK: Duration = Duration::from_secs(15);
/// A node silent this long (four missed ticks) is dropped.
const SILENT: Duration = Duration::from_secs(75);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Packets, and bytes, queued toward one node before the Erlang side waits.
const OUT_QUEUE: usize = 4096;
/// Tags the references of delivery barriers (their second word).
const BARRIER_TAG: u32 = 0xB0B0_0001;
/// Tags the reference of the marker written after each bulk packet (see
/// `Pace`).
const BULK_TAG: u32 = 0xB0B0_0002;
/// A registered name no node has: a monitor on it is answered at once.
const BARRIER_NAME: &str = "wandist_delivery_barrier";
const OUT_BYTES: usize = 64 * 1024 * 1024;
/// A delivery barrier follows the oldest delivery it covers by at most about
/// this much (plus the timer's 1 ms grain). It rides on the next write when
/// one comes sooner, so a steady flow gets one barrier per interval and a
/// lone message one barrier of its own: confirmations wait up to ~2 ms more,
/// and a round trip through the gateway does not pay for a barrier and an
/// ack on every message (BENCHMARKS.md, "Round trip").
const BARRIER_DELAY: Duration = Duration::from_millis(1);
/// ... or once this many deliveries wait for one.
const BARRIER_EVERY: usize = 4096;

/// A packet queued for a node, its share of the byte budget, and the
/// delivered message it carries, if any (dropped once written).
type Queued = (Bytes, OwnedSemaphorePermit, Option<Held>);

/// The way to one node's writer, in two lanes: messages (deliveries,
/// monitors, everything else) and bulk (the scope's membership messages,
/// which can be megabytes): the writer takes messages first and bulk one
/// packet at a time, so a message never waits behind a million members
/// queued before it, only behind the one bulk packet being written.
/// (Erlang orders messages per sender and receiver: every bulk packet is
/// from the gateway's pg process to a scope, which nothing in the other
/// lane is.)
#[derive(Clone, Debug)]
pub struct NodeTx {
    tx: mpsc::Sender<Queued>,
    bulk: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
}

/// The writer's ends of the two lanes.
pub struct Lanes {
    messages: mpsc::Receiver<Queued>,
    bulk: mpsc::Receiver<Queued>,
}

impl NodeTx {
    fn new() -> (NodeTx, Lanes) {
        let (tx, messages) = mpsc::channel(OUT_QUEUE);
        let (bulk_tx, bulk) = mpsc::channel(OUT_QUEUE);
        (NodeTx { tx, bulk: bulk_tx, budget: Arc::new(Semaphore::new(OUT_BYTES)) }, Lanes { messages, bulk })
    }

    /// Queues a packet; waits while the node is that far behind.
    pub async fn send(&self, pkt: Bytes) -> bool {
        self.send_delivery(pkt, None).await
    }

    /// Queues a packet carrying a message from a peer; `held` is dropped
    /// (telling the route it may ack) once the node has answered the
    /// delivery barrier written after it (see `Barriers`), or the
    /// connection is gone.
    pub async fn send_delivery(&self, pkt: Bytes, held: Option<Held>) -> bool {
        // A packet larger than the whole budget takes all of it, alone.
        let n = pkt.len().min(OUT_BYTES) as u32;
        let Ok(permit) = self.budget.clone().acquire_many_owned(n).await else { return false };
        self.tx.send((pkt, permit, held)).await.is_ok()
    }

    /// Queues a packet if the node's queue has room now; otherwise gives
    /// it back (`Full`), or says the connection is gone (`Closed`).
    pub fn try_send_delivery(&self, pkt: Bytes, held: Option<Held>) -> Result<(), TrySend> {
        self.try_send_on(&self.tx, pkt, held)
    }

    /// As `try_send_delivery`, in the bulk lane (membership for the scope).
    pub fn try_send_bulk(&self, pkt: Bytes) -> Result<(), TrySend> {
        self.try_send_on(&self.bulk, pkt, None)
    }

    fn try_send_on(&self, lane: &mpsc::Sender<Queued>, pkt: Bytes, held: Option<Held>) -> Result<(), TrySend> {
        let n = pkt.len().min(OUT_BYTES) as u32;
        let permit = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySend::Full(pkt, held)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(TrySend::Closed(held)),
        };
        match lane.try_send((pkt, permit, held)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full((pkt, _, held))) => Err(TrySend::Full(pkt, held)),
            Err(mpsc::error::TrySendError::Closed((_, _, held))) => Err(TrySend::Closed(held)),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Why `try_send_delivery` did not queue a packet.
#[derive(Debug)]
pub enum TrySend {
    Full(Bytes, Option<Held>),
    Closed(Option<Held>),
}

/// What a node connection reports.
#[derive(Debug)]
pub enum NodeEvent {
    Up {
        node: Arc<str>,
        tx: NodeTx,
    },
    Down {
        node: Arc<str>,
        why: NodeClose,
    },
    /// An attempt to connect failed (it is tried again after a backoff).
    Unreachable {
        node: Arc<str>,
    },
    /// A control message, and the message term's bytes (with version byte) if any.
    Message {
        node: Arc<str>,
        control: Term,
        payload: Option<Bytes>,
    },
    /// `{SEND_SENDER, From, To}` from a pid of this cluster to a pid on the
    /// gateway's own node, with its message: read in place, no terms built
    /// (most of what nodes send the gateway; BENCHMARKS.md, "Round trip").
    Send {
        node: Arc<str>,
        /// The sender's pid, as the node encoded it.
        from: Bytes,
        /// The receiving pid's id, serial and creation (its node is ours).
        to: (u32, u32, u32),
        /// The message term's bytes (with version byte).
        payload: Bytes,
    },
    /// A packet we could not decode (the connection stays up).
    Rejected {
        node: Arc<str>,
        why: String,
    },
}

#[derive(Clone)]
pub struct NodeParams {
    pub me: Arc<str>,
    pub creation: u32,
    pub cookie: Secret,
    pub max_packet: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// TLS distribution (`[erlang.tls]`): the handshake runs inside TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Encodes one distribution packet: length, pass-through, control, payload.
pub fn packet(control: &Term, payload: Option<&[u8]>) -> Bytes {
    let mut body = Vec::with_capacity(64 + payload.map_or(0, |p| p.len()));
    body.extend_from_slice(&[0, 0, 0, 0, PASS_THROUGH]);
    body.extend_from_slice(&etf::encode(control));
    if let Some(p) = payload {
        body.extend_from_slice(p);
    }
    let len = (body.len() - 4) as u32;
    body[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(body)
}

/// Keeps one node connected until `cancel`.
pub async fn run(node: ErlNode, p: NodeParams, events: mpsc::Sender<NodeEvent>, cancel: CancellationToken) {
    let name: Arc<str> = node.name.as_str().into();
    let mut backoff = Backoff::new(p.reconnect_min, p.reconnect_max);
    let mut stop = crate::stop::on_cancel(&cancel);
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            c = connect(&node, &p) => c,
        };
        let why = match connected {
            Ok(stream) => {
                backoff.reset();
                tracing::info!(node = %name, "connected to Erlang node (hidden)");
                let (tx, rx) = NodeTx::new();
                if events.send(NodeEvent::Up { node: name.clone(), tx }).await.is_err() {
                    return;
                }
                let served = async {
                    match stream {
                        DistStream::Tcp(s) => {
                            let (rd, wr) = s.into_split();
                            serve(rd, wr, &name, &p, rx, &events).await
                        }
                        DistStream::Tls(s) => {
                            let (rd, wr) = tokio::io::split(*s);
                            serve(rd, wr, &name, &p, rx, &events).await
                        }
                    }
                };
                let why = tokio::select! {
                    _ = &mut stop => return,
                    why = served => why,
                };
                let _ = events.send(NodeEvent::Down { node: name.clone(), why: why.clone() }).await;
                why.to_string()
            }
            Err(e) => {
                if events.send(NodeEvent::Unreachable { node: name.clone() }).await.is_err() {
                    return;
                }
                e.to_string()
            }
        };
        let delay = backoff.fail(fastrand::f64());
        tracing::warn!(node = %name, retry_in = ?delay, "Erlang node unreachable: {why}");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A connected, handshaken distribution stream: plain TCP, or TLS
/// distribution (`inet_tls_dist`).
enum DistStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect(node: &ErlNode, p: &NodeParams) -> Result<DistStream, dist::DistError> {
    let (_, host) =
        dist::split_node(&node.name).ok_or_else(|| dist::DistError::Epmd(node.name.clone(), "bad node name".into()))?;
    // (A node given by port, without EPMD, is taken for OTP 23 or later:
    // OTP 21–22 nodes are met with the old handshake only through EPMD.)
    let (port, version) = match node.port {
        Some(port) => (port, dist::VERSION_23),
        None => dist::port_please(&node.name, CONNECT_TIMEOUT).await?,
    };
    let addr = format!("{host}:{port}");
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| dist::DistError::Timeout("connect"))?
        .map_err(|e| dist::DistError::Connect(addr.clone(), e))?;
    let _ = s.set_nodelay(true);
    let mut s = match &p.tls {
        None => DistStream::Tcp(s),
        Some(tls) => {
            // The node's certificate must name the host of its node name (a
            // DNS name or an address), unless `check_host = false`.
            let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
                dist::DistError::Tls(
                    addr.clone(),
                    format!("{host:?} is not a host name to check a certificate against: {e}"),
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone());
            let s = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, s))
                .await
                .map_err(|_| dist::DistError::Timeout("TLS handshake"))?
                .map_err(|e| {
                    let hint = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                        Some(rustls::Error::InvalidMessage(_)) => {
                            " (the node does not speak TLS: is it started with -proto_dist inet_tls?)"
                        }
                        _ => "",
                    };
                    dist::DistError::Tls(addr.clone(), format!("{e}{hint}"))
                })?;
            DistStream::Tls(Box::new(s))
        }
    };
    let handshake = async {
        match &mut s {
            DistStream::Tcp(s) => {
                dist::handshake(s, dist::Framing::Tcp, version, &p.me, p.creation, &node.name, &p.cookie).await
            }
            DistStream::Tls(s) => {
                dist::handshake(&mut **s, dist::Framing::Tls, version, &p.me, p.creation, &node.name, &p.cookie).await
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| dist::DistError::Timeout("handshake"))??;
    Ok(s)
}

/// Delivery barriers: after messages from peers (with the next write, or on
/// its own BARRIER_DELAY after the first, see `BarrierDue`), the writer adds
/// a MONITOR_P on a name nobody has registered. The node answers
/// MONITOR_P_EXIT noproc once it has handled everything before it on this
/// connection, i.e. put those messages into their receivers' queues; only
/// then are the batch's `Held`s dropped, letting the routes ack them. So a
/// gateway killed at any moment has acked nothing the node did not take.
#[derive(Default)]
struct Barriers {
    next: u32,
    /// (barrier id, the deliveries it covers), oldest first.
    waiting: std::collections::VecDeque<(u32, Vec<Held>)>,
    /// The barrier packet, encoded once; only its id changes (the reference's
    /// first word, the packet's last 12 bytes but 8).
    template: Vec<u8>,
}

impl Barriers {
    fn reference(p: &NodeParams, id: u32) -> etf::Ref {
        etf::Ref { node: p.me.to_string(), creation: p.creation, ids: vec![id, BARRIER_TAG, 0] }
    }

    /// Appends a barrier packet covering `carried` to `batch`.
    fn add(&mut self, p: &NodeParams, batch: &mut BytesMut, carried: &mut Vec<Held>) {
        self.next = self.next.wrapping_add(1);
        if self.template.is_empty() {
            let from = etf::Pid { node: p.me.to_string(), id: 0, serial: 0, creation: p.creation };
            let control = Term::tuple(vec![
                Term::Int(dist::MONITOR_P),
                Term::Pid(from),
                Term::atom(BARRIER_NAME),
                Term::Ref(Self::reference(p, 0)),
            ]);
            self.template = packet(&control, None).to_vec();
        }
        let at = batch.len() + self.template.len() - 12;
        batch.extend_from_slice(&self.template);
        batch[at..at + 4].copy_from_slice(&self.next.to_be_bytes());
        self.waiting.push_back((self.next, std::mem::take(carried)));
    }

    /// The barrier a packet answers, read in place (`packet` as read, with
    /// its pass-through byte); `None` if it is not a barrier's answer, or
    /// not one this reads (the general path then decodes it).
    fn answer_in(p: &NodeParams, packet: &[u8]) -> Option<u32> {
        let (node, ids) = etf::name_monitor_exit_ref(packet.get(1..)?)?;
        if ids.len() != 12 || ids[4..8] != BARRIER_TAG.to_be_bytes() || node != p.me.as_bytes() {
            return None;
        }
        Some(u32::from_be_bytes([ids[0], ids[1], ids[2], ids[3]]))
    }

    /// If `control` answers one of our barriers, releases it and every
    /// earlier one (answers come in order): the deliveries they covered,
    /// for the caller to finish (outside the lock this is kept under).
    fn answered(&mut self, p: &NodeParams, control: &Term) -> Option<Vec<Held>> {
        let t = control.as_tuple()?;
        let (Some(dist::MONITOR_P_EXIT), Some(Term::Ref(r))) = (t.first().and_then(Term::as_int), t.get(3)) else {
            return None;
        };
        if r.ids.get(1) != Some(&BARRIER_TAG) || *r.node != *p.me {
            return None;
        }
        Some(self.release(r.ids[0]))
    }

    /// Releases barrier `id` and every earlier one.
    fn release(&mut self, id: u32) -> Vec<Held> {
        let mut released = Vec::new();
        if !self.waiting.iter().any(|(i, _)| *i == id) {
            return released; // not (or no longer) waiting: ignore, release nothing
        }
        while let Some((first, held)) = self.waiting.pop_front() {
            released.extend(held);
            if first == id {
                break;
            }
        }
        released
    }
}

/// Bulk packets go one at a time: after each, a marker (a monitor on the
/// unregistered name, answered in order with the connection's traffic),
/// and no other bulk packet until the node has answered it. So at most one
/// bulk packet is ever between a message and the node: a message waits for
/// the node to read that one, not megabytes of membership buffered in the
/// sockets ahead of it.
#[derive(Default)]
struct Pace {
    waiting: std::sync::atomic::AtomicBool,
    answered: tokio::sync::Notify,
}

impl Pace {
    fn waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The marker packet (with its length).
    fn marker(p: &NodeParams) -> Bytes {
        let from = etf::Pid { node: p.me.to_string(), id: 0, serial: 0, creation: p.creation };
        let mref = etf::Ref { node: p.me.to_string(), creation: p.creation, ids: vec![0, BULK_TAG, 0] };
        let control =
            Term::tuple(vec![Term::Int(dist::MONITOR_P), Term::Pid(from), Term::atom(BARRIER_NAME), Term::Ref(mref)]);
        packet(&control, None)
    }

    /// Whether a packet (as read, with its pass-through byte) answers the
    /// marker; then the next bulk packet may go.
    fn answer_in(&self, p: &NodeParams, packet: &[u8]) -> bool {
        let Some((node, ids)) = packet.get(1..).and_then(etf::name_monitor_exit_ref) else { return false };
        if ids.len() != 12 || ids[4..8] != BULK_TAG.to_be_bytes() || node != p.me.as_bytes() {
            return false;
        }
        self.waiting.store(false, std::sync::atomic::Ordering::Release);
        self.answered.notify_one();
        true
    }
}

/// When the next delivery barrier goes out (see BARRIER_DELAY): the writer
/// asks before each write, with the deliveries no barrier covers yet.
#[derive(Default)]
struct BarrierDue(Option<std::time::Instant>);

impl BarrierDue {
    /// True when the barrier goes with this write: BARRIER_DELAY after the
    /// first uncovered delivery was written, or at once for BARRIER_EVERY.
    fn now(&mut self, now: std::time::Instant, uncovered: usize) -> bool {
        if uncovered == 0 {
            return false;
        }
        let due = *self.0.get_or_insert(now + BARRIER_DELAY);
        let go = now >= due || uncovered >= BARRIER_EVERY;
        if go {
            self.0 = None;
        }
        go
    }

    /// When the writer must wake to send a barrier on its own, if ever.
    fn at(&self) -> Option<std::time::Instant> {
        self.0
    }
}

/// Why a node connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeClose {
    /// The gateway let go of the connection's sending side (the node was
    /// removed, or the gateway stops).
    ByGateway,
    /// The Erlang side is gone: the gateway is stopping.
    Stopping,
    /// Nothing heard from the node for SILENT (its ticks stopped).
    Silent,
    /// Reading failed, or the node closed the connection.
    Lost(String),
    /// A packet larger than the configured limit.
    Oversize { len: usize, max: usize },
    /// Writing failed.
    WriteFailed(String),
    /// The writer task ended abnormally.
    WriterFailed(String),
}

impl std::fmt::Display for NodeClose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeClose::ByGateway => f.write_str("closed by the gateway"),
            NodeClose::Stopping => f.write_str("gateway stopping"),
            NodeClose::Silent => write!(f, "silent for {SILENT:?}"),
            NodeClose::Lost(e) => write!(f, "connection lost: {e}"),
            NodeClose::Oversize { len, max } => write!(f, "packet of {len} bytes exceeds the {max} byte limit"),
            NodeClose::WriteFailed(e) => write!(f, "write failed: {e}"),
            NodeClose::WriterFailed(e) => write!(f, "writer failed: {e}"),
        }
    }
}

/// What a connection's reader and writer share: the delivery barriers in
/// flight (the writer adds them, the reader sees their answers) and the
/// pacing of bulk packets.
#[derive(Default)]
struct Shared {
    barriers: std::sync::Mutex<Barriers>,
    pace: Pace,
}

impl Shared {
    fn barriers(&self) -> std::sync::MutexGuard<'_, Barriers> {
        self.barriers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs one connection, as `link::conn` runs a link: a reader and a writer
/// (a task of its own, so that a packet to write does not poll the reader,
/// nor a packet read the writer), one silence timer, either one ending the
/// connection (the writer is aborted, dropping the deliveries it holds).
async fn serve<R, W>(
    rd: R,
    wr: W,
    name: &Arc<str>,
    p: &NodeParams,
    lanes: Lanes,
    events: &mpsc::Sender<NodeEvent>,
) -> NodeClose
where
    R: tokio::io::AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared::default());
    let writer = Writer { lanes, p: p.clone(), shared: shared.clone() };
    // Erlang writes each message as its own packet: read them in bulk
    // (a packet larger than the buffer is read past it, straight into its
    // own). READ_BUFFER is per local node: 256 KiB here made a gateway
    // hold 360 KiB per node (`cargo bench --bench scale`).
    let reader = Reader { rd: tokio::io::BufReader::with_capacity(READ_BUFFER, rd), name, p, shared, events };
    let mut writer = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(writer.run(wr)));
    tokio::select! {
        why = &mut writer => why.unwrap_or_else(|e| NodeClose::WriterFailed(e.to_string())),
        why = reader.run() => why,
    }
}

/// Writes what the gateway queues for the node: messages ahead of bulk
/// packets (one bulk packet in flight, `Pace`), delivery barriers after
/// deliveries (`Barriers`, `BarrierDue`), ticks.
struct Writer {
    lanes: Lanes,
    p: NodeParams,
    shared: Arc<Shared>,
}

impl Writer {
    async fn run<W: tokio::io::AsyncWrite + Unpin>(self, mut wr: W) -> NodeClose {
        let Writer { lanes: Lanes { messages: mut outgoing, mut bulk }, p, shared } = self;
        let pace = &shared.pace;
        let marker = Pace::marker(&p);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Grows under load (up to a 256 KiB batch), small while idle.
        let mut batch = BytesMut::with_capacity(4 * 1024);
        // Deliveries written and not yet covered by a barrier: finished once
        // the node answers the barrier written after them.
        let mut carried: Vec<Held> = Vec::new();
        let mut due = BarrierDue::default();
        // One timer for barriers that go on their own, moved only when the
        // deadline changes (a timer made per turn showed in the profile).
        let barrier_timer = tokio::time::sleep(TICK);
        tokio::pin!(barrier_timer);
        let mut armed: Option<std::time::Instant> = None;
        loop {
            if due.at() != armed {
                armed = due.at();
                if let Some(at) = armed {
                    barrier_timer.as_mut().reset(at.into());
                }
            }
            tokio::select! {
                biased;
                pkt = outgoing.recv() => match pkt {
                    Some((pkt, _permit, held)) => {
                        batch.extend_from_slice(&pkt);
                        carried.extend(held);
                    }
                    None => return NodeClose::ByGateway,
                },
                pkt = bulk.recv(), if !pace.waiting() => match pkt {
                    Some((pkt, _permit, _)) => {
                        batch.extend_from_slice(&pkt);
                        batch.extend_from_slice(&marker);
                        pace.waiting.store(true, std::sync::atomic::Ordering::Release);
                    }
                    None => return NodeClose::ByGateway,
                },
                _ = pace.answered.notified(), if pace.waiting() => {}
                _ = &mut barrier_timer, if armed.is_some() => {}
                _ = tick.tick() => {
                    // Idle since a burst: give back what it grew.
                    if batch.is_empty() && batch.capacity() > 64 * 1024 {
                        batch = BytesMut::with_capacity(4 * 1024);
                    }
                    batch.extend_from_slice(&[0, 0, 0, 0]);
                }
            }
            // Write at once, with whatever messages are already queued (and
            // a bulk packet only if there are none).
            while batch.len() < 256 * 1024 {
                match outgoing.try_recv() {
                    Ok((pkt, _permit, held)) => {
                        batch.extend_from_slice(&pkt);
                        carried.extend(held);
                    }
                    Err(_) => break,
                }
            }
            if batch.is_empty() && !pace.waiting() {
                if let Ok((pkt, _permit, _)) = bulk.try_recv() {
                    batch.extend_from_slice(&pkt);
                    batch.extend_from_slice(&marker);
                    pace.waiting.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            if due.now(std::time::Instant::now(), carried.len()) {
                shared.barriers().add(&p, &mut batch, &mut carried);
            }
            if batch.is_empty() {
                continue;
            }
            // (A flush: TLS distribution buffers records; on TCP it is a no-op.)
            if let Err(e) = async {
                wr.write_all(&batch).await?;
                wr.flush().await
            }
            .await
            {
                return NodeClose::WriteFailed(e.to_string());
            }
            batch.clear();
        }
    }
}

/// Reads the node's packets: ticks, answers to our barriers and bulk
/// markers (handled here), sends to the gateway's own processes (the fast
/// path), and everything else as control messages for the Erlang side.
struct Reader<'a, R> {
    rd: tokio::io::BufReader<R>,
    name: &'a Arc<str>,
    p: &'a NodeParams,
    shared: Arc<Shared>,
    events: &'a mpsc::Sender<NodeEvent>,
}

impl<R: tokio::io::AsyncRead + Unpin> Reader<'_, R> {
    async fn run(mut self) -> NodeClose {
        let (name, p, events) = (self.name, self.p, self.events);
        let mut len = [0u8; 4];
        // One timer for the connection, not one per packet: the node is
        // silent once SILENT passed since a packet.
        let mut silence = crate::stop::Silence::new(SILENT);
        loop {
            let got = tokio::select! {
                biased;
                r = self.rd.read_exact(&mut len) => r,
                // (Leaves the connection, so the partial read does not matter.)
                _ = silence.elapsed() => return NodeClose::Silent,
            };
            if let Err(e) = got {
                return NodeClose::Lost(e.to_string());
            }
            silence.heard();
            let n = u32::from_be_bytes(len) as usize;
            if n == 0 {
                continue; // tick
            }
            if n > p.max_packet {
                return NodeClose::Oversize { len: n, max: p.max_packet };
            }
            // Into spare capacity: no zeroing first (it showed in the 64 KiB profile).
            let mut buf = BytesMut::with_capacity(n);
            while buf.len() < n {
                match (&mut self.rd).take((n - buf.len()) as u64).read_buf(&mut buf).await {
                    Ok(0) => return NodeClose::Lost("closed inside a packet".to_string()),
                    Ok(_) => {}
                    Err(e) => return NodeClose::Lost(e.to_string()),
                }
            }
            tracing::trace!(node = %name, len = n, head = ?&buf[..buf.len().min(24)], "packet");
            if self.shared.pace.answer_in(p, &buf) {
                continue;
            }
            if let Some(id) = Barriers::answer_in(p, &buf) {
                // The node has these: their routes ack them now.
                let done = self.shared.barriers().release(id);
                Held::finish_all(done);
                continue;
            }
            let buf = buf.freeze();
            if let Some(ev) = fast_send(&buf, name, &p.me) {
                if events.send(ev).await.is_err() {
                    return NodeClose::Stopping;
                }
                continue;
            }
            let ev = match parse(buf) {
                Ok((control, payload)) => {
                    let answered = self.shared.barriers().answered(p, &control);
                    if let Some(done) = answered {
                        // The node has these: their routes ack them now.
                        Held::finish_all(done);
                        continue;
                    }
                    NodeEvent::Message { node: name.clone(), control, payload }
                }
                Err(why) => NodeEvent::Rejected { node: name.clone(), why },
            };
            if events.send(ev).await.is_err() {
                return NodeClose::Stopping;
            }
        }
    }
}

/// A packet that is `{SEND_SENDER, From, To}` to a pid on `me` from a pid
/// elsewhere, with a message, as a `NodeEvent::Send`; `None` for every
/// other packet (`parse` and the Erlang side's general path take those).
fn fast_send(buf: &Bytes, node: &Arc<str>, me: &str) -> Option<NodeEvent> {
    if buf.first() != Some(&PASS_THROUGH) {
        return None;
    }
    let ss = etf::send_sender(&buf[1..])?;
    let payload_at = 1 + ss.len;
    if ss.to.node != me.as_bytes() || ss.from.node == me.as_bytes() || payload_at >= buf.len() {
        return None;
    }
    Some(NodeEvent::Send {
        node: node.clone(),
        from: buf.slice_ref(ss.from.bytes),
        to: (ss.to.id, ss.to.serial, ss.to.creation),
        payload: buf.slice(payload_at..),
    })
}

/// Splits a packet into its control term and the message bytes.
pub fn parse(buf: Bytes) -> Result<(Term, Option<Bytes>), String> {
    if buf.first() != Some(&PASS_THROUGH) {
        return Err(format!("unexpected packet type {:?} (atom cache not negotiated)", buf.first()));
    }
    let (control, used) = etf::decode(&buf[1..]).map_err(|e| format!("bad control message: {e}"))?;
    let rest = buf.slice(1 + used..);
    Ok((control, (!rest.is_empty()).then_some(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Epoch, Seq};

    fn params() -> NodeParams {
        NodeParams {
            me: "gw@127.0.0.1".into(),
            creation: 7,
            cookie: Secret::new("c"),
            max_packet: 1 << 20,
            reconnect_min: Duration::from_millis(1),
            reconnect_max: Duration::from_millis(2),
            tls: None,
        }
    }

    fn answer(p: &NodeParams, id: u32) -> Term {
        Term::tuple(vec![
            Term::Int(dist::MONITOR_P_EXIT),
            Term::atom(BARRIER_NAME),
            Term::Pid(etf::Pid { node: p.me.to_string(), id: 0, serial: 0, creation: p.creation }),
            Term::Ref(Barriers::reference(p, id)),
            Term::atom("noproc"),
        ])
    }

    #[test]
    fn sends_to_the_gateways_node_take_the_fast_path_and_nothing_else_does() {
        let me = "gw@h";
        let node: Arc<str> = "a@h".into();
        let a = etf::Pid { node: "a@h".into(), id: 5, serial: 1, creation: 9 };
        let proxy = etf::Pid { node: me.into(), id: 70, serial: 2, creation: 3 };
        let pkt = |from: &etf::Pid, to: &etf::Pid, msg: Option<&Term>| {
            let control =
                Term::tuple(vec![Term::Int(dist::SEND_SENDER), Term::Pid(from.clone()), Term::Pid(to.clone())]);
            let mut p = packet(&control, msg.map(etf::encode).as_deref()).to_vec();
            p.drain(..4);
            Bytes::from(p)
        };
        let msg = Term::tuple(vec![Term::atom("ping"), Term::Pid(a.clone())]);
        let buf = pkt(&a, &proxy, Some(&msg));
        match fast_send(&buf, &node, me) {
            Some(NodeEvent::Send { node: n, from, to, payload }) => {
                assert_eq!(n, node);
                assert_eq!(&from[..], &etf::pid_bytes(&a)[..]);
                assert_eq!(to, (70, 2, 3));
                assert_eq!(&payload[..], &etf::encode(&msg)[..]);
                // The general path reads the same packet the same way.
                let (control, general) = parse(buf.clone()).unwrap();
                assert_eq!(general.as_deref(), Some(&payload[..]));
                assert_eq!(control.as_tuple().unwrap()[1], Term::Pid(a.clone()));
            }
            other => panic!("expected the fast path, got {other:?}"),
        }
        // To a pid elsewhere, from the gateway's node, without a message, or
        // another control message: the general path.
        let b = etf::Pid { node: "b@h".into(), ..a.clone() };
        assert!(fast_send(&pkt(&a, &b, Some(&msg)), &node, me).is_none());
        assert!(fast_send(&pkt(&proxy, &proxy, Some(&msg)), &node, me).is_none());
        assert!(fast_send(&pkt(&a, &proxy, None), &node, me).is_none());
        let mut reg = packet(
            &Term::tuple(vec![Term::Int(dist::REG_SEND), Term::Pid(a), Term::atom(""), Term::atom("x")]),
            Some(&etf::encode(&msg)),
        )
        .to_vec();
        reg.drain(..4);
        assert!(fast_send(&Bytes::from(reg), &node, me).is_none());
    }

    #[test]
    fn a_barrier_waits_for_later_writes_but_not_longer_than_its_delay() {
        let t0 = std::time::Instant::now();
        let mut due = BarrierDue::default();
        assert!(!due.now(t0, 0), "nothing to cover, no barrier");
        assert_eq!(due.at(), None);
        // A first delivery: no barrier yet, a deadline BARRIER_DELAY away.
        assert!(!due.now(t0, 1));
        assert_eq!(due.at(), Some(t0 + BARRIER_DELAY));
        // Writes before the deadline add to what it will cover; the deadline stays.
        assert!(!due.now(t0 + BARRIER_DELAY / 2, 5));
        assert_eq!(due.at(), Some(t0 + BARRIER_DELAY));
        // At the deadline (the writer's timer, or a write then) the barrier goes.
        assert!(due.now(t0 + BARRIER_DELAY, 5));
        assert_eq!(due.at(), None);
        // Enough waiting deliveries send it at once.
        assert!(!due.now(t0, 1));
        assert!(due.now(t0, BARRIER_EVERY));
        assert_eq!(due.at(), None);
    }

    #[test]
    fn barriers_release_in_order_and_ignore_what_is_not_theirs() {
        let p = params();
        let mut b = Barriers::default();
        let mut batch = BytesMut::new();
        // Each barrier covers one delivery of session 5.
        let finished = Arc::new(crate::local::Finished::default());
        finished.reset(Epoch(5));
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for n in 1..=3 {
            b.add(&p, &mut batch, &mut vec![Held::take(&counter, 10, &finished, Epoch(5), Seq(n))]);
        }
        // The packets are MONITOR_P on the unregistered name, with our refs
        // (from the encoded template: the same bytes as encoding each one).
        let mut rest = batch.clone().freeze();
        for id in 1..=3u32 {
            let from = etf::Pid { node: p.me.to_string(), id: 0, serial: 0, creation: p.creation };
            let control = Term::tuple(vec![
                Term::Int(dist::MONITOR_P),
                Term::Pid(from),
                Term::atom(BARRIER_NAME),
                Term::Ref(Barriers::reference(&p, id)),
            ]);
            let one = packet(&control, None);
            assert_eq!(&rest[..one.len()], &one[..], "barrier {id}");
            rest = rest.slice(one.len()..);
        }
        let mut rest = batch.clone().freeze();
        for id in 1..=3u32 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let (control, payload) = parse(rest.slice(4..4 + len)).unwrap();
            assert!(payload.is_none());
            let t = control.as_tuple().unwrap();
            assert_eq!(t[0].as_int(), Some(dist::MONITOR_P));
            assert_eq!(t[2].as_atom(), Some(BARRIER_NAME));
            assert_eq!(t[3], Term::Ref(Barriers::reference(&p, id)));
            rest = rest.slice(4 + len..);
        }
        // An answer for someone else's monitor, or an unknown barrier, releases nothing.
        let other = Term::tuple(vec![
            Term::Int(dist::MONITOR_P_EXIT),
            Term::atom("x"),
            Term::atom("y"),
            Term::Ref(etf::Ref { node: p.me.to_string(), creation: 7, ids: vec![2, 0, 0] }),
            Term::atom("noproc"),
        ]);
        assert!(b.answered(&p, &other).is_none());
        assert_eq!(Barriers::answer_in(&p, &packet(&other, None)[4..]), None);
        // Another node's reference, or not our tag: not ours either way.
        let mut theirs = answer(&p, 2);
        if let Term::Tuple(t) = &mut theirs {
            t[3] = Term::Ref(etf::Ref { node: "x@h".into(), creation: 7, ids: vec![2, BARRIER_TAG, 0] });
        }
        assert_eq!(Barriers::answer_in(&p, &packet(&theirs, None)[4..]), None);
        assert!(b.answered(&p, &theirs).is_none());
        assert!(b.answered(&p, &answer(&p, 99)).is_some_and(|r| r.is_empty()));
        assert_eq!(b.waiting.len(), 3);
        // The second answer releases the first two (answers come in order);
        // finishing them lets the route ack both.
        // Read in place, each answer gives its barrier.
        for id in [1, 2, 3, 99] {
            assert_eq!(Barriers::answer_in(&p, &packet(&answer(&p, id), None)[4..]), Some(id));
        }
        let released = b.answered(&p, &answer(&p, 2)).unwrap();
        assert_eq!(released.len(), 2);
        assert_eq!(b.waiting.iter().map(|w| w.0).collect::<Vec<_>>(), vec![3]);
        assert_eq!(finished.upto(), (Some(Epoch(5)), Seq(0)));
        Held::finish_all(released);
        assert_eq!(finished.upto(), (Some(Epoch(5)), Seq(2)));
        assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 10, "the third is still held");
        assert_eq!(b.answered(&p, &answer(&p, 3)).map(|r| r.len()), Some(1));
        assert!(b.waiting.is_empty());
    }
}
