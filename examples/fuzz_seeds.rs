//! Writes the seed corpus for the frame_decoder and handshake fuzz targets:
//!
//!     cargo run --example fuzz_seeds -- fuzz/corpus
//!
//! (The etf_translate seeds are real `term_to_binary` output; see fuzz/README.md.)

use bytes::{Bytes, BytesMut};
use wandist::wire::codec;
use wandist::wire::{Advert, AdvertBody, Frame, Header, Hello, PROTOCOL_VERSION};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: fuzz_seeds DIR"));
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster: "dc2".into(),
        gateway: "gw-dc2".into(),
        epoch: 1_700_000_000_123,
        links_wanted: 2,
        recv_window_messages: 65_536,
        recv_window_bytes: 64 << 20,
        capabilities: vec!["heartbeat-v1".into()],
    };
    let advert = |body| Header::Advert(Advert { origin: "dc2".into(), counter: 7, body });
    let frames = vec![
        ("hello", Frame::control(Header::Hello(hello.clone()))),
        ("ping", Frame::control(Header::Ping { nonce: 42 })),
        ("pong", Frame::control(Header::Pong { nonce: 42 })),
        (
            "data",
            Frame {
                header: Header::Data { epoch: 9, seq: 1, more: false },
                body: Bytes::from_static(b"\x83d\x00\x02hi"),
            },
        ),
        (
            "data_more",
            Frame { header: Header::Data { epoch: 9, seq: 2, more: true }, body: Bytes::from(vec![7u8; 300]) },
        ),
        ("ack", Frame::control(Header::Ack { epoch: 9, upto: 2 })),
        (
            "snapshot",
            Frame::control(advert(AdvertBody::Snapshot {
                part: 0,
                last: true,
                groups: vec![("chat".into(), vec![b"\x58member".to_vec(), b"other".to_vec()])],
            })),
        ),
        ("join", Frame::control(advert(AdvertBody::Join { group: "chat".into(), members: vec![b"m".to_vec()] }))),
        ("leave", Frame::control(advert(AdvertBody::Leave { group: "chat".into(), members: vec![b"m".to_vec()] }))),
        ("resync", Frame::control(Header::Resync)),
        ("goodbye", Frame::control(Header::Goodbye { reason: "shutdown".into() })),
        ("reject", Frame::control(Header::Reject { epoch: 9, seqs: vec![2, 5, 6] })),
    ];
    let dir = out.join("frame_decoder");
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = BytesMut::new();
    for (name, f) in &frames {
        let b = codec::encode_frame(f, codec::DEFAULT_MAX_FRAME_BYTES).unwrap();
        all.extend_from_slice(&b);
        std::fs::write(dir.join(name), &b).unwrap();
    }
    std::fs::write(dir.join("stream"), &all).unwrap();

    let dir = out.join("handshake");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, header) in
        [("hello", Header::Hello(hello)), ("goodbye", Header::Goodbye { reason: "no route for dc2".into() })]
    {
        let mut b = BytesMut::new();
        b.extend_from_slice(&codec::preamble());
        codec::encode(&header, &[], codec::DEFAULT_MAX_FRAME_BYTES, &mut b).unwrap();
        std::fs::write(dir.join(name), &b).unwrap();
    }
    println!("seeds written under {}", out.display());
}
