"""The Grafana dashboard and the Prometheus rules under deploy/monitoring cannot be loaded into a Grafana or a
Prometheus here: check that they parse, that every query names metrics and labels the monitor and TorchServe
really export, and, where promtool is installed, that the rules load and fire as intended."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy" / "monitoring"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-rules.yaml"

# The contract with `robustserve monitor` and the handlers: metric -> its own labels.
MONITOR_METRICS = {
    "robustserve_monitor_robust_accuracy_ratio": {"model", "attack", "eps"},
    "robustserve_monitor_transfer_robust_accuracy_ratio": {"model", "attack", "eps"},
    "robustserve_monitor_clean_accuracy_ratio": {"model"},
    "robustserve_monitor_robust_accuracy_floor_ratio": {"model"},
    "robustserve_monitor_slo_ok": {"model"},
    "robustserve_monitor_alert": {"model"},
    "robustserve_monitor_recall_at_1_ratio": {"model", "condition"},
    "robustserve_monitor_ers_lite": {"model"},
    "robustserve_monitor_embedding_shift": {"model"},
    "robustserve_monitor_gradient_masking_flag": {"model", "check"},
    "robustserve_monitor_probe_duration_seconds": {"model"},
    "robustserve_monitor_last_success_timestamp_seconds": {"model"},
    "robustserve_monitor_probe_interval_seconds": {"model"},
    "robustserve_monitor_probes_total": {"model", "status"},
    "robustserve_monitor_ready": set(),
    "robustserve_monitor_server_up": set(),
    "robustserve_monitor_stale": {"model"},
    "robustserve_monitor_max_age_seconds": set(),
}
_TS = {"ModelName", "Level"}
_G = _TS | {"config"}  # TorchServe cannot drop a series: its probe gauges carry the probe's configuration
TORCHSERVE_METRICS = {
    "robustserve_probe_clean_accuracy_ratio": _G,
    "robustserve_probe_robust_accuracy_ratio": _G | {"attack", "eps"},
    "robustserve_probe_transfer_robust_accuracy_ratio": _G | {"attack", "eps"},
    "robustserve_probe_recall_at_1_ratio": _G | {"condition"},
    "robustserve_probe_ers_lite": _G,
    "robustserve_probe_duration_seconds": _G,
    "robustserve_probe_last_success_timestamp_seconds": _G,
    "robustserve_probe_runs_total": _TS | {"status"},
    "robustserve_probe_embedding_shift": _G,
    "robustserve_probe_gradient_masking_flag": _G | {"check"},
}
METRICS = {**MONITOR_METRICS, **TORCHSERVE_METRICS, "up": set()}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")

REQUIRED_ALERTS = {"RobustAccuracyBelowFloor", "RobustnessProbeFailing", "RobustnessProbeStale",
                   "RobustnessMonitorDown", "GradientMaskingSuspected", "TransferGap", "RobustnessFiguresStale"}


def metric_names(expr: str) -> set[str]:
    """Every metric an expression reads: identifiers left once strings, matchers, ranges, grouping label lists and
    function calls are taken out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = GROUPING.sub(" ", s)
    s = re.sub(r"\boffset\s+\w+", " ", s)
    s = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", s)  # functions and aggregations
    s = re.sub(r"\$\w+", " ", s)
    names = set(re.findall(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", s))
    return names - PROMQL_WORDS


def labels_available(expr: str) -> set[str]:
    return set().union(*(METRICS.get(m, set()) for m in metric_names(expr))) | TARGET_LABELS


def check_expr(expr: str) -> None:
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    assert names <= METRICS.keys(), f"unknown metrics {names - METRICS.keys()} in {expr!r}"
    # The plain scan the contract is stated in, so a name the tokenizer above misses still fails.
    assert set(re.findall(r"robustserve_[a-z0-9_]+", expr)) <= METRICS.keys()
    for metric, body in SELECTOR.findall(expr):
        if metric in METRICS:
            used = set(MATCHER.findall(body))
            assert used <= METRICS[metric] | TARGET_LABELS, f"{metric} has no label {used - METRICS[metric]}"
    for _, body in GROUPING.findall(expr):
        used = {w.strip() for w in body.split(",") if w.strip()}
        assert used <= labels_available(expr), f"grouping by missing labels {used - labels_available(expr)}"


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rules():
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row carries its panels


def query_panels(dash):
    return [p for p in all_panels(dash) if p["type"] != "row"]


def all_exprs(dash):
    return [t["expr"] for p in query_panels(dash) for t in p["targets"]]


def test_metric_extraction_finds_what_it_should():
    # The checks below are only as strong as this scanner.
    assert metric_names('sum by (model, status) (rate(robustserve_monitor_probes_total{model=~"$model"}'
                        '[$__rate_interval]))') == {"robustserve_monitor_probes_total"}
    assert metric_names("time() - foo_seconds > 3 * bar offset 5m") == {"foo_seconds", "bar"}
    assert metric_names('up{job="robustserve-monitor"} == 0') == {"up"}
    with pytest.raises(AssertionError):
        check_expr('robustserve_monitor_clean_accuracy_ratio{ModelName="x"}')
    with pytest.raises(AssertionError):
        check_expr("sum by (status) (robustserve_monitor_slo_ok)")
    with pytest.raises(AssertionError):
        check_expr("ts_inference_requests_total")


def test_dashboard_shape(dashboard):
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells = set()
    for p in all_panels(dashboard):
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= g.keys()
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        covered = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered
    assert {p["type"] for p in query_panels(dashboard)} <= {"timeseries", "stat"}


def test_dashboard_datasource_and_model_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    inputs = [i for i in dashboard.get("__inputs", []) if i.get("pluginId") == "prometheus"]
    ds = variables.get("datasource")
    assert inputs or (ds and ds["type"] == "datasource" and ds["query"] == "prometheus")
    ref = "${DS_PROMETHEUS}" if inputs else "${datasource}"
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(robustserve_monitor_robust_accuracy_ratio, model)"
    assert model["datasource"]["uid"] == ref
    for p in query_panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": ref}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == ref


def test_dashboard_queries_use_exported_metrics_and_labels(dashboard):
    for p in query_panels(dashboard):
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            check_expr(t["expr"])
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            assert legend <= labels_available(t["expr"]), f"{p['title']}: legend labels {legend}"
            # Every monitor query follows the model picker; an unfiltered one would mix models.
            unlabelled = {"robustserve_monitor_ready", "robustserve_monitor_server_up"}
            if metric_names(t["expr"]) & MONITOR_METRICS.keys() - unlabelled:
                assert 'model=~"$model"' in t["expr"], t["expr"]
            if metric_names(t["expr"]) & TORCHSERVE_METRICS.keys():
                assert 'ModelName=~"$model"' in t["expr"], t["expr"]


def test_dashboard_covers_every_figure(dashboard):
    used = set().union(*(metric_names(e) for e in all_exprs(dashboard)))
    assert MONITOR_METRICS.keys() <= used, MONITOR_METRICS.keys() - used
    assert TORCHSERVE_METRICS.keys() <= used, TORCHSERVE_METRICS.keys() - used
    by_panel = [set().union(*(metric_names(t["expr"]) for t in p["targets"])) for p in query_panels(dashboard)]
    # The comparisons that matter are drawn in one panel, not left to the reader across two.
    assert any({"robustserve_monitor_robust_accuracy_ratio", "robustserve_monitor_robust_accuracy_floor_ratio"}
               <= s for s in by_panel)
    assert any({"robustserve_monitor_robust_accuracy_ratio", "robustserve_monitor_transfer_robust_accuracy_ratio"}
               <= s for s in by_panel)
    floor_panel = next(p for p in query_panels(dashboard) if any(
        "robustserve_monitor_robust_accuracy_floor_ratio" in t["expr"] for t in p["targets"]))
    assert any('attack="worst"' in t["expr"] for t in floor_panel["targets"])  # the floor bounds the worst case
    assert any("rate(robustserve_monitor_probes_total" in e for e in all_exprs(dashboard))
    assert any("rate(robustserve_probe_runs_total" in e for e in all_exprs(dashboard))
    assert any(p["type"] == "row" and "TorchServe" in p["title"] for p in all_panels(dashboard))


def test_rules_shape(rules):
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    for r in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= r.keys(), r.get("alert")
        assert re.fullmatch(r"\d+[smh]", str(r["for"])), r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        ann = r["annotations"]
        assert ann["summary"].strip() and ann["description"].strip()
        text = ann["summary"] + ann["description"]
        assert "$value" in text, r["alert"]
        # up carries no model label: that alert names the target instead.
        assert ("$labels.instance" if r["alert"] == "RobustnessMonitorDown" else "$labels.model") in text
        # A misspelt label renders as an empty string rather than failing, so nothing else would notice.
        named = set(re.findall(r"\$labels\.(\w+)", text))
        assert named <= labels_available(r["expr"]), f"{r['alert']}: no label {named - labels_available(r['expr'])}"
        check_expr(r["expr"])


def test_rules_say_what_was_asked(rules):
    by = {r["alert"]: r for r in rules}
    expr = {k: " ".join(v["expr"].split()) for k, v in by.items()}
    assert by["RobustAccuracyBelowFloor"]["for"] == "10m"
    assert 'attack="worst"' in expr["RobustAccuracyBelowFloor"]
    assert "robustserve_monitor_robust_accuracy_floor_ratio" in expr["RobustAccuracyBelowFloor"]
    assert 'status!="ok"' in expr["RobustnessProbeFailing"] and "[30m]" in expr["RobustnessProbeFailing"]
    assert "3 * robustserve_monitor_probe_interval_seconds" in expr["RobustnessProbeStale"]
    assert expr["RobustnessMonitorDown"] == 'up{job="robustserve-monitor"} == 0'
    assert expr["GradientMaskingSuspected"].endswith("== 1")
    assert expr["TransferGap"].endswith("> 0.05")
    assert {by[a]["labels"]["severity"] for a in ("RobustAccuracyBelowFloor", "RobustnessMonitorDown")} == {
        "critical"}


def test_readme_scrape_config_matches_the_rules():
    text = (DEPLOY / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for b in blocks for j in b.get("scrape_configs", [])}
    assert jobs == {"robustserve-monitor": ["127.0.0.1:9108"], "torchserve": ["127.0.0.1:8082"]}


promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool not on PATH (Debian: apt-get install -y prometheus)")


@promtool
def test_promtool_check_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(yaml.safe_load(RULES.read_text())['groups'][0]['rules'])} rules found" in out.stdout


def _alerts(name, state, *label_sets):
    return {"expr": f'ALERTS{{alertname="{name}", alertstate="{state}"}}',
            "exp_samples": [{"labels": "ALERTS{" + ", ".join(
                f'{k}="{v}"' for k, v in sorted({"alertname": name, "alertstate": state, **ls}.items())) + "}",
                "value": 1} for ls in label_sets]}


def _none(name, when):
    return {"expr": f'ALERTS{{alertname="{name}"}}', "eval_time": when, "exp_samples": []}


@promtool
def test_promtool_rules_fire_as_intended(tmp_path):
    """Synthetic series, one minute apart, with one model that should alert and one that should not."""
    mon = "robustserve_monitor_"
    series = [
        # a: worst case 0.40 at its largest eps, under the 0.45 floor; b: above it.
        (mon + 'robust_accuracy_ratio{model="a", attack="worst", eps="0.1"}', "0.40x30"),
        (mon + 'robust_accuracy_ratio{model="a", attack="worst", eps="0.05"}', "0.60x30"),
        (mon + 'robust_accuracy_floor_ratio{model="a"}', "0.45x30"),
        (mon + 'robust_accuracy_ratio{model="b", attack="worst", eps="0.1"}', "0.50x30"),
        (mon + 'robust_accuracy_floor_ratio{model="b"}', "0.45x30"),
        # a only succeeds; b's first failure ever appears at minute 20 (a series increase() alone cannot see).
        (mon + 'probes_total{model="a", status="ok"}', "0+1x60"),
        (mon + 'probes_total{model="b", status="failed"}', "_x20 1x60"),
        # a last succeeded at t=0 with a 60 s interval; b's timestamp keeps up with the clock.
        (mon + 'last_success_timestamp_seconds{model="a"}', "0x30"),
        (mon + 'probe_interval_seconds{model="a"}', "60x30"),
        (mon + 'last_success_timestamp_seconds{model="b"}', "0+60x30"),
        (mon + 'probe_interval_seconds{model="b"}', "60x30"),
        ('up{job="robustserve-monitor", instance="127.0.0.1:9108"}', "1x5 0x25"),
        (mon + 'gradient_masking_flag{model="a", check="zero_gradients"}', "0x10 1x20"),
        (mon + 'gradient_masking_flag{model="a", check="eps_monotone"}', "0x30"),
        # On the same examples the served ONNX session is 10 points less accurate for e, within 2 points for d,
        # and 10 points more accurate for c (white-box minus transfer is negative: not this alert).
        (mon + 'robust_accuracy_ratio{model="e", attack="PGD-20", eps="0.1"}', "0.60x30"),
        (mon + 'transfer_robust_accuracy_ratio{model="e", attack="PGD-20", eps="0.1"}', "0.50x30"),
        (mon + 'robust_accuracy_ratio{model="d", attack="PGD-20", eps="0.1"}', "0.50x30"),
        (mon + 'transfer_robust_accuracy_ratio{model="d", attack="PGD-20", eps="0.1"}', "0.48x30"),
        (mon + 'robust_accuracy_ratio{model="c", attack="PGD-20", eps="0.1"}', "0.50x30"),
        (mon + 'transfer_robust_accuracy_ratio{model="c", attack="PGD-20", eps="0.1"}', "0.60x30"),
    ]
    tests = [
        {**_alerts("RobustAccuracyBelowFloor", "pending", {"model": "a", "severity": "critical"}), "eval_time": "5m"},
        {**_alerts("RobustAccuracyBelowFloor", "firing", {"model": "a", "severity": "critical"}), "eval_time": "15m"},
        _none("RobustnessProbeFailing", "10m"),
        {**_alerts("RobustnessProbeFailing", "firing", {"model": "b", "status": "failed", "severity": "warning"}),
         "eval_time": "21m"},
        _none("RobustnessProbeFailing", "55m"),  # the failure has aged out of the 30 min window
        _none("RobustnessProbeStale", "2m"),
        {**_alerts("RobustnessProbeStale", "firing", {"model": "a", "severity": "warning"}), "eval_time": "4m"},
        {**_alerts("RobustnessMonitorDown", "pending", {"job": "robustserve-monitor", "instance": "127.0.0.1:9108",
                                                        "severity": "critical"}), "eval_time": "8m"},
        {**_alerts("RobustnessMonitorDown", "firing", {"job": "robustserve-monitor", "instance": "127.0.0.1:9108",
                                                       "severity": "critical"}), "eval_time": "12m"},
        _none("GradientMaskingSuspected", "9m"),
        {**_alerts("GradientMaskingSuspected", "firing",
                   {"model": "a", "check": "zero_gradients", "severity": "warning"}), "eval_time": "12m"},
        {**_alerts("TransferGap", "firing", {"model": "e", "attack": "PGD-20", "eps": "0.1", "severity": "warning"}),
         "eval_time": "15m"},
    ]
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                       "promql_expr_test": tests}]}
    path = tmp_path / "rules_test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@promtool
