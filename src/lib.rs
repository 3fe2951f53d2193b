//! wandist: a gateway that bridges disjoint Erlang/OTP clusters.
//!
//! Layers point one way: `app` composes `gateway` (the routes to peer
//! clusters) and `erlang` (the local cluster), which meet only in `local`
//! (the contract between them); `gateway` wires `link` (async I/O) over
//! `route`, `membership`, `wire` (no I/O) and `config`. See ARCHITECTURE.md.

pub mod app;
pub mod certs;
pub mod config;
pub mod date;
pub mod demo;
pub mod erlang;
pub mod gateway;
pub mod link;
pub mod local;
pub mod membership;
pub mod metrics;
pub mod ratelog;
pub mod route;
pub mod shard;
pub mod signal;
pub mod status;
pub mod stop;
pub mod tls;
pub mod wire;

/// Helpers for the crate's own unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// The value of the first sample named `name` whose labels include
    /// `labels`, in a Prometheus text exposition.
    pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, l) = series.split_once('{').map(|(n, l)| (n, l.trim_end_matches('}'))).unwrap_or((series, ""));
            let have: Vec<(&str, &str)> =
                l.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.trim_matches('"'))).collect();
            (n == name && labels.iter().all(|kv| have.contains(kv))).then(|| value.parse().ok())?
        })
    }
}

/// The layers point one way (ARCHITECTURE.md): no module names one it
/// must not know.
#[cfg(test)]
mod layers {
    /// (module, what it must not name).
    const FORBIDDEN: &[(&str, &[&str])] = &[
        ("app", &["demo"]),
        ("gateway", &["erlang", "app", "demo"]),
        ("erlang", &["gateway", "app", "demo"]),
        ("local", &["gateway", "erlang", "app", "demo", "link"]),
        ("link", &["gateway", "erlang", "app", "demo", "local"]),
        ("route", &["gateway", "erlang", "app", "demo", "local", "link"]),
        ("membership", &["gateway", "erlang", "app", "demo", "local", "link"]),
        ("wire", &["gateway", "erlang", "app", "demo", "local", "link", "route", "membership"]),
        ("config", &["gateway", "erlang", "app", "demo", "local", "link", "membership"]),
    ];

    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_module_names_a_layer_above_it() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut wrong = Vec::new();
        let mut seen = 0;
        for path in all {
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs");
            let Some((_, forbidden)) = FORBIDDEN.iter().find(|(m, _)| *m == top) else { continue };
            seen += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for m in *forbidden {
                    if line.contains(&format!("crate::{m}::")) || line.contains(&format!("crate::{m};")) {
                        wrong.push(format!("{}:{}: names {m}", rel.display(), n + 1));
                    }
                }
            }
        }
        assert!(seen >= FORBIDDEN.len(), "every module listed was read");
        assert!(wrong.is_empty(), "layers pointing the wrong way:\n{}", wrong.join("\n"));
    }
}
