//! Frame encoding and decoding. The one place that knows the serializer
//! (bincode 2.0.1, pinned): swap it here and nothing else changes.
//!
//! Bounds: a frame's length is checked against `max_frame_bytes` from its
//! 4-byte prefix, before any of it is buffered; the header is decoded with a
//! hard allocation limit, and bodies are sliced out without copying.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::packing::{Codec, Packing};
use super::{Frame, Header, MAGIC, PREAMBLE_LEN, PROTOCOL_VERSION};

/// Hard cap on what decoding one header may claim, whatever the frame limit.
pub const HEADER_LIMIT: usize = 16 * 1024 * 1024;
/// Smallest frame limit a configuration may set.
pub const MIN_FRAME_LIMIT: usize = 64 * 1024;
/// Largest frame limit a configuration may set.
pub const MAX_FRAME_LIMIT: usize = 1024 * 1024 * 1024;
/// Default frame limit: room for Erlang messages of tens of MB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 128 * 1024 * 1024;

const LEN_PREFIX: usize = 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<HEADER_LIMIT>()
}

/// Why bytes from a peer were rejected. `reason()` is the metric label.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: usize, max: usize },
    #[error("connection ended inside a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("undecodable frame: {0}")]
    Garbage(String),
    #[error("not a wandist connection (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("peer speaks protocol version {0}, this gateway speaks {PROTOCOL_VERSION}: both gateways must run a release of the same protocol version (CHANGELOG and docs/PROTOCOL.md say which)")]
    Version(u16),
}

impl CodecError {
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::Oversize { .. } => "oversize",
            CodecError::Truncated { .. } => "truncated",
            CodecError::Garbage(_) => "garbage",
            CodecError::BadMagic(_) => "bad_magic",
            CodecError::Version(_) => "version",
        }
    }
}

/// The 6 bytes each side sends first.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(&MAGIC);
    p[4..].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    p
}

/// Checks a peer's preamble; returns its version if this build speaks it.
pub fn check_preamble(p: &[u8; PREAMBLE_LEN]) -> Result<u16, CodecError> {
    let magic: [u8; 4] = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(CodecError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([p[4], p[5]]);
    if version != PROTOCOL_VERSION {
        return Err(CodecError::Version(version));
    }
    Ok(version)
}

/// Serializes a value, appending to `out`.
pub fn encode_value<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Garbage(e.to_string()))
}

/// Deserializes a value from the front of a payload; returns it and the
/// bytes it used (what follows is the caller's: e.g. a raw body).
pub fn from_prefix<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Garbage(e.to_string()))
}

/// Appends one frame to `out`.
pub fn encode(header: &Header, body: &[u8], max: usize, out: &mut BytesMut) -> Result<(), CodecError> {
    let start = out.len();
    out.put_u32(0);
    let mut w = out.writer();
    bincode::serde::encode_into_std_write(header, &mut w, config()).map_err(|e| CodecError::Garbage(e.to_string()))?;
    let out = w.into_inner();
    out.extend_from_slice(body);
    let len = out.len() - start - LEN_PREFIX;
    if len > max {
        out.truncate(start);
        return Err(CodecError::Oversize { len, max });
    }
    out[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Encodes one frame into a fresh buffer.
pub fn encode_frame(frame: &Frame, max: usize) -> Result<BytesMut, CodecError> {
    let mut out = BytesMut::with_capacity(frame.body.len() + 64);
    encode(&frame.header, &frame.body, max, &mut out)?;
    Ok(out)
}

/// Takes one whole frame off the front of `buf`, if one is there.
///
/// Rejects an oversize frame as soon as its length prefix is in, so a peer
/// cannot make the reader buffer more than `max` bytes.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, CodecError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(CodecError::Oversize { len, max });
    }
    if len == 0 {
        return Err(CodecError::Garbage("empty frame".into()));
    }
    if buf.len() < LEN_PREFIX + len {
        buf.reserve(LEN_PREFIX + len - buf.len());
        return Ok(None);
    }
    buf.advance(LEN_PREFIX);
    let mut whole: Bytes = buf.split_to(len).freeze();
    let (header, used): (Header, usize) =
        bincode::serde::decode_from_slice(&whole, config()).map_err(|e| CodecError::Garbage(e.to_string()))?;
    let body = whole.split_off(used);
    if !body.is_empty() && header.is_control() {
        return Err(CodecError::Garbage("control frame with a body".into()));
    }
    Ok(Some(Frame { header, body }))
}

/// Compresses batches of encoded data frames into `Packed` frames. Keeps a
/// zstd context once zstd is used (made on first use: a link that never
/// compresses with zstd never pays for one).
#[derive(Default)]
pub struct Packer {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer").field("zstd_level", &self.zstd.as_ref().map(|z| z.0)).finish()
    }
}

