//! Every configuration key, once: its table, what it takes, its range and
//! default, and what it means. The walker takes the keys each table allows,
//! and every integer's range and default, from here; a test holds README's
//! configuration table and `gateway.toml.example` to it.

use crate::wire::codec::{DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_LIMIT, MIN_FRAME_LIMIT};

use super::{Limits, DEFAULT_WINDOW, MAX_STANDBY};

/// What a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer in `min..=max`; `default` when absent (None: worked out
    /// from other keys, as `help` says).
    Int {
        min: i64,
        max: i64,
        default: Option<i64>,
    },
    Text,
    Flag,
    /// A file, relative to the configuration file.
    File,
    /// `IP:port`.
    Address,
    List,
    Table,
}

/// One key of one table.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

impl Key {
    /// The integer key's (min, max, default); panics for any other kind
    /// (a mistake in this file, caught by its tests).
    pub fn range(&self) -> (i64, i64, Option<i64>) {
        match self.kind {
            Kind::Int { min, max, default } => (min, max, default),
            other => panic!("{} is {other:?}, not an integer", self.name),
        }
    }
}

/// A table and the keys it allows.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// As problems name it: `[gateway]`, `an endpoint`.
    pub title: &'static str,
    /// As README names its keys (`gateway.heartbeat_ms`); None for tables
    /// inside a value (an endpoint, a node).
    pub path: Option<&'static str>,
    pub keys: &'static [Key],
}

impl Table {
    pub fn names(&self) -> Vec<&'static str> {
        self.keys.iter().map(|k| k.name).collect()
    }
}

const fn int(name: &'static str, min: i64, max: i64, default: i64, help: &'static str) -> Key {
    Key { name, kind: Kind::Int { min, max, default: Some(default) }, help }
}

const fn int_derived(name: &'static str, min: i64, max: i64, help: &'static str) -> Key {
    Key { name, kind: Kind::Int { min, max, default: None }, help }
}

const fn key(name: &'static str, kind: Kind, help: &'static str) -> Key {
    Key { name, kind, help }
}

pub const DEFAULT_HEARTBEAT_MS: i64 = 1000;
pub const DEFAULT_DEAD_AFTER_MS: i64 = 3000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: i64 = 5000;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: i64 = 5000;
pub const DEFAULT_RECONNECT_MIN_MS: i64 = 100;
pub const DEFAULT_RECONNECT_MAX_MS: i64 = 10_000;
pub const DEFAULT_SHUTDOWN_GRACE_MS: i64 = 5000;
pub const DEFAULT_MAX_PENDING_HANDSHAKES: i64 = 256;
/// 0: one per CPU (one on hosts with two or fewer).
pub const DEFAULT_WORKER_THREADS: i64 = 0;
/// Proxies beyond `max_members` a peer may make us hold by default.
pub const PROXIES_BEYOND_MEMBERS: i64 = 100_000;

