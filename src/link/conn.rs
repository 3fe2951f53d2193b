//! A running link: a reader and a writer over one established connection.
//!
//! The writer puts control frames (heartbeats, pongs, goodbyes) ahead of
//! data and batches whatever is queued into one write. The reader answers
//! pings, measures RTT from pongs, and declares the link dead when nothing at
//! all has arrived for `dead_after`; the writer does the same for a write
//! that stalls that long. Either way the link closes once, with one reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handshake::Established;
use super::{BoxIo, CloseReason};
use crate::metrics as m;
use crate::wire::codec;
use crate::wire::{Frame, Header};

/// Frames queued per lane before senders wait.
const CONTROL_QUEUE: usize = 256;
const DATA_QUEUE: usize = 1024;
/// The writer stops gathering a batch at this size.
const BATCH_BYTES: usize = 256 * 1024;

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone)]
pub struct LinkParams {
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub max_frame_bytes: usize,
    /// The peer cluster, for metric labels and logs.
    pub peer: String,
}

/// What a link tells its owner.
#[derive(Debug)]
pub enum LinkEvent {
    Frame { link: u64, frame: Frame },
    Rtt { link: u64, rtt: Duration },
    Closed { link: u64, reason: CloseReason },
}

/// The owner's handle on a running link. Dropping it closes the link.
#[derive(Debug)]
pub struct Link {
    pub id: u64,
    control: mpsc::Sender<Frame>,
    data: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    cancel: CancellationToken,
    reason: OnceLock<CloseReason>,
    /// Set when we close on purpose: the writer says goodbye with it.
    goodbye: Mutex<Option<String>>,
}

impl Shared {
    fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }
}

impl Link {
    /// Queues a control frame; fails if the link is gone or hopelessly behind.
    pub fn send_control(&self, frame: Frame) -> bool {
        self.control.try_send(frame).is_ok()
    }

    /// Queues a data frame, waiting for room (backpressure).
    pub async fn send_data(&self, frame: Frame) -> bool {
        self.data.send(frame).await.is_ok()
    }

    /// Closes the link, telling the peer why.
    pub fn close(&self, label: &'static str, why: &str) {
        if let Ok(mut g) = self.shared.goodbye.lock() {
            g.get_or_insert_with(|| why.to_string());
        }
        self.shared.close(CloseReason::new(label, why));
    }

    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close("closed", "link handle dropped");
    }
}

/// Starts a link's tasks. Events (frames, RTT samples, the one `Closed`)
/// arrive on `events`. The owner closes the link (`close`, or by dropping
/// the handle), so that the peer always hears a goodbye with the reason.
pub fn spawn(
    est: Established,
    params: LinkParams,
    events: mpsc::Sender<LinkEvent>,
    tracker: &TaskTracker,
) -> Link {
    let id = NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let shared = Arc::new(Shared {
        cancel: CancellationToken::new(),
        reason: OnceLock::new(),
        goodbye: Mutex::new(None),
    });
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
    };
    let writer = Writer {
        wr,
        params,
        control: control_rx,
        data: data_rx,
        epoch,
    };
    let task_shared = shared.clone();
    tracker.spawn(async move {
        let shared = task_shared;
        let r = async {
            let why = reader.run(&shared.cancel).await;
            shared.close(why);
        };
        let w = async {
            let why = writer.run(&shared).await;
            shared.close(why);
        };
        tokio::join!(r, w);
        let reason = shared
            .reason
            .get()
            .cloned()
            .unwrap_or_else(|| CloseReason::new("closed", ""));
        let _ = events.send(LinkEvent::Closed { link: id, reason }).await;
    });
    Link {
        id,
        control: control_tx,
        data: data_tx,
        shared,
    }
}

fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

struct Reader {
    id: u64,
    rd: ReadHalf<BoxIo>,
    buf: BytesMut,
    params: LinkParams,
    events: mpsc::Sender<LinkEvent>,
    control: mpsc::Sender<Frame>,
    epoch: Instant,
}

