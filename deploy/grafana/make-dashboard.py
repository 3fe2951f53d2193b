#!/usr/bin/env python3
"""Writes wandist.json, the Grafana dashboard, from the panel list below
(the JSON is generated: edit this file, then run it)."""
import json
import os

PANELS = [
    # (title, unit, [(expr, legend)], kind)
    ("Routes up (1) / standing by", "none", [("wandist_route_up", "{{instance}} → {{peer}}"), ("wandist_route_standby", "{{instance}} → {{peer}} standby")], "timeseries"),
    ("Links up by role", "none", [("wandist_link_up", "{{instance}} → {{peer}} {{role}}")], "timeseries"),
    ("Link RTT p50 / p99", "s", [
        ("histogram_quantile(0.5, sum by (le, instance, peer) (rate(wandist_link_rtt_seconds_bucket[5m])))", "p50 {{instance}} → {{peer}}"),
        ("histogram_quantile(0.99, sum by (le, instance, peer) (rate(wandist_link_rtt_seconds_bucket[5m])))", "p99 {{instance}} → {{peer}}"),
    ], "timeseries"),
    ("Messages out / delivered / in", "ops", [
        ("sum by (instance, peer) (rate(wandist_messages_sent_total[1m]))", "sent {{instance}} → {{peer}}"),
        ("sum by (instance, peer) (rate(wandist_messages_delivered_total[1m]))", "delivered {{instance}} → {{peer}}"),
        ("sum by (instance, peer) (rate(wandist_messages_received_total[1m]))", "received {{instance}} ← {{peer}}"),
    ], "timeseries"),
    ("Failures by reason", "ops", [("sum by (instance, peer, reason) (rate(wandist_messages_failed_total[5m]))", "{{instance}} → {{peer}} {{reason}}")], "timeseries"),
    ("Window use", "percentunit", [("wandist_unacked_messages / on (instance, peer) wandist_window_messages", "{{instance}} → {{peer}}")], "timeseries"),
    ("Members exported / imported", "none", [("wandist_members", "{{instance}} {{peer}} {{direction}}")], "timeseries"),
    ("Erlang nodes up", "none", [("wandist_erlang_node_up", "{{instance}} {{node}}"), ("wandist_erlang_nodes_connected", "{{instance}} connected")], "timeseries"),
    ("Handshake failures by reason", "ops", [("sum by (instance, peer, reason) (rate(wandist_handshake_failures_total[5m]))", "{{instance}} {{peer}} {{reason}}")], "timeseries"),
    ("Refused at the trust boundary", "ops", [("sum by (instance, peer, reason) (rate(wandist_erlang_rejected_total[5m]))", "{{instance}} {{peer}} {{reason}}")], "timeseries"),
    ("Bytes out / in", "Bps", [
        ("sum by (instance, peer) (rate(wandist_bytes_sent_total[1m]))", "out {{instance}} → {{peer}}"),
        ("sum by (instance, peer) (rate(wandist_bytes_received_total[1m]))", "in {{instance}} ← {{peer}}"),
    ], "timeseries"),
    ("Compression ratio (raw / packed)", "none", [
        ("sum by (instance, peer, codec) (rate(wandist_compression_bytes_total{stage=\"raw\"}[5m])) / sum by (instance, peer, codec) (rate(wandist_compression_bytes_total{stage=\"packed\"}[5m]))", "{{instance}} → {{peer}} {{codec}}"),
    ], "timeseries"),
    ("Certificate days left", "d", [("(wandist_certificate_expiry_seconds - time()) / 86400", "{{instance}}")], "stat"),
]


def panel(i, title, unit, targets, kind):
    return {
        "id": i + 1,
        "title": title,
        "type": kind,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [
            {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for j, (expr, legend) in enumerate(targets)
        ],
    }


dashboard = {
    "title": "wandist",
    "uid": "wandist",
    "tags": ["wandist", "erlang"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {
        "list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        ]
    },
    "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
}

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "wandist.json"), "w") as f:
    json.dump(dashboard, f, indent=2, ensure_ascii=False)
    f.write("\n")
