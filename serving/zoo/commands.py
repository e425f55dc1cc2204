"""``robustserve zoo list | show | export | serve | verify | add``.

A zoo entry ``zoo/<name>/`` holds ``model.pt`` (the state_dict alone, loadable with
``torch.load(weights_only=True)``), ``model.json`` (spec, builder options, training config and metrics as plain
data: the weights-only checkpoint form of :mod:`training.checkpoint`), ``evaluation.json`` (the evaluation
report behind the card), ``card.json`` + ``card.md`` and the card's plots. Everything that uses an entry checks
the weights' SHA-256 against the card first.

``add`` is the only writer: it evaluates a trained run folder with the benchmark suites' attacks
(configs/classifiers/bench-full.yaml, configs/embedders/bench-full.yaml) and writes the whole entry, built in a
temporary folder that replaces ``zoo/<name>`` only once complete. ``export`` and ``serve`` run the ordinary
``robustserve export`` / ``archive`` / ``serve`` code on an entry; ``verify`` reruns a card's protocol.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from serving.runtime.artifacts import sha256_file
from serving.runtime.evaluation.classification import AttackSpec
from serving.runtime.spec import Frozen
from serving.serve import ServeConfig
from serving.zoo.card import (
    CARD_FORMAT,
    CARD_JSON,
    CARD_MD,
    WORST,
    classifier_record,
    embedder_record,
    outside_ci,
    render_markdown,
    unchecked,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
REPO_ZOO = REPO / "zoo"  # the repository's own zoo (commands default to ./zoo, relative to where they run)
WEIGHTS = "model.pt"
SPEC = "model.json"
EVALUATION = "evaluation.json"
FULL_EVALUATION = "evaluation-full.json"
CURVE_PNG = "robustness_curve.png"
ERS_PNG = "ers_terms.png"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
BENCH_CONFIGS = {"classification": REPO / "configs" / "classifiers" / "bench-full.yaml",
                 "embedding": REPO / "configs" / "embedders" / "bench-full.yaml"}

# The default verification: cheap enough to run in the test suite, stated on the card.
VERIFY_ATTACKS = (AttackSpec(name="fgsm", steps=1), AttackSpec(name="pgd", steps=20),
                  AttackSpec(name="apgd-ce", steps=25))


class ZooConfig(Frozen):
    zoo_dir: str = "zoo"


class ZooListConfig(ZooConfig):
    pass


class ZooShowConfig(ZooConfig):
    name: str = ""


class ZooExportConfig(ZooConfig):
    name: str = ""
    out_dir: Optional[str] = None  # None: runs/zoo/<name>/export
    num_threads: Optional[int] = Field(None, ge=1)


class ZooServeConfig(ZooConfig):
    names: tuple[str, ...] = ()
    exports_dir: str = "runs/zoo"  # each model's export goes to <exports_dir>/<name>/export
    serve: ServeConfig = ServeConfig()  # archives go to serve.model_store; serve.models gets the names added
    num_threads: Optional[int] = Field(None, ge=1)


class ZooVerifyConfig(ZooConfig):
    name: str = ""
    full: bool = False  # the card's headline protocol on the whole test set, instead of its verification protocol
    # With full: write the whole-test-set figures into the entry (card.json "full_test", card.md,
    # evaluation-full.json); the weights and the headline record stay as they are.
    record: bool = False
    out_dir: Optional[str] = None  # the rerun's evaluation.json; None: runs/zoo/<name>/verify
    batch_size: int = Field(256, ge=1)
    device: str = "auto"
    num_threads: Optional[int] = Field(None, ge=1)


class ZooAddConfig(ZooConfig):
    run_dir: str = ""  # a training run folder: model.pt, config.yaml, metrics.jsonl
    name: str = ""
    overwrite: bool = False
    # Headline evaluation: the benchmark suite's attacks, eps and curve, on the first `subset` test points of a
    # permutation seeded `seed` (classifiers) or as many queries (embedders); None: the whole test set.
    subset: Optional[int] = Field(None, ge=1)
    curve_eps: Optional[tuple[float, ...]] = None  # classifiers' extra curve points; None: the benchmark suite's
    sanity_checks: bool = True
    # The verification protocol `zoo verify` reruns by default.
    verify_subset: int = Field(200, ge=10)
    verify_attacks: tuple[AttackSpec, ...] = VERIFY_ATTACKS
    verify_queries: int = Field(20, ge=2)  # embedders: ranking-attack queries (benign metrics use the whole test set)
    seed: int = 0
    command: Optional[str] = None  # the command that trained the run; None: `robustserve train` on its config
    summary: Optional[str] = None  # the card's one-line description; None: from method, arch and data
    budget_note: Optional[str] = None  # e.g. that this is a small-budget model, shown at the top of the card
    trained_on: str = "not recorded"  # the hardware the run trained on
    batch_size: int = Field(256, ge=1)
    device: str = "auto"
    num_threads: Optional[int] = Field(None, ge=1)


# --- entries -----------------------------------------------------------------------------------------------------


def names(zoo_dir: str | Path) -> list[str]:
    root = Path(zoo_dir)
    return sorted(p.parent.name for p in root.glob(f"*/{CARD_JSON}")) if root.is_dir() else []


def entry_dir(zoo_dir: str | Path, name: str) -> Path:
    """The folder of zoo model ``name``; FileNotFoundError naming the models there when it is not one."""
    if not name:
        raise ValueError("name a zoo model (see `robustserve zoo list`)")
    path = Path(zoo_dir) / name
    if not NAME_RE.match(name) or not (path / CARD_JSON).is_file():
        have = ", ".join(names(zoo_dir)) or "none"
        raise FileNotFoundError(f"no zoo model {name!r} in {zoo_dir} (models there: {have})")
    return path


def read_card(path: Path) -> dict:
    return json.loads((path / CARD_JSON).read_text())


def check_weights(path: Path, card: dict) -> Path:
    """The weights file after checking its SHA-256 against the card; ValueError when they differ."""
    weights = path / card["weights"]["file"]
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    got = sha256_file(weights)
    if got != card["weights"]["sha256"]:
        raise ValueError(f"{weights}: SHA-256 {got} differs from the card's {card['weights']['sha256']}")
    return weights


def load(zoo_dir: str | Path, name: str, map_location: str = "cpu"):
    """(model in eval mode, ModelSpec, card) of a zoo model, weights checked against the card first."""
    from training.checkpoint import load_model

    path = entry_dir(zoo_dir, name)
    card = read_card(path)
    model, spec, _ = load_model(check_weights(path, card), map_location=map_location)
    return model, spec, card


def headline_record(card: dict) -> dict:
    """The record a card is summed up by: the headline protocol on the whole test set where ``zoo verify --full``
    recorded it, else the headline evaluation."""
    return card.get("full_test") or card["evaluation"]


def headline(card: dict) -> str:
    rec = headline_record(card)
    f = rec["figures"]
    if card["task"] == "classification":
        return (f"clean {100 * f['clean']['value']:.1f} %, worst case {100 * f[WORST]['value']:.1f} % at eps "
                f"{rec['eps']:g} ({rec['n']} points)")
    ers = f.get("ERS", {}).get("value")
    return (f"R@1 {f['R@1']['value']:.1f}, mAP@R {f['mAP@R']['value']:.1f}, ERS "
            f"{'n/a' if ers is None else f'{ers:.1f}'} ({rec['n']} queries)")


def list_models(cfg: ZooListConfig) -> list[dict[str, Any]]:
    out = []
    for n in names(cfg.zoo_dir):
        card = read_card(Path(cfg.zoo_dir) / n)
        out.append({"name": n, "task": card["task"], "arch": card["arch"], "method": card["method"],
                    "headline": headline(card), "budget_note": card.get("budget_note")})
    return out


def show(cfg: ZooShowConfig) -> str:
    return (entry_dir(cfg.zoo_dir, cfg.name) / CARD_MD).read_text()


# --- export and serve --------------------------------------------------------------------------------------------


def export(cfg: ZooExportConfig) -> Path:
    """``robustserve export`` of a zoo model, parity-checked, with its card's evaluation in spec.json."""
    from serving.export import ExportConfig, export as export_checkpoint

    path = entry_dir(cfg.zoo_dir, cfg.name)
    weights = check_weights(path, read_card(path))
    out = Path(cfg.out_dir) if cfg.out_dir else Path("runs/zoo") / cfg.name / "export"
    return export_checkpoint(ExportConfig(checkpoint=str(weights), out_dir=str(out), name=cfg.name,
                                          evaluation=str(path / EVALUATION), num_threads=cfg.num_threads))