impl Packer {
    /// Compresses `raw` (encoded data frames) with `codec` into one
    /// `Packed` frame on `out`.
    pub fn pack(&mut self, codec: Codec, raw: &[u8], max: usize, out: &mut BytesMut) -> Result<(), CodecError> {
        let raw_len = u32::try_from(raw.len()).map_err(|_| CodecError::Oversize { len: raw.len(), max })?;
        let packed = match codec {
            Codec::Lz4 => lz4_flex::block::compress(raw),
            Codec::Zstd(level) => {
                let z = match &mut self.zstd {
                    Some((l, z)) if *l == level => z,
                    slot => {
                        let z = zstd::bulk::Compressor::new(level)
                            .map_err(|e| CodecError::Garbage(format!("zstd level {level}: {e}")))?;
                        &mut slot.insert((level, z)).1
                    }
                };
                z.compress(raw).map_err(|e| CodecError::Garbage(format!("zstd: {e}")))?
            }
        };
        encode(&Header::Packed { packing: codec.packing(), raw_len }, &packed, max, out)
    }
}

/// The largest zstd window a peer's frame may ask for (2^20 bytes: more
/// than a writer's batch; zstd refuses a frame that wants more).
const ZSTD_WINDOW_LOG_MAX: u32 = 20;

/// Takes `Packed` frames apart. Keeps a zstd context once one arrives.
#[derive(Default)]
pub struct Unpacker {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker").field("zstd", &self.zstd.is_some()).finish()
    }
}

impl Unpacker {
    /// The data frames of a `Packed` frame. Its stated size is checked
    /// before anything is decompressed (at most `max_raw` bytes: a small
    /// frame cannot make the reader allocate much), the body must
    /// decompress to exactly that, and every frame in it must be a whole
    /// `Data` frame.
    pub fn unpack(
        &mut self,
        packing: Packing,
        raw_len: u32,
        body: &[u8],
        max: usize,
        max_raw: usize,
    ) -> Result<Vec<Frame>, CodecError> {
        let raw_len = raw_len as usize;
        if raw_len > max_raw || raw_len == 0 {
            return Err(CodecError::Oversize { len: raw_len, max: max_raw });
        }
        let raw = match packing {
            Packing::Lz4 => {
                lz4_flex::block::decompress(body, raw_len).map_err(|e| CodecError::Garbage(format!("packed: {e}")))?
            }
            Packing::Zstd => {
                let z = match &mut self.zstd {
                    Some(z) => z,
                    slot => {
                        let mut z =
                            zstd::bulk::Decompressor::new().map_err(|e| CodecError::Garbage(format!("zstd: {e}")))?;
                        z.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                            .map_err(|e| CodecError::Garbage(format!("zstd: {e}")))?;
                        slot.insert(z)
                    }
                };
                z.decompress(body, raw_len).map_err(|e| CodecError::Garbage(format!("packed: {e}")))?
            }
        };
        if raw.len() != raw_len {
            return Err(CodecError::Garbage("packed: not the size it said".into()));
        }
        // (Through `Bytes`: the decompressed buffer itself, not a copy.)
        let mut buf = BytesMut::from(Bytes::from(raw));
        let mut frames = Vec::new();
        while let Some(f) = decode(&mut buf, max)? {
            if !matches!(f.header, Header::Data { .. }) {
                return Err(CodecError::Garbage("packed: a frame that is not data".into()));
            }
            frames.push(f);
        }
        if !buf.is_empty() {
            return Err(CodecError::Garbage("packed: a frame cut short".into()));
        }
        Ok(frames)
    }
}

