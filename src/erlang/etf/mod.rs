//! Erlang's external term format (ETF): a small term type for control
//! messages ([`decode`], [`encode`]), readers that take the common control
//! messages in place, and ([`scan`]) the scanner that copies a message
//! payload while replacing only its pids and references.
//!
//! Between gateways, payloads travel in ETF with one extension: identities
//! are never written as pids or references, only as handles (tags
//! [`PEER_PID`], [`PEER_REF`], [`HOME_PID`], [`HOME_REF`], each followed by
//! a big-endian u64; docs/PROTOCOL.md). Everything read here is
//! bounds-checked, and what a node would refuse (an atom of 256
//! characters, a NaN, a map with two equal keys...: the node would drop
//! the gateway's whole connection) is refused here first.

pub mod canon;
pub mod scan;

use std::borrow::Cow;
use std::fmt;

pub use scan::{translate, Kind, Refusal, Source, Translator};

pub const VERSION: u8 = 131;
const SMALL_INTEGER: u8 = 97;
const INTEGER: u8 = 98;
const FLOAT: u8 = 99;
const NEW_FLOAT: u8 = 70;
const ATOM: u8 = 100;
const SMALL_ATOM: u8 = 115;
const ATOM_UTF8: u8 = 118;
const SMALL_ATOM_UTF8: u8 = 119;
const REFERENCE: u8 = 101;
const NEW_REFERENCE: u8 = 114;
const NEWER_REFERENCE: u8 = 90;
const PORT: u8 = 102;
const NEW_PORT: u8 = 89;
const V4_PORT: u8 = 120;
const PID: u8 = 103;
const NEW_PID: u8 = 88;
const SMALL_TUPLE: u8 = 104;
const LARGE_TUPLE: u8 = 105;
const MAP: u8 = 116;
const NIL: u8 = 106;
const STRING: u8 = 107;
const LIST: u8 = 108;
const BINARY: u8 = 109;
const BIT_BINARY: u8 = 77;
const SMALL_BIG: u8 = 110;
const LARGE_BIG: u8 = 111;
const NEW_FUN: u8 = 112;
const EXPORT: u8 = 113;

/// Gateway-only tags (plain ETF never has them), each followed by a
/// big-endian u64 handle. `PEER_*`: an identity of the SENDING gateway's
/// cluster, by the handle that gateway issued for it; `HOME_*`: an identity
/// of the RECEIVING gateway's cluster, by the handle the receiver issued.
pub const PEER_PID: u8 = 201;
pub const PEER_REF: u8 = 202;
pub const HOME_PID: u8 = 203;
pub const HOME_REF: u8 = 204;

/// Nesting deeper than this in a decoded term (control messages, pg
/// messages, group terms, map keys compared) is refused; payloads are
/// scanned iteratively and have no such limit.
const MAX_DEPTH: usize = 128;
/// Longest atom a node accepts, in characters.
pub const MAX_ATOM_CHARS: usize = 255;
/// Largest integer accepted, in bytes of digits (8 Mbit). A node drops
/// the connection on a much larger one (seen: 8 MB), so the scanner
/// refuses anything past this first.
pub const MAX_BIG_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid {
    pub node: String,
    pub id: u32,
    pub serial: u32,
    pub creation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref {
    pub node: String,
    pub creation: u32,
    pub ids: Vec<u32>,
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}.{}.{}>@{}", self.id, self.serial, self.creation, self.node)
    }
}

/// A decoded term. Funs, exports, bit binaries and big integers are kept
/// as their raw encoding, so decoding and encoding again gives the same
/// bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Int(i64),
    Float(f64),
    Atom(String),
    Pid(Pid),
    Ref(Ref),
    Tuple(Vec<Term>),
    List(Vec<Term>, Box<Term>),
    Nil,
    /// STRING_EXT: a list of bytes.
    Str(Vec<u8>),
    Binary(Vec<u8>),
    Map(Vec<(Term, Term)>),
    /// Anything else, encoded (without the version byte).
    Raw(Vec<u8>),
}

