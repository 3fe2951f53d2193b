//! Configuration: the TOML file turned into a checked [`Config`].
//!
//! The file is walked by hand over `toml_edit`'s span-preserving tree, so
//! that every problem — unknown keys, wrong types, bad values, missing
//! tables — is reported at once, each with its line. Secrets are held in
//! [`Secret`], which never prints its contents.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use crate::route::Window;
use crate::wire::codec::{DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_LIMIT, MIN_FRAME_LIMIT};
use crate::wire::packing::Compression;

/// Largest size of a config file we are willing to read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// A cap on links per route; more than this is a typo, not a deployment.
pub const MAX_STANDBY: u8 = 8;
/// A cap on routes per gateway.
const MAX_ROUTES: usize = 1024;

/// One thing wrong with a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// A string that must never reach a log line or `check` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What could be read of a broken file's `[tls]` table, and its cluster name.
pub type PartialTls = (TlsFiles, Option<String>);

/// Scopes one gateway mirrors at most.
pub const MAX_SCOPES: usize = 16;

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from; relative paths inside are resolved against its folder.
    pub path: PathBuf,
    pub gateway: GatewayConfig,
    pub tls: Option<TlsFiles>,
    pub metrics: Option<MetricsConfig>,
    pub routes: Vec<RouteConfig>,
    /// The local cluster; without it the gateway only links to peers.
    pub erlang: Option<ErlangConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ErlangConfig {
    /// The gateway's own (hidden) node name, `name@host`.
    pub node: String,
    pub cookie: Secret,
    /// Local nodes to connect to and mirror (with discovery, the seeds).
    pub nodes: Vec<ErlNode>,
    /// `discover = "cluster"`: every node the connected ones see is
    /// connected to and mirrored too, as the cluster grows and shrinks.
    pub discover_cluster: bool,
    /// `dns = "name@host"`: `host`'s addresses, polled, become the nodes
    /// `name@ADDRESS` (a Kubernetes headless service): (name, host).
    pub dns: Option<(String, String)>,
    /// The `pg` scopes mirrored across clusters (`scopes = [...]`, or
    /// `scope = "..."` for one). The first is the primary: its groups cross
    /// by their bare names (and land in the peer's primary scope, whatever
    /// it is named); the others' cross as `scope:group` and land in the
    /// scope of that name.
    pub scopes: Vec<String>,
    /// Several gateway instances of this cluster: each route is held by
    /// one of them at a time, agreed through claims in the scope on the
    /// local nodes (`erlang::claims`; needs OTP 25.1 or later there).
    pub coordinate: bool,
    /// TLS distribution (`-proto_dist inet_tls` on the nodes): the
    /// gateway's certificate and key, and the CA the nodes' chain to.
    pub tls: Option<DistTls>,
}

/// `[erlang.tls]`: TLS distribution to the local nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct DistTls {
    pub files: TlsFiles,
    /// Whether a node's certificate must name the host of its node name
    /// (as `inet_tls_dist` checks by default); on unless `check_host = false`.
    pub check_host: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErlNode {
    pub name: String,
    /// Distribution port, for nodes without EPMD; otherwise asked of EPMD.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub cluster: String,
    pub name: String,
    pub listen: Option<SocketAddr>,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub shutdown_grace: Duration,
    pub max_frame_bytes: usize,
    pub max_pending_handshakes: usize,
    /// Per route: more members than this from one peer is refused.
    pub max_imported_members: usize,
    /// Runtime worker threads; 0 = automatic (`gateway::worker_threads`).
    pub worker_threads: usize,
}

/// Paths to PEM files, already resolved against the config's folder, with
/// the config line that named each (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathAt,
    pub key: PathAt,
    /// The CA(s) trusted for every peer whose route names none of its own.
    pub ca: PathAt,
    /// Certificate revocation lists (PEM), checked for every peer.
    pub crl: Option<PathAt>,
    /// Routes that trust their own CA(s) instead of `ca`: (cluster, file).
    pub route_cas: Vec<(String, PathAt)>,
}

impl TlsFiles {
    /// Certificate, key and CA; no CRL, no route of its own CA.
    pub fn new(cert: PathAt, key: PathAt, ca: PathAt) -> TlsFiles {
        TlsFiles { cert, key, ca, crl: None, route_cas: Vec::new() }
    }
}

#[derive(Debug, Clone)]
pub struct PathAt {
    pub path: PathBuf,
    pub line: Option<usize>,
}

/// The same file, wherever the config names it (the line is for messages).
impl PartialEq for PathAt {
    fn eq(&self, other: &PathAt) -> bool {
        self.path == other.path
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub cluster: String,
    pub endpoints: Vec<Dial>,
    pub standby: u8,
    pub insecure_plaintext: bool,
    /// The CA(s) trusted for this peer instead of `tls.ca` (a partner's
    /// own CA, which then vouches for this peer only).
    pub ca: Option<PathAt>,
    /// Unacknowledged messages we keep for this peer (and the most we
    /// buffer of its messages undelivered).
    pub window: Window,
    /// Group-name patterns exported to / imported from this peer.
    pub export: Vec<String>,
    pub import: Vec<String>,
    pub limits: Limits,
    /// `compression`: how data batches to this peer are compressed, when
    /// it speaks the codec (default `"auto"`: `wire::packing`).
    pub compression: Compression,
}

/// Default per-route window: enough to keep a 200 ms link busy.
pub const DEFAULT_WINDOW: Window = Window { messages: 65_536, bytes: 64 * 1024 * 1024 };

/// What one peer may make this gateway hold (SECURITY.md, "Per-peer
/// limits"). Each is a `[[route]]` key (`max_` and the field name; atoms:
/// `max_peer_atoms`); a refusal at any of them is counted with the peer's
/// name and costs that peer only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Links to the peer at once, whoever dialed.
    pub links: u8,
    /// Proxies for the peer's processes and references.
    pub proxies: usize,
    /// Handles issued to the peer for ours.
    pub handles: usize,
    /// Monitors the gateway holds on local processes for the peer.
    pub monitors: usize,
    /// Imported groups, members, and bytes (names + 8 per member).
    pub groups: usize,
    pub members: usize,
    pub member_bytes: usize,
    /// Messages (and bytes) queued for the peer beyond its window.
    pub pending: usize,
    pub pending_bytes: usize,
    /// Distinct atoms the peer may bring to the local nodes.
    pub atoms: usize,
    /// Refused messages per second (a burst of a second's worth) before
    /// the peer is read no further until it is back within (0: no limit).
    pub refusals: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        links: 1 + MAX_STANDBY,
        proxies: 1_100_000,
        handles: 1_100_000,
        monitors: 100_000,
        groups: 100_000,
        members: 1_000_000,
        member_bytes: 64 * 1024 * 1024,
        pending: 16_384,
        pending_bytes: 64 * 1024 * 1024,
        atoms: 10_000,
        refusals: 10_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// One way to reach a peer gateway: an address, maybe through a proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Dial {
    pub endpoint: Endpoint,
    pub socks5: Option<Socks5>,
}