impl Reader {
    async fn run(mut self, cancel: &CancellationToken) -> CloseReason {
        let peer = self.params.peer.clone();
        let received = metrics::counter!(m::BYTES_RECEIVED, "peer" => peer.clone());
        let rtt_hist = metrics::histogram!(m::LINK_RTT, "peer" => peer.clone());
        let reject = |e: &codec::CodecError| {
            metrics::counter!(m::FRAMES_REJECTED, "peer" => peer.clone(), "reason" => e.reason())
                .increment(1);
            tracing::warn!(peer = %peer, link = self.id, "closing link: bad frame from peer: {e}");
            CloseReason::new(e.reason(), e.to_string())
        };
        loop {
            loop {
                let frame = match codec::decode(&mut self.buf, self.params.max_frame_bytes) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return reject(&e),
                };
                match frame.header {
                    Header::Ping { nonce } => {
                        if self
                            .control
                            .try_send(Frame::control(Header::Pong { nonce }))
                            .is_err()
                        {
                            return CloseReason::new(
                                "control_overflow",
                                "peer pings faster than we can answer",
                            );
                        }
                    }
                    Header::Pong { nonce } => {
                        let now = micros_since(self.epoch);
                        if nonce <= now {
                            let rtt = Duration::from_micros(now - nonce);
                            rtt_hist.record(rtt.as_secs_f64());
                            let _ = self.events.try_send(LinkEvent::Rtt { link: self.id, rtt });
                        }
                    }
                    Header::Goodbye { reason } => return CloseReason::new("goodbye", reason),
                    Header::Data { .. } => {
                        if self
                            .events
                            .send(LinkEvent::Frame {
                                link: self.id,
                                frame,
                            })
                            .await
                            .is_err()
                        {
                            return CloseReason::new("shutdown", "");
                        }
                    }
                    other => {
                        let e = codec::CodecError::Garbage(format!(
                            "unexpected {other:?} on a running link"
                        ));
                        return reject(&e);
                    }
                }
            }
            let read = tokio::select! {
                _ = cancel.cancelled() => return CloseReason::new("closed", ""),
                r = tokio::time::timeout(self.params.dead_after, self.rd.read_buf(&mut self.buf)) => r,
            };
            match read {
                Err(_) => {
                    return CloseReason::new(
                        "dead",
                        format!("nothing received for {:?}", self.params.dead_after),
                    );
                }
                Ok(Ok(0)) => {
                    return match codec::check_eof(&self.buf) {
                        Ok(()) => CloseReason::new("eof", "peer closed the connection"),
                        Err(e) => reject(&e),
                    };
                }
                Ok(Ok(n)) => received.increment(n as u64),
                Ok(Err(e)) => return CloseReason::new("io", e.to_string()),
            }
        }
    }
}

struct Writer {
    wr: WriteHalf<BoxIo>,
    params: LinkParams,
    control: mpsc::Receiver<Frame>,
    data: mpsc::Receiver<Frame>,
    epoch: Instant,
}

impl Writer {
    async fn run(mut self, shared: &Shared) -> CloseReason {
        let sent = metrics::counter!(m::BYTES_SENT, "peer" => self.params.peer.clone());
        let mut tick = tokio::time::interval(self.params.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = BytesMut::with_capacity(64 * 1024);
        let max = self.params.max_frame_bytes;
        loop {
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => break,
                f = self.control.recv() => match f {
                    Some(f) => push(&f, max, &mut out),
                    None => break,
                },
                _ = tick.tick() => {
                    push(&Frame::control(Header::Ping { nonce: micros_since(self.epoch) }), max, &mut out);
                }
                f = self.data.recv() => match f {
                    Some(f) => push(&f, max, &mut out),
                    None => break,
                },
            }
            // Gather whatever else is ready, control first, up to a batch.
            while out.len() < BATCH_BYTES {
                if let Ok(f) = self.control.try_recv() {
                    push(&f, max, &mut out);
                } else if let Ok(f) = self.data.try_recv() {
                    push(&f, max, &mut out);
                } else {
                    break;
                }
            }
            if let Err(why) = self.write(&mut out, &sent).await {
                return why;
            }
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
        CloseReason::new("closed", "")
    }

    async fn write(
        &mut self,
        out: &mut BytesMut,
        sent: &metrics::Counter,
    ) -> Result<(), CloseReason> {
        if out.is_empty() {
            return Ok(());
        }
        let dead_after = self.params.dead_after;
        let stalled = || {
            CloseReason::new(
                "write_stall",
                format!("a write made no progress for {dead_after:?}"),
            )
        };
        let mut off = 0;
        while off < out.len() {
            match tokio::time::timeout(dead_after, self.wr.write(&out[off..])).await {
                Err(_) => return Err(stalled()),
                Ok(Err(e)) => return Err(CloseReason::new("io", e.to_string())),
                Ok(Ok(0)) => return Err(CloseReason::new("io", "connection closed while writing")),
                Ok(Ok(n)) => off += n,
            }
        }
        match tokio::time::timeout(dead_after, self.wr.flush()).await {
            Err(_) => return Err(stalled()),
            Ok(Err(e)) => return Err(CloseReason::new("io", e.to_string())),
            Ok(Ok(())) => {}
        }
        sent.increment(out.len() as u64);
        out.clear();
        Ok(())
    }
}

fn push(f: &Frame, max: usize, out: &mut BytesMut) {
    if let Err(e) = codec::encode(&f.header, &f.body, max, out) {
        // Our own frame too big for the link: a bug upstream, never sent.
        tracing::error!("dropping an outgoing frame: {e}");
    }
}