def prepare_serve(cfg: ZooServeConfig) -> ServeConfig:
    """Exports (unless a current export exists) and archives each named zoo model into ``serve.model_store``;
    returns the ServeConfig that serves them beside ``serve.models``."""
    if not cfg.names:
        raise ValueError("name the zoo models to serve (see `robustserve zoo list`)")
    for name in cfg.names:
        archive_entry(cfg.zoo_dir, name, Path(cfg.exports_dir) / name / "export", cfg.serve.model_store,
                      cfg.num_threads)
    models = tuple(dict.fromkeys((*cfg.serve.models, *cfg.names))) if cfg.serve.models else cfg.names
    return cfg.serve.model_copy(update={"models": models})


def archive_entry(zoo_dir: str | Path, name: str, export_dir: Path, model_store: str | Path,
                  num_threads: Optional[int] = None) -> Path:
    """``<model_store>/<name>.mar`` of a zoo model, exported to ``export_dir`` first unless a current export of
    the same weights is there."""
    from serving.archive import ArchiveConfig, archive

    card = read_card(entry_dir(zoo_dir, name))
    if not _current_export(export_dir, card):
        export(ZooExportConfig(zoo_dir=str(zoo_dir), name=name, out_dir=str(export_dir), num_threads=num_threads))
    mar = archive(ArchiveConfig(export_dir=str(export_dir), name=name, model_store=str(model_store), overwrite=True))
    log.info("zoo model %s archived to %s", name, mar)
    return mar