impl fmt::Display for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.socks5 {
            Some(s) => write!(f, "{} via SOCKS5 {}", self.endpoint, s.proxy),
            None => write!(f, "{}", self.endpoint),
        }
    }
}

impl RouteConfig {
    /// Links this side wants: the primary plus standbys.
    pub fn links_wanted(&self) -> u8 {
        1 + self.standby
    }
}

/// `host:port` of a peer gateway; the host may be a name (resolved at dial
/// time, or by the SOCKS5 proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']').ok_or_else(|| format!("{s:?}: unclosed '['"))?,
            None if host.contains(':') => return Err(format!("{s:?}: write IPv6 addresses as [addr]:port")),
            None => host,
        };
        if host.is_empty() || host.len() > 253 || host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("{s:?}: bad host"));
        }
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0 cannot be dialed"));
        }
        Ok(Endpoint { host: host.to_string(), port })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Socks5 {
    pub proxy: Endpoint,
    pub auth: Option<(String, Secret)>,
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
        Config::parse(&Config::read(path)?, path)
    }

    /// Reads a file, refusing one too large to be a configuration.
    pub fn read(path: &Path) -> Result<String, Vec<Problem>> {
        let problem = |message: String| vec![Problem { file: path.to_path_buf(), line: None, message }];
        let meta = std::fs::metadata(path).map_err(|e| problem(format!("cannot read: {e}")))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(problem(format!("file is {} bytes; the limit is {MAX_CONFIG_BYTES}", meta.len())));
        }
        std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read: {e}")))
    }

    /// Checks text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<Problem>> {
        Config::parse_partial(text, path).0
    }

    /// Like `parse`, but also returns what could be read of the `[tls]` table
    /// and the cluster name even when other parts are wrong, so their files
    /// can be checked too and every problem reported at once.
    pub fn parse_partial(text: &str, path: &Path) -> (Result<Config, Vec<Problem>>, Option<PartialTls>) {
        let mut cx = Cx {
            src: text,
            file: path,
            base: path.parent().unwrap_or(Path::new("")).to_path_buf(),
            problems: Vec::new(),
        };
        let doc = match toml_edit::Document::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                let msg = e.message().trim().to_string();
                cx.err(e.span(), format!("invalid TOML: {msg}"));
                return (Err(cx.problems), None);
            }
        };
        let root: &dyn TableLike = doc.as_table();
        cx.allow_keys(root, &["gateway", "tls", "metrics", "route", "erlang"], "the top level");

        let gateway = match cx.table(root, "gateway", true) {
            Some(t) => cx.gateway(t),
            None => None,
        };
        let mut tls = cx.table(root, "tls", false).and_then(|t| cx.tls(t));
        let metrics = cx.table(root, "metrics", false).and_then(|t| cx.metrics(t));
        let routes = cx.routes(
            root.get("route"),
            gateway.as_ref().map(|g| g.cluster.as_str()),
            gateway.as_ref().map_or(Limits::DEFAULT.members, |g| g.max_imported_members),
        );
        let erlang = cx.table(root, "erlang", false).and_then(|t| cx.erlang(t));

        if let Some(routes) = &routes {
            if let Some(tls) = &mut tls {
                tls.route_cas = routes.iter().filter_map(|r| Some((r.cluster.clone(), r.ca.clone()?))).collect();
            }
            let needs_tls = routes.is_empty() || routes.iter().any(|r| !r.insecure_plaintext);
            if needs_tls && root.get("tls").is_none() {
                cx.err(
                    None,
                    "[tls] is required: every route uses mutual TLS unless it sets insecure_plaintext = true".into(),
                );
            }
        }
        let mut routes = routes;
        if let (Some(routes), Some(e)) = (routes.as_mut(), erlang.as_ref()) {
            // A pattern naming the primary scope means its bare names; one
            // naming a scope not mirrored can match nothing: refused.
            for r in routes.iter_mut() {
                for (what, patterns) in [("export", &mut r.export), ("import", &mut r.import)] {
                    for p in patterns.iter_mut() {
                        let Some((scope, rest)) = p.split_once(':') else { continue };
                        if scope == e.scopes[0] {
                            *p = rest.to_string();
                        } else if !e.scopes.iter().any(|s| s == scope) && !scope.contains('*') {
                            cx.err(
                                None,
                                format!(
                                    "route to {}: {what} pattern {p:?} names the pg scope {scope:?}, which [erlang] does not mirror (scopes: {})",
                                    r.cluster,
                                    e.scopes.join(", ")
                                ),
                            );
                        }
                    }
                }
            }
        }
        match (gateway, routes) {
            (Some(gateway), Some(routes)) if cx.problems.is_empty() => {
                (Ok(Config { path: path.to_path_buf(), gateway, tls, metrics, routes, erlang }), None)
            }
            (gateway, _) => {
                let cluster = gateway.map(|g| g.cluster).filter(|c| check_cluster_name(c).is_ok());
                (Err(cx.problems), tls.map(|t| (t, cluster)))
            }
        }
    }

    pub fn route(&self, cluster: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.cluster == cluster)
    }

    /// What is valid but cannot work as meant: `check` prints it, `run`
    /// logs it at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.gateway.listen.is_none() {
            for r in self.routes.iter().filter(|r| r.endpoints.is_empty()) {
                out.push(format!(
                    "route to {}: no endpoints, and [gateway] has no listen: it can never come up (give it endpoints, or listen for {} to dial in)",
                    r.cluster, r.cluster
                ));
            }
        }
        out
    }
}

