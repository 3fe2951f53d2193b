//! The payload scanner: copies one term from input to output, checking it
//! as a node would, and hands every identity in it to a [`Translator`],
//! which writes what replaces it.
//!
//! A payload from a node of this cluster ([`Source::Node`]) is plain ETF:
//! its identities are pids and references. A payload from a peer gateway
//! ([`Source::Peer`]) names identities only by handle (the `PEER_*` and
//! `HOME_*` tags); a pid or reference written out in it is refused as
//! forged, and so is a port either way (it means nothing in another
//! cluster). Whatever a node would refuse, and drop the gateway's whole
//! connection over, is refused here: atoms over 255 characters, floats
//! that are not finite, malformed bit strings, integers over
//! [`MAX_BIG_BYTES`], malformed funs and exports, and (from a peer) maps
//! with two equal keys.
//!
//! Memory: the work stack holds one 12-byte entry per level of nesting
//! still open with siblings to come (each costs at least 3 bytes of
//! input), and none for a term nested as a last element; map keys from a
//! peer add 8 bytes per key while their map is open. So a scan needs at
//! most a few times its input, however it is nested.

use super::*;

/// Where a payload comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A node of this cluster: plain ETF.
    Node,
    /// A peer gateway: identities only as handles; checked strictly.
    Peer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pid,
    Ref,
}

/// Why a translator refused an identity (or an atom). `label()` is the
/// metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Not something this gateway issued to that peer: a handle never
    /// issued (or of the other kind), or a raw pid or reference from a peer.
    Forged,
    /// A handle this gateway issued to that peer once, since forgotten.
    Stale,
    /// The peer has introduced as many distinct atoms as it may.
    AtomBudget,
    /// The peer's proxies are at their quota, every one pinned.
    ProxyQuota,
    /// The handles issued to the peer are at their quota, every one pinned.
    HandleQuota,
    /// An identity of a third cluster: identities are not transitive.
    Transitive,
    /// One of the gateway's own identities, which never cross.
    Internal,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Forged => "forged",
            Refusal::Stale => "stale_handle",
            Refusal::AtomBudget => "atom_budget",
            Refusal::ProxyQuota => "proxy_quota",
            Refusal::HandleQuota => "handle_quota",
            Refusal::Transitive => "transitive",
            Refusal::Internal => "internal",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Forged => "an identity the peer was never given",
            Refusal::Stale => "an identity the peer was given once, since forgotten",
            Refusal::AtomBudget => "the peer's atom budget is spent",
            Refusal::ProxyQuota => "the peer's proxies are at their quota",
            Refusal::HandleQuota => "the handles issued to the peer are at their quota",
            Refusal::Transitive => "an identity of a third cluster (identities are not transitive)",
            Refusal::Internal => "one of the gateway's own identities",
        })
    }
}

