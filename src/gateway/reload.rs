//! What a reload (SIGHUP) applies to a running gateway, and what only a
//! restart can: a plain comparison of the running configuration with the
//! one just loaded. No I/O; `Running::reload` carries it out.
//!
//! Applied live: the TLS material (`[tls]` files and routes' `ca`, re-read
//! on every reload even when the paths are the same, so a rotated
//! certificate or a new CRL takes effect): new handshakes use it, links
//! already up keep theirs; routes added, removed or changed (a changed one
//! is stopped and started again: only its own links are touched); and
//! `[erlang] nodes`. Everything else is compared and, when it differs,
//! named as needing a restart.

use crate::config::{Config, GatewayConfig, RouteConfig};

/// The outcome of comparing two configurations.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Settings that differ and take effect only after a restart, by
    /// their config name (`gateway.listen`).
    pub restart: Vec<String>,
    /// Routes to stop, by cluster (removed, or changed: then also in `start`).
    pub stop: Vec<String>,
    /// Routes to start, by cluster (added, or changed).
    pub start: Vec<String>,
    /// `[erlang] nodes` changed.
    pub nodes: bool,
}

pub fn plan(running: &Config, loaded: &Config) -> Plan {
    let mut restart = Vec::new();
    gateway(&running.gateway, &loaded.gateway, &mut restart);
    if running.tls.is_some() != loaded.tls.is_some() {
        restart.push(if loaded.tls.is_some() { "[tls] (added)" } else { "[tls] (removed)" }.to_string());
    }
    if running.metrics != loaded.metrics {
        restart.push("metrics.listen".to_string());
    }
    let (stop, start) = routes(&running.routes, &loaded.routes);
    let mut nodes = false;
    match (&running.erlang, &loaded.erlang) {
        (None, None) => {}
        (Some(_), None) => restart.push("[erlang] (removed)".to_string()),
        (None, Some(_)) => restart.push("[erlang] (added)".to_string()),
        (Some(a), Some(b)) => {
            let keys = [
                ("erlang.node", a.node != b.node),
                ("erlang.cookie", a.cookie != b.cookie),
                ("erlang.scopes", a.scopes != b.scopes),
                ("erlang.coordinate", a.coordinate != b.coordinate),
                ("erlang.tls", a.tls != b.tls),
                ("erlang.discover", a.discover_cluster != b.discover_cluster),
                ("erlang.dns", a.dns != b.dns),
            ];
            restart.extend(keys.iter().filter(|(_, changed)| *changed).map(|(k, _)| k.to_string()));
            nodes = a.nodes != b.nodes;
        }
    }
    Plan { restart, stop, start, nodes }
}

fn gateway(a: &GatewayConfig, b: &GatewayConfig, out: &mut Vec<String>) {
    let keys = [
        ("gateway.cluster", a.cluster != b.cluster),
        ("gateway.name", a.name != b.name),
        ("gateway.listen", a.listen != b.listen),
        ("gateway.heartbeat_ms", a.heartbeat != b.heartbeat),
        ("gateway.dead_after_ms", a.dead_after != b.dead_after),
        ("gateway.connect_timeout_ms", a.connect_timeout != b.connect_timeout),
        ("gateway.handshake_timeout_ms", a.handshake_timeout != b.handshake_timeout),
        ("gateway.reconnect_min_ms", a.reconnect_min != b.reconnect_min),
        ("gateway.reconnect_max_ms", a.reconnect_max != b.reconnect_max),
        ("gateway.shutdown_grace_ms", a.shutdown_grace != b.shutdown_grace),
        ("gateway.max_frame_bytes", a.max_frame_bytes != b.max_frame_bytes),
        ("gateway.max_pending_handshakes", a.max_pending_handshakes != b.max_pending_handshakes),
        ("gateway.max_imported_members", a.max_imported_members != b.max_imported_members),
        ("gateway.worker_threads", a.worker_threads != b.worker_threads),
    ];
    out.extend(keys.iter().filter(|(_, changed)| *changed).map(|(k, _)| k.to_string()));
}

