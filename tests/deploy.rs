//! What ships next to the code: every metric the Grafana dashboard and the
//! alert rules use exists in a real gateway pair's /metrics, and the
//! Kubernetes ConfigMap's gateway.toml is a configuration `wandist` takes.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use support::erl::{dc2_gateway, epmd, erlang_table, pg_node, tag, JOIN_PINGER};
use support::*;

/// `wandist_…` names in a text, histogram series folded to their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("wandist_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        out.insert(name.to_string());
        rest = &tail[end..];
    }
    out
}

fn deploy(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)).unwrap()
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_exists() {
    let dashboard: serde_json::Value = serde_json::from_str(&deploy("grafana/wandist.json")).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    let mut used = metric_names(&exprs.join("\n"));
    let alerts = metric_names(&deploy("prometheus/alerts.yml"));
    assert!(alerts.len() >= 8, "{alerts:?}");
    used.extend(alerts);

    // A real pair with an Erlang side each, a member across, a message.
    let t = tag();
    let epmd = epmd();
    let mut a1 = pg_node("a1", &t, "cookie_a", &epmd);
    let mut b1 = pg_node("b1", &t, "cookie_b", &epmd);
    assert_eq!(b1.eval(JOIN_PINGER), "ok");
    let certs = Certs::new(&["dc1", "dc2"]);
    let gw2 = dc2_gateway(&certs, &t, &b1, &epmd);
    // (First an endpoint nobody listens on: a handshake failure to count.)
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let gw1 = Gateway::start_with_env(
        "gw-dc1",
        &format!(
            "{}{}",
            dialing("dc1", &certs, "dc2", format!("{dead}\", \"{}", gw2.peer_addr())),
            erlang_table(&format!("wgw1_{t}@127.0.0.1"), "cookie_a", &[&a1])
        ),
        &[("ERL_EPMD_PORT", epmd.port.to_string())],
    );
    a1.eval_until("length(pg:get_members(wan, svc)).", |v| v == "1");
    assert_eq!(
        a1.eval("hd(pg:get_members(wan, svc)) ! {ping, self()}, receive {pong, N} -> N after 5000 -> timeout end."),
        format!("'{}'", b1.name)
    );
    gw1.wait_metric("wandist_link_rtt_seconds_count", &[], |v| v > 0.0);
    let exposed = metric_names(&format!("{}\n{}", gw1.metrics(), gw2.metrics()));
    let missing: Vec<&String> = used.difference(&exposed).collect();
    assert!(missing.is_empty(), "used by deploy/ but not in /metrics: {missing:?}");
}

/// The ConfigMap's gateway.toml, with the init container's substitutions,
/// parses (its files live in the pod, so this is `Config::parse`, not `check`).
#[test]
fn the_kubernetes_config_map_holds_a_configuration_wandist_takes() {
    let yaml = deploy("kubernetes/configmap.yaml");
    let at = yaml.find("gateway.toml: |\n").unwrap() + "gateway.toml: |\n".len();
    let toml: String = yaml[at..]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("@POD_NAME@", "wandist-5d8f7c9b4-x2x7q")
        .replace("@POD_IP@", "10.1.2.3");
    // The cookie Secret, mounted: a file here.
    let dir = tempfile::tempdir().unwrap();
    let cookie = dir.path().join("cookie");
    std::fs::write(&cookie, "c").unwrap();
    std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
    let toml = toml.replace("/etc/wandist/cookie/cookie", &cookie.display().to_string());
    let c = wandist::config::Config::parse(&toml, &dir.path().join("gateway.toml")).unwrap_or_else(|p| panic!("{p:?}"));
    let e = c.erlang.unwrap();
    assert_eq!(e.node, "wandist_wandist-5d8f7c9b4-x2x7q@10.1.2.3");
    assert!(e.coordinate && e.discover_cluster && e.dns.is_some());
    assert_eq!(c.metrics.unwrap().listen.port(), 9570);
}
