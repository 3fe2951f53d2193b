//! What each fuzz target checks, as plain functions: the fuzz targets call
//! them on generated inputs, and `tests/fuzz_regressions.rs` calls them on
//! the seed corpus and on every input that ever crashed (fuzz/regressions/).
#![allow(dead_code)]

use std::sync::OnceLock;

use bytes::BytesMut;
use wandist::erlang::etf::{self, Pid};
use wandist::link::handshake;
use wandist::wire::codec;

const MAX: usize = 1 << 20;

/// The frame decoder on arbitrary bytes from a peer: frames or a clear
/// error, never a panic, never a buffer beyond the limit; a decoded frame
/// encodes and decodes again to itself; a `Packed` frame unpacks (lz4 or
/// zstd) to whole data frames within its stated size, or is refused.
pub fn frame_decoder(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut unpacker = codec::Unpacker::default();
    for _ in 0..1024 {
        match codec::decode(&mut buf, MAX) {
            Ok(Some(frame)) => {
                if let wandist::wire::Header::Packed { packing, raw_len } = frame.header {
                    if let Ok(frames) = unpacker.unpack(packing, raw_len, &frame.body, MAX, 64 * 1024) {
                        let inside: usize = frames.iter().map(|f| f.body.len()).sum();
                        assert!(inside <= raw_len as usize, "unpacked more than it said");
                    }
                }
                let mut again = codec::encode_frame(&frame, MAX).expect("a decoded frame encodes");
                let back = codec::decode(&mut again, MAX).expect("re-decodes").expect("whole");
                assert_eq!(back, frame);
                assert!(again.is_empty());
            }
            Ok(None) => {
                let _ = codec::check_eof(&buf);
                break;
            }
            Err(_) => break,
        }
        assert!(buf.capacity() <= MAX + 4 + data.len(), "buffered beyond the limit");
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap())
}

/// The accepting side's first bytes from an unauthenticated peer (after
/// TLS, or on a plaintext route): the preamble and the hello. A hello or a
/// clear error, never a panic or a hang (a slice ends in EOF).
pub fn handshake(data: &[u8]) {
    let mut io = data;
    if let Ok((hello, _rest)) = runtime().block_on(handshake::read_hello(&mut io, 128 << 20)) {
        assert!(hello.cluster.len() <= data.len());
    }
}

/// Rewrites local pids to another node, keeps references; from a peer,
/// turns handles into pids and references of fixed nodes.
struct Rewrite;

impl etf::Translator for Rewrite {
    fn pid(&mut self, p: etf::PidView<'_>, out: &mut Vec<u8>) -> Result<(), etf::Refusal> {
        etf::put_pid(out, &Pid { node: format!("proxy@{}", p.node.len()), ..p.to_pid() });
        Ok(())
    }
    fn handle(&mut self, kind: etf::Kind, home: bool, h: u64, out: &mut Vec<u8>) -> Result<(), etf::Refusal> {
        if h % 7 == 0 {
            return Err(etf::Refusal::Forged);
        }
        let node = if home { "home@dc1" } else { "proxy@gw" };
        match kind {
            etf::Kind::Pid => etf::put_pid(out, &Pid { node: node.into(), id: h as u32, serial: 0, creation: 1 }),
            etf::Kind::Ref => {
                etf::put_ref(out, &etf::Ref { node: node.into(), creation: 1, ids: vec![h as u32, 0, 0] })
            }
        }
        Ok(())
    }
}

/// The payload scanner on arbitrary bytes, as from a local node and as
/// from a peer gateway: a translated term or a clear error, never a panic;
/// what comes out is plain ETF that a node takes (it scans again, as from
/// a node and strictly as from a peer, to itself).
pub fn etf_translate(data: &[u8]) {
    for source in [etf::Source::Node, etf::Source::Peer] {
        let mut out = Vec::new();
        if let Ok(used) = etf::translate(data, &mut out, &mut Rewrite, source) {
            assert!(used <= data.len());
            let mut again = Vec::new();
            etf::translate(&out, &mut again, &mut etf::scan::Verbatim, etf::Source::Node)
                .expect("translated output scans again");
            assert_eq!(again, out);
            if source == etf::Source::Peer {
                // What a peer sent, once translated, is plain ETF a node
                // takes: no handle tags left, nothing a node would refuse.
                let mut strict = Vec::new();
                struct Identities;
                impl etf::Translator for Identities {}
                let _ = etf::translate(&out, &mut strict, &mut Identities, etf::Source::Node).expect("plain ETF");
            }
        }
    }
    let _ = etf::decode(data);
    let _ = etf::canon::canonical(data);
    // The in-place readers agree with the decoder wherever they read anything.
    if let Some(ss) = etf::send_sender(data) {
        let (t, used) = etf::decode(data).expect("what send_sender reads decodes");
        assert_eq!(used, ss.len);
        let t = t.as_tuple().expect("a tuple");
        for (term, view) in [(&t[1], ss.from), (&t[2], ss.to)] {
            let p = term.as_pid().expect("a pid");
            assert_eq!(
                (p.node.as_bytes(), p.id, p.serial, p.creation),
                (&*view.node_utf8(), view.id, view.serial, view.creation)
            );
        }
    }
    if let Some((node, ids)) = etf::name_monitor_exit_ref(data) {
        let (t, _) = etf::decode(data).expect("what name_monitor_exit_ref reads decodes");
        let Some(etf::Term::Ref(r)) = t.as_tuple().and_then(|t| t.get(3)) else { panic!("no ref in {t:?}") };
        assert_eq!(r.node.as_bytes(), node);
        assert_eq!(r.ids.iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>(), ids);
    }
}

