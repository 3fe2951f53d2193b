//! Configuration: the TOML file turned into a checked [`Config`].
//!
//! The file is walked by hand over `toml_edit`'s span-preserving tree, so
//! that every problem — unknown keys, wrong types, bad values, missing
//! tables — is reported at once, each with its line. Secrets are held in
//! [`Secret`], which never prints its contents.
//!
//! [`keys`] is the one table of keys: which each table allows, every
//! integer's range and named default, and what each means (README's table
//! and `gateway.toml.example` are held to it by its tests). The walk is
//! split by section: `gateway` (`[gateway]`, `[tls]`, `[metrics]`),
//! `route` (`[[route]]`), `erlang` (`[erlang]`), over `walk`'s primitives.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::TableLike;

use crate::route::Window;
use crate::wire::packing::Compression;

mod erlang;
mod gateway;
pub mod keys;
mod route;
mod walk;

use walk::Cx;

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
        cx.allow(root, &keys::TOP);

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
        assert_eq!(c.gateway.max_frame_bytes, crate::wire::codec::DEFAULT_MAX_FRAME_BYTES);
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
