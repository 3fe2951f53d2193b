//! Real Erlang nodes (`erl` from erlang-nox), for the demo and the tests: a
//! private EPMD on a port the kernel chose a moment before, and nodes driven
//! through a small REPL on their stdin, so a caller can evaluate
//! expressions and read the results. Every process started here is stopped
//! (by its pid, through `Child`) when its handle is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Bound on any single wait.
pub const SOON: Duration = Duration::from_secs(20);

/// Whether `erl` can be run at all.
pub fn available() -> bool {
    Command::new("erl")
        .args(["-noshell", "-eval", "halt()."])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `epmd -port P`, P free a moment before (bind 0, read it back, release).
pub struct Epmd {
    child: Child,
    pub port: u16,
}

impl Epmd {
    pub fn start() -> std::io::Result<Epmd> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new("epmd")
            .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = std::time::Instant::now() + SOON;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other("epmd did not start"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Epmd { child, port })
    }
}

impl Drop for Epmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const REPL: &str = r#"R = fun Loop(Bs) -> case io:get_line('') of eof -> halt(0); Line -> {Id, Src} = lists:splitwith(fun(C) -> C =/= $: end, string:trim(Line)), {Out, Bs2} = try {ok, Ts, _} = erl_scan:string(tl(Src)), {ok, Es} = erl_parse:parse_exprs(Ts), {value, V, B2} = erl_eval:exprs(Es, Bs), {io_lib:format("~s=> ~w~n", [Id, V]), B2} catch C:E -> {io_lib:format("~s!! ~w:~w~n", [Id, C, E]), Bs} end, io:put_chars(Out), Loop(Bs2) end end, R(erl_eval:new_bindings())."#;

pub struct Erl {
    pub name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    next: u64,
}

impl Erl {
    /// Starts `name@127.0.0.1` with `cookie`, registered in `epmd`; panics
    /// if it does not come up (callers are tests and the demo).
    pub fn start(name: &str, cookie: &str, epmd: &Epmd) -> Erl {
        Self::start_with(name, cookie, epmd, &[])
    }

    /// As `start`, with extra `erl` arguments (e.g. `-proto_dist inet_tls`).
    pub fn start_with(name: &str, cookie: &str, epmd: &Epmd, extra: &[&str]) -> Erl {
        let node = format!("{name}@127.0.0.1");
        let mut child = Command::new("erl")
            .args([
                "-noshell",
                "-start_epmd",
                "false",
                "-name",
                &node,
                "-setcookie",
                cookie,
                "-kernel",
                "prevent_overlapping_partitions",
                "false",
            ])
            .args(extra)
            .args(["-eval", REPL])
            .env("ERL_EPMD_PORT", epmd.port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start erl");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let tag = node.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("WANDIST_TEST_LOG").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut erl = Erl { name: node, child, stdin, lines, next: 0 };
        assert_eq!(erl.eval("node()."), format!("'{}'", erl.name));
        erl
    }

    /// Evaluates expressions (ending in '.'); returns the value as `~w` prints it.
    pub fn eval(&mut self, expr: &str) -> String {
        self.eval_within(expr, SOON)
    }

    pub fn eval_within(&mut self, expr: &str, within: Duration) -> String {
        self.next += 1;
        let id = format!("q{}", self.next);
        let line = format!("{id}:{}\n", expr.replace('\n', " "));
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{}: no answer within {within:?} to {expr}", self.name));
            if let Some(v) = line.strip_prefix(&format!("{id}=> ")) {
                return v.to_string();
            }
            if let Some(e) = line.strip_prefix(&format!("{id}!! ")) {
                panic!("{}: {expr} raised {e}", self.name);
            }
        }
    }

    /// Evaluates until the result satisfies `ok` (bounded).
    pub fn eval_until(&mut self, expr: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + SOON;
        loop {
            let v = self.eval(expr);
            if ok(&v) {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "{}: {expr} stayed {v}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Erl {
    fn drop(&mut self) {
        self.kill();
    }
}