impl Term {
    pub fn atom(s: &str) -> Term {
        Term::Atom(s.to_string())
    }
    pub fn tuple(items: Vec<Term>) -> Term {
        Term::Tuple(items)
    }
    pub fn list(items: Vec<Term>) -> Term {
        if items.is_empty() {
            Term::Nil
        } else {
            Term::List(items, Box::new(Term::Nil))
        }
    }
    pub fn as_atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_tuple(&self) -> Option<&[Term]> {
        match self {
            Term::Tuple(t) => Some(t),
            _ => None,
        }
    }
    pub fn as_pid(&self) -> Option<&Pid> {
        match self {
            Term::Pid(p) => Some(p),
            _ => None,
        }
    }
    pub fn as_ref(&self) -> Option<&Ref> {
        match self {
            Term::Ref(r) => Some(r),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Term::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// Elements of a proper list (Nil, List with Nil tail, or Str).
    pub fn as_list(&self) -> Option<Vec<Term>> {
        match self {
            Term::Nil => Some(Vec::new()),
            Term::List(items, tail) if **tail == Term::Nil => Some(items.clone()),
            Term::Str(bytes) => Some(bytes.iter().map(|&b| Term::Int(b as i64)).collect()),
            _ => None,
        }
    }
    /// A binary or a charlist/atom as text.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Term::Binary(b) | Term::Str(b) => String::from_utf8(b.clone()).ok(),
            Term::Atom(a) => Some(a.clone()),
            _ => None,
        }
    }
    /// Whether the term holds an identity or code: a pid, a reference, or
    /// anything kept raw (funs, exports, ports, bit binaries, big integers).
    pub fn has_identity_or_raw(&self) -> bool {
        match self {
            Term::Pid(_) | Term::Ref(_) | Term::Raw(_) => true,
            Term::Tuple(items) => items.iter().any(Term::has_identity_or_raw),
            Term::List(items, tail) => items.iter().any(Term::has_identity_or_raw) || tail.has_identity_or_raw(),
            Term::Map(pairs) => pairs.iter().any(|(k, v)| k.has_identity_or_raw() || v.has_identity_or_raw()),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtfError {
    #[error("term ends early")]
    Truncated,
    #[error("unsupported term tag {0}")]
    Tag(u8),
    #[error("not external term format (version byte {0})")]
    Version(u8),
    #[error("term nested too deeply")]
    TooDeep,
    #[error("bad atom text")]
    BadAtom,
    /// Well-formed, but a node would refuse it (and drop the connection).
    #[error("{0}")]
    Invalid(&'static str),
    #[error("{0}")]
    Refused(Refusal),
}

impl EtfError {
    /// The metric label (`wandist_erlang_rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            EtfError::Refused(r) => r.label(),
            EtfError::Tag(_) => "unsupported_term",
            EtfError::Invalid(_) | EtfError::BadAtom => "invalid_term",
            _ => "undecodable",
        }
    }
}

/// Whether an atom's text is one a node accepts: UTF-8 (unless Latin-1)
/// and at most 255 characters.
pub fn atom_text_ok(bytes: &[u8], latin1: bool) -> Result<(), EtfError> {
    if bytes.len() <= MAX_ATOM_CHARS {
        if !latin1 && !bytes.is_ascii() && std::str::from_utf8(bytes).is_err() {
            return Err(EtfError::BadAtom);
        }
        return Ok(());
    }
    if latin1 || bytes.len() > 4 * MAX_ATOM_CHARS {
        return Err(EtfError::Invalid("atom longer than 255 characters"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| EtfError::BadAtom)?;
    if text.chars().count() > MAX_ATOM_CHARS {
        return Err(EtfError::Invalid("atom longer than 255 characters"));
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], EtfError> {
        let end = self.at.checked_add(n).ok_or(EtfError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(EtfError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, EtfError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, EtfError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, EtfError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, EtfError> {
        let s = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        Ok(u64::from_be_bytes(b))
    }
    /// An atom's bytes, and whether they are Latin-1 (else UTF-8); the
    /// text checked as a node would (`atom_text_ok`).
    fn atom_bytes(&mut self) -> Result<(&'a [u8], bool), EtfError> {
        let (len, latin1) = match self.u8()? {
            ATOM => (self.u16()? as usize, true),
            SMALL_ATOM => (self.u8()? as usize, true),
            ATOM_UTF8 => (self.u16()? as usize, false),
            SMALL_ATOM_UTF8 => (self.u8()? as usize, false),
            t => return Err(EtfError::Tag(t)),
        };
        let bytes = self.take(len)?;
        atom_text_ok(bytes, latin1)?;
        Ok((bytes, latin1))
    }
    fn atom(&mut self) -> Result<String, EtfError> {
        let (bytes, latin1) = self.atom_bytes()?;
        Ok(atom_string(bytes, latin1))
    }
    /// An atom's text where it lies, as UTF-8 bytes; `None` for a Latin-1
    /// atom with non-ASCII bytes (its text differs from its bytes).
    fn atom_text(&mut self) -> Result<Option<&'a [u8]>, EtfError> {
        let (bytes, latin1) = self.atom_bytes()?;
        Ok((bytes.is_ascii() || !latin1).then_some(bytes))
    }
    /// A pid (from its tag) where it lies.
    fn pid_view(&mut self) -> Result<PidView<'a>, EtfError> {
        let start = self.at;
        let tag = self.u8()?;
        if tag != NEW_PID && tag != PID {
            return Err(EtfError::Tag(tag));
        }
        let (node, latin1) = self.atom_bytes()?;
        let id = self.u32()?;
        let serial = self.u32()?;
        let creation = if tag == NEW_PID { self.u32()? } else { self.u8()? as u32 };
        Ok(PidView { bytes: &self.b[start..self.at], node, latin1, id, serial, creation })
    }
    /// A reference (from its tag) where it lies: 1 to 5 words.
    fn ref_view(&mut self) -> Result<RefView<'a>, EtfError> {
        let start = self.at;
        let tag = self.u8()?;
        let (node, latin1, creation, words) = match tag {
            REFERENCE => {
                let (node, latin1) = self.atom_bytes()?;
                let words = self.take(4)?;
                let creation = self.u8()? as u32;
                (node, latin1, creation, words)
            }
            NEW_REFERENCE | NEWER_REFERENCE => {
                let len = self.u16()? as usize;
                if !(1..=5).contains(&len) {
                    return Err(EtfError::Invalid("a reference has 1 to 5 words"));
                }
                let (node, latin1) = self.atom_bytes()?;
                let creation = if tag == NEWER_REFERENCE { self.u32()? } else { self.u8()? as u32 };
                (node, latin1, creation, self.take(4 * len)?)
            }
            t => return Err(EtfError::Tag(t)),
        };
        Ok(RefView { bytes: &self.b[start..self.at], node, latin1, creation, words })
    }
}

fn atom_string(bytes: &[u8], latin1: bool) -> String {
    if latin1 && !bytes.is_ascii() {
        bytes.iter().map(|&c| c as char).collect()
    } else {
        // Checked UTF-8 (or ASCII, the same in both).
        String::from_utf8(bytes.to_vec()).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// An atom's text as UTF-8 (Latin-1 converted).
fn atom_utf8(bytes: &[u8], latin1: bool) -> Cow<'_, [u8]> {
    if latin1 && !bytes.is_ascii() {
        Cow::Owned(atom_string(bytes, true).into_bytes())
    } else {
        Cow::Borrowed(bytes)
    }
}

/// A pid read where it lies: its encoding, and its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidView<'a> {
    pub bytes: &'a [u8],
    /// The node's name as encoded (see `latin1`).
    pub node: &'a [u8],
    pub latin1: bool,
    pub id: u32,
    pub serial: u32,
    pub creation: u32,
}

impl PidView<'_> {
    /// The node's name as UTF-8.
    pub fn node_utf8(&self) -> Cow<'_, [u8]> {
        atom_utf8(self.node, self.latin1)
    }

    /// The encoding `pid_bytes` gives this pid: its own bytes when they
    /// are already in that form (the form OTP 23+ sends).
    pub fn canonical(&self) -> Cow<'_, [u8]> {
        let node = self.node_utf8();
        let small = node.len() < 256;
        let same = self.bytes[0] == NEW_PID
            && self.bytes[1] == if small { SMALL_ATOM_UTF8 } else { ATOM_UTF8 }
            && matches!(node, Cow::Borrowed(_));
        if same {
            return Cow::Borrowed(self.bytes);
        }
        let mut out = Vec::with_capacity(16 + node.len());
        put_pid_parts_bytes(&mut out, &node, self.id, self.serial, self.creation);
        Cow::Owned(out)
    }

    pub fn to_pid(&self) -> Pid {
        Pid { node: atom_string(self.node, self.latin1), id: self.id, serial: self.serial, creation: self.creation }
    }
}

/// A reference read where it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefView<'a> {
    pub bytes: &'a [u8],
    pub node: &'a [u8],
    pub latin1: bool,
    pub creation: u32,
    /// The words, 4 bytes each, big-endian.
    pub words: &'a [u8],
}