def best(zoo_dir: str | Path, task: str) -> Optional[str]:
    """The zoo's best model of a task: the highest worst-case accuracy (classifiers) or ERS (embedders), ties
    to the higher clean accuracy / R@1; None when the zoo has none."""
    def key(card: dict) -> tuple[float, float]:
        f = headline_record(card)["figures"]
        if task == "classification":
            return f[WORST]["value"], f["clean"]["value"]
        return (f.get("ERS") or {}).get("value", -1.0), f["R@1"]["value"]

    cards = [read_card(Path(zoo_dir) / n) for n in names(zoo_dir)]
    cards = [c for c in cards if c["task"] == task]
    return max(cards, key=key)["name"] if cards else None


def _current_export(out: Path, card: dict) -> bool:
    spec = out / "spec.json"
    if not spec.is_file():
        return False
    try:
        exported = json.loads(spec.read_text()).get("exported", {})
    except ValueError:
        return False
    return exported.get("checkpoint_sha256") == card["weights"]["sha256"]


# --- verify ------------------------------------------------------------------------------------------------------


def _eval_config(train_cfg: dict, record: dict, checkpoint: Path, out_dir: Path, subset: Optional[int],
                 sanity: bool, curve_eps: tuple[float, ...] = (), batch_size: int = 256, device: str = "auto",
                 num_threads: Optional[int] = None):
    from training.config import DataConfig, EvaluateConfig

    data = train_cfg.get("data") or {}
    common = dict(checkpoint=str(checkpoint), out_dir=str(out_dir), subset=subset, seed=record["seed"],
                  batch_size=batch_size, device=device, num_threads=num_threads,
                  data=DataConfig(name=data.get("name", "fashion-mnist"), root=data.get("root"), augment=False,
                                  options=data.get("options") or {}))
    if record["task"] == "embedding":
        return EvaluateConfig(**common, profile=record["profile"]["name"])
    attacks = tuple(AttackSpec(**{k: v for k, v in a.items() if k != "label"}) for a in record["attacks"])
    return EvaluateConfig(**common, attacks=attacks, eps=(record["eps"],), curve_eps=curve_eps,
                          sanity_checks=sanity)


def _record(report: dict, num_classes: Optional[int]) -> dict:
    return embedder_record(report) if report.get("task") == "embedding" else classifier_record(report, num_classes)


