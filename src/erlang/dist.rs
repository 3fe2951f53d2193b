//! Erlang distribution: finding a node's port through EPMD, the client side
//! of the handshake (OTP 23+ "N" handshake, as a hidden node), and the
//! control-message codes used once connected.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Secret;

pub const DFLAG_EXTENDED_REFERENCES: u64 = 0x4;
pub const DFLAG_DIST_MONITOR: u64 = 0x8;
pub const DFLAG_FUN_TAGS: u64 = 0x10;
pub const DFLAG_DIST_MONITOR_NAME: u64 = 0x20;
pub const DFLAG_NEW_FUN_TAGS: u64 = 0x80;
pub const DFLAG_EXTENDED_PIDS_PORTS: u64 = 0x100;
pub const DFLAG_EXPORT_PTR_TAG: u64 = 0x200;
pub const DFLAG_BIT_BINARIES: u64 = 0x400;
pub const DFLAG_NEW_FLOATS: u64 = 0x800;
pub const DFLAG_UNICODE_IO: u64 = 0x1000;
pub const DFLAG_SMALL_ATOM_TAGS: u64 = 0x4000;
pub const DFLAG_UTF8_ATOMS: u64 = 0x10000;
pub const DFLAG_MAP_TAG: u64 = 0x20000;
pub const DFLAG_BIG_CREATION: u64 = 0x40000;
pub const DFLAG_SEND_SENDER: u64 = 0x80000;
pub const DFLAG_BIG_SEQTRACE_LABELS: u64 = 0x100000;
pub const DFLAG_HANDSHAKE_23: u64 = 0x1000000;
pub const DFLAG_UNLINK_ID: u64 = 0x2000000;
pub const DFLAG_V4_NC: u64 = 1 << 34;
pub const DFLAG_ALIAS: u64 = 1 << 35;

/// What we advertise. Hidden: no DFLAG_PUBLISHED. Never FRAGMENTS or the
/// atom cache (not implemented: Erlang then sends whole messages with every
/// atom spelled out). DIST_MONITOR *and* DIST_MONITOR_NAME: Erlang sends
/// MONITOR_P (and MONITOR_P_EXIT) only to nodes that have both.
pub const OUR_FLAGS: u64 = DFLAG_EXTENDED_REFERENCES
    | DFLAG_DIST_MONITOR
    | DFLAG_DIST_MONITOR_NAME
    | DFLAG_FUN_TAGS
    | DFLAG_NEW_FUN_TAGS
    | DFLAG_EXTENDED_PIDS_PORTS
    | DFLAG_EXPORT_PTR_TAG
    | DFLAG_BIT_BINARIES
    | DFLAG_NEW_FLOATS
    | DFLAG_UNICODE_IO
    | DFLAG_SMALL_ATOM_TAGS
    | DFLAG_UTF8_ATOMS
    | DFLAG_MAP_TAG
    | DFLAG_BIG_CREATION
    | DFLAG_SEND_SENDER
    | DFLAG_BIG_SEQTRACE_LABELS
    | DFLAG_HANDSHAKE_23
    | DFLAG_UNLINK_ID
    | DFLAG_V4_NC
    | DFLAG_ALIAS;

/// Flags the peer must have for us to talk to it.
const REQUIRED: u64 = DFLAG_EXTENDED_REFERENCES
    | DFLAG_EXTENDED_PIDS_PORTS
    | DFLAG_UTF8_ATOMS
    | DFLAG_NEW_FUN_TAGS
    | DFLAG_BIG_CREATION
    | DFLAG_HANDSHAKE_23
    | DFLAG_MAP_TAG;