pub mod gateway {
    use super::*;
    pub const CLUSTER: Key = key("cluster", Kind::Text, "required: this cluster's name, a DNS name");
    pub const NAME: Key = key("name", Kind::Text, "this gateway instance (default: the host name)");
    pub const LISTEN: Key = key("listen", Kind::Address, "WAN listener for peer gateways");
    pub const HEARTBEAT_MS: Key =
        int("heartbeat_ms", 10, 600_000, DEFAULT_HEARTBEAT_MS, "heartbeat interval on every link");
    pub const DEAD_AFTER_MS: Key =
        int("dead_after_ms", 30, 3_600_000, DEFAULT_DEAD_AFTER_MS, "a link silent or stalled this long is dead");
    pub const CONNECT_TIMEOUT_MS: Key =
        int("connect_timeout_ms", 10, 600_000, DEFAULT_CONNECT_TIMEOUT_MS, "TCP connect deadline");
    pub const HANDSHAKE_TIMEOUT_MS: Key =
        int("handshake_timeout_ms", 10, 600_000, DEFAULT_HANDSHAKE_TIMEOUT_MS, "SOCKS5, and TLS + hello, deadlines");
    pub const RECONNECT_MIN_MS: Key =
        int("reconnect_min_ms", 1, 600_000, DEFAULT_RECONNECT_MIN_MS, "reconnect backoff's start");
    pub const RECONNECT_MAX_MS: Key =
        int("reconnect_max_ms", 1, 3_600_000, DEFAULT_RECONNECT_MAX_MS, "reconnect backoff's cap");
    pub const SHUTDOWN_GRACE_MS: Key =
        int("shutdown_grace_ms", 0, 600_000, DEFAULT_SHUTDOWN_GRACE_MS, "how long a stop may take");
    pub const MAX_FRAME_BYTES: Key = int(
        "max_frame_bytes",
        MIN_FRAME_LIMIT as i64,
        MAX_FRAME_LIMIT as i64,
        DEFAULT_MAX_FRAME_BYTES as i64,
        "largest frame accepted from a peer",
    );
    pub const MAX_PENDING_HANDSHAKES: Key = int(
        "max_pending_handshakes",
        1,
        65_536,
        DEFAULT_MAX_PENDING_HANDSHAKES,
        "incoming connections still handshaking",
    );
    pub const MAX_IMPORTED_MEMBERS: Key = int(
        "max_imported_members",
        1,
        100_000_000,
        Limits::DEFAULT.members as i64,
        "default of each route's max_members",
    );
    pub const WORKER_THREADS: Key =
        int("worker_threads", 0, 1024, DEFAULT_WORKER_THREADS, "runtime worker threads (0: by CPUs)");
    pub const TABLE: Table = Table {
        title: "[gateway]",
        path: Some("gateway"),
        keys: &[
            CLUSTER,
            NAME,
            LISTEN,
            HEARTBEAT_MS,
            DEAD_AFTER_MS,
            CONNECT_TIMEOUT_MS,
            HANDSHAKE_TIMEOUT_MS,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            SHUTDOWN_GRACE_MS,
            MAX_FRAME_BYTES,
            MAX_PENDING_HANDSHAKES,
            MAX_IMPORTED_MEMBERS,
            WORKER_THREADS,
        ],
    };
}

pub mod tls {
    use super::*;
    pub const TABLE: Table = Table {
        title: "[tls]",
        path: Some("tls"),
        keys: &[
            key("cert", Kind::File, "PEM chain naming this cluster"),
            key("key", Kind::File, "its private key, owner-only"),
            key("ca", Kind::File, "the CA(s) trusted for peers"),
            key("crl", Kind::File, "revocation lists checked for every peer"),
        ],
    };
}

pub mod metrics {
    use super::*;
    pub const TABLE: Table = Table {
        title: "[metrics]",
        path: Some("metrics"),
        keys: &[key("listen", Kind::Address, "where /metrics, /healthz, /readyz, /status are served")],
    };
}