/// An Erlang node name: `name@host`, as `erl -name`/`-sname` would accept.
pub fn check_node_name(node: &str) -> Result<(), String> {
    let ok = node.split_once('@').is_some_and(|(n, h)| {
        !n.is_empty()
            && !h.is_empty()
            && n.len() + h.len() < 255
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == ':')
    });
    if ok {
        Ok(())
    } else {
        Err(format!("{node:?} is not an Erlang node name like name@host"))
    }
}

/// A valid cluster name is a DNS name (it is checked against certificates).
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("cluster name {name:?} must be 1 to 63 characters"));
    }
    let ok = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..")
        && !name.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !ok {
        return Err(format!(
            "cluster name {name:?} must be a DNS name: lowercase letters, digits, '-' and '.', not an IP address"
        ));
    }
    Ok(())
}

struct Cx<'a> {
    src: &'a str,
    file: &'a Path,
    base: PathBuf,
    problems: Vec<Problem>,
}

impl Cx<'_> {
    fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        let at = span?.start.min(self.src.len());
        Some(self.src.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1)
    }

    fn err(&mut self, span: Option<Range<usize>>, message: String) {
        let line = self.line(span);
        self.problems.push(Problem { file: self.file.to_path_buf(), line, message });
    }

    fn allow_keys(&mut self, t: &dyn TableLike, allowed: &[&str], what: &str) {
        for (k, item) in t.iter() {
            if !allowed.contains(&k) {
                let span = t.get_key_value(k).and_then(|(key, _)| key.span()).or_else(|| item.span());
                self.err(span, format!("unknown key {k:?} in {what} (allowed: {})", allowed.join(", ")));
            }
        }
    }

    fn key_span(t: &dyn TableLike, k: &str) -> Option<Range<usize>> {
        t.get_key_value(k).and_then(|(key, item)| item.span().or_else(|| key.span()))
    }

    fn table<'t>(&mut self, t: &'t dyn TableLike, k: &str, required: bool) -> Option<&'t dyn TableLike> {
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

    fn value<'t>(&mut self, t: &'t dyn TableLike, k: &str, want: &str) -> Option<(&'t Value, Option<Range<usize>>)> {
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

    fn string(&mut self, t: &dyn TableLike, k: &str) -> Option<(String, Option<Range<usize>>)> {
        let (v, span) = self.value(t, k, "a string")?;
        match v.as_str() {
            Some(s) => Some((s.to_string(), span)),
            None => {
                self.err(span, format!("{k:?} must be a string"));
                None
            }
        }
    }

    fn required_string(&mut self, t: &dyn TableLike, k: &str, table: &str) -> Option<(String, Option<Range<usize>>)> {
        if t.get(k).is_none() {
            let span = t.iter().next().and_then(|(first, _)| Self::key_span(t, first));
            self.err(span, format!("missing required key {k:?} in {table}"));
            return None;
        }
        self.string(t, k)
    }

    fn integer(&mut self, t: &dyn TableLike, k: &str, min: i64, max: i64, default: i64) -> i64 {
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

    fn millis(&mut self, t: &dyn TableLike, k: &str, min: i64, max: i64, default: i64) -> Duration {
        Duration::from_millis(self.integer(t, k, min, max, default) as u64)
    }

    fn bool(&mut self, t: &dyn TableLike, k: &str) -> bool {
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

    fn socket_addr(&mut self, t: &dyn TableLike, k: &str) -> Option<SocketAddr> {
        let (s, span) = self.string(t, k)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(span, format!("{k} = {s:?} is not an IP:port address"));
                None
            }
        }
    }

    fn path(&mut self, t: &dyn TableLike, k: &str, table: &str) -> Option<PathAt> {
        let (s, span) = self.required_string(t, k, table)?;
        let line = self.line(span.clone());
        if s.is_empty() {
            self.err(span, format!("{k:?} must not be empty"));
            return None;
        }
        Some(PathAt { path: self.base.join(s), line })
    }

    fn gateway(&mut self, t: &dyn TableLike) -> Option<GatewayConfig> {
        self.allow_keys(
            t,
            &[
                "cluster",
                "name",
                "listen",
                "heartbeat_ms",
                "dead_after_ms",
                "connect_timeout_ms",
                "handshake_timeout_ms",
                "reconnect_min_ms",
                "reconnect_max_ms",
                "shutdown_grace_ms",
                "max_frame_bytes",
                "max_pending_handshakes",
                "max_imported_members",
                "worker_threads",
            ],
            "[gateway]",
        );
        let cluster = self.required_string(t, "cluster", "[gateway]");
        if let Some((c, span)) = &cluster {
            if let Err(e) = check_cluster_name(c) {
                self.err(span.clone(), e);
            }
        }
        let name = match self.string(t, "name") {
            Some((n, span)) if n.is_empty() || n.len() > 255 => {
                self.err(span, "name must be 1 to 255 characters".into());
                String::new()
            }
            Some((n, _)) => n,
            None => default_gateway_name(),
        };
        let listen = self.socket_addr(t, "listen");
        let heartbeat = self.millis(t, "heartbeat_ms", 10, 600_000, 1000);
        let dead_after = self.millis(t, "dead_after_ms", 30, 3_600_000, 3000);
        if heartbeat >= dead_after {
            self.err(
                Self::key_span(t, "dead_after_ms").or_else(|| Self::key_span(t, "heartbeat_ms")),
                format!(
                    "dead_after_ms ({}) must be greater than heartbeat_ms ({})",
                    dead_after.as_millis(),
                    heartbeat.as_millis()
                ),
            );
        }
        let connect_timeout = self.millis(t, "connect_timeout_ms", 10, 600_000, 5000);
        let handshake_timeout = self.millis(t, "handshake_timeout_ms", 10, 600_000, 5000);
        let reconnect_min = self.millis(t, "reconnect_min_ms", 1, 600_000, 100);
        let reconnect_max = self.millis(t, "reconnect_max_ms", 1, 3_600_000, 10_000);
        if reconnect_min > reconnect_max {
            self.err(
                Self::key_span(t, "reconnect_max_ms"),
                "reconnect_max_ms must be at least reconnect_min_ms".into(),
            );
        }
        let shutdown_grace = self.millis(t, "shutdown_grace_ms", 0, 600_000, 5000);
        let max_frame_bytes = self.integer(
            t,
            "max_frame_bytes",
            MIN_FRAME_LIMIT as i64,
            MAX_FRAME_LIMIT as i64,
            DEFAULT_MAX_FRAME_BYTES as i64,
        ) as usize;
        let max_pending_handshakes = self.integer(t, "max_pending_handshakes", 1, 65_536, 256) as usize;
        let max_imported_members = self.integer(t, "max_imported_members", 1, 100_000_000, 1_000_000) as usize;
        let worker_threads = self.integer(t, "worker_threads", 0, 1024, 0) as usize;
        let (cluster, _) = cluster?;
        Some(GatewayConfig {
            cluster,
            name,
            listen,
            heartbeat,
            dead_after,
            connect_timeout,
            handshake_timeout,
            reconnect_min,
            reconnect_max,
            shutdown_grace,
            max_frame_bytes,
            max_pending_handshakes,
            max_imported_members,
            worker_threads,
        })
    }

    fn tls(&mut self, t: &dyn TableLike) -> Option<TlsFiles> {
        self.allow_keys(t, &["cert", "key", "ca", "crl"], "[tls]");
        let cert = self.path(t, "cert", "[tls]");
        let key = self.path(t, "key", "[tls]");
        let ca = self.path(t, "ca", "[tls]");
        let crl = self.path_opt(t, "crl");
        Some(TlsFiles { cert: cert?, key: key?, ca: ca?, crl, route_cas: Vec::new() })
    }

    fn metrics(&mut self, t: &dyn TableLike) -> Option<MetricsConfig> {
        self.allow_keys(t, &["listen"], "[metrics]");
        if t.get("listen").is_none() {
            self.err(None, "missing required key \"listen\" in [metrics]".into());
        }
        Some(MetricsConfig { listen: self.socket_addr(t, "listen")? })
    }

    fn routes(&mut self, item: Option<&Item>, own: Option<&str>, members: usize) -> Option<Vec<RouteConfig>> {
        let Some(item) = item else {
            return Some(Vec::new());
        };
        let tables: Vec<&dyn TableLike> = match item {
            Item::ArrayOfTables(a) => a.iter().map(|t| t as &dyn TableLike).collect(),
            Item::Value(Value::Array(a)) if a.iter().all(|v| v.is_inline_table()) => {
                a.iter().filter_map(|v| v.as_inline_table()).map(|t| t as &dyn TableLike).collect()
            }
            _ => {
                self.err(item.span(), "route must be written as [[route]] tables".into());
                return None;
            }
        };
        if tables.len() > MAX_ROUTES {
            self.err(item.span(), format!("{} routes; at most {MAX_ROUTES} are supported", tables.len()));
            return None;
        }
        let mut seen = BTreeSet::new();
        let mut routes = Vec::new();
        for t in tables {
            if let Some(r) = self.route(t, own, &mut seen, members) {
                routes.push(r);
            }
        }
        Some(routes)
    }

    fn route(
        &mut self,
        t: &dyn TableLike,
        own: Option<&str>,
        seen: &mut BTreeSet<String>,
        default_members: usize,
    ) -> Option<RouteConfig> {
        self.allow_keys(
            t,
            &[
                "cluster",
                "endpoints",
                "standby",
                "socks5",
                "socks5_username",
                "socks5_password",
                "insecure_plaintext",
                "ca",
                "compression",
                "window_messages",
                "window_bytes",
                "export",
                "import",
                "max_links",
                "max_proxies",
                "max_handles",
                "max_monitors",
                "max_groups",
                "max_members",
                "max_member_bytes",
                "max_pending",
                "max_pending_bytes",
                "max_peer_atoms",
                "max_refusals_per_second",
            ],
            "[[route]]",
        );
        let cluster = self.required_string(t, "cluster", "[[route]]");
        if let Some((c, span)) = &cluster {
            if let Err(e) = check_cluster_name(c) {
                self.err(span.clone(), e);
            } else if Some(c.as_str()) == own {
                self.err(span.clone(), format!("route to {c:?} points at this gateway's own cluster"));
            } else if !seen.insert(c.clone()) {
                self.err(span.clone(), format!("a second route for cluster {c:?}; one route per peer cluster"));
            }
        }
        let route_socks = self.socks5(t, "[[route]]");
        let mut endpoints: Vec<Dial> = Vec::new();
        const WANT: &str = "an array of \"host:port\" strings or { address = \"host:port\", socks5 = … } tables";
        if let Some((v, span)) = self.value(t, "endpoints", WANT) {
            match v.as_array() {
                Some(a) => {
                    for e in a.iter() {
                        let at = e.span().or(span.clone());
                        let dial = if let Some(table) = e.as_inline_table() {
                            self.allow_keys(
                                table,
                                &["address", "socks5", "socks5_username", "socks5_password"],
                                "an endpoint",
                            );
                            let socks5 = self.socks5(table, "an endpoint");
                            match self.required_string(table, "address", "an endpoint") {
                                Some((addr, aspan)) => match addr.parse::<Endpoint>() {
                                    Ok(endpoint) => Some(Dial { endpoint, socks5 }),
                                    Err(msg) => {
                                        self.err(aspan, format!("endpoints: {msg}"));
                                        None
                                    }
                                },
                                None => None,
                            }
                        } else {
                            match e.as_str().map(str::parse::<Endpoint>) {
                                Some(Ok(endpoint)) => Some(Dial { endpoint, socks5: route_socks.clone() }),
                                Some(Err(msg)) => {
                                    self.err(at.clone(), format!("endpoints: {msg}"));
                                    None
                                }
                                None => {
                                    self.err(at.clone(), format!("endpoints must be {WANT}"));
                                    None
                                }
                            }
                        };
                        if let Some(dial) = dial {
                            if endpoints.iter().any(|d| {
                                d.endpoint == dial.endpoint
                                    && d.socks5.as_ref().map(|s| &s.proxy) == dial.socks5.as_ref().map(|s| &s.proxy)
                            }) {
                                self.err(at, format!("endpoint {} is listed twice", dial.endpoint));
                            } else {
                                endpoints.push(dial);
                            }
                        }
                    }
                }
                None => self.err(span, format!("\"endpoints\" must be {WANT}")),
            }
        }
        let standby = self.integer(t, "standby", 0, MAX_STANDBY as i64, 0) as u8;
        let insecure_plaintext = self.bool(t, "insecure_plaintext");
        let ca = self.path_opt(t, "ca");
        if ca.is_some() && insecure_plaintext {
            self.err(
                Self::key_span(t, "ca"),
                "a route with insecure_plaintext = true has no TLS: its \"ca\" would never be used".into(),
            );
        }
        let window = Window {
            messages: self.integer(t, "window_messages", 1, 10_000_000, DEFAULT_WINDOW.messages as i64) as usize,
            bytes: self.integer(t, "window_bytes", 1024, 1 << 40, DEFAULT_WINDOW.bytes as i64) as usize,
        };
        let export = self.patterns(t, "export");
        let import = self.patterns(t, "import");
        let limits = self.limits(t, standby, default_members);
        let (cluster, _) = cluster?;
        let compression = match self.string(t, "compression") {
            Some((c, span)) => Compression::parse(&c).unwrap_or_else(|| {
                self.err(
                    span,
                    format!("compression must be one of \"{}\"", Compression::BY_NAME.map(|(n, _)| n).join("\", \"")),
                );
                Compression::default()
            }),
            None => Compression::default(),
        };
        Some(RouteConfig {
            cluster,
            endpoints,
            standby,
            insecure_plaintext,
            ca,
            window,
            export,
            import,
            limits,
            compression,
        })
    }

    /// The per-peer limits of a route (every key optional).
    fn limits(&mut self, t: &dyn TableLike, standby: u8, default_members: usize) -> Limits {
        let d = Limits::DEFAULT;
        let mut n = |k: &str, min: i64, max: i64, default: usize| self.integer(t, k, min, max, default as i64) as usize;
        let members = n("max_members", 1, 100_000_000, default_members);
        let l = Limits {
            links: n("max_links", 1, 64, d.links as usize) as u8,
            members,
            // A proxy per imported member, and room for the rest.
            proxies: n("max_proxies", 1, 200_000_000, members + 100_000),
            handles: n("max_handles", 1, 200_000_000, d.handles),
            monitors: n("max_monitors", 0, 100_000_000, d.monitors),
            groups: n("max_groups", 1, 100_000_000, d.groups),
            member_bytes: n("max_member_bytes", 1024, 1 << 40, d.member_bytes),
            pending: n("max_pending", 1, 100_000_000, d.pending),
            pending_bytes: n("max_pending_bytes", 1024, 1 << 40, d.pending_bytes),
            atoms: n("max_peer_atoms", 0, 10_000_000, d.atoms),
            refusals: n("max_refusals_per_second", 0, 100_000_000, d.refusals),
        };
        if usize::from(standby) + 1 > usize::from(l.links) {
            self.err(
                Self::key_span(t, "max_links").or_else(|| Self::key_span(t, "standby")),
                format!("max_links = {} leaves no room for 1 + standby = {} links", l.links, standby + 1),
            );
        }
        if l.proxies < l.members {
            self.err(
                Self::key_span(t, "max_proxies"),
                format!(
                    "max_proxies ({}) must be at least max_members ({}): every imported member is a proxy",
                    l.proxies, l.members
                ),
            );
        }
        l
    }

    fn erlang(&mut self, t: &dyn TableLike) -> Option<ErlangConfig> {
        self.allow_keys(
            t,
            &["node", "cookie", "cookie_file", "nodes", "discover", "dns", "scope", "scopes", "coordinate", "tls"],
            "[erlang]",
        );
        let node = self.required_string(t, "node", "[erlang]");
        if let Some((n, span)) = &node {
            if let Err(e) = check_node_name(n) {
                self.err(span.clone(), e);
            }
        }
        let cookie = match (self.string(t, "cookie"), self.path_opt(t, "cookie_file")) {
            (Some((c, span)), None) => {
                if c.is_empty() || c.len() > 1024 {
                    self.err(span, "cookie must be 1 to 1024 characters".into());
                }
                Some(Secret::new(c))
            }
            (None, Some(at)) => match owner_only(&at.path).and_then(|()| std::fs::read_to_string(&at.path)) {
                Ok(text) if !text.trim().is_empty() && text.len() <= 1024 => Some(Secret::new(text.trim())),
                Ok(_) => {
                    self.problems.push(Problem {
                        file: self.file.to_path_buf(),
                        line: at.line,
                        message: format!("{}: the cookie file must hold 1 to 1024 characters", at.path.display()),
                    });
                    None
                }
                Err(e) => {
                    self.problems.push(Problem {
                        file: self.file.to_path_buf(),
                        line: at.line,
                        message: format!("cannot read {}: {e}", at.path.display()),
                    });
                    None
                }
            },
            (Some((_, span)), Some(_)) => {
                self.err(span, "set cookie or cookie_file, not both".into());
                None
            }
            (None, None) => {
                self.err(None, "[erlang] needs cookie or cookie_file".into());
                None
            }
        };
        let discover_cluster = match self.string(t, "discover") {
            Some((d, _)) if d == "cluster" => true,
            Some((d, _)) if d == "none" => false,
            Some((_, span)) => {
                self.err(
                    span,
                    "discover must be \"cluster\" (learn every node from the connected ones) or \"none\"".into(),
                );
                false
            }
            None => false,
        };
        let dns = match self.string(t, "dns") {
            Some((d, span)) => match d.split_once('@') {
                Some((name, host)) if check_node_name(&d).is_ok() && !host.is_empty() => {
                    Some((name.to_string(), host.to_string()))
                }
                _ => {
                    self.err(
                        span,
                        "dns must be \"name@host\": host is looked up, and each address A becomes the node name@A"
                            .into(),
                    );
                    None
                }
            },
            None => None,
        };
        let mut nodes: Vec<ErlNode> = Vec::new();
        const WANT: &str = "an array of \"name@host\" strings or { name = \"name@host\", port = N } tables";
        match self.value(t, "nodes", WANT) {
            None if t.get("nodes").is_none() && dns.is_some() => {}
            None if t.get("nodes").is_none() => {
                self.err(None, "missing required key \"nodes\" in [erlang] (or dns = \"name@host\")".into())
            }
            None => {}
            Some((v, span)) => match v.as_array() {
                Some(a) => {
                    for e in a.iter() {
                        let at = e.span().or(span.clone());
                        let parsed = if let Some(tbl) = e.as_inline_table() {
                            self.allow_keys(tbl, &["name", "port"], "an Erlang node");
                            let port = self.integer(tbl, "port", 1, 65535, 0);
                            self.required_string(tbl, "name", "an Erlang node")
                                .map(|(n, _)| ErlNode { name: n, port: (port > 0).then_some(port as u16) })
                        } else {
                            e.as_str().map(|n| ErlNode { name: n.to_string(), port: None })
                        };
                        match parsed {
                            Some(n) => {
                                if let Err(msg) = check_node_name(&n.name) {
                                    self.err(at, msg);
                                } else if nodes.iter().any(|m| m.name == n.name) {
                                    self.err(at, format!("node {} is listed twice", n.name));
                                } else if node.as_ref().is_some_and(|(me, _)| *me == n.name) {
                                    self.err(at, format!("{} is the gateway's own node name", n.name));
                                } else {
                                    nodes.push(n);
                                }
                            }
                            None => self.err(at, format!("nodes must be {WANT}")),
                        }
                    }
                }
                None => self.err(span, format!("\"nodes\" must be {WANT}")),
            },
        }
        let mut scopes: Vec<String> = Vec::new();
        const SCOPE: &str = "a pg scope name (1 to 255 characters, no ':')";
        match (t.get("scope").is_some(), t.get("scopes").is_some()) {
            (true, true) => self.err(Self::key_span(t, "scopes"), "set scope or scopes, not both".into()),
            (true, false) => {
                if let Some((s, span)) = self.string(t, "scope") {
                    if s.is_empty() || s.len() > 255 || s.contains(':') {
                        self.err(span, format!("scope must be {SCOPE}"));
                    }
                    scopes.push(s);
                }
            }
            (false, true) => {
                if let Some((v, span)) = self.value(t, "scopes", "an array of pg scope names") {
                    match v.as_array() {
                        Some(a) if !a.is_empty() && a.len() <= MAX_SCOPES => {
                            for e in a.iter() {
                                match e.as_str() {
                                    Some(s) if !s.is_empty() && s.len() <= 255 && !s.contains(':') => {
                                        if scopes.iter().any(|x| x == s) {
                                            self.err(e.span().or(span.clone()), format!("scope {s:?} is listed twice"));
                                        }
                                        scopes.push(s.to_string());
                                    }
                                    _ => self.err(e.span().or(span.clone()), format!("each of scopes must be {SCOPE}")),
                                }
                            }
                        }
                        _ => self.err(span, format!("scopes must be an array of 1 to {MAX_SCOPES} pg scope names")),
                    }
                }
            }
            (false, false) => scopes.push("wan".to_string()),
        }
        let coordinate = self.bool(t, "coordinate");
        let tls = match self.table(t, "tls", false) {
            Some(tt) => {
                self.allow_keys(tt, &["cert", "key", "ca", "check_host"], "[erlang.tls]");
                let check_host = tt.get("check_host").is_none() || self.bool(tt, "check_host");
                let (cert, key, ca) = (
                    self.path(tt, "cert", "[erlang.tls]"),
                    self.path(tt, "key", "[erlang.tls]"),
                    self.path(tt, "ca", "[erlang.tls]"),
                );
                Some(DistTls { files: TlsFiles::new(cert?, key?, ca?), check_host })
            }
            None => None,
        };
        Some(ErlangConfig { node: node?.0, cookie: cookie?, nodes, discover_cluster, dns, scopes, coordinate, tls })
    }

    fn path_opt(&mut self, t: &dyn TableLike, k: &str) -> Option<PathAt> {
        let (s, span) = self.string(t, k)?;
        let line = self.line(span.clone());
        if s.is_empty() {
            self.err(span, format!("{k:?} must not be empty"));
            return None;
        }
        Some(PathAt { path: self.base.join(s), line })
    }

    /// `socks5`, `socks5_username`, `socks5_password` of a route or endpoint.
    fn socks5(&mut self, t: &dyn TableLike, what: &str) -> Option<Socks5> {
        let proxy = match self.string(t, "socks5") {
            Some((s, span)) => match s.parse::<Endpoint>() {
                Ok(proxy) => Some(proxy),
                Err(msg) => {
                    self.err(span, format!("socks5: {msg}"));
                    None
                }
            },
            None => None,
        };
        let user = self.string(t, "socks5_username");
        let pass = self.string(t, "socks5_password");
        let auth = match (user, pass) {
            (None, None) => None,
            (Some((u, span)), Some((p, _))) => {
                if u.is_empty() || u.len() > 255 || p.is_empty() || p.len() > 255 {
                    self.err(span, "socks5_username and socks5_password must each be 1 to 255 bytes".into());
                }
                Some((u, Secret::new(p)))
            }
            (Some((_, span)), None) | (None, Some((_, span))) => {
                self.err(span, "socks5_username and socks5_password go together".into());
                None
            }
        };
        if auth.is_some() && t.get("socks5").is_none() {
            self.err(
                Self::key_span(t, "socks5_username"),
                format!("socks5_username is set in {what} but socks5 (the proxy address) is not"),
            );
        }
        proxy.map(|proxy| Socks5 { proxy, auth })
    }

    /// A list of group-name patterns; absent = everything.
    fn patterns(&mut self, t: &dyn TableLike, k: &str) -> Vec<String> {
        let Some((v, span)) = self.value(t, k, "an array of group-name patterns") else { return vec!["*".into()] };
        match v.as_array() {
            Some(a) if a.iter().all(|p| p.as_str().is_some_and(|s| !s.is_empty() && s.len() <= 255)) => {
                a.iter().filter_map(|p| p.as_str().map(String::from)).collect()
            }
            _ => {
                self.err(span, format!("{k:?} must be an array of non-empty group-name patterns like \"chat.*\""));
                Vec::new()
            }
        }
    }
}

