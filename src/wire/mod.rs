//! Gateway-to-gateway protocol: the connection preamble and the frame types.
//!
//! A connection (after TLS, if any) starts with a 6-byte preamble from each
//! side — `b"WDST"` and the protocol version — then carries frames. A frame is
//! a 4-byte big-endian length, a serialized [`Header`], and an opaque body
//! (payload bytes, never run through the serializer). Encoding lives in
//! [`codec`], the only module that knows the serializer. What the Erlang
//! side puts in a data frame's body is a [`relay`] header and a payload.
//! docs/PROTOCOL.md describes all of it, precisely enough to write a peer.

pub mod codec;
pub mod packing;
pub mod relay;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. 2: identities cross only as
/// handles the receiving gateway can resolve (capability addressing);
/// version 1 sent raw pids, and a version-1 peer is refused in the
/// preamble with a clear reason.
pub const PROTOCOL_VERSION: u16 = 2;
/// First bytes on every connection, before the version.
pub const MAGIC: [u8; 4] = *b"WDST";
/// Magic plus a big-endian u16 version.
pub const PREAMBLE_LEN: usize = 6;

/// What this build speaks beyond the base protocol, told in the hello.
/// `reject-v1`: the `Reject` frame (sent only to peers that list it).
/// `lz4-v1` / `zstd-v1`: `Packed` frames (data frames compressed as one
/// lz4 block / zstd frame), sent only to peers that list the codec
/// ([`packing`] decides which, per route and per batch).
pub const CAPABILITIES: &[&str] = &["heartbeat-v1", "reject-v1", "lz4-v1", "zstd-v1"];
pub const CAP_REJECT: &str = "reject-v1";
pub const CAP_LZ4: &str = "lz4-v1";
pub const CAP_ZSTD: &str = "zstd-v1";

/// The first frame each side sends after the preamble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    /// The sender's own cluster.
    pub cluster: String,
    /// The sender's gateway instance name.
    pub gateway: String,
    /// The sender's session with us (see `Epoch`).
    pub epoch: Epoch,
    /// How many links (primary + standby) the sender wants for this route.
    pub links_wanted: u8,
    /// The most the sender will buffer of our messages not yet delivered
    /// to its cluster: we keep our unacknowledged window within this.
    pub recv_window_messages: u32,
    pub recv_window_bytes: u64,
    pub capabilities: Vec<String>,
}

/// An identity as a gateway names it to one peer: a number it issued to
/// that peer alone (never reused, resolved only through the issuer's table
/// for that peer). Group members are handles of the advertising gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Handle(pub u64);

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A session of one side of a route: chosen fresh whenever that side
/// starts a session (a gateway run, a route task, a switch to another
/// instance of the peer); a new epoch means a new session, whose numbering
/// means nothing of the old one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A data message's number within its sender's session, from 1: what acks
/// and rejects name (an ack's `upto` is the last of a contiguous run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One member of a process group: a handle of the gateway advertising it.
pub type Member = Handle;

/// Group membership news from a peer about ITS OWN cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// The cluster whose members these are; must be the sending peer.
    pub origin: String,
    /// Consecutive per session; a snapshot's first part may jump ahead.
    pub counter: u64,
    pub body: AdvertBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdvertBody {
    /// The whole exported state, possibly in several parts; replaces what
    /// the receiver held once the last part is in.
    Snapshot {
        part: u32,
        last: bool,
        groups: Vec<(String, Vec<Member>)>,
    },
    Join {
        group: String,
        members: Vec<Member>,
    },
    Leave {
        group: String,
        members: Vec<Member>,
    },
}

/// Everything a frame can say besides its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Header {
    Hello(Hello),
    /// Heartbeat; answered with `Pong` carrying the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Application data; the body is the payload, or a chunk of it when
    /// `more` says further chunks of the same message follow.
    Data {
        epoch: Epoch,
        seq: Seq,
        more: bool,
    },
    /// Cumulative: every message of `epoch` up to `upto` was delivered.
    Ack {
        epoch: Epoch,
        upto: Seq,
    },
    Advert(Advert),
    /// The receiver lost track of adverts; asks for a fresh snapshot.
    Resync,
    /// The sender is closing this connection on purpose.
    Goodbye {
        reason: String,
    },
    /// Messages (by seq, of the receiver's session `epoch`) the receiving
    /// gateway could not hand to its cluster; sent before the ack covering
    /// them, so their senders learn they failed. Only to `reject-v1` peers.
    Reject {
        epoch: Epoch,
        seqs: Vec<Seq>,
    },
    /// Data frames, encoded one after another (`raw_len` bytes) and
    /// compressed as one lz4 block or zstd frame (the body). Only to peers
    /// that list the codec; holds nothing but `Data` frames
    /// (`codec::Unpacker`).
    Packed {
        packing: packing::Packing,
        raw_len: u32,
    },
}

impl Header {
    /// Control frames go ahead of data on a link's writer.
    pub fn is_control(&self) -> bool {
        !matches!(self, Header::Data { .. } | Header::Packed { .. })
    }
}

/// A decoded frame: header plus body (empty for control frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: bytes::Bytes,
}

impl Frame {
    pub fn control(header: Header) -> Self {
        Frame { header, body: bytes::Bytes::new() }
    }
}
