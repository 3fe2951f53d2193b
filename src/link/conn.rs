//! A running link: a reader and a writer over one established connection.
//!
//! The writer puts control frames (heartbeats, pongs, acks, adverts,
//! goodbyes) ahead of data, cuts large messages into chunks so control
//! frames and small messages never wait behind a whole large one, and
//! batches whatever is queued into one write — with no added latency when
//! the link is idle. The reader answers pings, measures RTT from pongs,
//! reassembles chunks, and declares the link dead when nothing at all has
//! arrived for `dead_after`; the writer does the same for a write that makes
//! no progress that long. Either way the link closes once, with one reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::handshake::Established;
use super::{BoxIo, Close, CloseReason};
use crate::metrics::{self as m, Metrics};
use crate::route::LinkId;
use crate::wire::codec;
use crate::wire::packing::{Packing, Policy};
use crate::wire::{Epoch, Frame, Header, Seq};

/// Frames queued per lane before senders wait (data) or fail (control).
const CONTROL_QUEUE: usize = 4096;
const DATA_QUEUE: usize = 1024;
/// The writer stops gathering a batch at this size.
const BATCH_BYTES: usize = 256 * 1024;
/// Buffer sizes of an idle link (reader and writer); bursts grow them.
const IDLE_BUFFER: usize = 2 * 1024;
/// A busy link reads up to this much per read.
const READ_MAX: usize = 64 * 1024;
/// Frames handed to the owner in one event, at most.
const MAX_BATCH_FRAMES: usize = 1024;
/// A write that takes this long waited for the connection (a loopback or
/// LAN write of a whole batch takes well under it).
const PUSHED_BACK: Duration = Duration::from_millis(2);
/// Data payloads are sent in chunks of at most this size.
pub const CHUNK_BYTES: usize = 256 * 1024;

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone)]
pub struct LinkParams {
    pub heartbeat: Duration,
    pub dead_after: Duration,
    /// Largest frame, and largest reassembled message, accepted.
    pub max_frame_bytes: usize,
    /// The peer cluster, for metric labels and logs.
    pub peer: String,
    pub metrics: Metrics,
    /// Takes frames in the reader's task before they become an event.
    pub sink: Option<Arc<dyn FrameSink>>,
    /// How data batches are compressed (`Packed` frames): the route's
    /// `compression`, narrowed to what the peer speaks (set per link from
    /// its hello).
    pub packing: Policy,
}

/// The owner's way to handle frames right in the reader's task, without a
/// hop through its own (the data path of a route, `gateway::core`).
pub trait FrameSink: Send + Sync + std::fmt::Debug {
    /// Takes what it handles from `frames` (whole data messages, in arrival
    /// order with control frames) and leaves the rest, in order; what is
    /// left, the reader hands to the owner as one `LinkEvent::Frames`.
    fn take(&self, link: LinkId, frames: &mut Vec<Frame>);
}

/// What a link tells its owner.
#[derive(Debug)]
pub enum LinkEvent {
    /// Control frames for the owner and whole (reassembled) data messages,
    /// in arrival order: everything decoded from one read.
    Frames {
        link: LinkId,
        frames: Vec<Frame>,
    },
    Rtt {
        link: LinkId,
        rtt: Duration,
    },
    Closed {
        link: LinkId,
        reason: CloseReason,
    },
}

/// The owner's handle on a running link. Dropping it closes the link.
#[derive(Debug)]
pub struct Link {
    pub id: LinkId,
    control: mpsc::Sender<Frame>,
    data: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Dropped on close, which wakes the reader's and the writer's
    /// `oneshot::Receiver`. (Cheaper to poll on every wake-up than a
    /// CancellationToken, whose future takes two locks per poll.)
    stop: Mutex<Vec<oneshot::Sender<()>>>,
    reason: OnceLock<CloseReason>,
    /// Set when we close on purpose: the writer says goodbye with it.
    goodbye: Mutex<Option<String>>,
    /// The lowest round trip the reader measured, in µs (`u64::MAX`: none
    /// yet), for the writer's compression choice.
    rtt_us: AtomicU64,
}

impl Shared {
    /// With the receivers the reader and the writer wait on.
    fn new() -> (Shared, oneshot::Receiver<()>, oneshot::Receiver<()>) {
        let (r_tx, r_rx) = oneshot::channel();
        let (w_tx, w_rx) = oneshot::channel();
        let shared = Shared {
            stop: Mutex::new(vec![r_tx, w_tx]),
            reason: OnceLock::new(),
            goodbye: Mutex::new(None),
            rtt_us: AtomicU64::new(u64::MAX),
        };
        (shared, r_rx, w_rx)
    }

    fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Closes on purpose: the writer tells the peer why.
    fn close_saying(&self, kind: Close, why: &str) {
        if let Ok(mut g) = self.goodbye.lock() {
            g.get_or_insert_with(|| why.to_string());
        }
        self.close(CloseReason::new(kind, why));
    }

    /// Closed once a reason is set (`close` sets it first).
    fn is_closed(&self) -> bool {
        self.reason.get().is_some()
    }
}

/// A link's two lanes, for sending from elsewhere than its owner (the
/// data path). Unlike the `Link` handle, dropping these does not close the
/// link.
#[derive(Debug, Clone)]
pub struct Lanes {
    pub id: LinkId,
    control: mpsc::Sender<Frame>,
    /// For senders that reserve room before committing a frame.
    pub data: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
}

impl Lanes {
    /// Lanes of no running link, with their receiving ends (tests).
    #[cfg(test)]
    pub(crate) fn detached(id: LinkId, room: usize) -> (Lanes, mpsc::Receiver<Frame>, mpsc::Receiver<Frame>) {
        let (control, control_rx) = mpsc::channel(room);
        let (data, data_rx) = mpsc::channel(room);
        let (shared, _, _) = Shared::new();
        (Lanes { id, control, data, shared: Arc::new(shared) }, control_rx, data_rx)
    }

    /// Queues a control frame. A control lane thousands of frames behind
    /// means the link is not healthy: it is closed (failover resends data
    /// and membership from scratch), and this returns false.
    pub fn send_control(&self, frame: Frame) -> bool {
        if self.control.try_send(frame).is_ok() {
            return true;
        }
        if !self.shared.is_closed() {
            self.shared.close_saying(Close::ControlOverflow, "control frames backed up");
        }
        false
    }
}

impl Link {
    /// The link's lanes, to send on without this handle.
    pub fn lanes(&self) -> Lanes {
        Lanes { id: self.id, control: self.control.clone(), data: self.data.clone(), shared: self.shared.clone() }
    }

    /// Closes the link, telling the peer why.
    pub fn close(&self, kind: Close, why: &str) {
        self.shared.close_saying(kind, why);
    }

    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close(Close::Closed, "link handle dropped");
    }
}

/// Starts a link's tasks. Events (frames, RTT samples, the one `Closed`)
/// arrive on `events`. The owner closes the link (`close`, or by dropping
/// the handle), so that the peer always hears a goodbye with the reason.
pub fn spawn(est: Established, params: LinkParams, events: mpsc::Sender<LinkEvent>, tracker: &TaskTracker) -> Link {
    let id = LinkId(NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed));
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let (shared, reader_stop, writer_stop) = Shared::new();
    let shared = Arc::new(shared);
    let (rd, wr) = tokio::io::split(est.io);
    let epoch = Instant::now();
    let reader = Reader {
        id,
        rd,
        buf: est.rest,
        params: params.clone(),
        events: events.clone(),
        control: control_tx.clone(),
        epoch,
        reassembly: Reassembly::new(params.max_frame_bytes),
        unpacker: codec::Unpacker::default(),
        shared: shared.clone(),
    };
    let writer = Writer {
        wr,
        params,
        control: control_rx,
        data: data_rx,
        epoch,
        current: None,
        raw: BytesMut::new(),
        packer: codec::Packer::default(),
        pushed_back: false,
    };
    let task_shared = shared.clone();
    let writer_shared = shared.clone();
    // Reader and writer are separate tasks, so that waking one does not
    // poll the other. Either one ending closes the link (`shared.close`),
    // which stops the other.
    let writer = tracker.spawn(async move {
        let why = writer.run(&writer_shared, writer_stop).await;
        writer_shared.close(why);
    });
    tracker.spawn(async move {
        let shared = task_shared;
        let why = reader.run(reader_stop).await;
        shared.close(why);
        let _ = writer.await;
        let reason = shared.reason.get().cloned().unwrap_or_else(|| CloseReason::new(Close::Closed, ""));
        let _ = events.send(LinkEvent::Closed { link: id, reason }).await;
    });
    Link { id, control: control_tx, data: data_tx, shared }
}

fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// A message being reassembled from chunks.
#[derive(Debug)]
struct Partial {
    epoch: Epoch,
    seq: Seq,
    body: BytesMut,
}

