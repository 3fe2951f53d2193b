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

/// Why a link closed; [`Close::label`] is the metric label
/// (`wandist_link_disconnects_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Close {
    /// Reading or writing failed, or the connection ended inside a write.
    Io,
    /// This side closed it (the owner dropped or closed the link).
    Closed,
    /// A write made no progress for `dead_after`.
    WriteStall,
    /// Nothing at all arrived for `dead_after`.
    Dead,
    /// The peer closed the connection without a goodbye.
    Eof,
    /// The peer closed it and said why.
    Goodbye,
    /// Control frames backed up (the peer pings faster than we answer, or
    /// the link is not draining).
    ControlOverflow,
    /// The gateway, or the route, is stopping.
    Shutdown,
    /// The route holds as many links as it may (`max_links`).
    LinkLimit,
    /// Superseded by a link to the peer's new run.
    PeerRestarted,
    /// Both sides dialed; the older links are kept.
    Surplus,
    /// A bad frame (the codec's reason) or a protocol violation (the
    /// route's): the label is theirs (`CodecError::reason`,
    /// `Violation::label`).
    Refused(&'static str),
}

impl Close {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Close::Io => "io",
            Close::Closed => "closed",
            Close::WriteStall => "write_stall",
            Close::Dead => "dead",
            Close::Eof => "eof",
            Close::Goodbye => "goodbye",
            Close::ControlOverflow => "control_overflow",
            Close::Shutdown => "shutdown",
            Close::LinkLimit => "link_limit",
            Close::PeerRestarted => "peer_restarted",
            Close::Surplus => "surplus",
            Close::Refused(label) => label,
        }
    }
}

/// Why a link went down, with what was said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub kind: Close,
    pub detail: String,
}

impl CloseReason {
    pub fn new(kind: Close, detail: impl Into<String>) -> Self {
        CloseReason { kind, detail: detail.into() }
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        self.kind.label()
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.label())
        } else {
            write!(f, "{}: {}", self.label(), self.detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels are what dashboards and alerts match: one each, as
    /// Prometheus labels are written.
    #[test]
    fn every_close_has_its_own_label() {
        let all = [
            Close::Io,
            Close::Closed,
            Close::WriteStall,
            Close::Dead,
            Close::Eof,
            Close::Goodbye,
            Close::ControlOverflow,
            Close::Shutdown,
            Close::LinkLimit,
            Close::PeerRestarted,
            Close::Surplus,
        ];
        let labels: std::collections::BTreeSet<&str> = all.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert!(labels.iter().all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        assert_eq!(Close::Refused("gap").label(), "gap");
        assert_eq!(CloseReason::new(Close::Dead, "nothing for 3s").to_string(), "dead: nothing for 3s");
        assert_eq!(CloseReason::new(Close::Closed, "").to_string(), "closed");
    }
}
