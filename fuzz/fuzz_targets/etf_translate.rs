//! Fuzz target: see `checks::etf_translate`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::etf_translate(data));
