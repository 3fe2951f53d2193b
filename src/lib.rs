//! wandist: a gateway that bridges disjoint Erlang/OTP clusters.
//!
//! Layers point one way: `gateway` wires `link` (async I/O) over `wire`
//! (frames, no I/O) and `config`; see ARCHITECTURE.md.

pub mod certs;
pub mod config;
pub mod date;
pub mod demo;
pub mod erlang;
pub mod gateway;
pub mod link;
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
