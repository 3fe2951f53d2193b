//! Writes the seed corpus for the frame_decoder, handshake and relay fuzz targets:
//!
//!     cargo run --example fuzz_seeds -- fuzz/corpus
//!
//! (The etf_translate seeds are real `term_to_binary` output; see fuzz/README.md.)

use bytes::{Bytes, BytesMut};
use wandist::erlang::etf::{self, Term};
use wandist::wire::codec;
use wandist::wire::relay::Relay;
use wandist::wire::{Advert, AdvertBody, Frame, Handle, Header, Hello, PROTOCOL_VERSION};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: fuzz_seeds DIR"));
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster: "dc2".into(),
        gateway: "gw-dc2".into(),
        epoch: wandist::wire::Epoch(1_700_000_000_123),
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
                header: Header::Data { epoch: wandist::wire::Epoch(9), seq: wandist::wire::Seq(1), more: false },
                body: Bytes::from_static(b"\x83d\x00\x02hi"),
            },
        ),
        (
            "data_more",
            Frame {
                header: Header::Data { epoch: wandist::wire::Epoch(9), seq: wandist::wire::Seq(2), more: true },
                body: Bytes::from(vec![7u8; 300]),
            },
        ),
        ("ack", Frame::control(Header::Ack { epoch: wandist::wire::Epoch(9), upto: wandist::wire::Seq(2) })),
        (
            "snapshot",
            Frame::control(advert(AdvertBody::Snapshot {
                part: 0,
                last: true,
                groups: vec![("chat".into(), vec![Handle(1), Handle(2)]), ("~6803".into(), vec![Handle(7)])],
            })),
        ),
        ("join", Frame::control(advert(AdvertBody::Join { group: "chat".into(), members: vec![Handle(3)] }))),
        ("leave", Frame::control(advert(AdvertBody::Leave { group: "chat".into(), members: vec![Handle(3)] }))),
        ("resync", Frame::control(Header::Resync)),
        ("goodbye", Frame::control(Header::Goodbye { reason: "shutdown".into() })),
        (
            "reject",
            Frame::control(Header::Reject {
                epoch: wandist::wire::Epoch(9),
                seqs: vec![wandist::wire::Seq(2), wandist::wire::Seq(5), wandist::wire::Seq(6)],
            }),
        ),
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
    // Relays as dc2 would send them to a gateway that gave it handles 1-6
    // (fuzz/checks.rs, `relay`): pids 1, 3, 5; aliases 2, 4, 6.
    let dir = out.join("relay");
    std::fs::create_dir_all(&dir).unwrap();
    let handle = |tag: u8, h: u64| {
        let mut v = Vec::new();
        etf::put_handle(&mut v, tag, h);
        v
    };
    let tuple = |items: Vec<Vec<u8>>| {
        let mut v = vec![etf::VERSION, 104, items.len() as u8];
        for i in items {
            v.extend(i);
        }
        v
    };
    let atom = |a: &str| etf::encode(&Term::atom(a))[1..].to_vec();
    let map = etf::encode(&Term::Map(vec![
        (Term::atom("text"), Term::Binary(b"hello".to_vec())),
        (Term::atom("n"), Term::Int(7)),
    ]));
    let relays: Vec<(&str, Relay, Vec<u8>)> = vec![
        (
            "send",
            Relay::Send { to: Handle(1), from: Some(Handle(9)) },
            tuple(vec![atom("ping"), handle(etf::PEER_PID, 9)]),
        ),
        (
            "reply",
            Relay::AliasSend { to: Handle(2), from: Some(Handle(9)) },
            tuple(vec![handle(etf::HOME_REF, 2), atom("pong")]),
        ),
        (
            "call",
            Relay::Send { to: Handle(3), from: Some(Handle(9)) },
            tuple(vec![
                atom("$gen_call"),
                tuple(vec![handle(etf::PEER_PID, 9), handle(etf::PEER_REF, 10)])[1..].to_vec(),
                atom("x"),
            ]),
        ),
        (
            "home",
            Relay::Send { to: Handle(1), from: None },
            tuple(vec![handle(etf::HOME_PID, 5), handle(etf::HOME_PID, 99)]),
        ),
        ("map", Relay::Send { to: Handle(5), from: None }, map),
        ("monitor", Relay::Monitor { target: Handle(1) }, vec![]),
        ("demonitor", Relay::Demonitor { target: Handle(1) }, vec![]),
        ("down", Relay::Down { target: Handle(1) }, etf::encode(&Term::atom("normal"))),
    ];
    for (name, r, body) in relays {
        let mut b = Vec::new();
        codec::encode_value(&r, &mut b).unwrap();
        b.extend(body);
        std::fs::write(dir.join(name), &b).unwrap();
    }
    println!("seeds written under {}", out.display());
}
