"""The Dockerfile and the KServe layout cannot be run here (no Docker engine, no cluster): check their essentials
by parsing them."""
import json
import re
import shlex
from pathlib import Path

import yaml

from serving.serve import ServeConfig, is_loopback

ROOT = Path(__file__).resolve().parents[3]


def dockerfile_instructions():
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_essentials():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    args = {r.split("=")[0] for w, r in ins if w == "ARG"}
    assert {"BASE_IMAGE", "CUDA"} <= args
    assert ins[words.index("FROM")][1] == "${BASE_IMAGE}"
    run = " ".join(r for w, r in ins if w == "RUN")
    assert "torch==2.13.0" in run and "download.pytorch.org/whl/cpu" in run  # CPU by default
    assert 'if [ "$CUDA" = "1" ]' in run and "onnxruntime-gpu" in run
    assert "torchserve==0.12.0" in run and "openjdk-17-jre-headless" in run
    copies = [r for w, r in ins if w == "COPY"]
    assert not any(c.startswith(". ") or "training" in c or "tests" in c for c in copies)
    assert any("handlers/" in c for c in copies) and any("serving/runtime/" in c for c in copies)
    users = [r for w, r in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")
    assert "HEALTHCHECK" in words and "CMD" in ins[words.index("HEALTHCHECK")][1]
    assert any("/models" in r for w, r in ins if w == "VOLUME")
    exposed = " ".join(r for w, r in ins if w == "EXPOSE").split()
    assert "8080" in exposed and "8081" not in exposed  # management stays inside the container


# Top-level module -> the pip package that provides it, for the modules the image's code imports.
PACKAGE_OF = {"PIL": "pillow", "yaml": "pyyaml", "faiss": "faiss-cpu", "prometheus_client": "prometheus-client",
              "ts": "torchserve", "onnxruntime": "$ORT"}


def test_every_third_party_module_the_image_runs_is_installed_by_it():
    """Each module imported anywhere (module level or inside a function) by the code the image copies comes from a
    package its pip line installs: a missing one would fail only when a request reaches that path."""
    import ast
    import sys

    ins = dockerfile_instructions()
    copied = [tok for w, r in ins if w == "COPY" and not r.startswith("--") for tok in r.split()[:-1]]
    files = []
    for c in copied:
        path = ROOT / c
        if path.is_dir():
            files += sorted(path.rglob("*.py"))
        elif path.suffix == ".py":
            files.append(path)
    assert any(f.name == "index.py" for f in files) and any(f.parent.name == "handlers" for f in files)
    modules = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {"serving", "handlers", "training", "__future__"}  # training: only the CLI's training commands
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in local}
    pip = next(r for w, r in ins if w == "RUN" and "torchserve==" in r)
    installed = set(re.findall(r"[A-Za-z0-9_$.-]+", pip))
    missing = sorted(m for m in third_party if PACKAGE_OF.get(m, m) not in installed)
    assert not missing, f"imported by the image's code, not installed by its Dockerfile: {missing}"


def test_container_serve_config_is_valid_and_safe():
    ins = dockerfile_instructions()
    run = next(r for w, r in ins if w == "RUN" and "serve.yaml" in r)
    lines = shlex.split(run.split("printf '%s\\n'", 1)[1].split(">", 1)[0])
    cfg = ServeConfig.model_validate(yaml.safe_load("\n".join(lines)))
    assert cfg.model_store == "/models" and cfg.token_auth and not cfg.model_api
    assert is_loopback(cfg.management_host)
    # The model store is mounted read-only: nothing may be written under it.
    assert not cfg.workdir.startswith("/models")


def test_dockerignore_keeps_data_and_secrets_out():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv/", "runs/", "training/", "model_store/", "**/key_file.json"} <= lines