impl RefView<'_> {
    pub fn node_utf8(&self) -> Cow<'_, [u8]> {
        atom_utf8(self.node, self.latin1)
    }

    /// The encoding `ref_bytes` gives this reference.
    pub fn canonical(&self) -> Cow<'_, [u8]> {
        let node = self.node_utf8();
        let small = node.len() < 256;
        let same = self.bytes[0] == NEWER_REFERENCE
            && self.bytes[3] == if small { SMALL_ATOM_UTF8 } else { ATOM_UTF8 }
            && matches!(node, Cow::Borrowed(_));
        if same {
            return Cow::Borrowed(self.bytes);
        }
        let mut out = Vec::with_capacity(12 + node.len() + self.words.len());
        out.push(NEWER_REFERENCE);
        out.extend_from_slice(&((self.words.len() / 4) as u16).to_be_bytes());
        put_atom_bytes(&mut out, &node);
        out.extend_from_slice(&self.creation.to_be_bytes());
        out.extend_from_slice(self.words);
        Cow::Owned(out)
    }

    pub fn to_ref(&self) -> Ref {
        Ref {
            node: atom_string(self.node, self.latin1),
            creation: self.creation,
            ids: self.words.chunks_exact(4).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]])).collect(),
        }
    }
}

/// The control term `{SEND_SENDER, From, To}` with two pids, read in place
/// (no `Term` built): the shape of nearly every message a local process
/// sends to a proxy. `len` is the control term's length in bytes, its
/// version byte included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendSender<'a> {
    pub from: PidView<'a>,
    pub to: PidView<'a>,
    pub len: usize,
}

