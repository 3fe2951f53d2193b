//! Erlang's external term format: a small term type for control messages
//! (decode/encode), and a scanner that rewrites only the pids and
//! references inside a payload, copying every other byte as it is.
//!
//! Between gateways, payloads travel in this format with one extension: a
//! pid or reference that is going home (a proxy turned back into the real
//! identity in the receiving cluster) is prefixed with a marker tag that
//! plain ETF never uses. Everything from the network is bounds-checked.

use std::fmt;

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
/// Gateway-only: the next pid/reference goes home (is real in the receiver's cluster).
pub const MARK_HOME: u8 = 200;

/// Nesting deeper than this in a decoded term (control messages, pg
/// messages, confirmed-send requests) is refused; payloads are scanned
/// iteratively and have no such limit.
const MAX_DEPTH: usize = 128;

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

/// A decoded term. Funs, exports, ports and big integers are kept as their
/// raw encoding, so decoding and encoding again gives the same bytes.
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
    #[error("{0}")]
    Refused(String),
}

impl EtfError {
    pub fn reason(&self) -> &'static str {
        match self {
            EtfError::Refused(_) => "untranslatable",
            EtfError::Tag(_) => "unsupported_term",
            _ => "undecodable",
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
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
    /// An atom's bytes, and whether they are Latin-1 (else UTF-8).
    fn atom_bytes(&mut self) -> Result<(&'a [u8], bool), EtfError> {
        let (len, latin1) = match self.u8()? {
            ATOM => (self.u16()? as usize, true),
            SMALL_ATOM => (self.u8()? as usize, true),
            ATOM_UTF8 => (self.u16()? as usize, false),
            SMALL_ATOM_UTF8 => (self.u8()? as usize, false),
            t => return Err(EtfError::Tag(t)),
        };
        Ok((self.take(len)?, latin1))
    }
    fn atom(&mut self) -> Result<String, EtfError> {
        let (bytes, latin1) = self.atom_bytes()?;
        if latin1 && !bytes.is_ascii() {
            Ok(bytes.iter().map(|&c| c as char).collect())
        } else {
            // ASCII (nearly every atom, every node name) is the same in both.
            String::from_utf8(bytes.to_vec()).map_err(|_| EtfError::BadAtom)
        }
    }
    /// Moves past an atom, checking only its tag and length.
    fn atom_extent(&mut self) -> Result<(), EtfError> {
        self.atom_bytes().map(|_| ())
    }
    /// Moves past an atom, checking what `atom` checks, without making
    /// its text.
    fn atom_checked(&mut self) -> Result<(), EtfError> {
        let (bytes, latin1) = self.atom_bytes()?;
        if !latin1 && !bytes.is_ascii() && std::str::from_utf8(bytes).is_err() {
            return Err(EtfError::BadAtom);
        }
        Ok(())
    }
    /// An atom's text where it lies, as checked UTF-8 bytes (the cheap
    /// ASCII check first); `None` for a Latin-1 atom with non-ASCII bytes
    /// (its text differs from its bytes).
    fn atom_text(&mut self) -> Result<Option<&'a [u8]>, EtfError> {
        let (bytes, latin1) = self.atom_bytes()?;
        if bytes.is_ascii() {
            return Ok(Some(bytes));
        }
        if latin1 {
            return Ok(None);
        }
        std::str::from_utf8(bytes).map(|t| Some(t.as_bytes())).map_err(|_| EtfError::BadAtom)
    }
    /// A pid (from its tag) where it lies; `None` as `atom_text`.
    fn pid_view(&mut self) -> Result<Option<PidView<'a>>, EtfError> {
        let start = self.at;
        let tag = self.u8()?;
        if tag != NEW_PID && tag != PID {
            return Err(EtfError::Tag(tag));
        }
        let Some(node) = self.atom_text()? else { return Ok(None) };
        let id = self.u32()?;
        let serial = self.u32()?;
        let creation = if tag == NEW_PID { self.u32()? } else { self.u8()? as u32 };
        Ok(Some(PidView { bytes: &self.b[start..self.at], node, id, serial, creation }))
    }
    /// A pid after its tag.
    fn pid(&mut self, tag: u8) -> Result<Pid, EtfError> {
        let node = self.atom()?;
        let id = self.u32()?;
        let serial = self.u32()?;
        let creation = if tag == NEW_PID { self.u32()? } else { self.u8()? as u32 };
        Ok(Pid { node, id, serial, creation })
    }
    /// A reference after its tag.
    fn reference(&mut self, tag: u8) -> Result<Ref, EtfError> {
        match tag {
            REFERENCE => {
                let node = self.atom()?;
                let id = self.u32()?;
                let creation = self.u8()? as u32;
                Ok(Ref { node, creation, ids: vec![id] })
            }
            _ => {
                let len = self.u16()? as usize;
                if len > 5 {
                    return Err(EtfError::Refused(format!("reference with {len} words")));
                }
                let node = self.atom()?;
                let creation = if tag == NEWER_REFERENCE { self.u32()? } else { self.u8()? as u32 };
                let ids = (0..len).map(|_| self.u32()).collect::<Result<_, _>>()?;
                Ok(Ref { node, creation, ids })
            }
        }
    }
}

