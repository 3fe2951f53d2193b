//! A TCP forwarder the test controls: its target can be set after it is
//! listening (so two gateways can dial each other with port 0 everywhere),
//! and it can cut every connection or blackhole them (stop forwarding while
//! keeping the sockets open).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    target: Mutex<Option<SocketAddr>>,
    conns: Mutex<Vec<TcpStream>>,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    accepted: AtomicUsize,
    forwarded: AtomicUsize,
    stop: AtomicBool,
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

    /// Connections that reached the target.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<State>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        loop {
            if st.stop.load(Ordering::SeqCst) {
                break;
            }
            if st.blackhole.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
