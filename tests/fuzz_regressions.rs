//! The fuzz targets' checks (fuzz/checks.rs) on the seed corpus and on every
//! input that ever crashed a target (fuzz/regressions/TARGET/), so what the
//! fuzzer found stays fixed. The fuzzing itself: `fuzz/run`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn run(target: &str, check: fn(&[u8])) {
    let all = inputs(target);
    assert!(all.len() >= 2, "no seed corpus for {target}");
    for (name, data) in all {
        // Every prefix too: a peer can stop anywhere.
        for end in (0..=data.len()).step_by((data.len() / 64).max(1)) {
            if std::panic::catch_unwind(|| check(&data[..end])).is_err() {
                panic!("{target}: {name} (first {end} bytes) panicked");
            }
        }
    }
}

#[test]
fn frame_decoder_corpus_and_regressions() {
    run("frame_decoder", checks::frame_decoder);
}

#[test]
fn handshake_corpus_and_regressions() {
    run("handshake", checks::handshake);
}

#[test]
fn etf_translate_corpus_and_regressions() {
    run("etf_translate", checks::etf_translate);
}

#[test]
fn relay_corpus_and_regressions() {
    run("relay", checks::relay);
}