/// Whole messages from data chunks, as they arrive: one message at a time
/// (chunks must not interleave), never more than `max` bytes.
#[derive(Debug)]
struct Reassembly {
    partial: Option<Partial>,
    max: usize,
}

impl Reassembly {
    fn new(max: usize) -> Reassembly {
        Reassembly { partial: None, max }
    }

    /// Takes one chunk; a whole message once its last chunk is in.
    fn take(&mut self, epoch: Epoch, seq: Seq, more: bool, body: Bytes) -> Result<Option<Frame>, codec::CodecError> {
        let whole = |epoch, seq, body| Frame { header: Header::Data { epoch, seq, more: false }, body };
        let Some(p) = self.partial.as_mut() else {
            if !more {
                return Ok(Some(whole(epoch, seq, body)));
            }
            if body.len() > self.max {
                return Err(codec::CodecError::Oversize { len: body.len(), max: self.max });
            }
            self.partial = Some(Partial { epoch, seq, body: BytesMut::from(&body[..]) });
            return Ok(None);
        };
        if p.epoch != epoch || p.seq != seq {
            return Err(codec::CodecError::Garbage(format!(
                "chunk of message {seq} inside message {} (chunks must not interleave)",
                p.seq
            )));
        }
        if p.body.len() + body.len() > self.max {
            return Err(codec::CodecError::Oversize { len: p.body.len() + body.len(), max: self.max });
        }
        p.body.extend_from_slice(&body);
        if more {
            return Ok(None);
        }
        let p = self.partial.take().map(|p| p.body.freeze()).unwrap_or_default();
        Ok(Some(whole(epoch, seq, p)))
    }
}

struct Reader {
    id: LinkId,
    rd: ReadHalf<BoxIo>,
    buf: BytesMut,
    params: LinkParams,
    events: mpsc::Sender<LinkEvent>,
    control: mpsc::Sender<Frame>,
    epoch: Instant,
    reassembly: Reassembly,
    unpacker: codec::Unpacker,
    shared: Arc<Shared>,
}

