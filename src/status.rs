//! What the gateway is doing, for people: the routes (peer instance, links
//! with their endpoint, role, RTT and age, window use, groups exported and
//! imported), the Erlang nodes (up or down since when, scope found), and
//! readiness with its reasons. Route tasks and the Erlang shell write their
//! part into the `Board` as they publish their gauges; `/status`,
//! `/readyz` and `wandist status` read it. The deciding parts (`readiness`,
//! `render`) are plain functions.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Groups listed per route and direction at most (the counts are whole).
pub const MAX_GROUPS_LISTED: usize = 100;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub id: u64,
    /// The endpoint dialed, or `accepted` for a link the peer dialed.
    pub endpoint: String,
    /// `primary` (carries the traffic) or `standby`.
    pub role: String,
    /// The last heartbeat's round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
    pub up_secs: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupCount {
    pub scope: String,
    pub group: String,
    pub members: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteStatus {
    pub peer: String,
    pub up: bool,
    /// Another instance of this cluster holds the route (`coordinate`), or
    /// the peer refuses this one because another holds a session with it:
    /// down by design.
    pub standby: bool,
    /// The peer gateway instance the session is with.
    pub peer_gateway: Option<String>,
    pub up_secs: Option<f64>,
    pub links: Vec<LinkStatus>,
    /// Messages sent and not yet confirmed, and the window's limit.
    pub unacked_messages: usize,
    pub window_messages: usize,
    pub groups_exported: usize,
    pub members_exported: usize,
    pub groups_imported: usize,
    pub members_imported: usize,
    /// The first MAX_GROUPS_LISTED groups of each direction, by name.
    pub exported: Vec<GroupCount>,
    pub imported: Vec<GroupCount>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub up: bool,
    /// Seconds in the current state (up or down).
    pub since_secs: f64,
    /// The scopes the node answers for (of those mirrored).
    pub scopes: Vec<String>,
    /// `configured` or `discovered`.
    pub how: String,
}

/// The whole answer of `/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub cluster: String,
    pub gateway: String,
    pub version: String,
    pub ready: bool,
    pub reasons: Vec<String>,
    pub routes: Vec<RouteStatus>,
    /// None without an `[erlang]` table.
    pub erlang: Option<ErlangStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ErlangStatus {
    pub node: String,
    pub scopes: Vec<String>,
    pub nodes: Vec<NodeStatus>,
}

/// Where the parts are written as they change.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Parts>,
}

#[derive(Debug, Default)]
struct Parts {
    cluster: String,
    gateway: String,
    /// Each part with when it was written: ages are as of then, and grow
    /// by the time since when read.
    routes: BTreeMap<String, (Instant, RouteStatus)>,
    erlang: Option<(Instant, ErlangStatus)>,
    /// When "gateway ready" was first said.
    ready_since: Option<Instant>,
}

impl Board {
    fn parts(&self) -> std::sync::MutexGuard<'_, Parts> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_identity(&self, cluster: &str, gateway: &str) {
        let mut p = self.parts();
        p.cluster = cluster.to_string();
        p.gateway = gateway.to_string();
    }

    pub fn set_route(&self, route: RouteStatus) {
        self.parts().routes.insert(route.peer.clone(), (Instant::now(), route));
    }

    pub fn remove_route(&self, peer: &str) {
        self.parts().routes.remove(peer);
    }

    pub fn set_erlang(&self, erlang: ErlangStatus) {
        self.parts().erlang = Some((Instant::now(), erlang));
    }

    /// The status now.
    pub fn status(&self) -> Status {
        let p = self.parts();
        let routes: Vec<RouteStatus> = p
            .routes
            .values()
            .map(|(at, r)| {
                let later = at.elapsed().as_secs_f64();
                let mut r = r.clone();
                r.up_secs = r.up_secs.map(|s| s + later);
                for l in &mut r.links {
                    l.up_secs += later;
                }
                r
            })
            .collect();
        let erlang = p.erlang.as_ref().map(|(at, e)| {
            let later = at.elapsed().as_secs_f64();
            let mut e = e.clone();
            for n in &mut e.nodes {
                n.since_secs += later;
            }
            e
        });
        // Groups cross in the mirrored scope (routes do not know its name).
        let mut routes = routes;
        if let Some(scope) = erlang.as_ref().and_then(|e| e.scopes.first()) {
            for g in routes.iter_mut().flat_map(|r| r.exported.iter_mut().chain(r.imported.iter_mut())) {
                if g.scope.is_empty() {
                    g.scope = scope.clone();
                }
            }
        }
        let reasons = readiness(erlang.as_ref(), &routes);
        Status {
            cluster: p.cluster.clone(),
            gateway: p.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: reasons.is_empty(),
            reasons,
            routes,
            erlang,
        }
    }

    /// True the first time the gateway is ready (to say "gateway ready" once).
    pub fn first_ready(&self) -> bool {
        let ready = self.status().ready;
        let mut p = self.parts();
        if ready && p.ready_since.is_none() {
            p.ready_since = Some(Instant::now());
            return true;
        }
        false
    }
}

