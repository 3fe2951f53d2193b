//! Term equality as a node judges it, for map keys: a node drops the whole
//! distribution connection over a map with two equal keys, and equal
//! terms can be encoded differently (`1` small or as a 32-bit or big
//! integer, an atom in Latin-1 or UTF-8, `"ab"` as a string or a list,
//! `[1,2]` in one list or two, maps with their pairs in another order,
//! `0.0` and `-0.0`, equal on OTP 25 and 26). Each key is written in a
//! canonical form (one encoding per term, prefix-free) and the forms are
//! compared.

use super::*;

const EQUAL_KEYS: EtfError = EtfError::Invalid("a map with two equal keys");

/// Whether a term's encoding is the only one its value has among terms
/// whose encodings all pass this test: then two such keys are equal
/// exactly when their bytes are. (What OTP writes for atoms, small and
/// 32-bit integers, binaries, nonzero floats, and pids and references on
/// nodes with short names.)
fn one_encoding(t: &[u8]) -> bool {
    match t.first() {
        Some(&SMALL_ATOM_UTF8) | Some(&BINARY) | Some(&NIL) | Some(&SMALL_INTEGER) => true,
        Some(&ATOM_UTF8) => t.len() >= 3 && u16::from_be_bytes([t[1], t[2]]) >= 256,
        Some(&INTEGER) => t.len() == 5 && !(0..=255).contains(&i32::from_be_bytes([t[1], t[2], t[3], t[4]])),
        Some(&NEW_FLOAT) => t.len() == 9 && f64::from_be_bytes([t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]]) != 0.0,
        Some(&NEW_PID) => t.get(1) == Some(&SMALL_ATOM_UTF8),
        Some(&NEWER_REFERENCE) => t.get(3) == Some(&SMALL_ATOM_UTF8),
        _ => false,
    }
}

/// Refuses a map whose keys (their output ranges in `out`) include two
/// equal terms. `scratch` is reused between maps.
pub(super) fn check_unique_keys(out: &[u8], keys: &[(u32, u32)], scratch: &mut Vec<u8>) -> Result<(), EtfError> {
    let raw = |&(s, e): &(u32, u32)| &out[s as usize..e as usize];
    if keys.iter().all(|k| one_encoding(raw(k))) {
        // The common case (atom and binary keys): the bytes decide.
        if keys.len() <= 8 {
            for (i, a) in keys.iter().enumerate() {
                if keys[i + 1..].iter().any(|b| raw(a) == raw(b)) {
                    return Err(EQUAL_KEYS);
                }
            }
            return Ok(());
        }
        let mut sorted: Vec<&[u8]> = keys.iter().map(raw).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(EQUAL_KEYS);
        }
        return Ok(());
    }
    scratch.clear();
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(keys.len());
    for &(s, e) in keys {
        let start = scratch.len();
        let mut r = Reader::new(&out[s as usize..e as usize]);
        write(&mut r, scratch, 0)?;
        ranges.push((start, scratch.len()));
    }
    let key = |(s, e): (usize, usize)| &scratch[s..e];
    if ranges.len() <= 8 {
        for (i, a) in ranges.iter().enumerate() {
            if ranges[i + 1..].iter().any(|b| key(*a) == key(*b)) {
                return Err(EQUAL_KEYS);
            }
        }
        return Ok(());
    }
    ranges.sort_unstable_by(|a, b| key(*a).cmp(key(*b)));
    if ranges.windows(2).any(|w| key(w[0]) == key(w[1])) {
        return Err(EQUAL_KEYS);
    }
    Ok(())
}

/// The canonical form of one term (`t` then the term's own, see below).
pub fn canonical(term: &[u8]) -> Result<Vec<u8>, EtfError> {
    let mut out = Vec::new();
    let mut r = Reader::new(term);
    write(&mut r, &mut out, 0)?;
    Ok(out)
}

/// An integer: sign, then the magnitude's little-endian bytes without
/// high zero bytes (zero has no sign).
fn int(out: &mut Vec<u8>, negative: bool, le: &[u8]) {
    let len = le.iter().rposition(|&d| d != 0).map_or(0, |i| i + 1);
    out.push(b'i');
    out.push(u8::from(negative && len > 0));
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&le[..len]);
}