impl Reader {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> CloseReason {
        let peer = self.params.peer.clone();
        let metrics = self.params.metrics.clone();
        let received = metrics.counter(m::BYTES_RECEIVED, &[("peer", &peer)]);
        let rtt_hist = metrics.histogram(m::LINK_RTT, &[("peer", &peer)]);
        let id = self.id;
        let reject = |e: &codec::CodecError| {
            metrics.counter(m::FRAMES_REJECTED, &[("peer", &peer), ("reason", e.reason())]).increment(1);
            // (Said by the route task with the link's end, once per period.)
            tracing::debug!(peer = %peer, link = id.0, "closing link: bad frame from peer: {e}");
            CloseReason::new(Close::Refused(e.reason()), e.to_string())
        };
        let mut batch: Vec<Frame> = Vec::new();
        // One deadline timer for the life of the link, not one per read
        // (measured: a few % of a relayed message's instructions).
        let dead_after = self.params.dead_after;
        let mut silence = crate::stop::Silence::new(dead_after);
        let mut read_size = IDLE_BUFFER;
        loop {
            loop {
                let frame = match codec::decode(&mut self.buf, self.params.max_frame_bytes) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return reject(&e),
                };
                let frame = match frame.header {
                    Header::Ping { nonce } => {
                        if self.control.try_send(Frame::control(Header::Pong { nonce })).is_err() {
                            return CloseReason::new(Close::ControlOverflow, "peer pings faster than we can answer");
                        }
                        continue;
                    }
                    Header::Pong { nonce } => {
                        let now = micros_since(self.epoch);
                        if nonce <= now {
                            let rtt = Duration::from_micros(now - nonce);
                            rtt_hist.record(rtt.as_secs_f64());
                            self.shared.rtt_us.fetch_min(now - nonce, Ordering::Relaxed);
                            let _ = self.events.try_send(LinkEvent::Rtt { link: self.id, rtt });
                        }
                        continue;
                    }
                    Header::Goodbye { reason } => return CloseReason::new(Close::Goodbye, reason),
                    Header::Hello(_) => {
                        return reject(&codec::CodecError::Garbage("a second hello on a running link".into()));
                    }
                    Header::Data { epoch, seq, more } => match self.reassembly.take(epoch, seq, more, frame.body) {
                        Ok(Some(whole)) => whole,
                        Ok(None) => continue,
                        Err(e) => return reject(&e),
                    },
                    Header::Packed { packing, raw_len } => {
                        // At most what a writer packs: a batch and a chunk.
                        let max = self.params.max_frame_bytes;
                        let max_raw = BATCH_BYTES + CHUNK_BYTES + 1024;
                        let frames = match self.unpacker.unpack(packing, raw_len, &frame.body, max, max_raw) {
                            Ok(f) => f,
                            Err(e) => return reject(&e),
                        };
                        for f in frames {
                            let Header::Data { epoch, seq, more } = f.header else { continue };
                            match self.reassembly.take(epoch, seq, more, f.body) {
                                Ok(Some(whole)) => batch.push(whole),
                                Ok(None) => {}
                                Err(e) => return reject(&e),
                            }
                        }
                        continue;
                    }
                    // Control frames for the owner may come between chunks.
                    _ => frame,
                };
                batch.push(frame);
                if batch.len() >= MAX_BATCH_FRAMES {
                    break;
                }
            }
            if let (false, Some(sink)) = (batch.is_empty(), &self.params.sink) {
                sink.take(self.id, &mut batch);
            }
            if !batch.is_empty() {
                let frames = std::mem::replace(&mut batch, Vec::with_capacity(64));
                if self.events.send(LinkEvent::Frames { link: self.id, frames }).await.is_err() {
                    return CloseReason::new(Close::Shutdown, "");
                }
            }
            if codec::frame_ready(&self.buf) {
                continue; // more whole frames already buffered
            }
            if self.buf.is_empty() && self.buf.capacity() > 4 * CHUNK_BYTES {
                self.buf = BytesMut::with_capacity(IDLE_BUFFER); // after a large message
            }
            // Room for a read of `read_size`. (Messages handed on share
            // the buffer, so a reserve often means a new one: asking for
            // just the rest of a frame, or letting read_buf add 64 bytes,
            // made a busy link read a frame at a time.)
            let spare = self.buf.capacity() - self.buf.len();
            if spare < read_size / 2 {
                self.buf.reserve(read_size);
            }
            let offered = self.buf.capacity() - self.buf.len();
            let read = tokio::select! {
                _ = &mut stop => return CloseReason::new(Close::Closed, ""),
                _ = silence.elapsed() => {
                    return CloseReason::new(Close::Dead, format!("nothing received for {dead_after:?}"));
                }
                r = self.rd.read_buf(&mut self.buf) => r,
            };
            match read {
                Ok(0) => {
                    return match codec::check_eof(&self.buf) {
                        Ok(()) => CloseReason::new(Close::Eof, "peer closed the connection"),
                        Err(e) => reject(&e),
                    };
                }
                Ok(n) => {
                    silence.heard();
                    received.increment(n as u64);
                    // A read that filled what was offered: read more at a time.
                    if n == offered {
                        read_size = (read_size * 2).min(READ_MAX);
                    } else if n < IDLE_BUFFER / 2 {
                        read_size = IDLE_BUFFER;
                    }
                }
                Err(e) => return CloseReason::new(Close::Io, e.to_string()),
            }
        }
    }
}

/// A data message being written out chunk by chunk.
struct Outgoing {
    epoch: Epoch,
    seq: Seq,
    body: Bytes,
    offset: usize,
}

impl Outgoing {
    /// The next chunk (at most CHUNK_BYTES) and its header; `more` is
    /// false on the last.
    fn next_chunk(&mut self) -> (Header, Bytes) {
        let end = (self.offset + CHUNK_BYTES).min(self.body.len());
        let more = end < self.body.len();
        let chunk = self.body.slice(self.offset..end);
        self.offset = end;
        (Header::Data { epoch: self.epoch, seq: self.seq, more }, chunk)
    }
}

struct Writer {
    wr: WriteHalf<BoxIo>,
    params: LinkParams,
    control: mpsc::Receiver<Frame>,
    data: mpsc::Receiver<Frame>,
    epoch: Instant,
    current: Option<Outgoing>,
    /// With compression: a batch's data frames, packed before the write.
    raw: BytesMut,
    packer: codec::Packer,
    /// The last write waited at least PUSHED_BACK for the connection.
    pushed_back: bool,
}