/// Why the gateway is not ready, or nothing if it is: every local node is
/// up and answers for every mirrored scope, and every route is up (or
/// stands by by design: another instance of this cluster holds it).
pub fn readiness(erlang: Option<&ErlangStatus>, routes: &[RouteStatus]) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(e) = erlang {
        if e.nodes.is_empty() {
            reasons.push("no Erlang node configured or discovered yet".to_string());
        }
        for n in &e.nodes {
            if !n.up {
                reasons.push(format!("Erlang node {} is not connected", n.name));
                continue;
            }
            for s in e.scopes.iter().filter(|s| !n.scopes.contains(s)) {
                reasons.push(format!("Erlang node {} does not answer for the pg scope {s}", n.name));
            }
        }
    }
    for r in routes {
        if !r.up && !r.standby {
            reasons.push(format!("route to {} is down", r.peer));
        }
    }
    reasons
}

/// `/readyz`: 200 with `{"ready":true}` or 503 with the reasons.
pub fn readyz(status: &Status) -> (bool, String) {
    let body = serde_json::json!({ "ready": status.ready, "reasons": status.reasons });
    (status.ready, format!("{body}\n"))
}

fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `wandist status`: the status as tables for a terminal.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "gateway {} of cluster {} (wandist {})", s.gateway, s.cluster, s.version);
    if s.ready {
        let _ = writeln!(out, "ready");
    } else {
        let _ = writeln!(out, "NOT READY:");
        for r in &s.reasons {
            let _ = writeln!(out, "  - {r}");
        }
    }
    let _ = writeln!(out, "\nroutes");
    let _ = writeln!(
        out,
        "  {:<16} {:<8} {:<20} {:>7} {:>10} {:>16} {:>16}",
        "PEER", "STATE", "PEER GATEWAY", "UP", "UNACKED", "EXPORTED g/m", "IMPORTED g/m"
    );
    for r in &s.routes {
        let state = if r.up {
            "up"
        } else if r.standby {
            "standby"
        } else {
            "DOWN"
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<8} {:<20} {:>7} {:>10} {:>16} {:>16}",
            r.peer,
            state,
            r.peer_gateway.as_deref().unwrap_or("-"),
            r.up_secs.map(age).unwrap_or_else(|| "-".into()),
            format!("{}/{}", r.unacked_messages, r.window_messages),
            format!("{}/{}", r.groups_exported, r.members_exported),
            format!("{}/{}", r.groups_imported, r.members_imported),
        );
        for l in &r.links {
            let rtt = l.rtt_ms.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "      link {:<4} {:<8} {:<28} rtt {:<10} up {}",
                l.id,
                l.role,
                l.endpoint,
                rtt,
                age(l.up_secs)
            );
        }
    }
    if let Some(e) = &s.erlang {
        let _ = writeln!(out, "\nErlang side: {} mirroring {}", e.node, e.scopes.join(", "));
        let _ = writeln!(out, "  {:<40} {:<6} {:>7} {:<12} SCOPES", "NODE", "STATE", "FOR", "HOW");
        for n in &e.nodes {
            let _ = writeln!(
                out,
                "  {:<40} {:<6} {:>7} {:<12} {}",
                n.name,
                if n.up { "up" } else { "DOWN" },
                age(n.since_secs),
                n.how,
                if n.scopes.is_empty() { "-".to_string() } else { n.scopes.join(",") }
            );
        }
    }
    for r in &s.routes {
        for (what, list, total) in
            [("exported to", &r.exported, r.groups_exported), ("imported from", &r.imported, r.groups_imported)]
        {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\ngroups {what} {} ({} in all)", r.peer, total);
            for g in list {
                let _ = writeln!(out, "  {}:{} {}", g.scope, g.group, g.members);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, up: bool, scopes: &[&str]) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            up,
            since_secs: 1.0,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            how: "configured".into(),
        }
    }

    fn route(peer: &str, up: bool, standby: bool) -> RouteStatus {
        RouteStatus { peer: peer.into(), up, standby, ..Default::default() }
    }

    #[test]
    fn ready_only_with_every_node_its_scopes_and_every_route() {
        let erlang = |nodes| ErlangStatus { node: "gw@h".into(), scopes: vec!["wan".into()], nodes };
        let ok = erlang(vec![node("a1@h", true, &["wan"])]);
        assert!(readiness(Some(&ok), &[route("dc2", true, false)]).is_empty());
        // A standby route (another instance holds it) is down by design.
        assert!(readiness(Some(&ok), &[route("dc2", false, true)]).is_empty());
        assert_eq!(readiness(Some(&ok), &[route("dc2", false, false)]), ["route to dc2 is down"]);
        let down = erlang(vec![node("a1@h", false, &[]), node("a2@h", true, &[])]);
        assert_eq!(
            readiness(Some(&down), &[]),
            ["Erlang node a1@h is not connected", "Erlang node a2@h does not answer for the pg scope wan"]
        );
        assert_eq!(readiness(Some(&erlang(vec![])), &[]), ["no Erlang node configured or discovered yet"]);
        // Without an Erlang side, routes alone.
        assert!(readiness(None, &[]).is_empty());
    }

    #[test]
    fn readyz_and_the_table_say_what_is_wrong() {
        let board = Board::default();
        board.set_identity("dc1", "gw1");
        board.set_route(route("dc2", false, false));
        assert!(!board.first_ready());
        let s = board.status();
        let (ready, body) = readyz(&s);
        assert!(!ready);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["reasons"][0], "route to dc2 is down");
        assert!(render(&s).contains("NOT READY:\n  - route to dc2 is down"));
        board.set_route(route("dc2", true, false));
        assert!(board.first_ready());
        assert!(!board.first_ready(), "said once");
        assert!(render(&board.status()).contains("\nready\n"));
    }
}