/// `control` (a control term with its version byte, and what follows it)
/// as `{SEND_SENDER, From, To}`, or `None` when it is anything else, which
/// the general decoder then reads (so this only has to be right, not
/// complete). Node names that are Latin-1 and not ASCII are left to the
/// decoder too.
pub fn send_sender(control: &[u8]) -> Option<SendSender<'_>> {
    if control.get(..5)? != [VERSION, SMALL_TUPLE, 3, SMALL_INTEGER, super::dist::SEND_SENDER as u8] {
        return None;
    }
    let mut r = Reader { b: control, at: 5 };
    let from = r.pid_view().ok().filter(|p| !p.latin1 || p.node.is_ascii())?;
    let to = r.pid_view().ok().filter(|p| !p.latin1 || p.node.is_ascii())?;
    Some(SendSender { from, to, len: r.at })
}

/// The reference of a control term `{MONITOR_P_EXIT, Name, Pid, Ref,
/// Reason}` with atoms for name and reason (a monitor on a registered name
/// ended), read in place: its node's name (checked UTF-8, as bytes) and its
/// words; `None` for anything else, which the general decoder then reads (so
/// this only has to be right, not complete). What delivery barriers come
/// back as.
pub fn name_monitor_exit_ref(control: &[u8]) -> Option<(&[u8], &[u8])> {
    if control.get(..5)? != [VERSION, SMALL_TUPLE, 5, SMALL_INTEGER, super::dist::MONITOR_P_EXIT as u8] {
        return None;
    }
    let mut r = Reader { b: control, at: 5 };
    r.atom_bytes().ok()?;
    r.pid_view().ok()?;
    if r.u8().ok()? != NEWER_REFERENCE {
        return None;
    }
    let words = r.u16().ok()? as usize;
    if !(1..=5).contains(&words) {
        return None;
    }
    let node = r.atom_text().ok()??;
    r.u32().ok()?;
    let ids = r.take(4 * words).ok()?;
    r.atom_bytes().ok()?;
    Some((node, ids))
}

