//! Getting from a TCP connection to an authenticated link: dial (direct or via
//! SOCKS5), TLS (mutual), then the preamble and hello exchange. Every phase
//! runs under its own deadline, so a peer that accepts and then says nothing
//! cannot hang a link.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{BoxIo, Timeouts};
use crate::config::{Endpoint, Socks5};
use crate::tls::{server_name, Tls};
use crate::wire::codec::{self, CodecError};
use crate::wire::{Epoch, Frame, Header, Hello, CAPABILITIES, PREAMBLE_LEN, PROTOCOL_VERSION};

/// Who we are, as told in our hello.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster: String,
    pub gateway: String,
    pub epoch: Epoch,
}

/// What a route asks of the peer in its hello.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    pub links_wanted: u8,
    pub recv_window: crate::route::Window,
}

impl Identity {
    pub fn hello(&self, offer: Offer) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: self.cluster.clone(),
            gateway: self.gateway.clone(),
            epoch: self.epoch,
            links_wanted: offer.links_wanted,
            recv_window_messages: offer.recv_window.messages.min(u32::MAX as usize) as u32,
            recv_window_bytes: offer.recv_window.bytes as u64,
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// What an accepting gateway needs to know about each peer cluster it admits.
#[derive(Debug, Clone)]
pub struct Admission {
    pub insecure_plaintext: bool,
    pub offer: Offer,
    /// The route's say on the peer's run, before our hello is sent: the
    /// epoch to tell it (the route's session epoch), or why another
    /// instance of the peer cluster is refused. Without one, the gateway's
    /// own epoch and no refusal.
    pub session: Option<SessionCheck>,
    /// This instance stands by for the route (another instance of our
    /// cluster holds it, `[erlang] coordinate`): the peer is refused with
    /// `STANDBY`, after its certificate proved who it is.
    pub standby: bool,
}

/// See [`Admission::session`]: `Ok(our epoch)` or `Err(the instance
/// holding the route)`.
#[derive(Clone)]
pub struct SessionCheck(pub Arc<CheckFn>);

pub type CheckFn = dyn Fn(&Hello) -> Result<Epoch, String> + Send + Sync;

impl std::fmt::Debug for SessionCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionCheck")
    }
}

/// The start of the goodbye (and error) that refuses a second instance of
/// a peer cluster while the route holds links to another: the refused
/// instance is a standby for the route and tries again soon.
pub const OTHER_INSTANCE: &str = "another instance of your cluster holds this route";

/// The start of the goodbye (and error) from a gateway instance that
/// stands by for the dialer's route: the dialer tries its other endpoints.
pub const STANDBY: &str = "this gateway instance stands by for your route (another instance of its cluster holds it)";

/// A link that has passed every check, ready to run.
pub struct Established {
    pub io: BoxIo,
    pub peer: Hello,
    /// Bytes read past the hello, which belong to the first frames.
    pub rest: BytesMut,
    pub dialed: bool,
    pub tls: bool,
    pub remote: String,
    /// The epoch our hello on this link carried.
    pub our_epoch: Epoch,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Established({} {} at {})", self.peer.cluster, self.peer.gateway, self.remote)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Socks,
    Tls,
    Hello,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "TCP connect",
            Phase::Socks => "SOCKS5 negotiation",
            Phase::Tls => "TLS handshake",
            Phase::Hello => "hello exchange",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("{0} timed out after {1:?}")]
    Timeout(Phase, Duration),
    #[error("TCP connect to {0} failed: {1}")]
    Connect(String, io::Error),
    #[error("SOCKS5 proxy {0}: {1}")]
    Socks(String, String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("connection failed during the hello: {0}")]
    Io(io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("expected a hello, got {0}")]
    Unexpected(String),
    #[error("peer claims to be cluster {claimed:?} but {why}")]
    Identity { claimed: String, why: String },
    #[error("dialed cluster {expected:?} but reached {got:?}")]
    WrongPeer { expected: String, got: String },
    #[error("no route for cluster {0:?}: connection refused")]
    NoRoute(String),
    #[error("plaintext connection from {0:?} refused: its route does not set insecure_plaintext")]
    PlaintextRefused(String),
    #[error("TLS connection refused: this gateway has no [tls] configured")]
    NoTls,
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("another instance of your cluster holds this route: {0}")]
    OtherInstance(String),
    #[error("{STANDBY}")]
    Standby,
    #[error("the peer is this gateway's own cluster {0:?}")]
    SelfConnect(String),
    #[error("too many handshakes in progress")]
    Overload,
}

