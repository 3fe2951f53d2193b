//! Test harness: the real `wandist` binary on loopback, port 0 everywhere,
//! readiness read from its log lines and metrics — never fixed ports or sleeps.
#![allow(dead_code)]

pub mod erl;
pub mod forward;
pub mod inproc;
pub mod raw;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_wandist");

/// Generous bound for anything that should happen "soon" on a loaded CI box.
pub const SOON: Duration = Duration::from_secs(20);

/// Timing knobs that make tests quick without being flaky.
pub const FAST: &str = "heartbeat_ms = 100\ndead_after_ms = 1500\nreconnect_min_ms = 50\nreconnect_max_ms = 400\nconnect_timeout_ms = 1000\nshutdown_grace_ms = 3000\n";

/// A config: `cluster` listening on port 0, accepting a route from `peer`.
pub fn accepting(cluster: &str, certs: &Certs, peer: &str) -> String {
    format!("{}{}[[route]]\ncluster = \"{peer}\"\n", gateway_table(cluster, true), certs.tls_table(cluster))
}

/// A config: `cluster` (not listening) dialing `peer` at `addr`.
pub fn dialing(cluster: &str, certs: &Certs, peer: &str, addr: impl std::fmt::Display) -> String {
    format!(
        "{}{}[[route]]\ncluster = \"{peer}\"\nendpoints = [\"{addr}\"]\n",
        gateway_table(cluster, false),
        certs.tls_table(cluster)
    )
}

/// A `[gateway]` table with the FAST knobs; `listen` on port 0 if asked.
pub fn gateway_table(cluster: &str, listen: bool) -> String {
    gateway_table_with(cluster, listen, "handshake_timeout_ms = 1000\n")
}

pub fn gateway_table_with(cluster: &str, listen: bool, extra: &str) -> String {
    let listen = if listen { "listen = \"127.0.0.1:0\"\n" } else { "" };
    format!("[gateway]\ncluster = \"{cluster}\"\nname = \"gw-{cluster}\"\n{listen}{FAST}{extra}\n")
}

/// User + system CPU seconds of a process, from /proc (benches).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`), 0 if absent.
pub fn proc_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0.0)
}

/// "2 × CPU model" of this machine (benches' reports).
pub fn cpus() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} × {cpu}")
}

/// The time now, UTC, as benches' reports date their runs.
pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Appends a bench run to `benches/results/{name}.md` (the table) and
/// `{name}.jsonl` (one JSON object); returns the Markdown file's path.
pub fn append_results(name: &str, markdown: &str, json: &serde_json::Value) -> PathBuf {
    let results: PathBuf = [env!("CARGO_MANIFEST_DIR"), "benches", "results"].iter().collect();
    let open = |ext: &str| {
        std::fs::OpenOptions::new().create(true).append(true).open(results.join(format!("{name}.{ext}"))).unwrap()
    };
    open("md").write_all(markdown.as_bytes()).unwrap();
    writeln!(open("jsonl"), "{json}").unwrap();
    results.join(format!("{name}.md"))
}

/// Polls `f` until it returns Some, or panics after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A folder with a development CA and certificates, made by `wandist certs`.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn new(clusters: &[&str]) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN).arg("certs").arg("--out").arg(dir.path()).args(clusters).output().unwrap();
        assert!(out.status.success(), "wandist certs failed: {}", String::from_utf8_lossy(&out.stderr));
        Certs { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A `[tls]` table for `cluster`'s certificate, trusting this CA.
    pub fn tls_table(&self, cluster: &str) -> String {
        self.tls_table_with(cluster, &self.path("ca.pem"))
    }

    pub fn tls_table_with(&self, cluster: &str, ca: &Path) -> String {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            self.path(&format!("{cluster}.pem")),
            self.path(&format!("{cluster}.key")),
            ca
        )
    }
}

/// One running `wandist run` process.
pub struct Gateway {
    pub name: String,
    child: Child,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    pub dir: tempfile::TempDir,
    pub peer_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
}

impl Gateway {
    /// Starts a gateway with `body` as its config, plus a metrics table on
    /// port 0. Returns once it has logged "gateway started".
    pub fn start(name: &str, body: &str) -> Gateway {
        Self::start_with_env(name, body, &[])
    }

