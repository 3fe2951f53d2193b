//! A fault-injecting TCP proxy the test controls. Its target can be set after
//! it is listening (so two gateways can dial each other with port 0
//! everywhere), and at any moment it can:
//! - cut every connection (close both ends),
//! - blackhole them (stop forwarding, keep the sockets open),
//! - refuse new connections (accept and close at once),
//! - delay every chunk by a fixed latency plus random jitter, each way,
//! - throttle each direction to a number of bytes per second,
//! - split writes into pieces of at most N bytes.
//!
//! Each direction of a connection is a reader thread (stamps every chunk
//! with its due time) and a writer thread (waits for it, applies the
//! throttle and the split). Chunks stay in order even with jitter, as TCP
//! would keep them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    target: Mutex<Option<SocketAddr>>,
    conns: Mutex<Vec<TcpStream>>,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    accepted: AtomicUsize,
    forwarded: AtomicUsize,
    stop: AtomicBool,
    /// Added to every chunk, each way, in µs.
    latency_us: AtomicU64,
    /// Up to this much more, uniformly at random, in µs.
    jitter_us: AtomicU64,
    /// Bytes per second each way; 0 = unlimited.
    rate: AtomicU64,
    /// Largest write; 0 = as read.
    split: AtomicUsize,
    /// Bytes forwarded (both directions).
    bytes: AtomicU64,
    /// Most bytes read and not yet written, each way (a link's buffers);
    /// 0 = only the chunk count bounds it.
    queue_limit: AtomicUsize,
}

pub struct Forwarder {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Forwarder {
    pub fn start(target: Option<SocketAddr>) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        *state.target.lock().unwrap() = target;
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let target = *st.target.lock().unwrap();
                let (Some(target), false) = (target, st.refuse.load(Ordering::SeqCst)) else {
                    continue;
                };
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    continue;
                };
                st.forwarded.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = st.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                }
                pump(client.try_clone().unwrap(), server.try_clone().unwrap(), st.clone());
                pump(server, client, st.clone());
            }
        });
        Forwarder { addr, state }
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.state.target.lock().unwrap() = Some(target);
    }

    /// Closes every forwarded connection (both ends).
    pub fn cut(&self) {
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// While on, bytes stop flowing both ways but sockets stay open.
    pub fn blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, new connections are accepted and closed at once.
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    /// Every chunk read from now on is delivered `latency` plus up to
    /// `jitter` later, each way.
    pub fn delay(&self, latency: Duration, jitter: Duration) {
        self.state.latency_us.store(latency.as_micros() as u64, Ordering::SeqCst);
        self.state.jitter_us.store(jitter.as_micros() as u64, Ordering::SeqCst);
    }

    /// At most `bytes_per_s` each way (0 lifts the limit).
    pub fn throttle(&self, bytes_per_s: u64) {
        self.state.rate.store(bytes_per_s, Ordering::SeqCst);
    }

    /// Holds at most `bytes` read and not yet written, each way, as a
    /// link's buffers would (0: up to 256 chunks of 64 KiB).
    pub fn queue_limit(&self, bytes: usize) {
        self.state.queue_limit.store(bytes, Ordering::SeqCst);
    }

    /// Writes at most `max` bytes at a time (0 lifts it).
    pub fn split(&self, max: usize) {
        self.state.split.store(max, Ordering::SeqCst);
    }

    /// Connections that reached the target.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(self.addr);
    }
}

/// One direction: a reader stamping chunks with their due time, a writer
/// sending them when due, throttled and split.
fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<State>) {
    // Bounded: a slow writer (throttle, latency) pushes back on the reader,
    // and so on the sender's TCP window.
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(256);
    // Bytes read and not yet written, this direction.
    let queued = Arc::new(AtomicUsize::new(0));
    let writer_queued = queued.clone();
    let reader_st = st.clone();
    let to_close = to.try_clone().unwrap();
    std::thread::spawn(move || {
        let st = reader_st;
        let mut buf = vec![0u8; 64 * 1024];
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let mut last_due = Instant::now();
        loop {
            if st.stop.load(Ordering::SeqCst) {
                break;
            }
            if st.blackhole.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let limit = st.queue_limit.load(Ordering::SeqCst);
            if limit > 0 && queued.load(Ordering::SeqCst) >= limit {
                // Full: the sender's TCP window closes until the writer drains.
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let lat = st.latency_us.load(Ordering::SeqCst);
                    let jit = st.jitter_us.load(Ordering::SeqCst);
                    let extra = if jit > 0 { fastrand::u64(0..=jit) } else { 0 };
                    // In order, as TCP keeps it: never due before the previous chunk.
                    let due = (Instant::now() + Duration::from_micros(lat + extra)).max(last_due);
                    last_due = due;
                    queued.fetch_add(n, Ordering::SeqCst);
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(_) => break,
            }
        }
        drop(tx);
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        // Throttle by a token bucket refilled continuously; one second of burst.
        let mut sent_since = (Instant::now(), 0u64);
        for (due, chunk) in rx {
            if st.stop.load(Ordering::SeqCst) {
                break;
            }
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let split = st.split.load(Ordering::SeqCst);
            let piece = if split == 0 { chunk.len() } else { split };
            for part in chunk.chunks(piece.max(1)) {
                let rate = st.rate.load(Ordering::SeqCst);
                if rate > 0 {
                    let (start, sent) = &mut sent_since;
                    *sent += part.len() as u64;
                    let ahead = Duration::from_secs_f64(*sent as f64 / rate as f64).saturating_sub(start.elapsed());
                    if !ahead.is_zero() {
                        std::thread::sleep(ahead);
                    }
                    if start.elapsed() > Duration::from_secs(1) {
                        sent_since = (Instant::now(), 0);
                    }
                }
                if to.write_all(part).is_err() {
                    let _ = to_close.shutdown(Shutdown::Both);
                    return;
                }
                st.bytes.fetch_add(part.len() as u64, Ordering::SeqCst);
            }
            writer_queued.fetch_sub(chunk.len(), Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}