impl HandshakeError {
    /// The metric label.
    /// The reason label of `OtherInstance`, for refusals counted where no
    /// such error was made (a link this side refuses for the same cause).
    pub const OTHER_INSTANCE_LABEL: &'static str = "other_instance";

    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout(Phase::Connect, _) => "connect_timeout",
            HandshakeError::Timeout(Phase::Socks, _) => "socks_timeout",
            HandshakeError::Timeout(Phase::Tls, _) => "tls_timeout",
            HandshakeError::Timeout(Phase::Hello, _) => "hello_timeout",
            HandshakeError::Connect(..) => "connect",
            HandshakeError::Socks(..) => "socks",
            HandshakeError::Tls(_) => "tls",
            HandshakeError::Io(_) => "io",
            HandshakeError::Codec(e) => e.reason(),
            HandshakeError::Unexpected(_) => "unexpected_frame",
            HandshakeError::Identity { .. } => "identity",
            HandshakeError::WrongPeer { .. } => "wrong_peer",
            HandshakeError::NoRoute(_) => "no_route",
            HandshakeError::PlaintextRefused(_) => "plaintext_refused",
            HandshakeError::NoTls => "no_tls",
            HandshakeError::Refused(_) => "refused_by_peer",
            HandshakeError::OtherInstance(_) => Self::OTHER_INSTANCE_LABEL,
            HandshakeError::Standby => "standby",
            HandshakeError::SelfConnect(_) => "self",
            HandshakeError::Overload => "overload",
        }
    }
}

async fn within<T>(
    phase: Phase,
    after: Duration,
    f: impl Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    tokio::time::timeout(after, f).await.unwrap_or(Err(HandshakeError::Timeout(phase, after)))
}

/// Runs one phase of a handshake that must be done by `deadline` as a
/// whole (`total` is what the error reports).
async fn until<T>(
    phase: Phase,
    deadline: tokio::time::Instant,
    total: Duration,
    f: impl Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    tokio::time::timeout_at(deadline, f).await.unwrap_or(Err(HandshakeError::Timeout(phase, total)))
}