/// A peer's relay (header and payload) on arbitrary bytes, to an Erlang
/// side that issued the peer a few handles: never a panic, and whatever
/// reaches a node is addressed to, and names, only what the peer was given.
pub fn relay(data: &[u8]) {
    use wandist::erlang::control::Control;
    use wandist::erlang::core::{Core, Effect, PeerSetup, Setup};
    use wandist::local::{Held, ToLocal};
    use wandist::membership::{Change, Filter};
    use wandist::wire::Handle;

    let limits = wandist::config::Limits { proxies: 64, handles: 64, monitors: 8, atoms: 64, ..Default::default() };
    let peers = ["dc2", "dc3"].iter().map(|n| PeerSetup { name: (*n).into(), export: Filter::all(), limits }).collect();
    let a1: std::sync::Arc<str> = "a1@h".into();
    let setup = Setup {
        me: "gw@h".into(),
        creation: 9,
        scopes: vec!["wan".into()],
        nodes: vec![a1.clone()],
        peers,
        claims: None,
    };
    let mut core = Core::new(setup, wandist::metrics::Metrics::new());
    core.node_up(&a1);
    let mut issued = Vec::new();
    for p in 0..2 {
        core.from_route(p, ToLocal::Up { peer: core.peer_name(p).clone(), epoch: wandist::route::Epoch(1) });
        let change = Change::Join { group: "g".into(), members: vec![Handle(1)] };
        core.from_route(p, ToLocal::Members { peer: core.peer_name(p).clone(), change });
    }
    core.take_effects();
    // Local processes 100..103 of a1 talk to dc2's member: their handles
    // (and an alias each) are what dc2 was given.
    let proxy = Pid { node: "gw@h".into(), id: 1000, serial: 0, creation: 9 };
    for id in 100..103 {
        let pid = Pid { node: "a1@h".into(), id, serial: 0, creation: 1 };
        let alias = etf::Ref { node: "a1@h".into(), creation: 1, ids: vec![id, 0, 0] };
        let msg = etf::encode(&etf::Term::tuple(vec![etf::Term::Pid(pid.clone()), etf::Term::Ref(alias.clone())]));
        let control = Control::SendSender { from: pid.clone(), to: proxy.clone() }.term();
        core.node_control(&a1, control, Some(bytes::Bytes::from(msg)));
        issued.push(etf::pid_bytes(&pid));
        issued.push(etf::ref_bytes(&alias));
    }
    core.take_effects();
    for p in 0..2 {
        let item =
            ToLocal::Deliver { peer: core.peer_name(p).clone(), payload: data.to_vec().into(), held: Held::detached() };
        core.from_route(p, item);
        for e in core.take_effects() {
            let Effect::Node { packet, .. } = e else { continue };
            let (control, used) = etf::decode(&packet[5..]).expect("a control term");
            let dest = match Control::parse(&control) {
                Ok(Control::SendSender { to, .. }) => etf::pid_bytes(&to),
                Ok(Control::AliasSend { alias, .. }) => etf::ref_bytes(&alias),
                Ok(Control::MonitorP { target: wandist::erlang::control::Target::Pid(t), .. }) => etf::pid_bytes(&t),
                _ => continue,
            };
            assert!(p == 0 && issued.contains(&dest), "peer {p} reached something it was never given");
            // Whatever the payload names of a1 was given to dc2 too.
            if packet.len() > 5 + used {
                let mut out = Vec::new();
                struct Collect<'a>(&'a mut Vec<Vec<u8>>);
                impl etf::Translator for Collect<'_> {
                    fn pid(&mut self, p: etf::PidView<'_>, out: &mut Vec<u8>) -> Result<(), etf::Refusal> {
                        self.0.push(p.canonical().to_vec());
                        out.extend_from_slice(p.bytes);
                        Ok(())
                    }
                    fn reference(&mut self, r: etf::RefView<'_>, out: &mut Vec<u8>) -> Result<(), etf::Refusal> {
                        self.0.push(r.canonical().to_vec());
                        out.extend_from_slice(r.bytes);
                        Ok(())
                    }
                }
                let mut named = Vec::new();
                etf::translate(&packet[5 + used..], &mut out, &mut Collect(&mut named), etf::Source::Node)
                    .expect("a payload a node takes");
                for n in named {
                    let node = etf::node_of(&n).unwrap_or_default();
                    assert!(node != b"a1@h" || issued.contains(&n), "named something of a1 never given");
                }
            }
        }
    }
}
