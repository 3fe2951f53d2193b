//! The walk's primitives: reading one key of a table as what it should
//! be, and saying, with its line, what it is not. Each table's walk is in
//! the file of its section (`gateway`, `route`, `erlang`).

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use super::keys::{Key, Table};
use super::{PathAt, Problem};

/// The walk over one file: where problems are collected, each with its line.
pub(super) struct Cx<'a> {
    pub(super) src: &'a str,
    pub(super) file: &'a Path,
    /// Relative paths are resolved against this (the file's folder).
    pub(super) base: PathBuf,
    pub(super) problems: Vec<Problem>,
}

impl Cx<'_> {
    pub(super) fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        let at = span?.start.min(self.src.len());
        Some(self.src.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1)
    }

    pub(super) fn err(&mut self, span: Option<Range<usize>>, message: String) {
        let line = self.line(span);
        self.problems.push(Problem { file: self.file.to_path_buf(), line, message });
    }

    /// Refuses every key `table` does not allow.
    pub(super) fn allow(&mut self, t: &dyn TableLike, table: &Table) {
        for (k, item) in t.iter() {
            if !table.keys.iter().any(|key| key.name == k) {
                let span = t.get_key_value(k).and_then(|(key, _)| key.span()).or_else(|| item.span());
                let allowed = table.names().join(", ");
                self.err(span, format!("unknown key {k:?} in {} (allowed: {allowed})", table.title));
            }
        }
    }

    pub(super) fn key_span(t: &dyn TableLike, k: &str) -> Option<Range<usize>> {
        t.get_key_value(k).and_then(|(key, item)| item.span().or_else(|| key.span()))
    }

    pub(super) fn table<'t>(&mut self, t: &'t dyn TableLike, k: &str, required: bool) -> Option<&'t dyn TableLike> {
        match t.get(k) {
            None => {
                if required {
                    self.err(None, format!("missing required table [{k}]"));
                }
                None
            }
            Some(item) => match item.as_table_like() {
                Some(tl) => Some(tl),
                None => {
                    self.err(Self::key_span(t, k), format!("{k:?} must be a table"));
                    None
                }
            },
        }
    }

    pub(super) fn value<'t>(
        &mut self,
        t: &'t dyn TableLike,
        k: &str,
        want: &str,
    ) -> Option<(&'t Value, Option<Range<usize>>)> {
        let item = t.get(k)?;
        let span = Self::key_span(t, k);
        match item {
            Item::Value(v) => Some((v, span)),
            _ => {
                self.err(span, format!("{k:?} must be {want}"));
                None
            }
        }
    }

    pub(super) fn string(&mut self, t: &dyn TableLike, k: &str) -> Option<(String, Option<Range<usize>>)> {
        let (v, span) = self.value(t, k, "a string")?;
        match v.as_str() {
            Some(s) => Some((s.to_string(), span)),
            None => {
                self.err(span, format!("{k:?} must be a string"));
                None
            }
        }
    }

    pub(super) fn required_string(
        &mut self,
        t: &dyn TableLike,
        k: &str,
        table: &str,
    ) -> Option<(String, Option<Range<usize>>)> {
        if t.get(k).is_none() {
            let span = t.iter().next().and_then(|(first, _)| Self::key_span(t, first));
            self.err(span, format!("missing required key {k:?} in {table}"));
            return None;
        }
        self.string(t, k)
    }

    pub(super) fn integer(&mut self, t: &dyn TableLike, k: &str, min: i64, max: i64, default: i64) -> i64 {
        let Some((v, span)) = self.value(t, k, "an integer") else {
            return default;
        };
        match v.as_integer() {
            Some(n) if (min..=max).contains(&n) => n,
            Some(n) => {
                self.err(span, format!("{k} = {n} is out of range ({min} to {max})"));
                default
            }
            None => {
                self.err(span, format!("{k:?} must be an integer"));
                default
            }
        }
    }

    /// An integer key of the table (`keys`), its default when absent.
    pub(super) fn int(&mut self, t: &dyn TableLike, key: &Key) -> i64 {
        let (_, _, default) = key.range();
        self.int_or(t, key, default.expect("an integer key with a default"))
    }

    /// An integer key whose default is worked out from other keys.
    pub(super) fn int_or(&mut self, t: &dyn TableLike, key: &Key, default: i64) -> i64 {
        let (min, max, _) = key.range();
        self.integer(t, key.name, min, max, default)
    }

    /// A `_ms` key, as a duration.
    pub(super) fn millis(&mut self, t: &dyn TableLike, key: &Key) -> Duration {
        Duration::from_millis(self.int(t, key) as u64)
    }

    pub(super) fn bool(&mut self, t: &dyn TableLike, k: &str) -> bool {
        let Some((v, span)) = self.value(t, k, "true or false") else {
            return false;
        };
        match v.as_bool() {
            Some(b) => b,
            None => {
                self.err(span, format!("{k:?} must be true or false"));
                false
            }
        }
    }

    pub(super) fn socket_addr(&mut self, t: &dyn TableLike, k: &str) -> Option<SocketAddr> {
        let (s, span) = self.string(t, k)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(span, format!("{k} = {s:?} is not an IP:port address"));
                None
            }
        }
    }

    pub(super) fn path(&mut self, t: &dyn TableLike, k: &str, table: &str) -> Option<PathAt> {
        let (s, span) = self.required_string(t, k, table)?;
        let line = self.line(span.clone());
        if s.is_empty() {
            self.err(span, format!("{k:?} must not be empty"));
            return None;
        }
        Some(PathAt { path: self.base.join(s), line })
    }

    pub(super) fn path_opt(&mut self, t: &dyn TableLike, k: &str) -> Option<PathAt> {
        let (s, span) = self.string(t, k)?;
        let line = self.line(span.clone());
        if s.is_empty() {
            self.err(span, format!("{k:?} must not be empty"));
            return None;
        }
        Some(PathAt { path: self.base.join(s), line })
    }
}