/// A pid read where it lies: its encoding, and its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidView<'a> {
    pub bytes: &'a [u8],
    /// The node's name, UTF-8 (checked), as bytes: for comparing.
    pub node: &'a [u8],
    pub id: u32,
    pub serial: u32,
    pub creation: u32,
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
/// complete).
pub fn send_sender(control: &[u8]) -> Option<SendSender<'_>> {
    if control.get(..5)? != [VERSION, SMALL_TUPLE, 3, SMALL_INTEGER, super::dist::SEND_SENDER as u8] {
        return None;
    }
    let mut r = Reader { b: control, at: 5 };
    let from = r.pid_view().ok()??;
    let to = r.pid_view().ok()??;
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
    r.atom_checked().ok()?;
    r.pid_view().ok()??;
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
    r.atom_checked().ok()?;
    Some((node, ids))
}

pub fn put_atom(out: &mut Vec<u8>, a: &str) {
    if a.len() < 256 {
        out.push(SMALL_ATOM_UTF8);
        out.push(a.len() as u8);
    } else {
        out.push(ATOM_UTF8);
        out.extend_from_slice(&(a.len().min(u16::MAX as usize) as u16).to_be_bytes());
    }
    out.extend_from_slice(&a.as_bytes()[..a.len().min(u16::MAX as usize)]);
}

pub fn put_pid(out: &mut Vec<u8>, p: &Pid) {
    put_pid_parts(out, &p.node, p.id, p.serial, p.creation);
}

/// `put_pid` for a pid given by its parts.
pub fn put_pid_parts(out: &mut Vec<u8>, node: &str, id: u32, serial: u32, creation: u32) {
    out.reserve(16 + node.len());
    out.push(NEW_PID);
    put_atom(out, node);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&serial.to_be_bytes());
    out.extend_from_slice(&creation.to_be_bytes());
}

pub fn put_ref(out: &mut Vec<u8>, r: &Ref) {
    out.push(NEWER_REFERENCE);
    out.extend_from_slice(&(r.ids.len() as u16).to_be_bytes());
    put_atom(out, &r.node);
    out.extend_from_slice(&r.creation.to_be_bytes());
    for id in &r.ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
}

/// A pid's encoding on its own (no version byte): a group member's identity.
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

/// Reads a pid from its own encoding (see `pid_bytes`).
pub fn pid_from_bytes(b: &[u8]) -> Result<Pid, EtfError> {
    let mut r = Reader { b, at: 0 };
    let tag = r.u8()?;
    if tag != NEW_PID && tag != PID {
        return Err(EtfError::Tag(tag));
    }
    let p = r.pid(tag)?;
    if r.at != b.len() {
        return Err(EtfError::Refused("trailing bytes after a pid".into()));
    }
    Ok(p)
}

pub fn ref_from_bytes(b: &[u8]) -> Result<Ref, EtfError> {
    let mut r = Reader { b, at: 0 };
    let tag = r.u8()?;
    if !matches!(tag, REFERENCE | NEW_REFERENCE | NEWER_REFERENCE) {
        return Err(EtfError::Tag(tag));
    }
    let x = r.reference(tag)?;
    if r.at != b.len() {
        return Err(EtfError::Refused("trailing bytes after a reference".into()));
    }
    Ok(x)
}

// ---- whole terms (control messages) ----