impl Writer {
    async fn run(mut self, shared: &Shared, mut stop: oneshot::Receiver<()>) -> CloseReason {
        let sent = self.params.metrics.counter(m::BYTES_SENT, &[("peer", &self.params.peer)]);
        // Per codec (`Packing` order): bytes before and after.
        let packed = Packing::ALL.map(|p| {
            ["raw", "packed"].map(|stage| {
                let labels = [("peer", self.params.peer.as_str()), ("codec", p.label()), ("stage", stage)];
                self.params.metrics.counter(m::COMPRESSION_BYTES, &labels)
            })
        });
        let mut last_write = Instant::now();
        // Small to start: an idle link should cost little; it grows under load.
        let mut out = BytesMut::with_capacity(IDLE_BUFFER);
        let max = self.params.max_frame_bytes;
        // Made once, not per wait (see the reader); its deadline is when the
        // next heartbeat is due (the first at once).
        let ping = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(ping);
        loop {
            if shared.is_closed() {
                break;
            }
            // Wait only when there is nothing left to write.
            if self.current.is_none() {
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    f = self.control.recv() => match f {
                        Some(f) => push(&f, max, &mut out),
                        None => break,
                    },
                    _ = &mut ping => {}
                    f = self.data.recv() => match f {
                        Some(f) => self.current = outgoing(f),
                        None => break,
                    },
                }
            }
            if tokio::time::Instant::now() >= ping.deadline() {
                // Idle since the last heartbeat: give back what a burst grew.
                if out.is_empty() && out.capacity() > IDLE_BUFFER && last_write.elapsed() >= self.params.heartbeat {
                    out = BytesMut::with_capacity(IDLE_BUFFER);
                }
                push(&Frame::control(Header::Ping { nonce: micros_since(self.epoch) }), max, &mut out);
                ping.as_mut().reset(tokio::time::Instant::now() + self.params.heartbeat);
            }
            // Write at once, with whatever else is already queued (no waiting
            // for a batch to grow: measured, it only added latency).
            // Control first, then data chunks, up to a batch.
            while let Ok(f) = self.control.try_recv() {
                push(&f, max, &mut out);
            }
            let rtt = shared.rtt_us.load(Ordering::Relaxed);
            if rtt != u64::MAX {
                self.params.packing.rtt(Duration::from_micros(rtt));
            }
            // Data frames go straight out unless this batch may be packed.
            let compress = self.params.packing.may_pack();
            while out.len() + self.raw.len() < BATCH_BYTES {
                if self.current.is_none() {
                    match self.data.try_recv() {
                        Ok(f) => self.current = outgoing(f),
                        Err(_) => break,
                    }
                }
                let Some(cur) = self.current.as_mut() else { break };
                let (header, chunk) = cur.next_chunk();
                let last = matches!(header, Header::Data { more: false, .. });
                let to = if compress { &mut self.raw } else { &mut out };
                if let Err(e) = codec::encode(&header, &chunk, max, to) {
                    tracing::error!("dropping an outgoing message: {e}");
                    self.current = None;
                    continue;
                }
                if last {
                    self.current = None;
                }
            }
            if !self.raw.is_empty() {
                let before = out.len();
                // The last write waited for the connection, or the batch
                // filled up with data still waiting: the link is what
                // holds it back.
                let backed_up = self.pushed_back || out.len() + self.raw.len() >= BATCH_BYTES;
                match self.params.packing.choose(self.raw.len(), backed_up) {
                    Some(codec) if self.packer.pack(codec, &self.raw, max, &mut out).is_ok() => {
                        let n = out.len() - before;
                        self.params.packing.packed(self.raw.len(), n);
                        let [raw, after] = &packed[codec.packing() as usize];
                        raw.increment(self.raw.len() as u64);
                        after.increment(n as u64);
                    }
                    _ => out.extend_from_slice(&self.raw),
                }
                self.raw.clear();
            }
            let started = Instant::now();
            if let Err(why) = self.write(&mut out, &sent).await {
                return why;
            }
            last_write = Instant::now();
            // A write the connection held back: the link is the bottleneck.
            self.pushed_back = last_write - started >= PUSHED_BACK;
        }
        // Closing on purpose: say goodbye if we can, briefly.
        let goodbye = shared.goodbye.lock().ok().and_then(|g| g.clone());
        if let Some(reason) = goodbye {
            out.clear();
            push(&Frame::control(Header::Goodbye { reason }), max, &mut out);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = self.wr.write_all(&out).await;
                let _ = self.wr.shutdown().await;
            })
            .await;
        }
        CloseReason::new(Close::Closed, "")
    }

    async fn write(&mut self, out: &mut BytesMut, sent: &metrics::Counter) -> Result<(), CloseReason> {
        if out.is_empty() {
            return Ok(());
        }
        let dead_after = self.params.dead_after;
        let stalled = || CloseReason::new(Close::WriteStall, format!("a write made no progress for {dead_after:?}"));
        let mut off = 0;
        while off < out.len() {
            match tokio::time::timeout(dead_after, self.wr.write(&out[off..])).await {
                Err(_) => return Err(stalled()),
                Ok(Err(e)) => return Err(CloseReason::new(Close::Io, e.to_string())),
                Ok(Ok(0)) => return Err(CloseReason::new(Close::Io, "connection closed while writing")),
                Ok(Ok(n)) => off += n,
            }
        }
        match tokio::time::timeout(dead_after, self.wr.flush()).await {
            Err(_) => return Err(stalled()),
            Ok(Err(e)) => return Err(CloseReason::new(Close::Io, e.to_string())),
            Ok(Ok(())) => {}
        }
        sent.increment(out.len() as u64);
        out.clear();
        Ok(())
    }
}

