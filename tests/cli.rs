//! The command line: `check` reports every problem at once and binds
//! nothing; `certs` makes usable material; the shipped example is valid.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

#[test]
fn the_example_config_passes_check_with_dev_certificates_next_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("gateway.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml.example"), &example).unwrap();
    // Without certificates, check names each missing file with its line.
    let (code, out) = check(&example);
    assert_eq!(code, 64, "{out}");
    let text = std::fs::read_to_string(&example).unwrap();
    let line_of = |key: &str| text.lines().position(|l| l.starts_with(key)).map(|i| i + 1).unwrap();
    for key in ["cert = ", "key = ", "ca = "] {
        let line = line_of(key);
        assert!(out.contains(&format!("gateway.toml:{line}: cannot read")), "missing line {line} ({key}) in:\n{out}");
    }
    let st = Command::new(BIN).args(["certs", "--out"]).arg(dir.path().join("certs")).arg("dc1").status().unwrap();
    assert!(st.success());
    let (code, out) = check(&example);
    assert_eq!((code, out.trim()), (0, "ok"));
}

#[test]
fn check_reports_several_problems_of_one_file_at_once() {
    let certs = Certs::new(&["dc1", "dc2"]);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[gateway]\ncluster = \"dc1\"\nlisten = \"nowhere\"\nheartbeat_ms = 0\ncolour = \"red\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\
             [[route]]\ncluster = \"dc2\"\nendpoints = [\"10.0.0.1\"]\nsocks5_password = \"pa55word\"\n",
            certs.path("dc2.pem"),
            certs.path("dc2.key"),
            certs.path("ca.pem")
        ),
    )
    .unwrap();
    let (code, out) = check(&bad);
    assert_eq!(code, 64);
    let expect = [
        (3, "is not an IP:port address"),
        (4, "heartbeat_ms = 0 is out of range"),
        (5, "unknown key \"colour\""),
        (12, "is not host:port"),
        (13, "go together"),
        (7, "does not name cluster \"dc1\""),
    ];
    for (line, msg) in expect {
        assert!(
            out.lines().any(|l| l.contains(&format!("bad.toml:{line}: ")) && l.contains(msg)),
            "no {msg:?} at line {line} in:\n{out}"
        );
    }
    assert!(!out.contains("pa55word"), "check printed a secret:\n{out}");
    // A key that does not fit its certificate is reported at the key line.
    std::fs::write(
        &bad,
        format!(
            "[gateway]\ncluster = \"dc1\"\n[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            certs.path("dc1.pem"),
            certs.path("dc2.key"),
            certs.path("ca.pem")
        ),
    )
    .unwrap();
    let (code, out) = check(&bad);
    assert_eq!(code, 64);
    assert!(out.contains("bad.toml:5: ") && out.contains("does not fit"), "{out}");
}

#[test]
fn check_binds_nothing_and_run_refuses_a_bad_config_with_64() {
    let certs = Certs::new(&["dc1"]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\ncluster = \"dc1\"\nlisten = \"{}\"\n{}",
            taken.local_addr().unwrap(),
            certs.tls_table("dc1")
        ),
    )
    .unwrap();
    // The port is in use, yet check passes: it never binds.
    assert_eq!(check(&cfg), (0, "ok\n".to_string()));
    // run does bind, fails, and says so.
    let out = Command::new(BIN).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));

    std::fs::write(&cfg, "[gateway]\n").unwrap();
    let out = Command::new(BIN).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing required key \"cluster\""));
}