// Control message codes.
pub const LINK: i64 = 1;
pub const SEND: i64 = 2;
pub const EXIT: i64 = 3;
pub const UNLINK: i64 = 4;
pub const REG_SEND: i64 = 6;
pub const GROUP_LEADER: i64 = 7;
pub const EXIT2: i64 = 8;
pub const SEND_TT: i64 = 12;
pub const REG_SEND_TT: i64 = 16;
pub const MONITOR_P: i64 = 19;
pub const DEMONITOR_P: i64 = 20;
pub const MONITOR_P_EXIT: i64 = 21;
pub const SEND_SENDER: i64 = 22;
pub const SEND_SENDER_TT: i64 = 23;
pub const PAYLOAD_EXIT: i64 = 24;
pub const PAYLOAD_EXIT2: i64 = 26;
pub const PAYLOAD_MONITOR_P_EXIT: i64 = 28;
pub const SPAWN_REQUEST: i64 = 29;
pub const ALIAS_SEND: i64 = 33;
pub const ALIAS_SEND_TT: i64 = 34;
pub const UNLINK_ID: i64 = 35;
pub const UNLINK_ID_ACK: i64 = 36;

/// Distribution packets start with this byte when no atom cache is used.
pub const PASS_THROUGH: u8 = 112;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("EPMD at {0}: {1}")]
    Epmd(String, String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("handshake with {node}: {why}")]
    Handshake { node: String, why: String },
    #[error("TLS distribution with {0}: {1}")]
    Tls(String, String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// `name@host` split in two.
pub fn split_node(node: &str) -> Option<(&str, &str)> {
    let (n, h) = node.split_once('@')?;
    (!n.is_empty() && !h.is_empty() && !h.contains('@')).then_some((n, h))
}

/// The EPMD port: `ERL_EPMD_PORT` as `erl` reads it, else 4369.
pub fn epmd_port() -> u16 {
    std::env::var("ERL_EPMD_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(4369)
}

/// The distribution protocol version of OTP 23 and later (the 'N'
/// handshake, 64-bit flags); 5 is the one before.
pub const VERSION_23: u16 = 6;

/// Asks EPMD on the node's host for its distribution port and the highest
/// distribution version it registered (PORT_PLEASE2).
pub async fn port_please(node: &str, timeout: Duration) -> Result<(u16, u16), DistError> {
    port_and_version_at(node, epmd_port(), timeout).await
}

/// The node's port, from EPMD on a given port.
pub async fn port_please_at(node: &str, epmd_port: u16, timeout: Duration) -> Result<u16, DistError> {
    Ok(port_and_version_at(node, epmd_port, timeout).await?.0)
}

/// As `port_please`, with EPMD on a given port.
pub async fn port_and_version_at(node: &str, epmd_port: u16, timeout: Duration) -> Result<(u16, u16), DistError> {
    let (name, host) = split_node(node).ok_or_else(|| DistError::Epmd(node.into(), "not a name@host node".into()))?;
    let epmd = format!("{host}:{epmd_port}");
    let work = async {
        let mut s = TcpStream::connect(&epmd).await.map_err(|e| DistError::Epmd(epmd.clone(), e.to_string()))?;
        let mut req = Vec::with_capacity(3 + name.len());
        req.extend_from_slice(&((1 + name.len()) as u16).to_be_bytes());
        req.push(122);
        req.extend_from_slice(name.as_bytes());
        s.write_all(&req).await?;
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        if head[0] != 119 {
            return Err(DistError::Epmd(epmd.clone(), format!("unexpected reply {}", head[0])));
        }
        if head[1] != 0 {
            return Err(DistError::Epmd(epmd.clone(), format!("node {name:?} is not registered")));
        }
        // PortNo, NodeType, Protocol, HighestVersion, LowestVersion.
        let mut rest = [0u8; 8];
        s.read_exact(&mut rest).await?;
        Ok((u16::from_be_bytes([rest[0], rest[1]]), u16::from_be_bytes([rest[4], rest[5]])))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| DistError::Timeout("EPMD lookup"))?
}

fn md5_digest(cookie: &str, challenge: u32) -> [u8; 16] {
    let mut data = cookie.as_bytes().to_vec();
    data.extend_from_slice(challenge.to_string().as_bytes());
    md5(&data)
}

/// What the handshake learned about the node.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub flags: u64,
    pub creation: u32,
}

/// How handshake packets are framed: a 2-byte length over TCP
/// (`inet_tcp_dist`), a 4-byte one inside TLS (`inet_tls_dist` runs the
/// handshake on a `{packet, 4}` socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Tcp,
    Tls,
}