def properties(path):
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_kserve_layout():
    base = ROOT / "deploy" / "kserve"
    assert (base / "model-store").is_dir()
    p = properties(base / "config" / "config.properties")
    assert p["model_store"] == "/mnt/models/model-store"
    for key in ("inference_address", "management_address"):
        assert p[key].startswith("http://127.0.0.1:"), key
    assert p["grpc_inference_address"] == p["grpc_management_address"] == "127.0.0.1"
    assert "service_envelope" not in p  # the handlers speak v2 themselves, batch-safely
    assert p["enable_model_api"] == "false" and p["metrics_mode"] == "prometheus"
    assert p["allowed_urls"].startswith("file:///mnt/models/model-store/")
    snap = json.loads(p["model_snapshot"])
    assert snap["modelCount"] == len(snap["models"]) == 2
    for name, versions in snap["models"].items():
        for v in versions.values():
            assert v["marName"] == f"{name}.mar" and v["batchSize"] >= 1
    isvc = yaml.safe_load((base / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["modelFormat"]["name"] == "pytorch"
    assert model["storageUri"]


def test_kserve_keeps_a_token_requirement_and_fences_metrics():
    base = ROOT / "deploy" / "kserve"
    p = properties(base / "config" / "config.properties")
    docs = {d["kind"]: d for d in yaml.safe_load_all((base / "authorization.yaml").read_text())}
    isvc = yaml.safe_load((base / "inferenceservice.yaml").read_text())
    selector = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    if p["disable_token_authorization"] == "true":
        # Without TorchServe's token check, a policy requiring an authenticated principal must cover the pod.
        authz = docs["AuthorizationPolicy"]
        assert authz["spec"]["selector"]["matchLabels"] == selector and authz["spec"]["action"] == "ALLOW"
        serving_rules = [r for r in authz["spec"]["rules"] if "8080" in r["to"][0]["operation"]["ports"]]
        assert serving_rules and all(r["from"][0]["source"]["requestPrincipals"] for r in serving_rules)
        assert docs["RequestAuthentication"]["spec"]["selector"]["matchLabels"] == selector
    metrics_port = int(p["metrics_address"].rsplit(":", 1)[1])
    if not p["metrics_address"].startswith("http://127.0.0.1:"):
        netpol = docs["NetworkPolicy"]["spec"]
        assert netpol["podSelector"]["matchLabels"] == selector and netpol["policyTypes"] == ["Ingress"]
        for rule in netpol["ingress"]:
            if metrics_port in [q["port"] for q in rule["ports"]]:
                assert rule.get("from"), "the metrics port is open to every source"
    assert p["decode_input_request"] == "false"  # the handler parses JSON itself, with its limits


def test_kserve_declares_the_probe_metrics_and_wires_the_probe_key():
    from serving.serve import metrics_yaml

    base = ROOT / "deploy" / "kserve"
    p = properties(base / "config" / "config.properties")
    assert p["metrics_config"] == "/mnt/models/config/metrics.yaml"
    # The shipped file is what the server writes for itself, so the two never drift apart.
    assert yaml.safe_load((base / "config" / "metrics.yaml").read_text()) == yaml.safe_load(metrics_yaml())
    isvc = yaml.safe_load((base / "inferenceservice.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in model["env"]}
    mounts = {m["name"]: m["mountPath"] for m in model["volumeMounts"]}
    volumes = {v["name"]: v for v in isvc["spec"]["predictor"]["volumes"]}
    assert env["ROBUSTSERVE_PROBE_KEY_FILE"].startswith(mounts["probe-key"] + "/")
    assert env["ROBUSTSERVE_PROBE_DIR"] == mounts["probe-state"]
    assert volumes["probe-key"]["secret"]["secretName"] and "emptyDir" in volumes["probe-state"]


def test_the_image_carries_what_probes_and_the_monitor_import():
    run = " ".join(r for w, r in dockerfile_instructions() if w == "RUN")
    assert "tqdm" in run and "prometheus-client" in run
    copies = " ".join(r for w, r in dockerfile_instructions() if w == "COPY")
    for module in ("cli.py", "probe.py", "monitor.py", "gate.py"):
        assert f"serving/{module}" in copies


def test_the_image_runs_robustserve_commands_that_parse():
    """ENTRYPOINT and HEALTHCHECK are `robustserve` subcommands (serve --foreground, health) whose config file is
    the one the image writes; the monitoring sidecar's documented command parses too."""
    from serving.cli import build_parser
    from serving.configio import load_config
    from serving.monitor import MonitorConfig

    ins = dockerfile_instructions()
    entry = json.loads(next(r for w, r in ins if w == "ENTRYPOINT"))
    health = json.loads(next(r for w, r in ins if w == "HEALTHCHECK").split("CMD", 1)[1])
    for argv, command in ((entry, "serve"), (health, "health")):
        assert argv[:3] == ["python3", "-m", "serving.cli"], argv
        args = build_parser().parse_args(argv[3:])
        assert args.command == command and args.config == "/etc/robustserve/serve.yaml"
    assert build_parser().parse_args(entry[3:]).foreground
    readme = (ROOT / "deploy" / "monitoring" / "README.md").read_text()
    sidecar = json.loads(re.search(r'command: (\["python3", "-m", "serving.cli", "monitor".*?\])', readme,
                                    re.S).group(1))
    args = build_parser().parse_args(sidecar[3:])
    assert load_config(MonitorConfig, None, args.overrides).workdir == "/srv/robustserve"