/// A route that can never come up (no endpoints, and nothing listening
/// for the peer to dial in) passes `check` with a warning saying so.
#[test]
fn check_warns_about_a_route_that_can_never_come_up() {
    let certs = Certs::new(&["dc1"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    let body = format!(
        "[gateway]\ncluster = \"dc1\"\n{}[[route]]\ncluster = \"dc2\"\nendpoints = []\n",
        certs.tls_table("dc1")
    );
    std::fs::write(&cfg, &body).unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: route to dc2: no endpoints, and [gateway] has no listen: it can never come up"),
        "{out}"
    );
    assert!(out.ends_with("ok\n"), "{out}");
    // Listening for it: no warning.
    std::fs::write(&cfg, body.replace("cluster = \"dc1\"\n", "cluster = \"dc1\"\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    assert_eq!(check(&cfg), (0, "ok\n".to_string()));
}

/// A tls.ca that did not sign the gateway's own certificate (another CA)
/// passes `check` with a warning saying so; a leaf certificate given as
/// `ca` (which would trust nothing but itself) is refused.
#[test]
fn check_warns_when_the_own_certificate_does_not_chain_to_tls_ca_and_refuses_a_ca_that_is_not_one() {
    let (ours, other) = (Certs::new(&["dc1"]), Certs::new(&["dc2"]));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    let good = format!("[gateway]\ncluster = \"dc1\"\nlisten = \"127.0.0.1:0\"\n{}", ours.tls_table("dc1"));
    std::fs::write(&cfg, &good).unwrap();
    assert_eq!(check(&cfg), (0, "ok\n".to_string()));
    let with_ca = |ca: std::path::PathBuf| {
        let body = good.replace(&ours.path("ca.pem").display().to_string(), &ca.display().to_string());
        assert_ne!(body, good);
        std::fs::write(&cfg, body).unwrap();
        check(&cfg)
    };
    let (code, out) = with_ca(other.path("ca.pem"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("does not chain to tls.ca"), "{out}");
    let (code, out) = with_ca(ours.path("dc1.pem"));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("not a CA certificate"), "{out}");
}

#[test]
fn certs_refuses_a_name_that_cannot_be_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["certs", "--out"]).arg(dir.path()).arg("Not_A_Name").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a DNS name"));
}

/// `certs` adds clusters with the CA already in DIR (the clusters it
/// signed before stay valid), makes a new one only with `--force`, and
/// refuses half a CA.
#[test]
fn certs_adds_clusters_with_the_existing_ca_and_replaces_it_only_with_force() {
    use wandist::config::{PathAt, TlsFiles};
    let dir = tempfile::tempdir().unwrap();
    let certs = |args: &[&str]| Command::new(BIN).args(["certs", "--out"]).arg(dir.path()).args(args).output().unwrap();
    assert!(certs(&["dc1"]).status.success());
    let ca = || std::fs::read(dir.path().join("ca.pem")).unwrap();
    let first = ca();
    let out = certs(&["dc2"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept the CA in"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(ca(), first, "the CA was replaced");
    // dc2's new certificate chains to the CA dc1 trusts.
    let at = |f: &str| PathAt { path: dir.path().join(f), line: None };
    let dc1 = wandist::tls::Tls::load(
        &TlsFiles::new(at("dc1.pem"), at("dc1.key"), at("ca.pem")),
        Some("dc1"),
        Path::new("t"),
    )
    .unwrap();
    let pem = std::fs::read(dir.path().join("dc2.pem")).unwrap();
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).map(Result::unwrap).collect();
    assert_eq!(dc1.verify_peer(&chain, "dc2"), Ok(()));
    // --force: a new CA.
    assert!(certs(&["--force", "dc3"]).status.success());
    assert_ne!(ca(), first);
    // Half a CA is refused.
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let out = certs(&["dc4"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds only half of a CA"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_demo_runs_end_to_end_and_stops_what_it_started() {
    let out = Command::new(BIN).args(["demo", "--messages", "3000"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in
        ["1. dc2's `echo` appears", "{echo,hello,", "{stats,3000,0,0}", "failovers on gw-dc1: 1", "/metrics", "demo OK"]
    {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn the_demo_says_how_to_install_erlang_when_erl_is_missing() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).arg("demo").env("PATH", empty.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install -y erlang-nox"), "{err}");
}

/// Every file in tests/configs/invalid is rejected by `check` (exit 64) with
/// the message its `# expect: [LINE: ]text` header names, at that line.
#[test]
fn every_config_in_the_invalid_folder_is_rejected_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    wandist::certs::generate(&dir.path().join("certs"), &["dc1".into(), "dc2".into()]).unwrap();
    wandist::certs::generate_valid_for(&dir.path().join("certs-expired"), &["dc1".into()], -1).unwrap();
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "only {} invalid configs", files.len());
    let mut wrong = Vec::new();
    for src in files {
        let name = src.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&src).unwrap();
        let expects: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{name} has no '# expect:' line");
        let path = dir.path().join(&name);
        std::fs::write(&path, &text).unwrap();
        let (code, out) = check(&path);
        if code != 64 {
            wrong.push(format!("{name}: exit {code}, output:\n{out}"));
        }
        for e in expects {
            let (line, msg) = match e.split_once(": ") {
                Some((l, m)) if l.parse::<u32>().is_ok() => (Some(l), m),
                _ => (None, e),
            };
            let at = line.map(|l| format!("{name}:{l}: ")).unwrap_or_else(|| name.clone());
            if !out.lines().any(|l| l.contains(&at) && l.contains(msg)) {
                wrong.push(format!("{name}: expected {msg:?} at {at:?}, got:\n{out}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `certs --days` sets the validity; the gateway exports its certificate's
/// expiry as a metric and warns at start when it is near.
#[test]
fn a_certificate_near_expiry_is_logged_and_its_expiry_is_a_metric() {
    let certs = Certs { dir: tempfile::tempdir().unwrap() };
    let out = Command::new(BIN)
        .args(["certs", "--days", "10", "--out"])
        .arg(certs.dir.path())
        .args(["dc1", "dc2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dc1 = Gateway::start("dc1", &accepting("dc1", &certs, "dc2"));
    let line = dc1.wait_log("certificate expires soon", SOON);
    assert!(line.contains("days_left=9") || line.contains("days_left=10"), "{line}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    let expiry = dc1.metric("wandist_certificate_expiry_seconds", &[]).unwrap();
    let days = (expiry - now) / 86_400.0;
    assert!((9.0..=10.0).contains(&days), "expires in {days} days");
    // The default validity does not warn.
    let fresh = Certs::new(&["dc1", "dc2"]);
    let dc1b = Gateway::start("dc1b", &accepting("dc1", &fresh, "dc2"));
    assert!(dc1b.find_log("expires soon").is_none());
    let days = (dc1b.metric("wandist_certificate_expiry_seconds", &[]).unwrap() - now) / 86_400.0;
    assert!((824.0..=825.0).contains(&days), "expires in {days} days");
    // Out of range.
    let out =
        Command::new(BIN).args(["certs", "--days", "0", "--out"]).arg(certs.dir.path()).arg("dc1").output().unwrap();
    assert!(!out.status.success());
}

/// `WANDIST_LOG_FORMAT=json` (or `--log-format json`): every log line is
/// one JSON object with the text line's fields at the top level.
#[test]
fn json_logs_are_one_object_per_line_with_the_fields_of_the_text_lines() {
    let certs = Certs::new(&["dc1"]);
    let body = format!("{}{}", gateway_table("dc1", true), certs.tls_table("dc1"));
    let gw = Gateway::start_with_env("gw-json", &body, &[("WANDIST_LOG_FORMAT", "json".to_string())]);
    let lines = gw.logs();
    assert!(lines.len() >= 3, "{lines:?}");
    let mut listening = None;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "message", "target"] {
            assert!(v.get(key).is_some(), "no {key}: {line}");
        }
        if v["message"] == "listening for peer gateways" {
            listening = Some(v);
        }
    }
    let listening = listening.expect("the listening line");
    assert_eq!(listening["level"], "INFO");
    let addr: std::net::SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr, gw.peer_addr());
}

/// `certs --owner UID:GID` gives the files a gateway reads (not the CA's
/// key) to the container image's user, keys still 0600.
#[test]
fn certs_gives_the_gateway_files_to_an_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["certs", "--owner", "10001:10001", "--out"])
        .arg(dir.path())
        .arg("dc1")
        .output()
        .unwrap();
    if unsafe { libc::geteuid() } != 0 {
        // Only root may give files away: said, exit 1.
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot give"));
        return;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap();
    for f in ["dc1.key", "dc1.pem", "ca.pem"] {
        assert_eq!((meta(f).uid(), meta(f).gid()), (10001, 10001), "{f}");
    }
    assert_eq!(meta("dc1.key").permissions().mode() & 0o777, 0o600);
    assert_eq!(meta("ca.key").uid(), 0, "the CA key stays with its maker");
    let bad =
        Command::new(BIN).args(["certs", "--owner", "nobody", "--out"]).arg(dir.path()).arg("dc2").output().unwrap();
    assert_eq!(bad.status.code(), Some(64));
}
