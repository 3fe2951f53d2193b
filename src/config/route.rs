//! `[[route]]` tables: a peer cluster, how to reach it, what crosses,
//! and what it may make this gateway hold.

use std::collections::BTreeSet;

use toml_edit::{Item, TableLike, Value};

use super::keys::{self, route as k, Key};
use super::walk::Cx;
use super::{check_cluster_name, Dial, Endpoint, Limits, RouteConfig, Secret, Socks5, MAX_ROUTES};
use crate::route::Window;
use crate::wire::packing::Compression;

impl Cx<'_> {
    pub(super) fn routes(
        &mut self,
        item: Option<&Item>,
        own: Option<&str>,
        members: usize,
    ) -> Option<Vec<RouteConfig>> {
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

    pub(super) fn route(
        &mut self,
        t: &dyn TableLike,
        own: Option<&str>,
        seen: &mut BTreeSet<String>,
        default_members: usize,
    ) -> Option<RouteConfig> {
        self.allow(t, &k::TABLE);
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
                            self.allow(table, &k::ENDPOINT);
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
        let standby = self.int(t, &k::STANDBY) as u8;
        let insecure_plaintext = self.bool(t, "insecure_plaintext");
        let ca = self.path_opt(t, "ca");
        if ca.is_some() && insecure_plaintext {
            self.err(
                Self::key_span(t, "ca"),
                "a route with insecure_plaintext = true has no TLS: its \"ca\" would never be used".into(),
            );
        }
        let window = Window {
            messages: self.int(t, &k::WINDOW_MESSAGES) as usize,
            bytes: self.int(t, &k::WINDOW_BYTES) as usize,
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
    pub(super) fn limits(&mut self, t: &dyn TableLike, standby: u8, default_members: usize) -> Limits {
        let mut n = |key: &Key| self.int(t, key) as usize;
        let links = n(&k::MAX_LINKS) as u8;
        let (handles, monitors, groups) = (n(&k::MAX_HANDLES), n(&k::MAX_MONITORS), n(&k::MAX_GROUPS));
        let (member_bytes, pending, pending_bytes) =
            (n(&k::MAX_MEMBER_BYTES), n(&k::MAX_PENDING), n(&k::MAX_PENDING_BYTES));
        let (atoms, refusals) = (n(&k::MAX_PEER_ATOMS), n(&k::MAX_REFUSALS_PER_SECOND));
        let members = self.int_or(t, &k::MAX_MEMBERS, default_members as i64) as usize;
        // A proxy per imported member, and room for the rest.
        let proxies = self.int_or(t, &k::MAX_PROXIES, members as i64 + keys::PROXIES_BEYOND_MEMBERS) as usize;
        let l = Limits {
            links,
            members,
            proxies,
            handles,
            monitors,
            groups,
            member_bytes,
            pending,
            pending_bytes,
            atoms,
            refusals,
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

    /// `socks5`, `socks5_username`, `socks5_password` of a route or endpoint.
    pub(super) fn socks5(&mut self, t: &dyn TableLike, what: &str) -> Option<Socks5> {
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
    pub(super) fn patterns(&mut self, t: &dyn TableLike, k: &str) -> Vec<String> {
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