pub mod route {
    use super::*;
    pub const STANDBY: Key = int("standby", 0, MAX_STANDBY as i64, 0, "warm standby links besides the primary");
    pub const WINDOW_MESSAGES: Key =
        int("window_messages", 1, 10_000_000, DEFAULT_WINDOW.messages as i64, "unconfirmed messages kept for the peer");
    pub const WINDOW_BYTES: Key = int("window_bytes", 1024, 1 << 40, DEFAULT_WINDOW.bytes as i64, "and their bytes");
    pub const MAX_LINKS: Key =
        int("max_links", 1, 64, Limits::DEFAULT.links as i64, "links with the peer at once, whoever dials");
    pub const MAX_PROXIES: Key =
        int_derived("max_proxies", 1, 200_000_000, "proxies for its processes (default max_members + 100000)");
    pub const MAX_HANDLES: Key =
        int("max_handles", 1, 200_000_000, Limits::DEFAULT.handles as i64, "handles issued to it for ours");
    pub const MAX_MONITORS: Key =
        int("max_monitors", 0, 100_000_000, Limits::DEFAULT.monitors as i64, "monitors held for it");
    pub const MAX_GROUPS: Key =
        int("max_groups", 1, 100_000_000, Limits::DEFAULT.groups as i64, "groups imported from it");
    pub const MAX_MEMBERS: Key =
        int_derived("max_members", 1, 100_000_000, "members imported from it (default gateway.max_imported_members)");
    pub const MAX_MEMBER_BYTES: Key = int(
        "max_member_bytes",
        1024,
        1 << 40,
        Limits::DEFAULT.member_bytes as i64,
        "group names + 8 per member imported",
    );
    pub const MAX_PENDING: Key =
        int("max_pending", 1, 100_000_000, Limits::DEFAULT.pending as i64, "our messages queued beyond its window");
    pub const MAX_PENDING_BYTES: Key =
        int("max_pending_bytes", 1024, 1 << 40, Limits::DEFAULT.pending_bytes as i64, "and their bytes");
    pub const MAX_PEER_ATOMS: Key =
        int("max_peer_atoms", 0, 10_000_000, Limits::DEFAULT.atoms as i64, "distinct atoms it may bring");
    pub const MAX_REFUSALS_PER_SECOND: Key = int(
        "max_refusals_per_second",
        0,
        100_000_000,
        Limits::DEFAULT.refusals as i64,
        "refusals/s before it is read no further for a while",
    );
    pub const TABLE: Table = Table {
        title: "[[route]]",
        path: Some("route"),
        keys: &[
            key("cluster", Kind::Text, "required: the peer cluster"),
            key("endpoints", Kind::List, "where its gateways listen"),
            STANDBY,
            key("socks5", Kind::Text, "dial through this SOCKS5 proxy"),
            key("socks5_username", Kind::Text, "SOCKS5 authentication"),
            key("socks5_password", Kind::Text, "SOCKS5 authentication"),
            key("insecure_plaintext", Kind::Flag, "no TLS on this route"),
            key("ca", Kind::File, "the CA(s) trusted for this peer instead of tls.ca"),
            key("compression", Kind::Text, "\"off\", \"lz4\", \"zstd\" or \"auto\""),
            WINDOW_MESSAGES,
            WINDOW_BYTES,
            key("export", Kind::List, "group-name patterns advertised to the peer"),
            key("import", Kind::List, "group-name patterns accepted from the peer"),
            MAX_LINKS,
            MAX_PROXIES,
            MAX_HANDLES,
            MAX_MONITORS,
            MAX_GROUPS,
            MAX_MEMBERS,
            MAX_MEMBER_BYTES,
            MAX_PENDING,
            MAX_PENDING_BYTES,
            MAX_PEER_ATOMS,
            MAX_REFUSALS_PER_SECOND,
        ],
    };
    /// `{ address = "host:port", socks5 = ... }` in `endpoints`.
    pub const ENDPOINT: Table = Table {
        title: "an endpoint",
        path: None,
        keys: &[
            key("address", Kind::Text, "host:port"),
            key("socks5", Kind::Text, "this endpoint's proxy (none: direct)"),
            key("socks5_username", Kind::Text, "SOCKS5 authentication"),
            key("socks5_password", Kind::Text, "SOCKS5 authentication"),
        ],
    };
}

pub mod erlang {
    use super::*;
    pub const PORT: Key = Key {
        name: "port",
        kind: Kind::Int { min: 1, max: 65535, default: None },
        help: "distribution port of a node without EPMD",
    };
    pub const TABLE: Table = Table {
        title: "[erlang]",
        path: Some("erlang"),
        keys: &[
            key("node", Kind::Text, "the gateway's own hidden node name"),
            key("cookie", Kind::Text, "the cluster's cookie"),
            key("cookie_file", Kind::File, "a file holding it, owner-only"),
            key("nodes", Kind::List, "local nodes to connect to"),
            key("discover", Kind::Text, "\"cluster\": every node those see too"),
            key("dns", Kind::Text, "name@host: name@ADDRESS for each address of host"),
            key("scope", Kind::Text, "the pg scope mirrored"),
            key("scopes", Kind::List, "the pg scopes mirrored"),
            key("coordinate", Kind::Flag, "several instances of this cluster"),
            key("tls", Kind::Table, "TLS distribution"),
        ],
    };
    /// `{ name = "name@host", port = N }` in `nodes`.
    pub const NODE: Table =
        Table { title: "an Erlang node", path: None, keys: &[key("name", Kind::Text, "name@host"), PORT] };
    pub const TLS: Table = Table {
        title: "[erlang.tls]",
        path: Some("erlang.tls"),
        keys: &[
            key("cert", Kind::File, "the gateway's certificate, as the nodes' CA signs it"),
            key("key", Kind::File, "its private key"),
            key("ca", Kind::File, "the CA the nodes' certificates chain to"),
            key("check_host", Kind::Flag, "a node's certificate must name its host"),
        ],
    };
}