/// Decodes one term that starts with the version byte; returns it and the
/// number of bytes used.
pub fn decode(b: &[u8]) -> Result<(Term, usize), EtfError> {
    let mut r = Reader { b, at: 0 };
    let v = r.u8()?;
    if v != VERSION {
        return Err(EtfError::Version(v));
    }
    let t = term(&mut r, 0)?;
    Ok((t, r.at))
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
            let s = r.take(8)?;
            Term::Float(f64::from_be_bytes(s.try_into().map_err(|_| EtfError::Truncated)?))
        }
        ATOM | SMALL_ATOM | ATOM_UTF8 | SMALL_ATOM_UTF8 => {
            r.at = start;
            Term::Atom(r.atom()?)
        }
        PID | NEW_PID => Term::Pid(r.pid(tag)?),
        REFERENCE | NEW_REFERENCE | NEWER_REFERENCE => Term::Ref(r.reference(tag)?),
        SMALL_TUPLE | LARGE_TUPLE => {
            let n = if tag == SMALL_TUPLE { r.u8()? as usize } else { r.u32()? as usize };
            if n > r.b.len() - r.at {
                return Err(EtfError::Truncated);
            }
            Term::Tuple((0..n).map(|_| term(r, depth + 1)).collect::<Result<_, _>>()?)
        }
        NIL => Term::Nil,
        STRING => {
            let n = r.u16()? as usize;
            Term::Str(r.take(n)?.to_vec())
        }
        LIST => {
            let n = r.u32()? as usize;
            if n > r.b.len() - r.at {
                return Err(EtfError::Truncated);
            }
            let items = (0..n).map(|_| term(r, depth + 1)).collect::<Result<_, _>>()?;
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
            if n > r.b.len() - r.at {
                return Err(EtfError::Truncated);
            }
            let mut pairs = Vec::with_capacity(n);
            for _ in 0..n {
                let k = term(r, depth + 1)?;
                let v = term(r, depth + 1)?;
                pairs.push((k, v));
            }
            Term::Map(pairs)
        }
        _ => {
            r.at = start;
            skip(r)?;
            Term::Raw(r.b[start..r.at].to_vec())
        }
    })
}

/// Skips one term, whatever it is, iteratively.
fn skip(r: &mut Reader<'_>) -> Result<(), EtfError> {
    let mut out = Vec::new();
    let mut none = |_: Found| -> Result<Emit, String> { Err("no pids or references expected here".into()) };
    let start = r.at;
    let mut sub = Reader { b: &r.b[start..], at: 0 };
    scan_one(&mut sub, &mut out, &mut Closure(&mut none), false)?;
    r.at = start + sub.at;
    Ok(())
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

// ---- the rewriting scanner ----

/// A pid or reference met in a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Pid(Pid),
    Ref(Ref),
    /// Preceded by MARK_HOME: real in this (the receiving) cluster.
    HomePid(Pid),
    HomeRef(Ref),
}

/// What to write in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    Pid(Pid),
    Ref(Ref),
    /// Marked as going home to the receiving cluster.
    HomePid(Pid),
    HomeRef(Ref),
}

fn emit(out: &mut Vec<u8>, e: Emit) {
    match e {
        Emit::Pid(p) => put_pid(out, &p),
        Emit::Ref(r) => put_ref(out, &r),
        Emit::HomePid(p) => {
            out.push(MARK_HOME);
            put_pid(out, &p)
        }
        Emit::HomeRef(r) => {
            out.push(MARK_HOME);
            put_ref(out, &r)
        }
    }
}

enum Task {
    Terms(usize),
    /// Write the byte length of a fun, counted from `start`, at `at`.
    PatchFun {
        at: usize,
        start: usize,
    },
}

/// Copies one encoded term (with its version byte) from `input` to `out`,
/// replacing each pid and reference by what `f` says. `markers` allows the
/// gateway-only MARK_HOME tag (payloads from a peer gateway); plain ETF from
/// Erlang never has it.
pub fn translate(
    input: &[u8],
    out: &mut Vec<u8>,
    f: &mut dyn FnMut(Found) -> Result<Emit, String>,
    markers: bool,
) -> Result<usize, EtfError> {
    translate_with(input, out, &mut Closure(f), markers)
}

