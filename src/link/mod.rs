//! One connection between two gateways: dialing (TCP, optionally through a
//! SOCKS5 proxy), the TLS and hello handshake with a deadline on every phase,
//! and the running link (reader, writer, heartbeats).

pub mod backoff;
pub mod conn;
pub mod handshake;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// Anything a link can run over: a TLS stream or a plain TCP stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Deadlines for each handshake phase.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect (to the peer, or to the SOCKS5 proxy).
    pub connect: Duration,
    /// The SOCKS5 negotiation; then, as one deadline, TLS and the hello
    /// exchange (for an accepted connection: everything before the peer
    /// is known).
    pub handshake: Duration,
}

/// Why a link went down or never came up; `label` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub label: &'static str,
    pub detail: String,
}

impl CloseReason {
    pub fn new(label: &'static str, detail: impl Into<String>) -> Self {
        CloseReason { label, detail: detail.into() }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.label)
        } else {
            write!(f, "{}: {}", self.label, self.detail)
        }
    }
}