def verify(cfg: ZooVerifyConfig) -> tuple[bool, list[str]]:
    """Reruns the card's verification protocol (``full``: its headline protocol on the whole test set) and
    compares each figure with the card's 95 % interval. Returns (passed, lines to print)."""
    from training.evaluation.run import evaluate

    if cfg.record and not cfg.full:
        raise ValueError("record: only the headline protocol on the whole test set is recorded; add --full")
    path = entry_dir(cfg.zoo_dir, cfg.name)
    card = read_card(path)
    weights = check_weights(path, card)
    spec = json.loads((path / SPEC).read_text())
    record = card["evaluation"] if cfg.full else card["verification"]
    out = Path(cfg.out_dir) if cfg.out_dir else Path("runs/zoo") / cfg.name / ("verify-full" if cfg.full else "verify")
    subset = None if cfg.full else record["subset"]
    ecfg = _eval_config(card["training"]["config"], record, weights, out, subset, sanity=False,
                        batch_size=cfg.batch_size, device=cfg.device, num_threads=cfg.num_threads)
    report = evaluate(ecfg)
    measured = _record(report, spec["spec"].get("num_classes"))
    bad = outside_ci(record, measured)
    lines = [f"{cfg.name}: {'headline protocol on the whole test set' if cfg.full else 'verification protocol'}, "
             f"{measured['n']} {'queries' if record['task'] == 'embedding' else 'points'}"]
    for key, ref in record["figures"].items():
        got = measured["figures"].get(key, {}).get("value")
        ci = ref.get("ci95")
        scale = 100 if record["task"] == "classification" else 1
        judged = "not judged (no interval)" if ci is None else (
            "ok" if not any(b.startswith(f"{key}:") for b in bad) else "OUTSIDE")
        lines.append(f"  {key:24s} measured {'-' if got is None else f'{scale * got:.2f}':>7}  card "
                     f"{scale * ref['value']:.2f}" + (f" [{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]" if ci else "")
                     + f"  {judged}")
    if unchecked(record):
        lines.append(f"  not judged (the card gives no interval): {', '.join(unchecked(record))}")
    lines.append(f"  report: {out / 'evaluation.json'}")
    if cfg.record:
        record_full_test(path, card, measured, report, bad)
        lines.append(f"  recorded in {path / CARD_JSON} (full_test), {path / CARD_MD} and {path / FULL_EVALUATION}")
    return not bad, lines