fn outgoing(f: Frame) -> Option<Outgoing> {
    match f.header {
        Header::Data { epoch, seq, .. } => Some(Outgoing { epoch, seq, body: f.body, offset: 0 }),
        other => {
            tracing::error!("non-data frame {other:?} on the data lane; dropped");
            None
        }
    }
}

fn push(f: &Frame, max: usize, out: &mut BytesMut) {
    if let Err(e) = codec::encode(&f.header, &f.body, max, out) {
        // Our own frame too big for the link: a bug upstream, never sent.
        tracing::error!("dropping an outgoing frame: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Epoch, Seq};

    fn outgoing(seq: u64, len: usize) -> Outgoing {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        Outgoing { epoch: Epoch(7), seq: Seq(seq), body: Bytes::from(body), offset: 0 }
    }

    /// Chunks the way the writer cuts them: (header, chunk) until the last.
    fn chunks(mut o: Outgoing) -> Vec<(Header, Bytes)> {
        let mut out = Vec::new();
        loop {
            let (h, c) = o.next_chunk();
            let last = matches!(h, Header::Data { more: false, .. });
            out.push((h, c));
            if last {
                return out;
            }
        }
    }

    fn feed(r: &mut Reassembly, (h, c): (Header, Bytes)) -> Result<Option<Frame>, codec::CodecError> {
        let Header::Data { epoch, seq, more } = h else { panic!("{h:?}") };
        r.take(epoch, seq, more, c)
    }

    #[test]
    fn a_large_message_goes_in_chunks_and_comes_back_whole() {
        let o = outgoing(1, 2 * CHUNK_BYTES + 1000);
        let body = o.body.clone();
        let parts = chunks(o);
        let more: Vec<bool> = parts.iter().map(|(h, _)| matches!(h, Header::Data { more: true, .. })).collect();
        assert_eq!(more, [true, true, false]);
        assert_eq!(parts.iter().map(|(_, c)| c.len()).collect::<Vec<_>>(), [CHUNK_BYTES, CHUNK_BYTES, 1000]);
        let mut r = Reassembly::new(1 << 20);
        let mut got = parts.into_iter().map(|p| feed(&mut r, p).unwrap()).collect::<Vec<_>>();
        let whole = got.pop().unwrap().expect("whole after the last chunk");
        assert!(got.iter().all(Option::is_none));
        assert_eq!(whole, Frame { header: Header::Data { epoch: Epoch(7), seq: Seq(1), more: false }, body });
        // A small message is one chunk, whole at once; exactly a chunk too.
        for len in [10, CHUNK_BYTES] {
            let parts = chunks(outgoing(2, len));
            assert_eq!(parts.len(), 1);
            assert!(feed(&mut r, parts.into_iter().next().unwrap()).unwrap().is_some());
        }
    }

    #[test]
    fn interleaved_or_oversize_chunks_are_refused() {
        let mut r = Reassembly::new(1 << 20);
        let a = chunks(outgoing(1, CHUNK_BYTES + 10));
        let b = chunks(outgoing(2, CHUNK_BYTES + 10));
        assert_eq!(feed(&mut r, a[0].clone()).unwrap(), None);
        assert!(matches!(feed(&mut r, b[0].clone()), Err(codec::CodecError::Garbage(_))));
        // A message growing past the limit, chunk by chunk.
        let mut r = Reassembly::new(CHUNK_BYTES + 5);
        assert_eq!(feed(&mut r, a[0].clone()).unwrap(), None);
        assert!(matches!(feed(&mut r, a[1].clone()), Err(codec::CodecError::Oversize { .. })));
    }
}