/// What `translate_with` asks about each pid and reference it finds.
pub trait Translator {
    /// A pid's encoding as found (its tag included, the node's name not
    /// checked): write what replaces it to `out` and say true if this
    /// knows it without its being decoded; false has it decoded and given
    /// to `found`.
    fn known_pid(&mut self, _encoded: &[u8], _out: &mut Vec<u8>) -> bool {
        false
    }
    fn found(&mut self, found: Found) -> Result<Emit, String>;
}

struct Closure<'f>(&'f mut dyn FnMut(Found) -> Result<Emit, String>);

impl Translator for Closure<'_> {
    fn found(&mut self, found: Found) -> Result<Emit, String> {
        (self.0)(found)
    }
}

/// `translate`, asking `t`.
pub fn translate_with(
    input: &[u8],
    out: &mut Vec<u8>,
    t: &mut dyn Translator,
    markers: bool,
) -> Result<usize, EtfError> {
    let mut r = Reader { b: input, at: 0 };
    let v = r.u8()?;
    if v != VERSION {
        return Err(EtfError::Version(v));
    }
    out.push(VERSION);
    scan_one(&mut r, out, t, markers)?;
    Ok(r.at)
}

fn scan_one(r: &mut Reader<'_>, out: &mut Vec<u8>, t: &mut dyn Translator, markers: bool) -> Result<(), EtfError> {
    // Room for a few levels of nesting up front (growing it showed per message).
    let mut todo: Vec<Task> = Vec::with_capacity(8);
    todo.push(Task::Terms(1));
    loop {
        match todo.last_mut() {
            None => return Ok(()),
            Some(Task::Terms(0)) => {
                todo.pop();
                continue;
            }
            Some(Task::PatchFun { at, start }) => {
                let (at, start) = (*at, *start);
                let size = (out.len() - start) as u32;
                out[at..at + 4].copy_from_slice(&size.to_be_bytes());
                todo.pop();
                continue;
            }
            Some(Task::Terms(n)) => *n -= 1,
        }
        let start = r.at;
        let tag = r.u8()?;
        let copy_from = |r: &Reader<'_>, out: &mut Vec<u8>| out.extend_from_slice(&r.b[start..r.at]);
        match tag {
            SMALL_INTEGER => {
                r.take(1)?;
                copy_from(r, out);
            }
            INTEGER => {
                r.take(4)?;
                copy_from(r, out);
            }
            NEW_FLOAT => {
                r.take(8)?;
                copy_from(r, out);
            }
            FLOAT => {
                r.take(31)?;
                copy_from(r, out);
            }
            ATOM | SMALL_ATOM | ATOM_UTF8 | SMALL_ATOM_UTF8 => {
                r.at = start;
                r.atom_checked()?;
                copy_from(r, out);
            }
            PID | NEW_PID => {
                // Its extent first: a known pid is replaced without decoding.
                let after_tag = r.at;
                r.atom_extent()?;
                r.take(if tag == NEW_PID { 12 } else { 9 })?;
                if !t.known_pid(&r.b[start..r.at], out) {
                    r.at = after_tag;
                    let p = r.pid(tag)?;
                    emit(out, t.found(Found::Pid(p)).map_err(EtfError::Refused)?);
                }
            }
            REFERENCE | NEW_REFERENCE | NEWER_REFERENCE => {
                let x = r.reference(tag)?;
                emit(out, t.found(Found::Ref(x)).map_err(EtfError::Refused)?);
            }
            MARK_HOME if markers => {
                let inner = r.u8()?;
                let found = match inner {
                    PID | NEW_PID => Found::HomePid(r.pid(inner)?),
                    REFERENCE | NEW_REFERENCE | NEWER_REFERENCE => Found::HomeRef(r.reference(inner)?),
                    t => return Err(EtfError::Tag(t)),
                };
                emit(out, t.found(found).map_err(EtfError::Refused)?);
            }
            PORT => {
                r.atom()?;
                r.take(5)?;
                copy_from(r, out);
            }
            NEW_PORT => {
                r.atom()?;
                r.take(8)?;
                copy_from(r, out);
            }
            V4_PORT => {
                r.atom()?;
                r.take(12)?;
                copy_from(r, out);
            }
            SMALL_TUPLE | LARGE_TUPLE => {
                let n = if tag == SMALL_TUPLE { r.u8()? as usize } else { r.u32()? as usize };
                if n > r.b.len() - r.at {
                    return Err(EtfError::Truncated);
                }
                copy_from(r, out);
                todo.push(Task::Terms(n));
            }
            MAP => {
                let n = r.u32()? as usize;
                if n > (r.b.len() - r.at) / 2 {
                    return Err(EtfError::Truncated);
                }
                copy_from(r, out);
                todo.push(Task::Terms(2 * n));
            }
            NIL => copy_from(r, out),
            STRING => {
                let n = r.u16()? as usize;
                r.take(n)?;
                copy_from(r, out);
            }
            LIST => {
                let n = r.u32()? as usize;
                if n > r.b.len() - r.at {
                    return Err(EtfError::Truncated);
                }
                copy_from(r, out);
                todo.push(Task::Terms(n + 1));
            }
            BINARY => {
                let n = r.u32()? as usize;
                r.take(n)?;
                copy_from(r, out);
            }
            BIT_BINARY => {
                let n = r.u32()? as usize;
                r.take(1 + n)?;
                copy_from(r, out);
            }
            SMALL_BIG => {
                let n = r.u8()? as usize;
                r.take(1 + n)?;
                copy_from(r, out);
            }
            LARGE_BIG => {
                let n = r.u32()? as usize;
                r.take(1 + n)?;
                copy_from(r, out);
            }
            EXPORT => {
                copy_from(r, out);
                todo.push(Task::Terms(3));
            }
            NEW_FUN => {
                let _size = r.u32()?;
                let fixed = r.take(1 + 16 + 4)?; // arity, uniq, index
                let num_free = r.u32()? as usize;
                if num_free > r.b.len() - r.at {
                    return Err(EtfError::Truncated);
                }
                out.push(NEW_FUN);
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(fixed);
                out.extend_from_slice(&(num_free as u32).to_be_bytes());
                // The size covers itself and everything after the tag.
                todo.push(Task::PatchFun { at, start: at });
                todo.push(Task::Terms(4 + num_free)); // module, old index, old uniq, pid, free vars
            }
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

    #[test]
    fn known_pids_are_replaced_by_their_bytes_and_the_rest_decoded() {
        struct KnowsOne {
            known: Vec<u8>,
            asked: Vec<Vec<u8>>,
            found: usize,
        }
        impl Translator for KnowsOne {
            fn known_pid(&mut self, encoded: &[u8], out: &mut Vec<u8>) -> bool {
                self.asked.push(encoded.to_vec());
                let hit = encoded == self.known;
                if hit {
                    put_pid(out, &pid("proxy@gw", 1));
                }
                hit
            }
            fn found(&mut self, found: Found) -> Result<Emit, String> {
                self.found += 1;
                match found {
                    Found::Pid(_) => Ok(Emit::Pid(pid("proxy@gw", 2))),
                    _ => Err("no".into()),
                }
            }
        }
        let a = pid("a@dc2", 10);
        let old_b = {
            // b in the old PID_EXT form: decoded, whatever the hook says.
            let mut v = vec![PID, SMALL_ATOM, 5];
            v.extend_from_slice(b"b@dc2");
            v.extend_from_slice(&[0, 0, 0, 11, 0, 0, 0, 0, 7]);
            v
        };
        let mut input = vec![VERSION, SMALL_TUPLE, 3];
        input.extend_from_slice(&encode(&Term::atom("m"))[1..]);
        input.extend_from_slice(&pid_bytes(&a));
        input.extend_from_slice(&old_b);
        let mut t = KnowsOne { known: pid_bytes(&a), asked: Vec::new(), found: 0 };
        let mut out = Vec::new();
        assert_eq!(translate_with(&input, &mut out, &mut t, false).unwrap(), input.len());
        assert_eq!(t.asked, vec![pid_bytes(&a), old_b.clone()], "each pid's exact encoding");
        assert_eq!(t.found, 1, "only the unknown one decoded");
        let want = Term::tuple(vec![Term::atom("m"), Term::Pid(pid("proxy@gw", 1)), Term::Pid(pid("proxy@gw", 2))]);
        assert_eq!(out, encode(&want));
        // A truncated pid is an error either way.
        let cut = &input[..input.len() - 3];
        assert!(translate_with(cut, &mut Vec::new(), &mut t, false).is_err());
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
    fn translation_rewrites_only_pids_and_refs() {
        let t = Term::tuple(vec![
            Term::atom("$gen_call"),
            Term::tuple(vec![
                Term::Pid(pid("a@h", 5)),
                Term::List(
                    vec![Term::atom("alias")],
                    Box::new(Term::Ref(Ref { node: "a@h".into(), creation: 7, ids: vec![9, 9, 9] })),
                ),
            ]),
            Term::Map(vec![(Term::Binary(vec![1; 100]), Term::Pid(pid("b@h", 6)))]),
        ]);
        let input = encode(&t);
        let mut out = Vec::new();
        let mut seen = Vec::new();
        translate(
            &input,
            &mut out,
            &mut |found| {
                seen.push(found.clone());
                Ok(match found {
                    Found::Pid(p) => Emit::Pid(Pid { node: "gateway@somewhere.long".into(), id: p.id + 100, ..p }),
                    Found::Ref(r) => Emit::HomeRef(r),
                    other => panic!("{other:?}"),
                })
            },
            false,
        )
        .unwrap();
        assert_eq!(seen.len(), 3);
        // The marker is visible only to a scanner that allows it.
        let mut back = Vec::new();
        let mut homes = 0;
        translate(
            &out,
            &mut back,
            &mut |found| match found {
                Found::HomeRef(r) => {
                    homes += 1;
                    Ok(Emit::Ref(r))
                }
                Found::Pid(p) => {
                    Ok(Emit::Pid(Pid { node: if p.id == 105 { "a@h" } else { "b@h" }.into(), id: p.id - 100, ..p }))
                }
                other => Err(format!("{other:?}")),
            },
            true,
        )
        .unwrap();
        assert_eq!(homes, 1);
        assert_eq!(back, input, "there and back again is the identity");
        assert!(
            translate(&out, &mut Vec::new(), &mut |_| Ok(Emit::Pid(pid("x", 1))), false).is_err(),
            "markers refused from Erlang"
        );
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
        translate(
            &input,
            &mut out,
            &mut |f| match f {
                Found::Pid(p) => Ok(Emit::Pid(Pid { node: "a-much-longer-node-name@host".into(), ..p })),
                _ => unreachable!(),
            },
            false,
        )
        .unwrap();
        let size = u32::from_be_bytes(out[2..6].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 2, "size covers everything after the tag");
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
            vec![VERSION, MARK_HOME, NEW_PID],
            vec![VERSION, NEWER_REFERENCE, 0, 200, SMALL_ATOM_UTF8, 1, b'a'],
            vec![VERSION, SMALL_ATOM_UTF8, 2, 0xc3, 0x28], // not UTF-8
            vec![VERSION, SMALL_TUPLE, 2, SMALL_ATOM_UTF8, 1, b'a', SMALL_ATOM_UTF8, 1, 0xff],
        ];
        for c in cases {
            assert!(translate(&c, &mut Vec::new(), &mut |_| Ok(Emit::Pid(pid("x", 1))), false).is_err(), "{c:?}");
            assert!(decode(&c).is_err(), "{c:?}");
        }
        // What the decoder accepts, the scanner copies: Latin-1 and UTF-8 atoms.
        for ok in [vec![VERSION, SMALL_ATOM, 2, b'a', 0xe9], vec![VERSION, SMALL_ATOM_UTF8, 2, 0xc3, 0xa9]] {
            assert!(decode(&ok).is_ok(), "{ok:?}");
            let mut out = Vec::new();
            translate(&ok, &mut out, &mut |_| unreachable!(), false).unwrap();
            assert_eq!(out, ok);
        }
        // Deep nesting is refused by the decoder, and scanned iteratively.
        let mut deep = vec![VERSION];
        for _ in 0..100_000 {
            deep.extend_from_slice(&[SMALL_TUPLE, 1]);
        }
        deep.push(NIL);
        assert_eq!(decode(&deep).unwrap_err(), EtfError::TooDeep);
        let mut out = Vec::new();
        translate(&deep, &mut out, &mut |_| unreachable!(), false).unwrap();
        assert_eq!(out, deep);
    }

    #[test]
    fn member_identities() {
        let p = pid("chat@10.0.0.6", 77);
        assert_eq!(pid_from_bytes(&pid_bytes(&p)).unwrap(), p);
        assert!(pid_from_bytes(&[NEW_PID]).is_err());
        let r = Ref { node: "n@h".into(), creation: 1, ids: vec![1, 2, 3, 4, 5] };
        assert_eq!(ref_from_bytes(&ref_bytes(&r)).unwrap(), r);
    }
}