/// Opens a TCP connection to `ep`, through `socks` if given.
pub async fn dial(ep: &Endpoint, socks: Option<&Socks5>, t: &Timeouts) -> Result<TcpStream, HandshakeError> {
    let Some(socks) = socks else {
        let addr = (ep.host.as_str(), ep.port);
        let tcp = within(Phase::Connect, t.connect, async {
            TcpStream::connect(addr).await.map_err(|e| HandshakeError::Connect(ep.to_string(), e))
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        return Ok(tcp);
    };
    let proxy = socks.proxy.to_string();
    let tcp = within(Phase::Connect, t.connect, async {
        TcpStream::connect((socks.proxy.host.as_str(), socks.proxy.port))
            .await
            .map_err(|e| HandshakeError::Connect(format!("SOCKS5 proxy {proxy}"), e))
    })
    .await?;
    let _ = tcp.set_nodelay(true);
    let target = (ep.host.as_str(), ep.port);
    within(Phase::Socks, t.handshake, async {
        let stream = match &socks.auth {
            None => tokio_socks::tcp::Socks5Stream::connect_with_socket(tcp, target).await,
            Some((user, pass)) => {
                tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(tcp, target, user, pass.expose()).await
            }
        };
        stream
            .map(|s| s.into_inner())
            .map_err(|e| HandshakeError::Socks(proxy.clone(), format!("cannot reach {ep}: {e}")))
    })
    .await
}

fn tls_error(e: io::Error) -> HandshakeError {
    HandshakeError::Tls(e)
}

/// The dialing side: TLS to the peer named `expect` (unless `tls` is None,
/// which the caller allows only for insecure_plaintext routes), then hellos.
pub async fn client(
    tcp: TcpStream,
    tls: Option<&Tls>,
    expect: &str,
    ours: Hello,
    t: &Timeouts,
    max_frame: usize,
) -> Result<Established, HandshakeError> {
    let remote = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    // One deadline for TLS and the hellos together.
    let deadline = tokio::time::Instant::now() + t.handshake;
    let (io, is_tls): (BoxIo, bool) = match tls {
        Some(tls) => {
            let name = server_name(expect).map_err(|e| HandshakeError::Identity { claimed: expect.into(), why: e })?;
            let stream = until(Phase::Tls, deadline, t.handshake, async {
                TlsConnector::from(tls.client_for(expect).clone()).connect(name, tcp).await.map_err(tls_error)
            })
            .await?;
            (Box::new(stream), true)
        }
        None => (Box::new(tcp), false),
    };
    until(Phase::Hello, deadline, t.handshake, async move {
        let mut io = io;
        let our_epoch = ours.epoch;
        send_hello(&mut io, &Header::Hello(ours), max_frame).await?;
        let (peer, rest) = read_hello(&mut io, max_frame).await.map_err(|e| match e {
            HandshakeError::Refused(r) if r.starts_with(OTHER_INSTANCE) => {
                HandshakeError::OtherInstance(r[OTHER_INSTANCE.len()..].trim_start_matches(": ").to_string())
            }
            HandshakeError::Refused(r) if r.starts_with(STANDBY) => HandshakeError::Standby,
            e => e,
        })?;
        if peer.cluster != expect {
            return Err(HandshakeError::WrongPeer { expected: expect.into(), got: peer.cluster });
        }
        Ok(Established { io, peer, rest, dialed: true, tls: is_tls, remote, our_epoch })
    })
    .await
}

/// The accepting side. `admit` holds the clusters this gateway has routes to.
/// On failure also returns the claimed cluster once its certificate proved it.
pub async fn server(
    tcp: TcpStream,
    tls: Option<&Tls>,
    own: &Identity,
    admit: &HashMap<String, Admission>,
    t: &Timeouts,
    max_frame: usize,
) -> Result<Established, HandshakeError> {
    let _ = tcp.set_nodelay(true);
    let remote = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    // One deadline for everything before the peer is known: a silent or
    // slow client holds a handshake slot this long at most, whatever phase
    // it stalls in.
    let deadline = tokio::time::Instant::now() + t.handshake;
    let mut first = [0u8; 1];
    let n =
        until(Phase::Hello, deadline, t.handshake, async { tcp.peek(&mut first).await.map_err(HandshakeError::Io) })
            .await?;
    if n == 0 {
        return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    // A TLS record starts with content type 22 (handshake); our preamble with 'W'.
    let (io, certs): (BoxIo, Option<Vec<rustls::pki_types::CertificateDer<'static>>>) = if first[0] == 0x16 {
        let tls = tls.ok_or(HandshakeError::NoTls)?;
        let stream = until(Phase::Tls, deadline, t.handshake, async {
            TlsAcceptor::from(tls.server.clone()).accept(tcp).await.map_err(tls_error)
        })
        .await?;
        let certs = stream.get_ref().1.peer_certificates().map(|c| c.to_vec()).unwrap_or_default();
        (Box::new(stream), Some(certs))
    } else {
        (Box::new(tcp), None)
    };
    until(Phase::Hello, deadline, t.handshake, async move {
        let mut io = io;
        let (peer, rest) = read_hello(&mut io, max_frame).await?;
        let verdict = admit_peer(&peer, certs.as_deref().zip(tls), own, admit).and_then(|a| match &a.session {
            Some(check) => (check.0)(&peer).map(|epoch| (a.offer, epoch)).map_err(HandshakeError::OtherInstance),
            None => Ok((a.offer, own.epoch)),
        });
        match verdict {
            Ok((offer, our_epoch)) => {
                let hello = Hello { epoch: our_epoch, ..own.hello(offer) };
                send_hello(&mut io, &Header::Hello(hello), max_frame).await?;
                Ok(Established { io, peer, rest, dialed: false, tls: certs.is_some(), remote, our_epoch })
            }
            Err(e) => {
                // Best effort: tell the dialer why, so its log says more than "EOF".
                let _ = send_hello(&mut io, &Header::Goodbye { reason: e.to_string() }, max_frame).await;
                let _ = io.shutdown().await;
                Err(e)
            }
        }
    })
    .await
}

fn admit_peer(
    peer: &Hello,
    certs: Option<(&[rustls::pki_types::CertificateDer<'static>], &Tls)>,
    own: &Identity,
    admit: &HashMap<String, Admission>,
) -> Result<Admission, HandshakeError> {
    if let Some((certs, tls)) = certs {
        // Again, now that the cluster is known: its own CA, not any CA
        // trusted for some peer.
        tls.verify_peer(certs, &peer.cluster)
            .map_err(|why| HandshakeError::Identity { claimed: peer.cluster.clone(), why })?;
    }
    if peer.cluster == own.cluster {
        return Err(HandshakeError::SelfConnect(peer.cluster.clone()));
    }
    let admission = admit.get(&peer.cluster).cloned().ok_or_else(|| HandshakeError::NoRoute(peer.cluster.clone()))?;
    if certs.is_none() && !admission.insecure_plaintext {
        return Err(HandshakeError::PlaintextRefused(peer.cluster.clone()));
    }
    if admission.standby {
        return Err(HandshakeError::Standby);
    }
    Ok(admission)
}

/// Closes an established connection before it becomes a link, telling the
/// peer why (best effort). Both hellos have crossed, so the peer reads
/// frames now: a goodbye frame alone, with no preamble (one before it
/// would read as a frame length of 0x57444953, "oversize").
pub async fn goodbye(est: Established, reason: String, max_frame: usize) {
    let mut io = est.io;
    let mut out = BytesMut::with_capacity(128);
    if codec::encode(&Header::Goodbye { reason }, &[], max_frame, &mut out).is_ok() {
        let _ = io.write_all(&out).await;
    }
    let _ = io.shutdown().await;
}

async fn send_hello(io: &mut BoxIo, header: &Header, max_frame: usize) -> Result<(), HandshakeError> {
    let mut out = BytesMut::with_capacity(128);
    out.extend_from_slice(&codec::preamble());
    codec::encode(header, &[], max_frame, &mut out)?;
    io.write_all(&out).await.map_err(HandshakeError::Io)?;
    io.flush().await.map_err(HandshakeError::Io)
}

/// Reads the peer's preamble and first frame, which must be a hello (or a
/// goodbye saying why we were refused). Public for the fuzz target
/// (`fuzz/fuzz_targets/handshake.rs`), which feeds it arbitrary bytes.
pub async fn read_hello<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    max_frame: usize,
) -> Result<(Hello, BytesMut), HandshakeError> {
    let mut pre = [0u8; PREAMBLE_LEN];
    io.read_exact(&mut pre).await.map_err(HandshakeError::Io)?;
    codec::check_preamble(&pre)?;
    // The hello is small; do not let a peer make us buffer a huge frame here.
    let limit = max_frame.min(codec::MIN_FRAME_LIMIT);
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match codec::decode(&mut buf, limit)? {
            Some(Frame { header: Header::Hello(h), .. }) => {
                if h.version != PROTOCOL_VERSION {
                    return Err(CodecError::Version(h.version).into());
                }
                return Ok((h, buf));
            }
            Some(Frame { header: Header::Goodbye { reason }, .. }) => return Err(HandshakeError::Refused(reason)),
            Some(other) => return Err(HandshakeError::Unexpected(format!("{:?}", other.header))),
            None => {}
        }
        if io.read_buf(&mut buf).await.map_err(HandshakeError::Io)? == 0 {
            codec::check_eof(&buf)?;
            return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Epoch;

    fn identity(cluster: &str) -> Identity {
        Identity { cluster: cluster.into(), gateway: format!("gw-{cluster}"), epoch: Epoch(9) }
    }

    fn offer() -> Offer {
        Offer { links_wanted: 1, recv_window: crate::route::Window { messages: 100, bytes: 1 << 20 } }
    }

    fn admission(insecure_plaintext: bool, standby: bool) -> Admission {
        Admission { insecure_plaintext, offer: offer(), session: None, standby }
    }

    #[test]
    fn a_hello_says_who_we_are_and_what_this_build_speaks() {
        let h = identity("dc1").hello(offer());
        assert_eq!(
            (h.version, h.cluster.as_str(), h.gateway.as_str(), h.epoch),
            (PROTOCOL_VERSION, "dc1", "gw-dc1", Epoch(9))
        );
        assert_eq!((h.links_wanted, h.recv_window_messages, h.recv_window_bytes), (1, 100, 1 << 20));
        assert_eq!(h.capabilities, CAPABILITIES.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    }

    /// Who is admitted once the hello is in, without TLS (with TLS the
    /// certificate is checked first, against the claimed cluster's CA:
    /// tests/refusals.rs).
    #[test]
    fn only_a_routed_other_cluster_is_admitted_and_plaintext_only_where_allowed() {
        let own = identity("dc1");
        let admit: HashMap<String, Admission> = [
            ("dc2".to_string(), admission(true, false)),
            ("dc3".to_string(), admission(false, false)),
            ("dc4".to_string(), admission(true, true)),
        ]
        .into_iter()
        .collect();
        let hello = |c: &str| identity(c).hello(offer());
        let reason = |c: &str| admit_peer(&hello(c), None, &own, &admit).err().map(|e| e.reason());
        assert_eq!(reason("dc2"), None);
        assert_eq!(reason("dc1"), Some("self"));
        assert_eq!(reason("dc9"), Some("no_route"));
        assert_eq!(reason("dc3"), Some("plaintext_refused"));
        assert_eq!(reason("dc4"), Some("standby"));
    }
}
