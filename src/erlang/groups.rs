//! pg group names as they cross clusters. A group that is an atom travels
//! as its text; any other group term (and an atom starting with `~` or
//! holding a `:`) as `~` and the lowercase hex of its encoding (which
//! round-trips exactly). A group of a scope other than the primary one
//! travels as `scope:` before that name (`erlang::core` qualifies). A name from a peer becomes a term
//! on every local node, so [`check`] refuses at import what a node would
//! refuse or what could carry authority: an atom over 255 characters, a
//! `~` term that does not decode, that a node would drop the connection
//! over, that holds a pid, reference, port, fun or anything kept raw, or
//! that is not written the one way [`name_of`] writes it.

use super::etf::{self, scan, Term};

/// The largest encoded group term accepted from a peer, in bytes.
pub const MAX_TERM_BYTES: usize = 4096;

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * b.len());
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    b.chunks_exact(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// A local pg group as a name a peer may be given; `None` when the group
/// term holds a pid, reference or anything kept raw (it stays local:
/// exporting it would hand out an identity by its bytes).
pub fn name_of(t: &Term) -> Option<String> {
    match t {
        Term::Atom(a) if !a.starts_with('~') && !a.contains(':') => Some(a.clone()),
        other if other.has_identity_or_raw() => None,
        other => Some(format!("~{}", hex(&etf::encode(other)[1..]))),
    }
}

/// The group term a name stands for (names are `check`ed at import, or
/// made here by `name_of`).
pub fn term_of(name: &str) -> Term {
    name.strip_prefix('~').and_then(decode).unwrap_or_else(|| Term::atom(name))
}

fn decode(hexed: &str) -> Option<Term> {
    let b = unhex(hexed)?;
    let mut v = Vec::with_capacity(1 + b.len());
    v.push(etf::VERSION);
    v.extend_from_slice(&b);
    match etf::decode(&v) {
        Ok((t, used)) if used == v.len() => Some(t),
        _ => None,
    }
}

/// Whether a group name from a peer is one the local nodes can take:
/// `name`, or `scope:name` (whether that scope is mirrored here is the
/// core's to say).
pub fn check(name: &str) -> Result<(), &'static str> {
    match name.split_once(':') {
        Some((scope, rest)) => {
            if scope.is_empty() || scope.starts_with('~') || etf::atom_text_ok(scope.as_bytes(), false).is_err() {
                return Err("a scope name a node would refuse");
            }
            check_name(rest)
        }
        None => check_name(name),
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    let Some(hexed) = name.strip_prefix('~') else {
        if name.contains(':') {
            return Err("a group name not written the canonical way (an atom with ':' travels as a term)");
        }
        return etf::atom_text_ok(name.as_bytes(), false)
            .map_err(|_| "not an atom a node accepts (over 255 characters)");
    };
    if hexed.len() > 2 * MAX_TERM_BYTES {
        return Err("a group term over 4096 bytes");
    }
    let b = unhex(hexed).ok_or("not lowercase hex after '~'")?;
    let mut v = Vec::with_capacity(1 + b.len());
    v.push(etf::VERSION);
    v.extend_from_slice(&b);
    // What a node would refuse (atoms, floats, equal map keys...), as the
    // payload scanner checks it; identities are refused outright.
    let used = scan::translate(&v, &mut Vec::new(), &mut NoIdentities, scan::Source::Peer)
        .map_err(|_| "a group term a node would refuse, or one holding an identity")?;
    if used != v.len() {
        return Err("bytes after the group term");
    }
    let t = decode(hexed).ok_or("a group term that does not decode")?;
    if t.has_identity_or_raw() {
        return Err("a group term holding a pid, reference, port, fun or big integer");
    }
    if super::claims::is_claim_group(&t) {
        return Err("a group reserved for the gateways' claims on routes");
    }
    if name_of(&t).as_deref() != Some(name) {
        return Err("a group term not written the canonical way");
    }
    Ok(())
}

struct NoIdentities;
impl scan::Translator for NoIdentities {}

/// The atoms a group term brings to a node (its name, or those inside).
pub fn atoms(name: &str) -> Vec<String> {
    fn walk(t: &Term, out: &mut Vec<String>) {
        match t {
            Term::Atom(a) => out.push(a.clone()),
            Term::Tuple(items) => items.iter().for_each(|i| walk(i, out)),
            Term::List(items, tail) => {
                items.iter().for_each(|i| walk(i, out));
                walk(tail, out)
            }
            Term::Map(pairs) => pairs.iter().for_each(|(k, v)| {
                walk(k, out);
                walk(v, out)
            }),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&term_of(name.split_once(':').map_or(name, |(_, n)| n)), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in [
            Term::atom("chat"),
            Term::tuple(vec![Term::atom("room"), Term::Int(7)]),
            Term::Binary(b"bin".to_vec()),
            Term::atom("~tilde"),
            Term::atom("with:colon"),
            Term::atom(&"é".repeat(255)),
        ] {
            let name = name_of(&t).unwrap();
            assert_eq!(term_of(&name), t);
            assert_eq!(check(&name), Ok(()), "{name}");
        }
        assert_eq!(name_of(&Term::atom("chat")).unwrap(), "chat");
        // A scope before the name: the name's rules, and the scope's.
        assert_eq!(check("pg:chat"), Ok(()));
        assert_eq!(check(&format!("pg:{}", name_of(&Term::atom("a:b")).unwrap())), Ok(()));
        assert!(check("pg:a:b").is_err(), "an atom with ':' is not written bare");
        assert!(check(":chat").is_err());
        assert!(check(&format!("{}:chat", "s".repeat(256))).is_err());
        assert_eq!(atoms("pg:chat"), vec!["chat"]);
    }

    #[test]
    fn groups_holding_identities_stay_local() {
        let p = etf::Pid { node: "a@h".into(), id: 1, serial: 0, creation: 1 };
        assert_eq!(name_of(&Term::tuple(vec![Term::atom("room"), Term::Pid(p)])), None);
        let r = etf::Ref { node: "a@h".into(), creation: 1, ids: vec![1] };
        assert_eq!(name_of(&Term::list(vec![Term::Ref(r)])), None);
    }

    #[test]
    fn names_a_node_would_refuse_are_refused() {
        assert!(check(&"a".repeat(255)).is_ok());
        assert!(check(&"a".repeat(256)).is_err(), "one character too many");
        assert!(check(&"é".repeat(256)).is_err());
        let hexed = |b: &[u8]| format!("~{}", hex(b));
        let pid = etf::pid_bytes(&etf::Pid { node: "a1@h".into(), id: 53, serial: 0, creation: 1 });
        let refused = [
            "~".to_string(),
            "~zz".to_string(),
            "~6A".to_string(),                          // upper-case hex: not the canonical form
            hexed(&[106, 0]),                           // bytes after the term
            hexed(&pid),                                // a pid
            hexed(&[104, 2, 97, 1, 106][..3]),          // truncated
            hexed(&[119, 4, b'c', b'h', b'a', b't']),   // an atom written as a term: `chat` is its name
            hexed(&[70, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]), // NaN
            hexed(&[116, 0, 0, 0, 2, 97, 1, 97, 1, 98, 0, 0, 0, 1, 97, 2]), // a map with two equal keys
            hexed(&[77, 0, 0, 0, 1, 3, 0xe0]),          // a bit string: kept raw
            format!("~{}", "00".repeat(MAX_TERM_BYTES + 1)),
        ];
        for name in refused {
            assert!(check(&name).is_err(), "{name:.80}");
        }
        assert_eq!(atoms(&name_of(&Term::tuple(vec![Term::atom("a"), Term::atom("b")])).unwrap()), vec!["a", "b"]);
        assert_eq!(atoms("chat"), vec!["chat"]);
    }
}