/// Refuses a secret (a cookie file, a private key) that group or others
/// may access, as Erlang refuses such a cookie file: an error naming the
/// file, its mode and the fix.
pub fn owner_only(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "it is accessible by group or others (mode {mode:04o}); it holds a secret: chmod 600 {} (Erlang refuses such a cookie file too)",
                    path.display()
                ),
            ));
        }
    }
    let _ = path;
    Ok(())
}

/// The system's host name (gethostname(2); `$HOSTNAME` is a shell variable
/// that systemd and most shells do not export), else `wandist`.
fn default_gateway_name() -> String {
    system_hostname().unwrap_or_else(|| "wandist".to_string())
}

pub fn system_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_string();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        Config::parse(text, Path::new("/etc/wandist/gw.toml"))
    }

    const GOOD: &str = r#"
[gateway]
cluster = "dc1"
name = "gw1"
listen = "127.0.0.1:4370"

[tls]
cert = "certs/dc1.pem"
key = "certs/dc1.key"
ca = "/abs/ca.pem"

[metrics]
listen = "127.0.0.1:9570"

[[route]]
cluster = "dc2"
endpoints = ["10.1.0.5:4370", "gw.dc2.example:4370", "[::1]:4370"]
standby = 1
socks5 = "127.0.0.1:1080"
socks5_username = "u"
socks5_password = "hunter2"
"#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.gateway.cluster, "dc1");
        assert_eq!(c.gateway.heartbeat, Duration::from_millis(1000));
        assert_eq!(c.gateway.dead_after, Duration::from_millis(3000));
        assert_eq!(c.gateway.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES);
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert.path, Path::new("/etc/wandist/certs/dc1.pem"));
        assert_eq!(tls.ca.path, Path::new("/abs/ca.pem"));
        assert_eq!(tls.cert.line, Some(8));
        let r = &c.routes[0];
        assert_eq!(r.endpoints.len(), 3);
        assert_eq!(r.endpoints[1].endpoint, Endpoint { host: "gw.dc2.example".into(), port: 4370 });
        assert_eq!(r.endpoints[2].endpoint.to_string(), "[::1]:4370");
        assert_eq!(r.links_wanted(), 2);
        let socks = r.endpoints[0].socks5.as_ref().unwrap();
        assert_eq!(socks.auth.as_ref().unwrap().1.expose(), "hunter2");
        assert_eq!(r.window, DEFAULT_WINDOW);
        assert_eq!(r.export, vec!["*".to_string()]);
    }

    #[test]
    fn a_route_may_trust_its_own_ca_and_tls_may_name_a_crl() {
        let text = GOOD.replace("ca = \"/abs/ca.pem\"\n", "ca = \"/abs/ca.pem\"\ncrl = \"crl.pem\"\n")
            + "[[route]]\ncluster = \"partner\"\nca = \"partner-ca.pem\"\n";
        let c = parse(&text).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.crl.unwrap().path, Path::new("/etc/wandist/crl.pem"));
        assert_eq!(tls.route_cas.len(), 1);
        assert_eq!(tls.route_cas[0].0, "partner");
        assert_eq!(tls.route_cas[0].1.path, Path::new("/etc/wandist/partner-ca.pem"));
        assert!(c.routes[0].ca.is_none());
        // A CA on a route without TLS would be a promise not kept.
        let problems =
            parse(&(text + "[[route]]\ncluster = \"dc9\"\nca = \"x.pem\"\ninsecure_plaintext = true\n")).unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("would never be used")), "{problems:?}");
    }

    #[test]
    fn secrets_never_print() {
        let c = parse(GOOD).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Secret(***)"));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let bad = r#"
[gateway]
cluster = "DC_1"
heartbeat_ms = 5000
dead_after_ms = 100
colour = "blue"

[tls]
cert = "a.pem"

[[route]]
cluster = "dc2"
endpoints = ["nope", "10.0.0.1:0"]
standby = 99
socks5_password = "hunter2"

[[route]]
cluster = "dc2"
"#;
        let problems = parse(bad).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let has = |needle: &str, line: usize| {
            assert!(
                problems.iter().any(|p| p.message.contains(needle) && p.line == Some(line)),
                "no problem {needle:?} at line {line} in {text:#?}"
            )
        };
        has("must be a DNS name", 3);
        has("unknown key \"colour\"", 6);
        has("dead_after_ms (100) must be greater", 5);
        has("missing required key \"key\"", 9);
        has("missing required key \"ca\"", 9);
        has("is not host:port", 13);
        has("port 0", 13);
        has("standby = 99 is out of range", 14);
        has("go together", 15);
        has("a second route", 18);
        assert!(text.iter().all(|t| !t.contains("hunter2")));
        assert!(text.iter().all(|t| t.starts_with("/etc/wandist/gw.toml:")));
    }

    #[test]
    fn toml_syntax_errors_carry_a_line() {
        let problems = parse("[gateway]\ncluster = \"dc1\"\nlisten = \n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(3), "{:?}", problems[0]);
        assert!(problems[0].message.starts_with("invalid TOML"));
    }

    #[test]
    fn missing_gateway_and_tls_are_reported() {
        let problems = parse("[[route]]\ncluster = \"dc2\"\n").unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("missing required table [gateway]")), "{problems:?}");
        let problems = parse("[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\n").unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("[tls] is required")), "{problems:?}");
    }

    #[test]
    fn plaintext_routes_need_no_tls() {
        let c =
            parse("[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\n").unwrap();
        assert!(c.tls.is_none());
        assert!(c.routes[0].insecure_plaintext);
    }

    #[test]
    fn own_cluster_and_wrong_types() {
        let problems = parse(
            "[gateway]\ncluster = \"dc1\"\nlisten = 4370\n[[route]]\ncluster = \"dc1\"\ninsecure_plaintext = \"yes\"\nendpoints = \"a:1\"\n",
        )
        .unwrap_err();
        let msgs: Vec<_> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
        assert!(msgs.iter().any(|(l, m)| *l == Some(3) && m.contains("must be a string")), "{msgs:?}");
        assert!(msgs.iter().any(|(l, m)| *l == Some(5) && m.contains("own cluster")), "{msgs:?}");
        assert!(msgs.iter().any(|(l, m)| *l == Some(6) && m.contains("true or false")), "{msgs:?}");
        assert!(msgs.iter().any(|(l, m)| *l == Some(7) && m.contains("array")), "{msgs:?}");
    }

    #[test]
    fn endpoints_may_mix_direct_and_proxied_paths() {
        let c = parse(
            r#"
[gateway]
cluster = "dc1"
[[route]]
cluster = "dc2"
insecure_plaintext = true
socks5 = "127.0.0.1:1080"
endpoints = [
  "10.0.0.1:4370",
  { address = "10.0.0.2:4370" },
  { address = "10.0.0.2:4370", socks5 = "127.0.0.1:1081", socks5_username = "u", socks5_password = "p" },
]
window_messages = 100
window_bytes = 1048576
export = ["chat.*"]
import = ["chat.*", "presence"]
"#,
        )
        .unwrap();
        let r = &c.routes[0];
        assert_eq!(r.endpoints[0].socks5.as_ref().unwrap().proxy.port, 1080, "strings use the route's proxy");
        assert!(r.endpoints[1].socks5.is_none(), "a table endpoint without socks5 is direct");
        assert_eq!(r.endpoints[2].socks5.as_ref().unwrap().proxy.port, 1081);
        assert_eq!(r.endpoints[2].to_string(), "10.0.0.2:4370 via SOCKS5 127.0.0.1:1081");
        assert_eq!(r.window, Window { messages: 100, bytes: 1 << 20 });
        assert_eq!(r.import, vec!["chat.*".to_string(), "presence".to_string()]);

        let problems = parse(
            "[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\nendpoints = [{ addr = \"x:1\" }]\nexport = [\"\"]\n",
        )
        .unwrap_err();
        let msgs: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(msgs.iter().any(|m| m.contains("unknown key \"addr\" in an endpoint")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("missing required key \"address\"")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("\"export\" must be")), "{msgs:?}");
    }

    #[test]
    fn several_scopes_and_patterns_that_name_one() {
        let path = Path::new("gw.toml");
        let config = |erlang: &str, export: &str| {
            format!(
                "[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\nexport = [{export}]\n\
                 [erlang]\nnode = \"gw@h\"\ncookie = \"c\"\nnodes = [\"a@h\"]\n{erlang}"
            )
        };
        let c = Config::parse(&config("scopes = [\"wan\", \"pg\"]\n", "\"pg:chat*\", \"wan:svc\", \"lobby\""), path)
            .unwrap();
        assert_eq!(c.erlang.unwrap().scopes, ["wan", "pg"]);
        // The primary scope's name is dropped: its groups cross bare.
        assert_eq!(c.routes[0].export, ["pg:chat*", "svc", "lobby"]);
        let c = Config::parse(&config("scope = \"pg\"\n", "\"*\""), path).unwrap();
        assert_eq!(c.erlang.unwrap().scopes, ["pg"]);
        for (erlang, export, says) in [
            ("scope = \"a\"\nscopes = [\"b\"]\n", "\"*\"", "set scope or scopes, not both"),
            ("scopes = [\"wan\", \"wan\"]\n", "\"*\"", "listed twice"),
            ("scopes = []\n", "\"*\"", "scopes must be an array of 1 to 16"),
            ("scopes = [\"a:b\"]\n", "\"*\"", "no ':'"),
            ("scopes = [\"wan\"]\n", "\"pg:chat\"", "names the pg scope \"pg\", which [erlang] does not mirror"),
        ] {
            let problems = Config::parse(&config(erlang, export), path).unwrap_err();
            assert!(problems.iter().any(|p| p.message.contains(says)), "{erlang}: {problems:?}");
        }
    }

    #[test]
    fn the_default_gateway_name_is_the_system_host_name_not_the_environment() {
        let c = Config::parse(
            "[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\n",
            Path::new("gw.toml"),
        )
        .unwrap();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(c.gateway.name, host.trim());
    }

    #[test]
    fn the_erlang_table() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cookie"), "s3cret\n").unwrap();
        set_mode(&dir.path().join("cookie"), 0o600);
        let path = dir.path().join("gw.toml");
        let c = Config::parse(
            "[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\n\
             [erlang]\nnode = \"wandist_dc1@127.0.0.1\"\ncookie_file = \"cookie\"\n\
             nodes = [\"chat@10.0.0.6\", { name = \"chat@10.0.0.7\", port = 4370 }]\n",
            &path,
        )
        .unwrap();
        let e = c.erlang.unwrap();
        assert_eq!(e.cookie.expose(), "s3cret");
        assert_eq!(e.scopes, ["wan"]);
        assert_eq!(e.nodes[1], ErlNode { name: "chat@10.0.0.7".into(), port: Some(4370) });
        assert!(!format!("{:?}", e.cookie).contains("s3cret"));

        let problems = Config::parse(
            "[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\n\
             [erlang]\nnode = \"nohost\"\ncookie = \"a\"\ncookie_file = \"b\"\nnodes = [\"x@h\", \"x@h\", 5]\n",
            &path,
        )
        .unwrap_err();
        let msgs: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        for want in ["not an Erlang node name", "not both", "listed twice", "nodes must be"] {
            assert!(msgs.iter().any(|m| m.contains(want)), "{want} in {msgs:?}");
        }
        assert!(msgs.iter().all(|m| !m.contains("\"a\"")));
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// As Erlang does: a cookie file group or others may read is refused,
    /// with the file, its mode and the fix in the message.
    #[test]
    fn a_cookie_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cookie = dir.path().join("cookie");
        std::fs::write(&cookie, "s3cret").unwrap();
        let path = dir.path().join("gw.toml");
        let text = "[gateway]\ncluster = \"dc1\"\n[[route]]\ncluster = \"dc2\"\ninsecure_plaintext = true\n\
             [erlang]\nnode = \"gw@h\"\ncookie_file = \"cookie\"\nnodes = [\"a@h\"]\n";
        for mode in [0o644, 0o640, 0o604, 0o660] {
            set_mode(&cookie, mode);
            let problems = Config::parse(text, &path).unwrap_err();
            let m = &problems[0].message;
            assert!(m.contains(&format!("mode {mode:04o}")) && m.contains("chmod 600"), "{m}");
            assert!(!m.contains("s3cret"));
            assert_eq!(problems[0].line, Some(8));
        }
        for mode in [0o600, 0o400] {
            set_mode(&cookie, mode);
            assert!(Config::parse(text, &path).is_ok(), "{mode:o}");
        }
    }

    #[test]
    fn cluster_names() {
        for good in ["dc1", "eu-west.dc2", "a"] {
            check_cluster_name(good).unwrap();
        }
        for bad in ["", "DC1", "dc_1", "-dc", "dc.", "10.0.0.1", "a..b", &"x".repeat(64)] {
            assert!(check_cluster_name(bad).is_err(), "{bad:?}");
        }
    }
}