/// What the scanner asks about each identity and (from a peer) each atom.
pub trait Translator {
    /// From a node: a pid as found; write what replaces it. (Default: itself.)
    fn pid(&mut self, p: PidView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        out.extend_from_slice(p.bytes);
        Ok(())
    }
    /// From a node: a reference as found. (Default: itself.)
    fn reference(&mut self, r: RefView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
        out.extend_from_slice(r.bytes);
        Ok(())
    }
    /// From a peer: an identity by handle; `home` when the receiver (this
    /// gateway) issued it, else the sender did. (Default: refused.)
    fn handle(&mut self, _kind: Kind, _home: bool, _handle: u64, _out: &mut Vec<u8>) -> Result<(), Refusal> {
        Err(Refusal::Forged)
    }
    /// From a peer: an atom's text (UTF-8, checked). (Default: fine.)
    fn atom(&mut self, _text: &[u8]) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Copies identities as they are, refuses handles.
pub struct Verbatim;
impl Translator for Verbatim {}

enum Task {
    /// This many terms to go at this level.
    Terms(u32),
    /// A fun's byte size goes at this output position, counted from it.
    PatchFun(u32),
    /// A map from a peer: `left` pairs to go; its keys' output ranges
    /// are `keys[from..]`.
    Map { left: u32, from: u32 },
    /// The map key that began at this output position ends here; its
    /// value comes next.
    KeyEnd(u32),
}

/// Copies one term (with its version byte) from `input` to `out`,
/// replacing identities by what `t` says; returns the input bytes used.
pub fn translate(input: &[u8], out: &mut Vec<u8>, t: &mut dyn Translator, source: Source) -> Result<usize, EtfError> {
    let mut r = Reader::new(input);
    let v = r.u8()?;
    if v != VERSION {
        return Err(EtfError::Version(v));
    }
    out.push(VERSION);
    scan_one(&mut r, out, t, source)?;
    Ok(r.at)
}

/// Moves past one term, whatever it is, iteratively (identities copied).
pub(super) fn skip(r: &mut Reader<'_>) -> Result<(), EtfError> {
    let mut sink = Vec::new();
    let start = r.at;
    let mut sub = Reader { b: &r.b[start..], at: 0 };
    scan_one(&mut sub, &mut sink, &mut Verbatim, Source::Node)?;
    r.at = start + sub.at;
    Ok(())
}

fn refused(r: Refusal) -> EtfError {
    EtfError::Refused(r)
}

/// An atom where it lies: checked (`atom_bytes`), told to the translator
/// if from a peer, copied.
fn copy_atom(r: &mut Reader<'_>, out: &mut Vec<u8>, t: &mut dyn Translator, source: Source) -> Result<(), EtfError> {
    let start = r.at;
    let (bytes, latin1) = r.atom_bytes()?;
    if source == Source::Peer {
        t.atom(&atom_utf8(bytes, latin1)).map_err(refused)?;
    }
    out.extend_from_slice(&r.b[start..r.at]);
    Ok(())
}

/// An integer where it lies (small, 32-bit or big), copied.
fn copy_integer(r: &mut Reader<'_>, out: &mut Vec<u8>, what: &'static str) -> Result<(), EtfError> {
    let start = r.at;
    match r.u8()? {
        SMALL_INTEGER => {
            r.take(1)?;
        }
        INTEGER => {
            r.take(4)?;
        }
        SMALL_BIG => {
            let n = r.u8()? as usize;
            r.take(1 + n)?;
        }
        _ => return Err(EtfError::Invalid(what)),
    }
    out.extend_from_slice(&r.b[start..r.at]);
    Ok(())
}

fn scan_one(r: &mut Reader<'_>, out: &mut Vec<u8>, t: &mut dyn Translator, source: Source) -> Result<(), EtfError> {
    let peer = source == Source::Peer;
    let mut todo: Vec<Task> = Vec::with_capacity(8);
    // Output ranges of the keys of the maps from a peer now open.
    let mut keys: Vec<(u32, u32)> = Vec::new();
    let mut scratch: Vec<u8> = Vec::new();
    todo.push(Task::Terms(1));
    loop {
        match todo.last_mut() {
            None => return Ok(()),
            Some(Task::Terms(n)) => {
                *n -= 1;
                // The last term of a level replaces it on the stack, so
                // a term nested as a last element costs nothing.
                if *n == 0 {
                    todo.pop();
                }
            }
            Some(Task::PatchFun(at)) => {
                let at = *at as usize;
                let size = (out.len() - at) as u32;
                out[at..at + 4].copy_from_slice(&size.to_be_bytes());
                todo.pop();
                continue;
            }
            Some(Task::KeyEnd(start)) => {
                let start = *start;
                todo.pop();
                keys.push((start, out.len() as u32));
                todo.push(Task::Terms(1)); // its value
                continue;
            }
            Some(Task::Map { left, from }) => {
                if *left == 0 {
                    let from = *from as usize;
                    todo.pop();
                    super::canon::check_unique_keys(out, &keys[from..], &mut scratch)?;
                    keys.truncate(from);
                } else {
                    *left -= 1;
                    todo.push(Task::KeyEnd(out.len() as u32));
                    todo.push(Task::Terms(1));
                }
                continue;
            }
        }
        let start = r.at;
        let tag = r.u8()?;
        let copy = |r: &Reader<'_>, out: &mut Vec<u8>| out.extend_from_slice(&r.b[start..r.at]);
        match tag {
            SMALL_INTEGER => {
                r.take(1)?;
                copy(r, out);
            }
            INTEGER => {
                r.take(4)?;
                copy(r, out);
            }
            NEW_FLOAT => {
                if !f64::from_bits(r.u64()?).is_finite() {
                    return Err(EtfError::Invalid("a float that is not finite"));
                }
                copy(r, out);
            }
            ATOM | SMALL_ATOM | ATOM_UTF8 | SMALL_ATOM_UTF8 => {
                r.at = start;
                copy_atom(r, out, t, source)?;
            }
            PID | NEW_PID if peer => return Err(refused(Refusal::Forged)),
            REFERENCE | NEW_REFERENCE | NEWER_REFERENCE if peer => return Err(refused(Refusal::Forged)),
            PID | NEW_PID => {
                r.at = start;
                let p = r.pid_view()?;
                t.pid(p, out).map_err(refused)?;
            }
            REFERENCE | NEW_REFERENCE | NEWER_REFERENCE => {
                r.at = start;
                let x = r.ref_view()?;
                t.reference(x, out).map_err(refused)?;
            }
            PEER_PID | PEER_REF | HOME_PID | HOME_REF if peer => {
                let kind = if matches!(tag, PEER_PID | HOME_PID) { Kind::Pid } else { Kind::Ref };
                let handle = r.u64()?;
                t.handle(kind, matches!(tag, HOME_PID | HOME_REF), handle, out).map_err(refused)?;
            }
            SMALL_TUPLE | LARGE_TUPLE => {
                let n = if tag == SMALL_TUPLE { r.u8()? as usize } else { r.u32()? as usize };
                if n > r.left() {
                    return Err(EtfError::Truncated);
                }
                copy(r, out);
                if n > 0 {
                    todo.push(Task::Terms(n as u32));
                }
            }
            MAP => {
                let n = r.u32()? as usize;
                if n > r.left() / 2 {
                    return Err(EtfError::Truncated);
                }
                copy(r, out);
                if peer && n >= 2 {
                    todo.push(Task::Map { left: n as u32, from: keys.len() as u32 });
                } else if n > 0 {
                    todo.push(Task::Terms(2 * n as u32));
                }
            }
            NIL => copy(r, out),
            STRING => {
                let n = r.u16()? as usize;
                r.take(n)?;
                copy(r, out);
            }
            LIST => {
                let n = r.u32()? as usize;
                if n > r.left() {
                    return Err(EtfError::Truncated);
                }
                copy(r, out);
                todo.push(Task::Terms(n as u32 + 1));
            }
            BINARY => {
                let n = r.u32()? as usize;
                r.take(n)?;
                copy(r, out);
            }
            BIT_BINARY => {
                let n = r.u32()? as usize;
                let bits = r.u8()?;
                let ok = if n == 0 { bits == 0 } else { (1..=8).contains(&bits) };
                if !ok {
                    return Err(EtfError::Invalid("a bit string with a bad bit count"));
                }
                r.take(n)?;
                copy(r, out);
            }
            SMALL_BIG => {
                let n = r.u8()? as usize;
                r.take(1 + n)?;
                copy(r, out);
            }
            LARGE_BIG => {
                let n = r.u32()? as usize;
                if n > MAX_BIG_BYTES {
                    return Err(EtfError::Invalid("an integer of over 1 MiB"));
                }
                r.take(1 + n)?;
                copy(r, out);
            }
            EXPORT => {
                out.push(EXPORT);
                copy_atom(r, out, t, source)?;
                copy_atom(r, out, t, source)?;
                let at = r.at;
                match r.u8()? {
                    SMALL_INTEGER => {
                        r.take(1)?;
                    }
                    INTEGER if (0..=255).contains(&(r.u32()? as i32)) => {}
                    _ => return Err(EtfError::Invalid("an export's arity is not 0 to 255")),
                }
                out.extend_from_slice(&r.b[at..r.at]);
            }
            NEW_FUN => {
                let _size = r.u32()?;
                let fixed = r.take(1 + 16 + 4)?; // arity, uniq, index
                let num_free = r.u32()? as usize;
                if num_free > r.left() {
                    return Err(EtfError::Truncated);
                }
                out.push(NEW_FUN);
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(fixed);
                out.extend_from_slice(&(num_free as u32).to_be_bytes());
                copy_atom(r, out, t, source)?; // module
                copy_integer(r, out, "a fun's old index is not an integer")?;
                copy_integer(r, out, "a fun's old uniq is not an integer")?;
                // The size covers itself and everything after the tag:
                // patched once the pid and the free variables are in.
                todo.push(Task::PatchFun(at as u32));
                todo.push(Task::Terms(1 + num_free as u32));
            }
            FLOAT => return Err(EtfError::Tag(FLOAT)), // never sent since OTP R11 (DFLAG_NEW_FLOATS)
            PORT | NEW_PORT | V4_PORT => return Err(EtfError::Tag(tag)),
            t => return Err(EtfError::Tag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(node: &str, id: u32) -> Pid {
        Pid { node: node.into(), id, serial: 0, creation: 7 }
    }

    /// Rewrites local pids by adding 100 to their id, refs as they are;
    /// from a peer, turns PEER handles into pids on "proxy@gw" and HOME
    /// handles into pids on "home@dc1"; counts atoms.
    #[derive(Default)]
    struct Test {
        atoms: Vec<Vec<u8>>,
        handles: Vec<(Kind, bool, u64)>,
    }

    impl Translator for Test {
        fn pid(&mut self, p: PidView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
            let mut q = p.to_pid();
            q.id += 100;
            put_pid(out, &q);
            Ok(())
        }
        fn handle(&mut self, kind: Kind, home: bool, h: u64, out: &mut Vec<u8>) -> Result<(), Refusal> {
            self.handles.push((kind, home, h));
            if h == 666 {
                return Err(Refusal::Forged);
            }
            let node = if home { "home@dc1" } else { "proxy@gw" };
            match kind {
                Kind::Pid => put_pid(out, &pid(node, h as u32)),
                Kind::Ref => put_ref(out, &Ref { node: node.into(), creation: 1, ids: vec![h as u32, 0, 0] }),
            }
            Ok(())
        }
        fn atom(&mut self, text: &[u8]) -> Result<(), Refusal> {
            self.atoms.push(text.to_vec());
            if text == b"too_many" {
                return Err(Refusal::AtomBudget);
            }
            Ok(())
        }
    }

    fn node(input: &[u8]) -> Result<Vec<u8>, EtfError> {
        let mut out = Vec::new();
        translate(input, &mut out, &mut Test::default(), Source::Node).map(|_| out)
    }

    fn peer(input: &[u8]) -> Result<Vec<u8>, EtfError> {
        let mut out = Vec::new();
        translate(input, &mut out, &mut Test::default(), Source::Peer).map(|_| out)
    }

    fn with(tag: u8, h: u64) -> Vec<u8> {
        let mut v = Vec::new();
        put_handle(&mut v, tag, h);
        v
    }

    #[test]
    fn from_a_node_pids_and_refs_are_handed_over_and_the_rest_copied() {
        let r = Ref { node: "a@h".into(), creation: 7, ids: vec![9, 9, 9] };
        let t = Term::tuple(vec![
            Term::atom("$gen_call"),
            Term::tuple(vec![
                Term::Pid(pid("a@h", 5)),
                Term::List(vec![Term::atom("alias")], Box::new(Term::Ref(r.clone()))),
            ]),
            Term::Map(vec![(Term::Binary(vec![1; 100]), Term::Pid(pid("b@h", 6)))]),
        ]);
        let out = node(&encode(&t)).unwrap();
        let want = Term::tuple(vec![
            Term::atom("$gen_call"),
            Term::tuple(vec![
                Term::Pid(pid("a@h", 105)),
                Term::List(vec![Term::atom("alias")], Box::new(Term::Ref(r))),
            ]),
            Term::Map(vec![(Term::Binary(vec![1; 100]), Term::Pid(pid("b@h", 106)))]),
        ]);
        assert_eq!(out, encode(&want));
        // Handle tags are not ETF: a node never writes them.
        let mut tagged = vec![VERSION];
        tagged.extend(with(PEER_PID, 1));
        assert_eq!(node(&tagged), Err(EtfError::Tag(PEER_PID)));
    }

    #[test]
    fn from_a_peer_identities_come_only_as_handles() {
        let mut input = vec![VERSION, SMALL_TUPLE, 4];
        input.extend(with(PEER_PID, 3));
        input.extend(with(PEER_REF, 4));
        input.extend(with(HOME_PID, 5));
        input.extend(with(HOME_REF, 6));
        let mut t = Test::default();
        let mut out = Vec::new();
        assert_eq!(translate(&input, &mut out, &mut t, Source::Peer), Ok(input.len()));
        assert_eq!(
            t.handles,
            vec![(Kind::Pid, false, 3), (Kind::Ref, false, 4), (Kind::Pid, true, 5), (Kind::Ref, true, 6)]
        );
        let want = Term::tuple(vec![
            Term::Pid(pid("proxy@gw", 3)),
            Term::Ref(Ref { node: "proxy@gw".into(), creation: 1, ids: vec![4, 0, 0] }),
            Term::Pid(pid("home@dc1", 5)),
            Term::Ref(Ref { node: "home@dc1".into(), creation: 1, ids: vec![6, 0, 0] }),
        ]);
        assert_eq!(out, encode(&want));
        // A pid or a reference written out is a forgery, wherever it is.
        for forged in [
            Term::tuple(vec![Term::atom("x"), Term::Pid(pid("a1@h", 53))]),
            Term::list(vec![Term::Ref(Ref { node: "a1@h".into(), creation: 1, ids: vec![1] })]),
        ] {
            assert_eq!(peer(&encode(&forged)), Err(EtfError::Refused(Refusal::Forged)));
        }
        // The translator's refusal ends the scan.
        let mut bad = vec![VERSION];
        bad.extend(with(HOME_PID, 666));
        assert_eq!(peer(&bad), Err(EtfError::Refused(Refusal::Forged)));
        // A truncated handle is an error.
        assert_eq!(peer(&bad[..5]), Err(EtfError::Truncated));
    }

    #[test]
    fn from_a_peer_every_atom_is_counted_and_may_be_refused() {
        let mut fun = vec![VERSION, NEW_FUN, 0, 0, 0, 0, 0];
        fun.extend_from_slice(&[7u8; 16]);
        fun.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
        put_atom(&mut fun, "funmod");
        fun.extend_from_slice(&[SMALL_INTEGER, 1, SMALL_INTEGER, 2]);
        fun.extend(with(PEER_PID, 1));
        let t = Term::tuple(vec![Term::atom("a"), Term::atom("b"), Term::Raw(encode_export("m", "f", 1))]);
        let mut x = Test::default();
        translate(&encode(&t), &mut Vec::new(), &mut x, Source::Peer).unwrap();
        assert_eq!(x.atoms, vec![b"a".to_vec(), b"b".to_vec(), b"m".to_vec(), b"f".to_vec()]);
        let mut x = Test::default();
        translate(&fun, &mut Vec::new(), &mut x, Source::Peer).unwrap();
        assert_eq!(x.atoms, vec![b"funmod".to_vec()]);
        // Latin-1 atoms are told as UTF-8.
        let mut x = Test::default();
        translate(&[VERSION, SMALL_ATOM, 2, b'a', 0xe9], &mut Vec::new(), &mut x, Source::Peer).unwrap();
        assert_eq!(x.atoms, vec!["aé".as_bytes().to_vec()]);
        assert_eq!(peer(&encode(&Term::atom("too_many"))), Err(EtfError::Refused(Refusal::AtomBudget)));
        // From a node, atoms are not the translator's business.
        assert!(node(&encode(&Term::atom("too_many"))).is_ok());
    }

    fn encode_export(m: &str, f: &str, arity: u8) -> Vec<u8> {
        let mut v = vec![EXPORT];
        put_atom(&mut v, m);
        put_atom(&mut v, f);
        v.extend_from_slice(&[SMALL_INTEGER, arity]);
        v
    }

    /// What the probe of a real OTP 25 node showed it drops the connection
    /// over (docs/PROTOCOL.md, "What a payload may hold"): each refused,
    /// from a node and from a peer; what it accepts, accepted.
    #[test]
    fn what_a_node_would_drop_the_connection_over_is_refused() {
        let atom = |s: &[u8]| {
            let mut v = vec![VERSION, ATOM_UTF8];
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s);
            v
        };
        let float = |f: f64| {
            let mut v = vec![VERSION, NEW_FLOAT];
            v.extend(f.to_be_bytes());
            v
        };
        let big = |n: u32| {
            let mut v = vec![VERSION, LARGE_BIG];
            v.extend(n.to_be_bytes());
            v.push(0);
            v.extend(vec![1u8; n as usize]);
            v
        };
        let refused: Vec<(&str, Vec<u8>)> = vec![
            ("atom of 256 characters", atom(&[b'a'; 256])),
            ("atom of 256 two-byte characters", atom("é".repeat(256).as_bytes())),
            ("Latin-1 atom of 256", {
                let mut v = vec![VERSION, ATOM, 1, 0];
                v.extend([b'b'; 256]);
                v
            }),
            ("NaN", float(f64::NAN)),
            ("infinity", float(f64::INFINITY)),
            ("bits 0 of a byte", vec![VERSION, BIT_BINARY, 0, 0, 0, 1, 0, 0xff]),
            ("bits 9", vec![VERSION, BIT_BINARY, 0, 0, 0, 1, 9, 0xff]),
            ("no bytes, bits 8", vec![VERSION, BIT_BINARY, 0, 0, 0, 0, 8]),
            (
                "an export of an integer",
                vec![VERSION, EXPORT, SMALL_INTEGER, 1, SMALL_ATOM_UTF8, 1, b'f', SMALL_INTEGER, 1],
            ),
            (
                "an export of arity -1",
                vec![VERSION, EXPORT, SMALL_ATOM_UTF8, 1, b'm', SMALL_ATOM_UTF8, 1, b'f', INTEGER, 255, 255, 255, 255],
            ),
            ("an old float", {
                let mut v = vec![VERSION, FLOAT];
                v.extend([b'x'; 31]);
                v
            }),
            ("a port", {
                let mut v = vec![VERSION, NEW_PORT];
                v.extend(&atom(b"x@y")[1..]);
                v.extend([0, 0, 0, 1, 0, 0, 0, 1]);
                v
            }),
            ("a reference of 6 words", {
                let mut v = vec![VERSION, NEWER_REFERENCE, 0, 6];
                v.extend(&atom(b"x@y")[1..]);
                v.extend([0u8; 28]);
                v
            }),
            (
                "a pid whose node is not an atom",
                vec![VERSION, NEW_PID, SMALL_INTEGER, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            ("an 8 MB integer", big(8_000_000)),
        ];
        for (what, input) in &refused {
            assert!(node(input).is_err(), "{what} from a node");
            assert!(peer(input).is_err(), "{what} from a peer");
        }
        let accepted: Vec<(&str, Vec<u8>)> = vec![
            ("atom of 255 characters", atom(&[b'a'; 255])),
            ("atom of 255 four-byte characters", atom("😀".repeat(255).as_bytes())),
            ("the empty bit string", vec![VERSION, BIT_BINARY, 0, 0, 0, 0, 0]),
            ("one bit", vec![VERSION, BIT_BINARY, 0, 0, 0, 1, 1, 0x80]),
            ("a 1 MB integer", big(1 << 20)),
            ("an export", {
                let mut v = vec![VERSION];
                v.extend(encode_export("m", "f", 2));
                v
            }),
            ("1 and 1.0 as keys", {
                let mut v = vec![VERSION, MAP, 0, 0, 0, 2, SMALL_INTEGER, 1, SMALL_INTEGER, 1, NEW_FLOAT];
                v.extend(1.0f64.to_be_bytes());
                v.extend([SMALL_INTEGER, 2]);
                v
            }),
        ];
        for (what, input) in &accepted {
            assert_eq!(node(input).as_ref(), Ok(input), "{what} from a node");
            assert_eq!(peer(input).as_ref(), Ok(input), "{what} from a peer");
        }
    }

    #[test]
    fn maps_from_a_peer_with_equal_keys_are_refused() {
        let map = |pairs: &[&[u8]]| {
            let mut v = vec![VERSION, MAP];
            v.extend(((pairs.len() / 2) as u32).to_be_bytes());
            for p in pairs {
                v.extend_from_slice(p);
            }
            v
        };
        let one: &[u8] = &[SMALL_INTEGER, 1];
        let two: &[u8] = &[SMALL_INTEGER, 2];
        let dups: Vec<(&str, Vec<u8>)> = vec![
            ("1, 1", map(&[one, one, one, two])),
            ("1 small, 1 32-bit", map(&[one, one, &[INTEGER, 0, 0, 0, 1], two])),
            ("1 small, 1 big", map(&[one, one, &[SMALL_BIG, 1, 0, 1], two])),
            (
                "0.0, -0.0",
                map(&[
                    &[&[NEW_FLOAT][..], &0.0f64.to_be_bytes()].concat(),
                    one,
                    &[&[NEW_FLOAT][..], &(-0.0f64).to_be_bytes()].concat(),
                    two,
                ]),
            ),
            ("a Latin-1, a UTF-8", map(&[&[SMALL_ATOM, 1, b'a'], one, &[SMALL_ATOM_UTF8, 1, b'a'], two])),
            (
                "\"ab\" as string and as list",
                map(&[
                    &[STRING, 0, 2, 97, 98],
                    one,
                    &[LIST, 0, 0, 0, 2, SMALL_INTEGER, 97, SMALL_INTEGER, 98, NIL],
                    two,
                ]),
            ),
            (
                "[1,2] two ways",
                map(&[
                    &[LIST, 0, 0, 0, 2, SMALL_INTEGER, 1, SMALL_INTEGER, 2, NIL],
                    one,
                    &[LIST, 0, 0, 0, 1, SMALL_INTEGER, 1, LIST, 0, 0, 0, 1, SMALL_INTEGER, 2, NIL],
                    two,
                ]),
            ),
            ("<<1>> and <<1:8>>", map(&[&[BINARY, 0, 0, 0, 1, 1], one, &[BIT_BINARY, 0, 0, 0, 1, 8, 1], two])),
            (
                "maps as keys, in another order",
                map(&[&map(&[one, one, two, two])[1..], one, &map(&[two, two, one, one])[1..], two]),
            ),
            ("{1} twice", map(&[&[SMALL_TUPLE, 1, SMALL_INTEGER, 1], one, &[SMALL_TUPLE, 1, SMALL_INTEGER, 1], two])),
            ("a handle twice", map(&[&with(HOME_PID, 5), one, &with(HOME_PID, 5), two])),
            ("40 keys, one twice", {
                let keys: Vec<Vec<u8>> = (0..39u8).chain([3]).map(|i| vec![SMALL_INTEGER, i]).collect();
                let pairs: Vec<&[u8]> = keys.iter().flat_map(|k| [&k[..], one]).collect();
                map(&pairs)
            }),
        ];
        for (what, input) in &dups {
            assert_eq!(peer(input), Err(EtfError::Invalid("a map with two equal keys")), "{what}");
        }
        // Distinct keys pass, nested maps are checked too.
        let fine = map(&[one, one, two, two, &[NEW_FLOAT, 63, 240, 0, 0, 0, 0, 0, 0], one]);
        assert!(peer(&fine).is_ok());
        let nested = map(&[one, &map(&[two, one, two, two])[1..]]);
        assert!(peer(&nested).is_err(), "a map inside a value");
        let keys: Vec<Vec<u8>> = (0..40u8).map(|i| vec![SMALL_INTEGER, i]).collect();
        let pairs: Vec<&[u8]> = keys.iter().flat_map(|k| [&k[..], one]).collect();
        assert!(peer(&map(&pairs)).is_ok());
    }

    #[test]
    fn funs_get_their_size_patched() {
        // fun() -> ok end from a shell, as term_to_binary gives it, with a pid inside.
        let mut fun = vec![NEW_FUN, 0, 0, 0, 0, 0];
        fun.extend_from_slice(&[7u8; 16]); // uniq
        fun.extend_from_slice(&1u32.to_be_bytes()); // index
        fun.extend_from_slice(&1u32.to_be_bytes()); // num_free
        put_atom(&mut fun, "erl_eval");
        fun.extend_from_slice(&[SMALL_INTEGER, 1, SMALL_INTEGER, 2]);
        put_pid(&mut fun, &pid("a@h", 1));
        fun.extend_from_slice(&[SMALL_INTEGER, 42]); // the free variable
        let size = (fun.len() - 1) as u32;
        fun[1..5].copy_from_slice(&size.to_be_bytes());
        let mut input = vec![VERSION];
        input.extend_from_slice(&fun);
        let mut out = Vec::new();
        struct Longer;
        impl Translator for Longer {
            fn pid(&mut self, p: PidView<'_>, out: &mut Vec<u8>) -> Result<(), Refusal> {
                put_pid(out, &Pid { node: "a-much-longer-node-name@host".into(), ..p.to_pid() });
                Ok(())
            }
        }
        translate(&input, &mut out, &mut Longer, Source::Node).unwrap();
        let size = u32::from_be_bytes(out[2..6].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 2, "size covers everything after the tag");
        let (t, _) = decode(&out).unwrap();
        assert!(matches!(t, Term::Raw(_)));
        // A fun whose module is not an atom is refused.
        let mut bad = input.clone();
        let m = bad.iter().position(|&b| b == SMALL_ATOM_UTF8).unwrap();
        bad[m] = SMALL_INTEGER;
        assert!(node(&bad).is_err());
    }

    #[test]
    fn hostile_input_fails_cleanly() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![VERSION],
            vec![130, NIL],
            vec![VERSION, LIST, 0xff, 0xff, 0xff, 0xff],
            vec![VERSION, BINARY, 0, 0, 0, 10, 1, 2],
            vec![VERSION, MAP, 0x7f, 0xff, 0xff, 0xff],
            vec![VERSION, 82, 1], // atom cache refs are never advertised
            vec![VERSION, HOME_PID, 0],
            vec![VERSION, NEWER_REFERENCE, 0, 200, SMALL_ATOM_UTF8, 1, b'a'],
            vec![VERSION, SMALL_ATOM_UTF8, 2, 0xc3, 0x28], // not UTF-8
            vec![VERSION, SMALL_TUPLE, 2, SMALL_ATOM_UTF8, 1, b'a', SMALL_ATOM_UTF8, 1, 0xff],
        ];
        for c in cases {
            assert!(node(&c).is_err(), "{c:?}");
            assert!(peer(&c).is_err(), "{c:?}");
            assert!(decode(&c).is_err(), "{c:?}");
        }
        // What the decoder accepts, the scanner copies: Latin-1 and UTF-8 atoms.
        for ok in [vec![VERSION, SMALL_ATOM, 2, b'a', 0xe9], vec![VERSION, SMALL_ATOM_UTF8, 2, 0xc3, 0xa9]] {
            assert!(decode(&ok).is_ok(), "{ok:?}");
            assert_eq!(node(&ok).unwrap(), ok);
        }
    }

    /// However deep the nesting, the work stack stays within a few times
    /// the input (here: constant for last-element nesting, and 12 bytes
    /// per level, for at least 3 bytes of input, otherwise).
    #[test]
    fn deep_nesting_is_scanned_in_bounded_memory() {
        let mut deep = vec![VERSION];
        for _ in 0..100_000 {
            deep.extend_from_slice(&[SMALL_TUPLE, 1]);
        }
        deep.push(NIL);
        assert_eq!(decode(&deep).unwrap_err(), EtfError::TooDeep);
        assert_eq!(node(&deep).unwrap(), deep);
        assert_eq!(peer(&deep).unwrap(), deep);
        // Left-nested: each level leaves a sibling to come.
        let mut left = vec![VERSION];
        for _ in 0..100_000 {
            left.extend_from_slice(&[SMALL_TUPLE, 2]);
        }
        left.extend(std::iter::repeat_n(NIL, 100_001));
        assert_eq!(peer(&left).unwrap(), left);
        assert_eq!(std::mem::size_of::<Task>(), 12);
    }
}