/// Whether `buf` already holds a whole frame (or a bad length prefix).
pub fn frame_ready(buf: &BytesMut) -> bool {
    buf.len() >= LEN_PREFIX && buf.len() >= LEN_PREFIX + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// Called at end of stream: bytes left over mean the peer cut a frame short.
pub fn check_eof(buf: &BytesMut) -> Result<(), CodecError> {
    if buf.is_empty() {
        return Ok(());
    }
    let want = if buf.len() >= LEN_PREFIX {
        LEN_PREFIX + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
    } else {
        LEN_PREFIX
    };
    Err(CodecError::Truncated { have: buf.len(), want })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Epoch, Seq};

    fn data(seq: u64, body: &[u8]) -> Frame {
        Frame {
            header: Header::Data { epoch: Epoch(1), seq: Seq(seq), more: false },
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn packed_frames_unpack_to_the_data_frames_and_nothing_else() {
        let mut raw = BytesMut::new();
        let frames: Vec<Frame> = (0..50).map(|i| data(i, format!("hello {} hello hello", i % 3).as_bytes())).collect();
        for f in &frames {
            encode(&f.header, &f.body, 1 << 20, &mut raw).unwrap();
        }
        let (mut packer, mut unpacker) = (Packer::default(), Unpacker::default());
        for codec in [Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3), Codec::Zstd(1)] {
            let mut out = BytesMut::new();
            packer.pack(codec, &raw, 1 << 20, &mut out).unwrap();
            assert!(out.len() < raw.len() / 2, "{codec:?}: {} of {}", out.len(), raw.len());
            let f = decode(&mut out, 1 << 20).unwrap().unwrap();
            let Header::Packed { packing, raw_len } = f.header else { panic!("{:?}", f.header) };
            assert_eq!(packing, codec.packing());
            assert_eq!(unpacker.unpack(packing, raw_len, &f.body, 1 << 20, 1 << 20).unwrap(), frames);
            // A size over the bound: refused before decompressing.
            assert!(matches!(
                unpacker.unpack(packing, raw_len, &f.body, 1 << 20, raw_len as usize - 1),
                Err(CodecError::Oversize { .. })
            ));
            // A size that is not the body's: refused.
            assert!(unpacker.unpack(packing, raw_len + 1, &f.body, 1 << 20, 1 << 20).is_err());
            assert!(unpacker.unpack(packing, raw_len - 1, &f.body, 1 << 20, 1 << 20).is_err());
            // The other codec's body, or no codec's: refused.
            let other = if packing == Packing::Lz4 { Packing::Zstd } else { Packing::Lz4 };
            assert!(unpacker.unpack(other, raw_len, &f.body, 1 << 20, 1 << 20).is_err());
            assert!(unpacker.unpack(packing, 100, b"not compressed at all", 1 << 20, 1 << 20).is_err());
        }
        // A control frame inside: refused.
        let mut raw = BytesMut::new();
        encode(&Header::Resync, &[], 1 << 20, &mut raw).unwrap();
        for codec in [Codec::Lz4, Codec::Zstd(1)] {
            let mut out = BytesMut::new();
            packer.pack(codec, &raw, 1 << 20, &mut out).unwrap();
            let f = decode(&mut out, 1 << 20).unwrap().unwrap();
            let Header::Packed { packing, raw_len } = f.header else { panic!() };
            assert!(unpacker.unpack(packing, raw_len, &f.body, 1 << 20, 1 << 20).is_err());
        }
    }

    #[test]
    fn a_zstd_frame_asking_for_a_large_window_is_refused() {
        // 4 MiB of data compressed with a 2^22 window (long matches across
        // it): the receiver allows 2^20 and refuses it, whatever raw_len says.
        let chunk: Vec<u8> = (0..1 << 20).map(|_| fastrand::u8(..)).collect();
        let big: Vec<u8> = chunk.iter().chain(&chunk).chain(&chunk).chain(&chunk).copied().collect();
        let mut z = zstd::bulk::Compressor::new(3).unwrap();
        z.set_parameter(zstd::zstd_safe::CParameter::WindowLog(22)).unwrap();
        let body = z.compress(&big).unwrap();
        let mut u = Unpacker::default();
        assert!(u.unpack(Packing::Zstd, big.len() as u32, &body, 8 << 20, 8 << 20).is_err());
    }

    use crate::wire::Hello;

    const MAX: usize = 1 << 20;

    fn hello() -> Header {
        Header::Hello(Hello {
            version: PROTOCOL_VERSION,
            cluster: "dc1".into(),
            gateway: "gw1".into(),
            epoch: Epoch(42),
            links_wanted: 2,
            recv_window_messages: 100,
            recv_window_bytes: 1 << 20,
            capabilities: vec!["heartbeat-v1".into()],
        })
    }

    #[test]
    fn round_trip_control_and_data() {
        let mut buf = BytesMut::new();
        encode(&hello(), &[], MAX, &mut buf).unwrap();
        encode(&Header::Data { epoch: Epoch(1), seq: Seq(7), more: false }, b"payload", MAX, &mut buf).unwrap();
        encode(&Header::Ping { nonce: 9 }, &[], MAX, &mut buf).unwrap();
        let a = decode(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(a.header, hello());
        let b = decode(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(b.header, Header::Data { epoch: Epoch(1), seq: Seq(7), more: false });
        assert_eq!(&b.body[..], b"payload");
        let c = decode(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(c.header, Header::Ping { nonce: 9 });
        assert!(decode(&mut buf, MAX).unwrap().is_none());
        check_eof(&buf).unwrap();
    }

    /// The bytes docs/PROTOCOL.md gives as examples, exactly.
    #[test]
    fn the_encoding_is_the_documented_one() {
        let frame = |h: &Header, body: &[u8]| {
            let mut out = BytesMut::new();
            encode(h, body, MAX, &mut out).unwrap();
            out.to_vec()
        };
        assert_eq!(preamble(), [b'W', b'D', b'S', b'T', 0, 2]);
        assert_eq!(
            frame(&hello(), &[]),
            [
                0, 0, 0, 32, // length
                0,  // Hello
                2,  // version
                3, b'd', b'c', b'1', 3, b'g', b'w', b'1', // cluster, gateway
                42, 2,   // epoch, links_wanted
                100, // recv_window_messages
                252, 0, 0, 16, 0, // recv_window_bytes: 1 MiB as 252 + u32 LE
                1, 12, b'h', b'e', b'a', b'r', b't', b'b', b'e', b'a', b't', b'-', b'v', b'1', // capabilities
            ]
        );
        assert_eq!(frame(&Header::Ping { nonce: 9 }, &[]), [0, 0, 0, 2, 1, 9]);
        assert_eq!(
            frame(&Header::Data { epoch: Epoch(1), seq: Seq(300), more: false }, b"xy"),
            [0, 0, 0, 8, 3, 1, 251, 44, 1, 0, b'x', b'y']
        );
        assert_eq!(frame(&Header::Ack { epoch: Epoch(1), upto: Seq(300) }, &[]), [0, 0, 0, 5, 4, 1, 251, 44, 1]);
        assert_eq!(
            frame(&Header::Reject { epoch: Epoch(1), seqs: vec![Seq(5), Seq(6)] }, &[]),
            [0, 0, 0, 5, 8, 1, 2, 5, 6]
        );
        assert_eq!(frame(&Header::Resync, &[]), [0, 0, 0, 1, 6]);
        let join = Header::Advert(crate::wire::Advert {
            origin: "dc1".into(),
            counter: 7,
            body: crate::wire::AdvertBody::Join { group: "g".into(), members: vec![crate::wire::Handle(5)] },
        });
        assert_eq!(frame(&join, &[]), [0, 0, 0, 11, 5, 3, b'd', b'c', b'1', 7, 1, 1, b'g', 1, 5]);
        assert_eq!(frame(&Header::Goodbye { reason: "bye".into() }, &[]), [0, 0, 0, 5, 7, 3, b'b', b'y', b'e']);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let whole = encode_frame(
            &Frame {
                header: Header::Data { epoch: Epoch(1), seq: Seq(1), more: false },
                body: Bytes::from_static(b"abcdef"),
            },
            MAX,
        )
        .unwrap();
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(decode(&mut buf, MAX).unwrap().is_none(), "cut at {cut}");
            if cut > 0 {
                assert_eq!(check_eof(&buf).unwrap_err().reason(), "truncated");
            }
        }
    }

    #[test]
    fn oversize_is_rejected_from_the_prefix_alone() {
        let mut buf = BytesMut::from(&((MAX + 1) as u32).to_be_bytes()[..]);
        assert_eq!(decode(&mut buf, MAX).unwrap_err(), CodecError::Oversize { len: MAX + 1, max: MAX });
        let mut out = BytesMut::new();
        let big = vec![0u8; MAX];
        assert_eq!(
            encode(&Header::Data { epoch: Epoch(1), seq: Seq(1), more: false }, &big, MAX, &mut out)
                .unwrap_err()
                .reason(),
            "oversize"
        );
        assert!(out.is_empty(), "a refused frame leaves nothing behind");
    }

    #[test]
    fn garbage_and_empty_frames_are_rejected() {
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert_eq!(decode(&mut buf, MAX).unwrap_err().reason(), "garbage");
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode(&mut buf, MAX).unwrap_err().reason(), "garbage");
    }

    #[test]
    fn a_control_frame_may_not_carry_a_body() {
        let mut buf = BytesMut::new();
        encode(&Header::Ping { nonce: 1 }, b"smuggled", MAX, &mut buf).unwrap();
        assert_eq!(decode(&mut buf, MAX).unwrap_err().reason(), "garbage");
    }

    #[test]
    fn huge_length_claims_inside_a_small_frame_fail_cleanly() {
        // A Goodbye whose string claims 2^62 bytes: must error, not allocate.
        let mut frame = vec![7u8]; // variant index of Goodbye
        frame.push(253); // bincode varint marker for u64
        frame.extend_from_slice(&(1u64 << 62).to_le_bytes());
        let mut buf = BytesMut::new();
        buf.put_u32(frame.len() as u32);
        buf.extend_from_slice(&frame);
        assert_eq!(decode(&mut buf, MAX).unwrap_err().reason(), "garbage");
    }

    #[test]
    fn preamble_checks_magic_and_version() {
        assert_eq!(check_preamble(&preamble()).unwrap(), PROTOCOL_VERSION);
        let mut p = preamble();
        p[5] = p[5].wrapping_add(1);
        assert_eq!(check_preamble(&p).unwrap_err().reason(), "version");
        assert_eq!(check_preamble(b"GET / ").unwrap_err().reason(), "bad_magic");
    }
}