fn bytes(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn write(r: &mut Reader<'_>, out: &mut Vec<u8>, depth: usize) -> Result<(), EtfError> {
    if depth > MAX_DEPTH {
        return Err(EtfError::TooDeep);
    }
    let start = r.at;
    match r.u8()? {
        SMALL_INTEGER => int(out, false, &[r.u8()?]),
        INTEGER => {
            let v = r.u32()? as i32;
            int(out, v < 0, &v.unsigned_abs().to_le_bytes())
        }
        SMALL_BIG => {
            let n = r.u8()? as usize;
            let sign = r.u8()?;
            int(out, sign != 0, r.take(n)?)
        }
        LARGE_BIG => {
            let n = r.u32()? as usize;
            let sign = r.u8()?;
            int(out, sign != 0, r.take(n)?)
        }
        NEW_FLOAT => {
            let f = f64::from_bits(r.u64()?);
            // -0.0 == 0.0 as keys on OTP 25/26 (27 tells them apart: then
            // such a map is refused needlessly, never passed wrongly).
            let f = if f == 0.0 { 0.0 } else { f };
            out.push(b'f');
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        ATOM | SMALL_ATOM | ATOM_UTF8 | SMALL_ATOM_UTF8 => {
            r.at = start;
            let (b, latin1) = r.atom_bytes()?;
            bytes(out, b'a', &atom_utf8(b, latin1));
        }
        NIL => out.push(b'n'),
        // Lists as cons cells, so every way of writing one list agrees.
        STRING => {
            let n = r.u16()? as usize;
            for &b in r.take(n)? {
                out.push(b'c');
                int(out, false, &[b]);
            }
            out.push(b'n');
        }
        LIST => {
            let n = r.u32()? as usize;
            for _ in 0..n {
                out.push(b'c');
                write(r, out, depth + 1)?;
            }
            write(r, out, depth + 1)?; // the tail
        }
        BINARY => {
            let n = r.u32()? as usize;
            bytes(out, b'b', r.take(n)?);
            out.push(8);
        }
        BIT_BINARY => {
            let n = r.u32()? as usize;
            let bits = r.u8()?;
            let b = r.take(n)?;
            bytes(out, b'b', b);
            if n == 0 || bits == 8 {
                out.push(8);
            } else {
                // The bits past the last one are not part of the value.
                let last = out.len() - 1;
                out[last] &= 0xffu8 << (8 - bits.clamp(1, 8));
                out.push(bits);
            }
        }
        SMALL_TUPLE | LARGE_TUPLE => {
            let tag = r.b[start];
            let n = if tag == SMALL_TUPLE { r.u8()? as usize } else { r.u32()? as usize };
            out.push(b't');
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for _ in 0..n {
                write(r, out, depth + 1)?;
            }
        }
        MAP => {
            let n = r.u32()? as usize;
            let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(n.min(r.left() / 2).min(4096));
            for _ in 0..n {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                write(r, &mut k, depth + 1)?;
                write(r, &mut v, depth + 1)?;
                pairs.push((k, v));
            }
            pairs.sort_unstable();
            out.push(b'm');
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for (k, v) in pairs {
                out.extend_from_slice(&k);
                out.extend_from_slice(&v);
            }
        }
        PID | NEW_PID => {
            r.at = start;
            let p = r.pid_view()?;
            bytes(out, b'p', &p.node_utf8());
            for w in [p.id, p.serial, p.creation] {
                out.extend_from_slice(&w.to_be_bytes());
            }
        }
        REFERENCE | NEW_REFERENCE | NEWER_REFERENCE => {
            r.at = start;
            let x = r.ref_view()?;
            bytes(out, b'r', &x.node_utf8());
            out.extend_from_slice(&x.creation.to_be_bytes());
            bytes(out, b'w', x.words);
        }
        EXPORT => {
            out.push(b'e');
            for _ in 0..3 {
                write(r, out, depth + 1)?;
            }
        }
        NEW_FUN => {
            r.u32()?;
            let fixed = r.take(1 + 16 + 4)?;
            let num_free = r.u32()? as usize;
            out.push(b'u');
            out.extend_from_slice(fixed);
            out.extend_from_slice(&(num_free as u32).to_be_bytes());
            // module, old index, old uniq, pid, free variables
            for _ in 0..4 + num_free {
                write(r, out, depth + 1)?;
            }
        }
        t => return Err(EtfError::Tag(t)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &[u8], b: &[u8]) -> bool {
        canonical(a).unwrap() == canonical(b).unwrap()
    }

    /// The fast path never calls two terms different that are equal: for
    /// every pair of keys it accepts, equal bytes exactly when equal forms.
    #[test]
    fn one_encoding_agrees_with_the_canonical_form() {
        let keys: Vec<Vec<u8>> = vec![
            vec![SMALL_INTEGER, 5],
            vec![INTEGER, 0, 0, 0, 5],
            vec![INTEGER, 0, 0, 1, 0],
            vec![SMALL_BIG, 2, 0, 0, 1],
            vec![SMALL_ATOM_UTF8, 1, b'a'],
            vec![SMALL_ATOM, 1, b'a'],
            vec![ATOM_UTF8, 0, 1, b'a'],
            vec![BINARY, 0, 0, 0, 1, b'a'],
            vec![BIT_BINARY, 0, 0, 0, 1, 8, b'a'],
            vec![NIL],
            vec![STRING, 0, 0],
            [&[NEW_FLOAT][..], &1.5f64.to_be_bytes()].concat(),
            [&[NEW_FLOAT][..], &0.0f64.to_be_bytes()].concat(),
            [&[NEW_FLOAT][..], &(-0.0f64).to_be_bytes()].concat(),
            pid_bytes(&Pid { node: "a@h".into(), id: 1, serial: 0, creation: 1 }),
        ];
        for a in &keys {
            for b in &keys {
                if one_encoding(a) && one_encoding(b) {
                    assert_eq!(a == b, canonical(a).unwrap() == canonical(b).unwrap(), "{a:?} {b:?}");
                }
            }
        }
        assert!(!one_encoding(&[INTEGER, 0, 0, 0, 5]), "5 is written small");
        assert!(!one_encoding(&[SMALL_ATOM, 1, b'a']), "Latin-1 has another encoding");
    }

    #[test]
    fn equal_terms_written_differently_have_one_form() {
        let t = |x: Term| encode(&x)[1..].to_vec();
        assert!(same(&[SMALL_INTEGER, 7], &[INTEGER, 0, 0, 0, 7]));
        assert!(same(&[INTEGER, 255, 255, 255, 255], &[SMALL_BIG, 1, 1, 1]));
        assert!(same(&[SMALL_BIG, 2, 1, 5, 0], &[LARGE_BIG, 0, 0, 0, 1, 1, 5]));
        assert!(same(&[SMALL_BIG, 0, 1], &[SMALL_INTEGER, 0]), "minus zero is zero");
        assert!(same(&[SMALL_ATOM, 2, b'a', 0xe9], &t(Term::atom("aé"))));
        assert!(same(&[STRING, 0, 1, 7], &t(Term::list(vec![Term::Int(7)]))));
        assert!(same(&[BIT_BINARY, 0, 0, 0, 1, 3, 0xff], &[BIT_BINARY, 0, 0, 0, 1, 3, 0xe0]));
        assert!(same(&[BIT_BINARY, 0, 0, 0, 0, 0], &[BINARY, 0, 0, 0, 0]));
        let p = Pid { node: "a@h".into(), id: 1, serial: 2, creation: 3 };
        let mut old = vec![PID, SMALL_ATOM, 3];
        old.extend_from_slice(b"a@h");
        old.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 3]);
        assert!(same(&old, &pid_bytes(&p)));
        // And different terms have different forms.
        assert!(!same(&[SMALL_INTEGER, 1], &t(Term::Float(1.0))));
        assert!(!same(&[SMALL_INTEGER, 1], &[SMALL_BIG, 1, 1, 1]), "1 and -1");
        assert!(!same(&t(Term::atom("a")), &t(Term::Binary(b"a".to_vec()))));
        assert!(!same(&t(Term::list(vec![Term::Nil])), &t(Term::Nil)));
        assert!(!same(&t(Term::tuple(vec![])), &t(Term::Nil)));
        assert!(!same(&[BIT_BINARY, 0, 0, 0, 1, 3, 0xe0], &[BIT_BINARY, 0, 0, 0, 1, 4, 0xe0]));
    }
}