pub fn put_atom(out: &mut Vec<u8>, a: &str) {
    put_atom_bytes(out, a.as_bytes())
}

/// An atom from its UTF-8 text (callers keep it to 255 characters).
fn put_atom_bytes(out: &mut Vec<u8>, a: &[u8]) {
    let a = &a[..a.len().min(u16::MAX as usize)];
    if a.len() < 256 {
        out.push(SMALL_ATOM_UTF8);
        out.push(a.len() as u8);
    } else {
        out.push(ATOM_UTF8);
        out.extend_from_slice(&(a.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(a);
}

pub fn put_pid(out: &mut Vec<u8>, p: &Pid) {
    put_pid_parts(out, &p.node, p.id, p.serial, p.creation);
}

/// `put_pid` for a pid given by its parts.
pub fn put_pid_parts(out: &mut Vec<u8>, node: &str, id: u32, serial: u32, creation: u32) {
    put_pid_parts_bytes(out, node.as_bytes(), id, serial, creation)
}

fn put_pid_parts_bytes(out: &mut Vec<u8>, node: &[u8], id: u32, serial: u32, creation: u32) {
    out.reserve(16 + node.len());
    out.push(NEW_PID);
    put_atom_bytes(out, node);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&serial.to_be_bytes());
    out.extend_from_slice(&creation.to_be_bytes());
}

pub fn put_ref(out: &mut Vec<u8>, r: &Ref) {
    put_ref_parts(out, &r.node, r.creation, &r.ids);
}

/// `put_ref` for a reference given by its parts.
pub fn put_ref_parts(out: &mut Vec<u8>, node: &str, creation: u32, ids: &[u32]) {
    out.push(NEWER_REFERENCE);
    out.extend_from_slice(&(ids.len() as u16).to_be_bytes());
    put_atom(out, node);
    out.extend_from_slice(&creation.to_be_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
}

/// A handle tag and its handle.
pub fn put_handle(out: &mut Vec<u8>, tag: u8, handle: u64) {
    out.push(tag);
    out.extend_from_slice(&handle.to_be_bytes());
}

/// A pid's encoding on its own (no version byte).
pub fn pid_bytes(p: &Pid) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    put_pid(&mut out, p);
    out
}

pub fn ref_bytes(r: &Ref) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    put_ref(&mut out, r);
    out
}

/// A pid read from its own encoding (as a node wrote it), in place.
pub fn pid_view_of(b: &[u8]) -> Option<PidView<'_>> {
    let mut r = Reader::new(b);
    let p = r.pid_view().ok()?;
    (r.at == b.len()).then_some(p)
}

/// Reads a pid from its own encoding (see `pid_bytes`).
pub fn pid_from_bytes(b: &[u8]) -> Result<Pid, EtfError> {
    let mut r = Reader::new(b);
    let p = r.pid_view()?;
    if r.at != b.len() {
        return Err(EtfError::Invalid("trailing bytes after a pid"));
    }
    Ok(p.to_pid())
}

pub fn ref_from_bytes(b: &[u8]) -> Result<Ref, EtfError> {
    let mut r = Reader::new(b);
    let x = r.ref_view()?;
    if r.at != b.len() {
        return Err(EtfError::Invalid("trailing bytes after a reference"));
    }
    Ok(x.to_ref())
}

