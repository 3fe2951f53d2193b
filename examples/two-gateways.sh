#!/usr/bin/env bash
# Two wandist gateways on loopback, linked over mutual TLS: makes dev
# certificates, starts both, shows their link metrics, stops both.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
target=${CARGO_TARGET_DIR:-"$here/../target"}
case "$target" in /*) ;; *) target="$here/../$target" ;; esac
bin=${WANDIST:-"$target/release/wandist"}
if [ ! -x "$bin" ]; then
  (cd .. && cargo build --release --locked --quiet)
fi
"$bin" certs --out certs dc1 dc2 >/dev/null
"$bin" check --config dc1.toml >/dev/null
"$bin" check --config dc2.toml >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$bin" run --config dc1.toml 2>dc1.log & pids+=($!)
"$bin" run --config dc2.toml 2>dc2.log & pids+=($!)

scrape() { # port -> /metrics body, over bash's /dev/tcp (no curl needed)
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n' >&3
  cat <&3; exec 3<&-
}
for _ in $(seq 1 100); do
  if scrape 19571 2>/dev/null | grep -q 'wandist_link_up{peer="dc1",role="standby"} 1'; then break; fi
  sleep 0.1
done
echo "== dc2 (dials dc1, primary + standby) =="
scrape 19571 | grep -E '^wandist_(link_up|link_connects_total|link_rtt_seconds_count)'
echo "== dc1 (accepts) =="
scrape 19570 | grep -E '^wandist_(link_up|link_connects_total)'
echo "== logs =="
grep -h "link up" dc1.log dc2.log | sed 's/^[^ ]* *//'
echo "metrics: http://127.0.0.1:19570/metrics and http://127.0.0.1:19571/metrics (stopping now)"
