//! `[erlang]`: the local cluster, and `[erlang.tls]`.

use toml_edit::TableLike;

use super::keys::erlang as k;
use super::walk::Cx;
use super::{check_node_name, owner_only, DistTls, ErlNode, ErlangConfig, Problem, Secret, TlsFiles, MAX_SCOPES};

impl Cx<'_> {
    pub(super) fn erlang(&mut self, t: &dyn TableLike) -> Option<ErlangConfig> {
        self.allow(t, &k::TABLE);
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
            (None, Some(at)) => {
                let cookie = match owner_only(&at.path).and_then(|()| std::fs::read_to_string(&at.path)) {
                    Ok(text) if !text.trim().is_empty() && text.len() <= 1024 => Ok(Secret::new(text.trim())),
                    Ok(_) => Err(format!("{}: the cookie file must hold 1 to 1024 characters", at.path.display())),
                    Err(e) => Err(format!("cannot read {}: {e}", at.path.display())),
                };
                // (Said at the line of `cookie_file`.)
                let file = self.file.to_path_buf();
                cookie.map_err(|message| self.problems.push(Problem { file, line: at.line, message })).ok()
            }
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
                            self.allow(tbl, &k::NODE);
                            let port = self.int_or(tbl, &k::PORT, 0);
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
                self.allow(tt, &k::TLS);
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
}
