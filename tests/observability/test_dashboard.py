"""examples/grafana/llm_datadist.json: valid JSON whose every query names only metrics the collector exports, on
a Prometheus data source chosen by a variable, with a panel for each subject the README promises."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List

from llm_datadist.metrics import METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "examples", "grafana", "llm_datadist.json")
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}


def _dashboard() -> Dict[str, Any]:
    with open(DASHBOARD, encoding="utf-8") as handle:
        return json.load(handle)


def _panels(panels: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _exported() -> set:
    return {name + suffix for name, (kind, _labels, _help) in METRICS.items() for suffix in SUFFIXES[kind]}


def test_every_query_names_only_exported_metrics():
    exported = _exported()
    queries = [t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", [])]
    assert queries
    used = set()
    for expr in queries:
        names = set(re.findall(r"\bllm_datadist_[a-z_]+", expr))
        assert names, expr
        assert names <= exported, f"not exported: {sorted(names - exported)} in {expr}"
        used |= names
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert set(re.findall(r"\bllm_datadist_[a-z_]+", variables["cluster_id"]["definition"])) <= exported
    # every family is on the dashboard
    for name, (kind, _labels, _help) in METRICS.items():
        if name == "llm_datadist_start_time_seconds":
            continue  # restarts show as counter resets; no panel of its own
        assert any(name + suffix in used for suffix in SUFFIXES[kind]) or name in used, name


def test_the_data_source_is_a_variable_and_every_panel_uses_it():
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["cluster_id"]["datasource"]["uid"] == "${datasource}"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'cluster_id=~"$cluster_id"' in target["expr"], target["expr"]


def test_the_promised_panels_are_there():
    exprs = " ".join(t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", []))
    assert "histogram_quantile(0.5, sum by (le, direction)" in exprs
    assert "histogram_quantile(0.99, sum by (le, direction)" in exprs
    assert "sum by (direction, transport) (rate(llm_datadist_transfer_bytes_total" in exprs
    assert "sum by (code, direction) (rate(llm_datadist_transfer_failures_total" in exprs
    ids = [p["id"] for p in _panels(_dashboard()["panels"])]
    assert len(ids) == len(set(ids))