/// The node name of a pid or reference given by its own encoding (as
/// `pid_bytes` / `ref_bytes` write them), without decoding the rest.
pub fn node_of(identity: &[u8]) -> Option<&[u8]> {
    let mut r = Reader::new(identity);
    match r.u8().ok()? {
        NEW_PID | PID => {}
        NEW_REFERENCE | NEWER_REFERENCE => {
            r.u16().ok()?;
        }
        REFERENCE => {}
        _ => return None,
    }
    r.atom_text().ok()?
}

// ---- whole terms (control messages) ----

/// Decodes one term that starts with the version byte; returns it and the
/// number of bytes used.
pub fn decode(b: &[u8]) -> Result<(Term, usize), EtfError> {
    let mut r = Reader::new(b);
    let v = r.u8()?;
    if v != VERSION {
        return Err(EtfError::Version(v));
    }
    let t = term(&mut r, 0)?;
    Ok((t, r.at))
}

/// Room reserved up front for `n` elements of at least `min` bytes each:
/// never more than what the input left could hold, nor than a few
/// thousand (the rest grows as elements are actually read).
fn room(n: usize, r: &Reader<'_>, min: usize) -> usize {
    n.min(r.left() / min.max(1)).min(4096)
}

fn term(r: &mut Reader<'_>, depth: usize) -> Result<Term, EtfError> {
    if depth > MAX_DEPTH {
        return Err(EtfError::TooDeep);
    }
    let start = r.at;
    let tag = r.u8()?;
    Ok(match tag {
        SMALL_INTEGER => Term::Int(r.u8()? as i64),
        INTEGER => Term::Int(r.u32()? as i32 as i64),
        NEW_FLOAT => {
            let f = f64::from_bits(r.u64()?);
            if !f.is_finite() {
                return Err(EtfError::Invalid("a float that is not finite"));
            }
            Term::Float(f)
        }
        ATOM | SMALL_ATOM | ATOM_UTF8 | SMALL_ATOM_UTF8 => {
            r.at = start;
            Term::Atom(r.atom()?)
        }
        PID | NEW_PID => {
            r.at = start;
            Term::Pid(r.pid_view()?.to_pid())
        }
        REFERENCE | NEW_REFERENCE | NEWER_REFERENCE => {
            r.at = start;
            Term::Ref(r.ref_view()?.to_ref())
        }
        SMALL_TUPLE | LARGE_TUPLE => {
            let n = if tag == SMALL_TUPLE { r.u8()? as usize } else { r.u32()? as usize };
            if n > r.left() {
                return Err(EtfError::Truncated);
            }
            let mut items = Vec::with_capacity(room(n, r, 1));
            for _ in 0..n {
                items.push(term(r, depth + 1)?);
            }
            Term::Tuple(items)
        }
        NIL => Term::Nil,
        STRING => {
            let n = r.u16()? as usize;
            Term::Str(r.take(n)?.to_vec())
        }
        LIST => {
            let n = r.u32()? as usize;
            if n > r.left() {
                return Err(EtfError::Truncated);
            }
            let mut items = Vec::with_capacity(room(n, r, 1));
            for _ in 0..n {
                items.push(term(r, depth + 1)?);
            }
            let tail = term(r, depth + 1)?;
            Term::List(items, Box::new(tail))
        }
        BINARY => {
            let n = r.u32()? as usize;
            Term::Binary(r.take(n)?.to_vec())
        }
        SMALL_BIG => {
            let n = r.u8()? as usize;
            let sign = r.u8()?;
            let digits = r.take(n)?;
            let v = (n <= 8).then(|| digits.iter().rev().fold(0u64, |acc, &d| (acc << 8) | d as u64));
            match v {
                Some(v) if v <= i64::MAX as u64 => Term::Int(if sign == 0 { v as i64 } else { -(v as i64) }),
                _ => Term::Raw(r.b[start..r.at].to_vec()),
            }
        }
        MAP => {
            let n = r.u32()? as usize;
            if n > r.left() / 2 {
                return Err(EtfError::Truncated);
            }
            let mut pairs = Vec::with_capacity(room(n, r, 2));
            for _ in 0..n {
                let k = term(r, depth + 1)?;
                let v = term(r, depth + 1)?;
                pairs.push((k, v));
            }
            Term::Map(pairs)
        }
        _ => {
            r.at = start;
            scan::skip(r)?;
            Term::Raw(r.b[start..r.at].to_vec())
        }
    })
}