async fn read_packet<S: AsyncRead + Unpin>(s: &mut S, framing: Framing, max: usize) -> Result<Vec<u8>, DistError> {
    let len = match framing {
        Framing::Tcp => {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await?;
            if matches!(len, [0x15 | 0x16, 0x03]) {
                // A TLS record (alert or handshake), not a handshake packet.
                return Err(DistError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the node speaks TLS: it runs TLS distribution (-proto_dist inet_tls); give the gateway an [erlang.tls] table",
                )));
            }
            u16::from_be_bytes(len) as usize
        }
        Framing::Tls => {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await?;
            u32::from_be_bytes(len) as usize
        }
    };
    if len == 0 || len > max {
        return Err(DistError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handshake packet of {len} bytes"),
        )));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_packet<S: AsyncWrite + Unpin>(s: &mut S, framing: Framing, body: &[u8]) -> Result<(), DistError> {
    let mut out = Vec::with_capacity(body.len() + 4);
    match framing {
        Framing::Tcp => out.extend_from_slice(&(body.len() as u16).to_be_bytes()),
        Framing::Tls => out.extend_from_slice(&(body.len() as u32).to_be_bytes()),
    }
    out.extend_from_slice(body);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

/// Runs the client side of the handshake on a connected stream. `version`
/// is what EPMD says the node speaks: 6 (OTP 23+) gets the 'N' name; 5
/// (OTP 21–22) the older 'n' name with 32-bit flags, which OTP 23+ nodes
/// also take (they answer with an 'N' challenge, and we complement our
/// flags and creation: the 'c' message).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    framing: Framing,
    version: u16,
    me: &str,
    creation: u32,
    expect: &str,
    cookie: &Secret,
) -> Result<Peer, DistError> {
    let fail = |why: String| DistError::Handshake { node: expect.to_string(), why };
    let old_name = version < VERSION_23;
    // send_name
    let mut name = Vec::with_capacity(32 + me.len());
    if old_name {
        name.push(b'n');
        name.extend_from_slice(&5u16.to_be_bytes());
        name.extend_from_slice(&(OUR_FLAGS as u32).to_be_bytes());
    } else {
        name.push(b'N');
        name.extend_from_slice(&OUR_FLAGS.to_be_bytes());
        name.extend_from_slice(&creation.to_be_bytes());
        name.extend_from_slice(&(me.len() as u16).to_be_bytes());
    }
    name.extend_from_slice(me.as_bytes());
    write_packet(s, framing, &name).await?;
    // recv_status
    let status = read_packet(s, framing, 256).await?;
    if status.first() != Some(&b's') {
        return Err(fail("expected a status".into()));
    }
    match &status[1..] {
        b"ok" | b"ok_simultaneous" => {}
        b"alive" => {
            // The node has a connection from a node of our name. Never
            // displace it (answering true would: another gateway, or a
            // real node named as we are, would be dropped); if it is our
            // own previous run, the node lets it go within its tick time
            // and the next attempt gets through.
            write_packet(s, framing, b"sfalse").await?;
            return Err(fail(format!(
                "it already has a connection from a node named {me}: every gateway needs its own [erlang] node name (if that is this gateway's previous run, the node lets it go within its net_ticktime)"
            )));
        }
        other => return Err(fail(format!("refused: {}", String::from_utf8_lossy(other)))),
    }
    // recv_challenge: 'N' (OTP 23+), or 'n' from an OTP 21–22 node.
    let ch = read_packet(s, framing, 1024).await?;
    let short = || fail("short challenge".into());
    let (flags, challenge, their_creation, their_name, required) = match ch.first() {
        Some(b'N') if ch.len() >= 1 + 8 + 4 + 4 + 2 => {
            let flags = u64::from_be_bytes(ch[1..9].try_into().map_err(|_| short())?);
            let challenge = u32::from_be_bytes(ch[9..13].try_into().map_err(|_| short())?);
            let creation = u32::from_be_bytes(ch[13..17].try_into().map_err(|_| short())?);
            let nlen = u16::from_be_bytes([ch[17], ch[18]]) as usize;
            let name = ch.get(19..19 + nlen).ok_or_else(short)?;
            (flags, challenge, creation, name, REQUIRED)
        }
        Some(b'n') if old_name && ch.len() >= 1 + 2 + 4 + 4 => {
            let flags = u32::from_be_bytes(ch[3..7].try_into().map_err(|_| short())?) as u64;
            let challenge = u32::from_be_bytes(ch[7..11].try_into().map_err(|_| short())?);
            (flags, challenge, 0, &ch[11..], REQUIRED & !DFLAG_HANDSHAKE_23)
        }
        other => return Err(fail(format!("unexpected challenge packet {other:?}"))),
    };
    let their_name = String::from_utf8_lossy(their_name).into_owned();
    if their_name != expect {
        return Err(fail(format!("reached {their_name} instead")));
    }
    if flags & required != required {
        return Err(fail(format!("node lacks required distribution flags ({flags:#x}); OTP 21 or later is needed")));
    }
    // send_complement: our name was the old one, the node is OTP 23+.
    if old_name && ch[0] == b'N' {
        let mut complement = vec![b'c'];
        complement.extend_from_slice(&((OUR_FLAGS >> 32) as u32).to_be_bytes());
        complement.extend_from_slice(&creation.to_be_bytes());
        write_packet(s, framing, &complement).await?;
    }
    // send_challenge_reply: our challenge from the system's CSPRNG (a
    // predictable one would let a recorded digest be replayed).
    let ours = challenge_u32().map_err(|_| fail("no secure random numbers for the challenge".into()))?;
    let mut reply = vec![b'r'];
    reply.extend_from_slice(&ours.to_be_bytes());
    reply.extend_from_slice(&md5_digest(cookie.expose(), challenge));
    write_packet(s, framing, &reply).await?;
    // recv_challenge_ack
    let ack = read_packet(s, framing, 64).await.map_err(|_| fail("no challenge ack: wrong cookie?".into()))?;
    if ack.first() != Some(&b'a') || ack.len() != 17 {
        return Err(fail("bad challenge ack".into()));
    }
    if ack[1..] != md5_digest(cookie.expose(), ours) {
        return Err(fail("the node's cookie digest is wrong".into()));
    }
    Ok(Peer { name: their_name, flags, creation: their_creation })
}