    /// As `start`, with extra environment variables (e.g. ERL_EPMD_PORT).
    pub fn start_with_env(name: &str, body: &str, env: &[(&str, String)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, format!("{body}\n[metrics]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .env("WANDIST_LOG", "info,wandist=debug")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("WANDIST_TEST_LOG").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                let (lines, cv) = &*sink;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
            let (lines, cv) = &*sink;
            lines.lock().unwrap().push("<<stderr closed>>".into());
            cv.notify_all();
        });
        let mut gw = Gateway {
            name: name.to_string(),
            child,
            log,
            dir,
            peer_addr: None,
            metrics_addr: "0.0.0.0:0".parse().unwrap(),
        };
        gw.wait_log("gateway started", SOON);
        gw.metrics_addr = addr_in(&gw.wait_log("serving metrics", SOON));
        gw.peer_addr = gw.find_log("listening for peer gateways").map(|l| addr_in(&l));
        gw
    }

    /// Its configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// Replaces its configuration file with `body` (and the same metrics
    /// table `start` adds); the process sees it at its next reload.
    pub fn rewrite(&self, body: &str) {
        std::fs::write(self.config_path(), format!("{body}\n[metrics]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr.expect("this gateway has no listener")
    }

    pub fn logs(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    pub fn find_log(&self, needle: &str) -> Option<String> {
        self.log.0.lock().unwrap().iter().find(|l| l.contains(needle)).cloned()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let (lines, cv) = &*self.log;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline || guard.last().is_some_and(|l| l == "<<stderr closed>>") {
                panic!("{}: no log line with {needle:?} within {within:?}; log:\n{}", self.name, guard.join("\n"));
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    pub fn metrics(&self) -> String {
        scrape(self.metrics_addr).unwrap_or_else(|e| panic!("{}: metrics scrape failed: {e}", self.name))
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    /// Its metric lines containing any of `words` (for a failure message).
    pub fn metrics_with(&self, words: &[&str]) -> String {
        self.metrics().lines().filter(|l| words.iter().any(|w| l.contains(w))).collect::<Vec<_>>().join("\n")
    }

    /// Waits until metric `name{labels}` satisfies `ok`; returns its value.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool) -> f64 {
        wait_for(&format!("{}: {name}{labels:?}", self.name), SOON, || self.metric(name, labels).filter(|v| ok(*v)))
    }

    /// Sends a signal to the process (by its pid, which we started).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `addr=IP:PORT` out of a log line.
pub fn addr_in(line: &str) -> SocketAddr {
    // (A JSON line has "addr":"IP:PORT".)
    let (at, stop): (usize, fn(char) -> bool) = match line.find("\"addr\":\"") {
        Some(at) => (at + 8, |c| c == '"'),
        None => (line.find("addr=").unwrap_or_else(|| panic!("no addr= in {line:?}")) + 5, char::is_whitespace),
    };
    let rest = &line[at..];
    let end = rest.find(stop).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"))
}

/// GET /metrics over plain HTTP/1.1.
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, body) = body.split_once("\r\n\r\n").unwrap_or(("", ""));
    assert!(head.starts_with("HTTP/1.1 200"), "metrics answered {head:?}");
    Ok(body.to_string())
}

/// The value of the first sample named `name` whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: HashMap<&str, &str> =
            l.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.trim_matches('"'))).collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            return value.parse().ok();
        }
    }
    None
}

/// The sum over all samples named `name` whose labels include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A real SOCKS5 server (Debian's microsocks), on a port it was given by the
/// kernel, read back from /proc.
pub struct Socks5Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Socks5Server {
    pub fn start(auth: Option<(&str, &str)>) -> Socks5Server {
        Self::start_on(0, auth)
    }

    /// Starts on `port` (0 = any); used to bring a proxy back where it was.
    pub fn start_on(port: u16, auth: Option<(&str, &str)>) -> Socks5Server {
        let mut cmd = Command::new("microsocks");
        cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
        if let Some((u, p)) = auth {
            cmd.args(["-u", u, "-P", p]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("microsocks is not installed (apt-get install -y microsocks); .ci/run installs it");
        let pid = child.id();
        let port = wait_for("microsocks to listen", SOON, || listening_port(pid));
        Socks5Server { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Socks5Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TCP port a process listens on, found through its socket inodes.
pub fn listening_port(pid: u32) -> Option<u16> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let target = std::fs::read_link(fd.ok()?.path()).ok()?;
        let t = target.to_string_lossy();
        if let Some(ino) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            inodes.push(ino.to_string());
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() > 9 && cols[3] == "0A" && inodes.iter().any(|i| i == cols[9]) {
            let port = cols[1].rsplit_once(':')?.1;
            return u16::from_str_radix(port, 16).ok();
        }
    }
    None
}

/// Runs `wandist check` on a file; returns (exit code, stdout).
pub fn check(config: &Path) -> (i32, String) {
    let out = Command::new(BIN).args(["check", "--config"]).arg(config).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}