pub fn encode(t: &Term) -> Vec<u8> {
    let mut out = vec![VERSION];
    put_term(&mut out, t);
    out
}

pub fn put_term(out: &mut Vec<u8>, t: &Term) {
    match t {
        Term::Int(i) if (0..=255).contains(i) => {
            out.push(SMALL_INTEGER);
            out.push(*i as u8);
        }
        Term::Int(i) if (i32::MIN as i64..=i32::MAX as i64).contains(i) => {
            out.push(INTEGER);
            out.extend_from_slice(&(*i as i32).to_be_bytes());
        }
        Term::Int(i) => {
            out.push(SMALL_BIG);
            out.push(8);
            out.push(if *i < 0 { 1 } else { 0 });
            out.extend_from_slice(&i.unsigned_abs().to_le_bytes());
        }
        Term::Float(f) => {
            out.push(NEW_FLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Term::Atom(a) => put_atom(out, a),
        Term::Pid(p) => put_pid(out, p),
        Term::Ref(r) => put_ref(out, r),
        Term::Tuple(items) => {
            if items.len() < 256 {
                out.push(SMALL_TUPLE);
                out.push(items.len() as u8);
            } else {
                out.push(LARGE_TUPLE);
                out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            }
            for i in items {
                put_term(out, i);
            }
        }
        Term::List(items, tail) => {
            out.push(LIST);
            out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            for i in items {
                put_term(out, i);
            }
            put_term(out, tail);
        }
        Term::Nil => out.push(NIL),
        Term::Str(b) => {
            out.push(STRING);
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(b);
        }
        Term::Binary(b) => {
            out.push(BINARY);
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
        Term::Map(pairs) => {
            out.push(MAP);
            out.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
            for (k, v) in pairs {
                put_term(out, k);
                put_term(out, v);
            }
        }
        Term::Raw(b) => out.extend_from_slice(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(node: &str, id: u32) -> Pid {
        Pid { node: node.into(), id, serial: 0, creation: 7 }
    }

    #[test]
    fn send_sender_is_read_in_place_and_agrees_with_the_decoder() {
        let from = Pid { node: "a@h".into(), id: 5, serial: 1, creation: 9 };
        let to = Pid { node: "gw@h".into(), id: 70, serial: 2, creation: 3 };
        let control = Term::tuple(vec![Term::Int(22), Term::Pid(from.clone()), Term::Pid(to.clone())]);
        let mut b = encode(&control);
        let len = b.len();
        b.extend_from_slice(&encode(&Term::atom("msg")));
        let ss = send_sender(&b).expect("a SEND_SENDER");
        assert_eq!(ss.len, len);
        assert_eq!((ss.from.node, ss.from.id, ss.from.serial, ss.from.creation), (&b"a@h"[..], 5, 1, 9));
        assert_eq!((ss.to.node, ss.to.id, ss.to.serial, ss.to.creation), (&b"gw@h"[..], 70, 2, 3));
        assert_eq!(ss.from.bytes, pid_bytes(&from));
        assert_eq!(ss.to.bytes, pid_bytes(&to));
        // The old PID_EXT form (one-byte creation) and Latin-1 atoms read too.
        let mut old = vec![VERSION, SMALL_TUPLE, 3, SMALL_INTEGER, 22, PID, SMALL_ATOM, 3];
        old.extend_from_slice(b"a@h");
        old.extend_from_slice(&[0, 0, 0, 5, 0, 0, 0, 1, 9]);
        old.extend_from_slice(&b[5 + pid_bytes(&from).len()..]);
        let ss = send_sender(&old).expect("a SEND_SENDER with an old pid");
        assert_eq!((ss.from.node, ss.from.id, ss.from.creation), (&b"a@h"[..], 5, 9));
        // Anything else is left to the decoder: other controls, other
        // shapes, a Latin-1 node name that is not ASCII, truncation.
        let other = encode(&Term::tuple(vec![Term::Int(6), Term::Pid(from.clone()), Term::atom(""), Term::atom("x")]));
        assert_eq!(send_sender(&other), None);
        let alias = encode(&Term::tuple(vec![Term::Int(22), Term::Pid(from.clone()), Term::atom("x")]));
        assert_eq!(send_sender(&alias), None);
        let mut latin1 = vec![VERSION, SMALL_TUPLE, 3, SMALL_INTEGER, 22, NEW_PID, SMALL_ATOM, 3, b'a', 0xe9, b'h'];
        latin1.extend_from_slice(&[0; 12]);
        latin1.extend_from_slice(&b[5 + pid_bytes(&from).len()..]);
        assert_eq!(send_sender(&latin1), None);
        assert!(decode(&latin1).is_ok(), "the decoder reads what the fast path leaves");
        for cut in 0..len {
            assert_eq!(send_sender(&b[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn latin1_atoms_decode_to_the_same_characters() {
        // 'café' and 'cafe' as ATOM_EXT (Latin-1), and as SMALL_ATOM (Latin-1).
        for (tag, head) in [(ATOM, vec![0u8, 4]), (SMALL_ATOM, vec![4u8])] {
            for (bytes, text) in [(&b"caf\xe9"[..], "café"), (&b"cafe"[..], "cafe")] {
                let mut b = vec![VERSION, tag];
                b.extend_from_slice(&head);
                b.extend_from_slice(bytes);
                assert_eq!(decode(&b).unwrap(), (Term::atom(text), b.len()));
            }
        }
    }

    #[test]
    fn control_terms_round_trip() {
        let t = Term::tuple(vec![
            Term::Int(22),
            Term::Pid(pid("a@h", 1)),
            Term::Ref(Ref { node: "a@h".into(), creation: 3, ids: vec![1, 2, 3] }),
            Term::list(vec![Term::atom("x"), Term::Binary(b"bin".to_vec()), Term::Int(-5), Term::Int(1 << 40)]),
            Term::Map(vec![(Term::atom("k"), Term::Float(1.5))]),
            Term::Str(b"abc".to_vec()),
            Term::Nil,
        ]);
        let bytes = encode(&t);
        let (back, used) = decode(&bytes).unwrap();
        assert_eq!(back, t);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn member_identities() {
        let p = pid("chat@10.0.0.6", 77);
        assert_eq!(pid_from_bytes(&pid_bytes(&p)).unwrap(), p);
        assert!(pid_from_bytes(&[NEW_PID]).is_err());
        let r = Ref { node: "n@h".into(), creation: 1, ids: vec![1, 2, 3, 4, 5] };
        assert_eq!(ref_from_bytes(&ref_bytes(&r)).unwrap(), r);
    }

    #[test]
    fn identities_in_another_encoding_have_one_canonical_form() {
        let p = Pid { node: "a@h".into(), id: 1, serial: 2, creation: 3 };
        let mut old = vec![PID, SMALL_ATOM, 3];
        old.extend_from_slice(b"a@h");
        old.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 3]);
        let mut r = Reader::new(&old);
        assert_eq!(r.pid_view().unwrap().canonical().as_ref(), pid_bytes(&p));
        let b = pid_bytes(&p);
        let mut r = Reader::new(&b);
        assert!(matches!(r.pid_view().unwrap().canonical(), Cow::Borrowed(_)), "already canonical: not copied");
        let x = Ref { node: "a@h".into(), creation: 3, ids: vec![1, 2, 3] };
        let mut old = vec![NEW_REFERENCE, 0, 3, SMALL_ATOM, 3];
        old.extend_from_slice(b"a@h");
        old.push(3);
        old.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        let mut r = Reader::new(&old);
        assert_eq!(r.ref_view().unwrap().canonical().as_ref(), ref_bytes(&x));
        assert_eq!(node_of(&ref_bytes(&x)), Some(&b"a@h"[..]));
        assert_eq!(node_of(&pid_bytes(&p)), Some(&b"a@h"[..]));
        assert_eq!(node_of(&[SMALL_INTEGER, 1]), None);
    }
}
