//! What each fuzz target checks, as plain functions: the fuzz targets call
//! them on generated inputs, and `tests/fuzz_regressions.rs` calls them on
//! the seed corpus and on every input that ever crashed (fuzz/regressions/).
#![allow(dead_code)]

use std::sync::OnceLock;

use bytes::BytesMut;
use wandist::erlang::etf::{self, Emit, Found, Pid};
use wandist::link::handshake;
use wandist::wire::codec;

const MAX: usize = 1 << 20;

/// The frame decoder on arbitrary bytes from a peer: frames or a clear
/// error, never a panic, never a buffer beyond the limit; a decoded frame
/// encodes and decodes again to itself.
pub fn frame_decoder(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    for _ in 0..1024 {
        match codec::decode(&mut buf, MAX) {
            Ok(Some(frame)) => {
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

/// The Erlang term translator on arbitrary payloads, from a local node (no
/// markers) and from a peer gateway (markers allowed): a translated term or
/// a clear error, never a panic; plain ETF in gives plain ETF out, which
/// translates again to itself.
pub fn etf_translate(data: &[u8]) {
    for markers in [false, true] {
        let mut out = Vec::new();
        let mut f = |found: Found| -> Result<Emit, String> {
            Ok(match found {
                Found::Pid(p) => Emit::Pid(Pid { node: format!("proxy@{}", p.node.len()), ..p }),
                Found::Ref(r) => Emit::Ref(r),
                Found::HomePid(p) => Emit::HomePid(p),
                Found::HomeRef(r) => Emit::HomeRef(r),
            })
        };
        if let Ok(used) = etf::translate(data, &mut out, &mut f, markers) {
            assert!(used <= data.len());
            if !markers {
                let mut again = Vec::new();
                let mut same = |f: Found| -> Result<Emit, String> {
                    Ok(match f {
                        Found::Pid(p) => Emit::Pid(p),
                        Found::Ref(r) => Emit::Ref(r),
                        other => return Err(format!("{other:?}")),
                    })
                };
                etf::translate(&out, &mut again, &mut same, false).expect("translated output translates again");
                assert_eq!(again, out);
            }
        }
    }
    // Pids known by their encoding (here: those of even length) are
    // replaced without being decoded, the rest decoded as above: a clear
    // result either way, and well-formed ETF out.
    struct Known;
    impl etf::Translator for Known {
        fn known_pid(&mut self, encoded: &[u8], out: &mut Vec<u8>) -> bool {
            let known = encoded.len() % 2 == 0;
            if known {
                etf::put_pid(out, &Pid { node: "known@x".into(), id: 1, serial: 0, creation: 1 });
            }
            known
        }
        fn found(&mut self, found: Found) -> Result<Emit, String> {
            match found {
                Found::Pid(p) => Ok(Emit::Pid(p)),
                Found::Ref(r) => Ok(Emit::Ref(r)),
                other => Err(format!("{other:?}")),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(used) = etf::translate_with(data, &mut out, &mut Known, false) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        etf::translate_with(&out, &mut again, &mut Known, false).expect("translated output translates again");
    }
    let _ = etf::decode(data);
    // The in-place readers agree with the decoder wherever they read anything.
    if let Some(ss) = etf::send_sender(data) {
        let (t, used) = etf::decode(data).expect("what send_sender reads decodes");
        assert_eq!(used, ss.len);
        let t = t.as_tuple().expect("a tuple");
        for (term, view) in [(&t[1], ss.from), (&t[2], ss.to)] {
            let p = term.as_pid().expect("a pid");
            assert_eq!(
                (p.node.as_bytes(), p.id, p.serial, p.creation),
                (view.node, view.id, view.serial, view.creation)
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