pub const TOP: Table = Table {
    title: "the top level",
    path: None,
    keys: &[
        key("gateway", Kind::Table, "this gateway"),
        key("tls", Kind::Table, "mutual TLS toward peers"),
        key("metrics", Kind::Table, "the metrics endpoint"),
        key("route", Kind::Table, "one [[route]] per peer cluster"),
        key("erlang", Kind::Table, "the local cluster"),
    ],
};

/// Every table whose keys a user writes.
pub const TABLES: &[Table] = &[
    gateway::TABLE,
    tls::TABLE,
    metrics::TABLE,
    route::TABLE,
    route::ENDPOINT,
    erlang::TABLE,
    erlang::NODE,
    erlang::TLS,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn read(file: &str) -> String {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap()
    }

    #[test]
    fn every_key_is_named_once_and_its_default_is_in_range() {
        for table in TABLES.iter().chain([&TOP]) {
            let mut names = table.names();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), table.keys.len(), "{}: a key twice", table.title);
            for key in table.keys {
                if let Kind::Int { min, max, default: Some(d) } = key.kind {
                    assert!(
                        (min..=max).contains(&d),
                        "{}.{}: default {d} outside {min}..={max}",
                        table.title,
                        key.name
                    );
                }
            }
        }
    }

    /// Whether `text` sets `name` as TOML does (`name = `, maybe commented
    /// out or inside an inline table).
    fn sets(text: &str, name: &str) -> bool {
        text.lines().any(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            line.starts_with(&format!("{name} ="))
                || line.contains(&format!("{{ {name} ="))
                || line.contains(&format!(", {name} ="))
        })
    }

    #[test]
    fn readme_and_the_example_file_name_every_key() {
        let readme = read("README.md");
        let example = read("gateway.toml.example");
        let mut missing = Vec::new();
        for table in TABLES {
            for key in table.keys {
                let full = table.path.map(|p| format!("`{p}.{}`", key.name));
                let in_readme = full.as_ref().is_some_and(|f| readme.contains(f.as_str()))
                    || readme.contains(&format!("`{}`", key.name))
                    || sets(&readme, key.name);
                if !in_readme {
                    missing.push(format!("README.md: {} {}", table.title, key.name));
                }
                let in_example = match key.kind {
                    Kind::Table => {
                        let header = format!("[{}.{}]", table.path.unwrap_or_default(), key.name);
                        example
                            .lines()
                            .any(|l| l.trim_start().trim_start_matches('#').trim_start().starts_with(&header))
                    }
                    _ => sets(&example, key.name),
                };
                if !in_example {
                    missing.push(format!("gateway.toml.example: {} {}", table.title, key.name));
                }
            }
        }
        assert!(missing.is_empty(), "keys not documented:\n{}", missing.join("\n"));
    }

    #[test]
    fn readme_gives_each_integer_its_default() {
        let readme = read("README.md");
        let mut checked = 0;
        for table in TABLES {
            let Some(path) = table.path else { continue };
            for key in table.keys {
                let Kind::Int { default: Some(d), .. } = key.kind else { continue };
                let row = format!("| `{path}.{}` |", key.name);
                let Some(line) = readme.lines().find(|l| l.starts_with(&row)) else { continue };
                let cell = line[row.len()..].split('|').next().unwrap_or("");
                let said: Vec<String> = cell.split(|c: char| !c.is_ascii_digit()).map(str::to_string).collect();
                assert!(
                    said.contains(&d.to_string()),
                    "README's row for {path}.{} says {cell:?}, the default is {d}",
                    key.name
                );
                checked += 1;
            }
        }
        assert!(checked >= 10, "README's table has rows for the integer keys ({checked} found)");
    }
}