def record_full_test(path: Path, card: dict, measured: dict, report: dict, outside: list[str]) -> None:
    """Writes a whole-test-set rerun of the headline protocol into entry ``path``: card.json's ``full_test``
    (the record, whether it lies inside the headline's intervals, when and how it was measured), card.md and
    evaluation-full.json. The entry is rewritten in a copy that replaces it only once complete."""
    from serving.export import _replace_dir

    card = {**card, "full_test_file": FULL_EVALUATION,
            "full_test": {**measured, "within_headline_ci": not outside, "outside": list(outside),
                          "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          "command": f"robustserve zoo verify {card['name']} --full --set record=true"}}
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        staged = scratch / path.name
        shutil.copytree(path, staged)
        _relocate(report, staged / FULL_EVALUATION)
        (staged / CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
        (staged / CARD_MD).write_text(render_markdown(card))
        _replace_dir(staged, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- add ---------------------------------------------------------------------------------------------------------


def add(cfg: ZooAddConfig) -> Path:
    """Writes ``zoo/<name>`` from a training run folder: weights-only checkpoint, spec, evaluation with the
    benchmark suite, verification record, card.json, card.md and plots."""
    from serving.export import _chmod_like_mkdir, _replace_dir
    from training.checkpoint import load_checkpoint, save_weights_only
    from training.evaluation.run import evaluate

    run = Path(cfg.run_dir)
    missing = [f for f in ("model.pt", "config.yaml", "metrics.jsonl") if not (run / f).is_file()]
    if not cfg.run_dir or missing:
        raise FileNotFoundError(f"{run or '(no run_dir)'} is not a training run folder: missing {missing}")
    if not NAME_RE.match(cfg.name):
        raise ValueError(f"zoo name {cfg.name!r}: use lower-case letters, digits, '-', '_' or '.'")
    root = Path(cfg.zoo_dir)
    dest = root / cfg.name
    if dest.exists() and not cfg.overwrite:
        raise FileExistsError(f"{dest} exists; pass --set overwrite=true to replace it")
    ckpt = load_checkpoint(run / "model.pt")
    train_cfg = ckpt.get("config") or {}
    epochs_log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if ckpt.get("epoch") is not None and len(epochs_log) < ckpt["epoch"]:
        raise ValueError(f"{run}/metrics.jsonl holds {len(epochs_log)} epochs, the checkpoint {ckpt['epoch']}")

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.tmp-", dir=root))
    try:
        _chmod_like_mkdir(tmp)
        weights = tmp / WEIGHTS
        save_weights_only(ckpt, weights)
        weights.chmod(0o644)  # written through mkstemp (0600); the zoo is shared read-only data
        spec = ckpt["spec"]
        task = spec["task"]
        bench = _bench_protocol(task, spec)
        # Headline: the benchmark suite at its budgets.
        head_cfg = _eval_config(train_cfg, {"task": task, "seed": cfg.seed, "eps": bench.get("eps"),
                                            "attacks": bench.get("attacks", ()), "profile": bench.get("profile")},
                                weights, tmp, cfg.subset, cfg.sanity_checks,
                                bench.get("curve_eps", ()) if cfg.curve_eps is None else cfg.curve_eps,
                                cfg.batch_size, cfg.device, cfg.num_threads)
        report = evaluate(head_cfg)
        evaluation = _record(report, spec.get("num_classes"))
        if task == "embedding":
            evaluation["curve"] = report["curve"] = embedder_curve(weights, head_cfg)
            plot_embedder_curve(evaluation, tmp / CURVE_PNG, title=f"{spec['arch']} / {spec.get('method')}")
        else:
            plot_classifier_curve(report, tmp / CURVE_PNG, spec)
        _relocate(report, tmp / EVALUATION)
        # Verification: the short protocol, measured now on the same weights.
        scratch = tmp / ".verify"
        v_protocol = {"task": task, "seed": cfg.seed, "eps": bench.get("eps"), "profile": bench.get("profile"),
                      "attacks": [a.model_dump(mode="json") for a in cfg.verify_attacks]}
        v_subset = cfg.verify_queries if task == "embedding" else cfg.verify_subset
        v_report = evaluate(_eval_config(train_cfg, v_protocol, weights, scratch, v_subset, False, (),
                                         cfg.batch_size, cfg.device, cfg.num_threads))
        verification = _record(v_report, spec.get("num_classes"))
        shutil.rmtree(scratch)
        card = _card(cfg, ckpt, train_cfg, epochs_log, weights, evaluation, verification, tmp)
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
        (tmp / CARD_MD).write_text(render_markdown(card))
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("added %s to the zoo: %s", cfg.name, headline(card))
    return dest


# An embedder's robustness curve: Recall@1 of the stated queries under the embedding-shift (ES) attack at these
# fractions of its profile's eps (same steps, step scaled alike).
CURVE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def embedder_curve(weights: Path, ecfg, fractions: tuple[float, ...] = CURVE_FRACTIONS) -> list[dict[str, float]]:
    """[{eps, recall_at_1 (%)}] under ES, on the queries and gallery of the evaluation config ``ecfg``."""
    import torch

    from training.checkpoint import load_model
    from training.device import resolve_device
    from training.evaluation.embedder_report import PROFILES, attack_suite, default_profile, embed
    from training.evaluation.run import load_eval_points

    device = resolve_device(ecfg.device)
    model, spec, _ = load_model(weights, map_location=device)
    x, y, _ = load_eval_points(ecfg.model_copy(update={"subset": None}), device)  # the gallery: the test set
    queries = load_eval_points(ecfg, torch.device("cpu"))[2]  # the stated queries' positions in it
    gallery = embed(model, x)
    base = PROFILES[ecfg.profile or default_profile(spec.input_size)]
    out = []
    for f in fractions:
        profile = base.model_copy(update={"eps": base.eps * f, "step": base.step * f})
        raw = attack_suite(model, x, y, queries, profile, attacks=("ES",), seed=ecfg.seed, gallery=gallery)["raw"]
        out.append({"eps": profile.eps, "recall_at_1": raw["ES:R"]})
    return out


def plot_classifier_curve(report: dict, path: Path, spec: dict) -> None:
    """The evaluation's robustness curve with every attack named by its budget (APGD-T-100x9, not APGD-T)."""
    from serving.zoo.card import budget_label
    from training.evaluation.classifier_report import plot_curve

    labels = [budget_label(a, spec.get("num_classes")) for a in report["attacks"]]
    rows = [{**r, "attacks": dict(zip(labels, r["attacks"].values()))} for r in report["results"]]
    plot_curve({**report, "results": rows}, path, title=f"{spec['arch']} / {spec.get('method')}: "
                                                         f"{report['n']} test points")


def plot_embedder_curve(record: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0.0] + [c["eps"] for c in curve], [record["figures"]["R@1"]["value"]] + [c["recall_at_1"] for c in curve],
            marker="o", label="R@1 under the embedding-shift attack")
    ax.set_xlabel("eps (pixel units, [0, 1] images)")
    ax.set_ylabel("Recall@1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: {record['n']} queries (eps 0: benign, all queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bench_protocol(task: str, spec: dict) -> dict[str, Any]:
    """The benchmark suite's attacks, eps and curve (classifiers) or ranking-attack profile (embedders), read
    from the full-protocol bench configs so the zoo and the benchmarks measure alike."""
    from serving.configio import load_config

    if task == "embedding":
        from training.bench.robust_embedders import BenchConfig

        bench = load_config(BenchConfig, BENCH_CONFIGS[task])
        return {"profile": {"name": bench.profile}}
    from training.bench.robust_classifiers import BenchConfig

    bench = load_config(BenchConfig, BENCH_CONFIGS[task])
    threat = spec.get("threat_model") or {}
    eps = float(threat.get("eps", bench.eval_eps)) if threat.get("norm", "linf") == "linf" else bench.eval_eps
    return {"eps": eps, "attacks": [a.model_dump(mode="json") for a in bench.eval_attacks],
            "curve_eps": tuple(e for e in bench.curve_eps if e != eps)}


def _relocate(report: dict, path: Path) -> None:
    """The entry's evaluation.json names its checkpoint relative to itself, so the entry can move."""
    report = {k: v for k, v in report.items() if k not in ("table", "files")}
    report["checkpoint"] = WEIGHTS
    report["config"] = {**report.get("config", {}), "checkpoint": WEIGHTS, "out_dir": None}
    path.write_text(json.dumps(report, indent=2))


def _card(cfg: ZooAddConfig, ckpt: dict, train_cfg: dict, epochs_log: list[dict], weights: Path,
          evaluation: dict, verification: dict, folder: Path) -> dict:
    from training.models import build_model

    spec = ckpt["spec"]
    model, _ = build_model(spec["arch"], **ckpt.get("arch_options", {}))
    data = train_cfg.get("data") or {}
    n_train = data.get("train_subset")
    epochs = len(epochs_log)
    seconds = sum(float(e.get("seconds", 0.0)) for e in epochs_log)
    method = train_cfg.get("method") or {}
    per_epoch = train_cfg.get("max_steps_per_epoch")
    data_desc = (f"{data.get('name')} train split, {'all images' if n_train is None else f'{n_train} images'}"
                 f"{', augmented' if data.get('augment') else ''}; batch {train_cfg.get('batch_size')}"
                 + (f", {per_epoch} steps per epoch" if per_epoch else ", full epochs"))
    plots = {"robustness_curve": CURVE_PNG if (folder / CURVE_PNG).is_file() else None,
             "ers_terms": ERS_PNG if (folder / ERS_PNG).is_file() else None}
    return {
        "format": CARD_FORMAT,
        "name": cfg.name,
        "summary": cfg.summary or f"{spec['arch']} trained with {spec.get('method')} on {data.get('name')}.",
        "budget_note": cfg.budget_note,
        "task": spec["task"],
        "arch": spec["arch"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "method": spec.get("method"),
        "method_options": method.get("options") or {},
        "threat_model": spec.get("threat_model"),
        "data": {"name": data.get("name"), "train_subset": n_train, "augment": data.get("augment"),
                 "description": data_desc},
        "training": {
            "command": cfg.command or "robustserve train --config config.yaml  # config.yaml: the config below",
            "config": train_cfg,
            "seed": train_cfg.get("seed"),
            "epochs": epochs,
            "steps": epochs * per_epoch if per_epoch else None,
            "seconds": round(seconds, 1),
            "hardware": cfg.trained_on,
            "last_epoch": epochs_log[-1] if epochs_log else None,
        },
        "weights": {"file": WEIGHTS, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
        "spec_file": SPEC,
        "evaluation_file": EVALUATION,
        "evaluation": evaluation,
        "verification": verification,
        "plots": {k: v for k, v in plots.items() if v},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "created_by": f"robustserve zoo add {cfg.run_dir} --name {cfg.name}",
    }