/// A challenge from the operating system's CSPRNG.
fn challenge_u32() -> Result<u32, ring::error::Unspecified> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 4];
    SystemRandom::new().fill(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn md5(input: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    Md5::digest(input).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn md5_matches_rfc_1321() {
        assert_eq!(hex(&md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(&md5(b"abc")), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            hex(&md5(b"12345678901234567890123456789012345678901234567890123456789012345678901234567890")),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
    }

    /// A scripted node on the other end of `handshake`: reads what we
    /// send, answers as an OTP 21–22 node ('n' challenge, 32-bit flags) or,
    /// with `new_node`, as an OTP 23+ node meeting our old 'n' name.
    async fn scripted_node(new_node: bool, their_flags: u64) -> (Result<Peer, DistError>, Vec<Vec<u8>>) {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let cookie = Secret::new("cookie");
        // (Ours is dropped when the handshake ends, so the node sees EOF.)
        let client = async move {
            let mut ours = ours;
            handshake(&mut ours, Framing::Tcp, 5, "gw@h", 77, "old@h", &cookie).await
        };
        let node = async {
            let mut seen = Vec::new();
            let name = read_packet(&mut theirs, Framing::Tcp, 1024).await.unwrap();
            seen.push(name);
            write_packet(&mut theirs, Framing::Tcp, b"sok").await.unwrap();
            let mut ch = Vec::new();
            if new_node {
                ch.push(b'N');
                ch.extend_from_slice(&their_flags.to_be_bytes());
                ch.extend_from_slice(&4242u32.to_be_bytes());
                ch.extend_from_slice(&9u32.to_be_bytes());
                ch.extend_from_slice(&5u16.to_be_bytes());
            } else {
                ch.push(b'n');
                ch.extend_from_slice(&5u16.to_be_bytes());
                ch.extend_from_slice(&(their_flags as u32).to_be_bytes());
                ch.extend_from_slice(&4242u32.to_be_bytes());
            }
            ch.extend_from_slice(b"old@h");
            write_packet(&mut theirs, Framing::Tcp, &ch).await.unwrap();
            // The complement (if any), then the reply.
            loop {
                let Ok(p) = read_packet(&mut theirs, Framing::Tcp, 1024).await else { return seen };
                let reply = p[0] == b'r';
                seen.push(p.clone());
                if reply {
                    assert_eq!(p[5..], md5_digest("cookie", 4242), "our digest of its challenge");
                    let ours = u32::from_be_bytes(p[1..5].try_into().unwrap());
                    let mut ack = vec![b'a'];
                    ack.extend_from_slice(&md5_digest("cookie", ours));
                    write_packet(&mut theirs, Framing::Tcp, &ack).await.unwrap();
                    return seen;
                }
            }
        };
        tokio::join!(client, node)
    }

    const OTP22_FLAGS: u64 = (REQUIRED & !DFLAG_HANDSHAKE_23) | DFLAG_DIST_MONITOR | DFLAG_SEND_SENDER;

    #[tokio::test]
    async fn the_pre_otp_23_handshake_meets_an_otp_22_node() {
        let (peer, seen) = scripted_node(false, OTP22_FLAGS).await;
        let peer = peer.unwrap();
        assert_eq!((peer.name.as_str(), peer.flags, peer.creation), ("old@h", OTP22_FLAGS, 0));
        // Our name: 'n', version 5, our flags' low 32 bits (with HANDSHAKE_23), the name.
        let name = &seen[0];
        assert_eq!(name[0], b'n');
        assert_eq!(u16::from_be_bytes([name[1], name[2]]), 5);
        assert_eq!(u32::from_be_bytes(name[3..7].try_into().unwrap()) as u64, OUR_FLAGS & 0xffff_ffff);
        assert_eq!(&name[7..], b"gw@h");
        // No complement for an old node: the reply came next.
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1][0], b'r');
    }

    #[tokio::test]
    async fn the_pre_otp_23_handshake_complements_an_otp_23_node() {
        let their = OUR_FLAGS;
        let (peer, seen) = scripted_node(true, their).await;
        let peer = peer.unwrap();
        assert_eq!((peer.flags, peer.creation), (their, 9));
        // 'c': the high half of our flags, and our creation.
        let c = &seen[1];
        assert_eq!(c[0], b'c');
        assert_eq!(u32::from_be_bytes(c[1..5].try_into().unwrap()) as u64, OUR_FLAGS >> 32);
        assert_eq!(u32::from_be_bytes(c[5..9].try_into().unwrap()), 77);
        assert_eq!(seen[2][0], b'r');
    }

    #[tokio::test]
    async fn a_node_older_than_otp_21_is_refused_with_why() {
        let (peer, _) = scripted_node(false, OTP22_FLAGS & !DFLAG_UTF8_ATOMS).await;
        let e = peer.unwrap_err().to_string();
        assert!(e.contains("lacks required distribution flags") && e.contains("OTP 21 or later"), "{e}");
    }

    #[test]
    fn node_names() {
        assert_eq!(split_node("a@127.0.0.1"), Some(("a", "127.0.0.1")));
        assert_eq!(split_node("a"), None);
        assert_eq!(split_node("@h"), None);
        assert_eq!(split_node("a@b@c"), None);
    }
}