def test_dashboard_shows_only_the_latest_probe_of_torchserve(dashboard, tmp_path):
    """TorchServe keeps every series it was ever given: an older probe (APGD-CE at eps 0.1) stays beside a newer
    PGD-only probe at eps 0.05. The dashboard's query keeps the series of the latest probe's config only."""
    expr = next(e for e in all_exprs(dashboard) if e.startswith("(robustserve_probe_robust_accuracy_ratio"))
    expr = expr.replace("$model", ".*")
    ts = "robustserve_probe_"
    old, new = 'ModelName="clf", Level="Model", config="aaa"', 'ModelName="clf", Level="Model", config="bbb"'
    series = [
        (ts + f'robust_accuracy_ratio{{{old}, attack="APGD-CE", eps="0.1"}}', "0.625x10"),
        (ts + f'robust_accuracy_ratio{{{old}, attack="worst", eps="0.1"}}', "0.60x10"),
        (ts + f'robust_accuracy_ratio{{{old}, attack="worst", eps="0.05"}}', "0.70x10"),
        (ts + f'last_success_timestamp_seconds{{{old}}}', "100x10"),
        (ts + f'robust_accuracy_ratio{{{new}, attack="PGD-20", eps="0.05"}}', "0.75x10"),
        (ts + f'robust_accuracy_ratio{{{new}, attack="worst", eps="0.05"}}', "0.75x10"),
        (ts + f'last_success_timestamp_seconds{{{new}}}', "200x10"),
    ]
    want = [{"labels": f'robustserve_probe_robust_accuracy_ratio{{{new}, attack="{a}", eps="0.05"}}', "value": 0.75}
            for a in ("PGD-20", "worst")]
    spec = {"evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                       "promql_expr_test": [{"expr": expr, "eval_time": "5m", "exp_samples": want}]}]}
    path = tmp_path / "dashboard_test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_contract_is_what_the_server_declares():
    from serving.serve import metrics_yaml

    doc = yaml.safe_load(metrics_yaml())
    declared = {m["name"]: set(m["dimensions"]) for ms in doc["model_metrics"].values() for m in ms
                if m["name"].startswith("robustserve_probe_")}
    assert declared == TORCHSERVE_METRICS


def test_the_contract_is_what_the_monitor_exports(tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serving.monitor import Monitor, MonitorConfig

    clf = {"status": "ok", "task": "classification", "duration_s": 2.0, "started_unix": 1.0, "results": {
        "clean_accuracy": 0.9, "flags": {k: {"flag": False} for k in ("zero_gradients", "softmax_outputs",
                                                                       "eps_monotone")},
        "robust": [{"eps": 0.1, "attacks": {"PGD-20": 0.5}, "worst_case": 0.5, "transfer": {"PGD-20": 0.5},
                    "transfer_worst_case": 0.5}]}}
    ret = {"status": "ok", "task": "embedding", "duration_s": 2.0, "started_unix": 1.0, "results": {
        "recall_at_1": 0.8, "robust": [{"eps": 0.3, "recall_at_1_attacked": 0.4, "ers_lite": 40.0,
                                        "embedding_shift": 0.5}]}}
    mon = Monitor(MonitorConfig(history=str(tmp_path / "h.jsonl")))
    mon.record("a", clf, "ok")
    mon.record("b", ret, "ok")
    exported: dict[str, set] = {}
    for fam in text_string_to_metric_families(generate_latest(mon.registry).decode()):
        for smp in fam.samples:
            if not smp.name.endswith("_created"):
                exported.setdefault(smp.name, set()).update(smp.labels)
    assert exported == MONITOR_METRICS