/// Routes to stop and to start, by cluster: removed, added, or changed in
/// anything but `ca` (TLS material, applied without touching the route).
fn routes(a: &[RouteConfig], b: &[RouteConfig]) -> (Vec<String>, Vec<String>) {
    let same_but_ca = |x: &RouteConfig, y: &RouteConfig| {
        let mut y = y.clone();
        y.ca.clone_from(&x.ca);
        *x == y
    };
    let (mut stop, mut start) = (Vec::new(), Vec::new());
    for r in a {
        match b.iter().find(|n| n.cluster == r.cluster) {
            None => stop.push(r.cluster.clone()),
            Some(n) if !same_but_ca(r, n) => {
                stop.push(r.cluster.clone());
                start.push(r.cluster.clone());
            }
            Some(_) => {}
        }
    }
    start.extend(b.iter().filter(|n| !a.iter().any(|r| r.cluster == n.cluster)).map(|n| n.cluster.clone()));
    (stop, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[gateway]
cluster = "dc1"
listen = "127.0.0.1:0"
[tls]
cert = "c.pem"
key = "k.pem"
ca = "ca.pem"
[[route]]
cluster = "dc2"
endpoints = ["127.0.0.1:9000"]
[[route]]
cluster = "dc3"
endpoints = ["127.0.0.1:9001"]
[erlang]
node = "gw@127.0.0.1"
cookie = "c"
nodes = ["a1@127.0.0.1"]
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/wandist/gateway.toml")).expect("a valid config")
    }

    fn restart(edit: impl Fn(&str) -> String) -> Vec<String> {
        plan(&parse(BASE), &parse(&edit(BASE))).restart
    }

    fn planned(edit: impl Fn(&str) -> String) -> Plan {
        plan(&parse(BASE), &parse(&edit(BASE)))
    }

    #[test]
    fn the_same_file_again_needs_nothing() {
        assert_eq!(planned(|s| s.to_string()), Plan::default());
        // Lines moved (comments added) are not changes.
        assert_eq!(planned(|s| format!("# rotated\n\n{s}")), Plan::default());
    }

    #[test]
    fn routes_and_nodes_are_applied_live_touching_only_what_changed() {
        let p = planned(|s| s.replace(":9001", ":9002"));
        assert_eq!((p.stop, p.start, p.restart), (vec!["dc3".to_string()], vec!["dc3".to_string()], vec![]));
        let p = planned(|s| s.replace("cluster = \"dc3\"", "cluster = \"dc4\""));
        assert_eq!((p.stop, p.start), (vec!["dc3".to_string()], vec!["dc4".to_string()]));
        let p = planned(|s| s.replace("a1@127.0.0.1\"", "a1@127.0.0.1\", \"a2@127.0.0.1\""));
        assert_eq!((p.nodes, p.restart, p.stop), (true, vec![], vec![]));
    }

    #[test]
    fn tls_files_are_applied_live() {
        let edit = |s: &str| s.replace("c.pem", "c2.pem").replace("k.pem", "k2.pem");
        assert_eq!(restart(edit), Vec::<String>::new());
        let own_ca = |s: &str| s.replace("cluster = \"dc3\"\n", "cluster = \"dc3\"\nca = \"partner.pem\"\n");
        assert_eq!(restart(own_ca), Vec::<String>::new());
    }

    #[test]
    fn what_only_a_restart_applies_is_named() {
        assert_eq!(restart(|s| s.replace("127.0.0.1:0", "127.0.0.1:1")), ["gateway.listen"]);
        assert_eq!(restart(|s| s.replace("[gateway]\n", "[gateway]\nheartbeat_ms = 250\n")), ["gateway.heartbeat_ms"]);
        assert_eq!(restart(|s| s.replace("cookie = \"c\"", "cookie = \"d\"")), ["erlang.cookie"]);
        assert_eq!(
            restart(|s| s
                .replace("[metrics]", "")
                .replace("[erlang]", "[metrics]\nlisten = \"127.0.0.1:0\"\n[erlang]")),
            ["metrics.listen"]
        );
    }
}
