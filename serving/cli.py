"""``robustserve``: one console command with subcommands. Each takes ``--config FILE``, repeated
``--set key=value`` overrides and ``--dry-run`` (print the resolved config and stop)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Optional, Sequence

from pydantic import BaseModel

from serving.configio import ConfigError, dump_config, load_config

log = logging.getLogger("robustserve")


def _train_root():
    from training.config import TrainConfig

    return TrainConfig


def _evaluate_root():
    from training.config import EvaluateConfig

    return EvaluateConfig


def _demo_root():
    from serving.demo import DemoConfig

    return DemoConfig


def _export_root():
    from serving.export import ExportConfig

    return ExportConfig


def _archive_root():
    from serving.archive import ArchiveConfig

    return ArchiveConfig


def _serve_root():
    from serving.serve import ServeConfig

    return ServeConfig


def _probe_root():
    from serving.probe import ProbeCommand

    return ProbeCommand


def _monitor_root():
    from serving.monitor import MonitorConfig

    return MonitorConfig


def _gate_root():
    from serving.gate import GateConfig

    return GateConfig


def _run_train(cfg) -> int:
    from training.trainer import train

    out = train(cfg)
    print(f"trained: {out / 'model.pt'}")
    return 0


def _run_evaluate(cfg) -> int:
    from training.evaluation.run import evaluate

    report = evaluate(cfg)
    print(report["table"])
    print(f"sanity flags: {json.dumps({k: v['flag'] for k, v in report.get('sanity', {}).items() if isinstance(v, dict)})}")
    print(f"report: {report['files']['report']}\nplot: {report['files']['plot']}")
    return 0


def _serving_errors(command: str):
    """Serving commands report failures of the tools they drive (archiver, server start-up) as errors, not
    tracebacks."""

    def deco(fn):
        def run(cfg) -> int:
            try:
                return fn(cfg)
            except (FileExistsError, RuntimeError, TimeoutError) as e:
                print(f"robustserve {command}: error: {e}", file=sys.stderr)
                return 1

        return run

    return deco


@_serving_errors("export")
def _run_export(cfg) -> int:
    from serving.export import export, summary

    out = export(cfg)
    info = summary(out)
    print(f"exported {info['name']} to {out}")
    for name, f in info["files"].items():
        print(f"  {name:12s} {out / f}")
    for eng, figs in info["parity"].items():
        print(f"  parity {eng}: " + ", ".join(f"{k} max |diff| {v:.2g}" for k, v in figs.items()))
    return 0


@_serving_errors("archive")
def _run_archive(cfg) -> int:
    from serving.archive import archive

    print(f"archived: {archive(cfg)}")
    return 0


@_serving_errors("serve")
def _run_serve(cfg) -> int:
    from serving.serve import describe_access, start, status

    inst = start(cfg)
    st = status(cfg)
    print(f"TorchServe is running (pid {st.get('pid')}), work folder {inst.work}")
    for name, m in st["models"].items():
        ready = sum(w["status"] == "READY" for w in m.get("workers", []))
        print(f"  {name}: {ready}/{len(m.get('workers', []))} workers ready, batch {m.get('batch_size')}")
    print(describe_access(inst))
    print("stop it with: robustserve stop" + (f" --set workdir={cfg.workdir}" if cfg.workdir != "runs/serve" else ""))
    return 0


@_serving_errors("stop")
def _run_stop(cfg) -> int:
    from serving.serve import stop

    print("TorchServe stopped" if stop(cfg) else f"no TorchServe running from {cfg.workdir}")
    return 0


@_serving_errors("status")
def _run_status(cfg) -> int:
    from serving.serve import status

    st = status(cfg)
    if not st["running"]:
        print(f"TorchServe is not running (work folder {st['workdir']})")
        return 3
    print(f"TorchServe running, pid {st['pid']}, work folder {st['workdir']}")
    if "error" in st:
        print(f"  cannot list models: {st['error']}")
        return 1
    for name, m in st["models"].items():
        workers = ", ".join(f"{w['id']}:{w['status']}" for w in m.get("workers", [])) or "none"
        print(f"  {name} v{m.get('version')}: {'READY' if m.get('ready') else 'NOT READY'}; workers {workers}; "
              f"batch {m.get('batch_size')}, delay {m.get('max_batch_delay_ms')} ms")
    return 0 if st["models"] and all(m.get("ready") for m in st["models"].values()) else 1


@_serving_errors("probe")
def _run_probe(cfg) -> int:
    from serving.probe import ProbeFailed, run

    try:
        return run(cfg)
    except ProbeFailed as e:
        print(f"robustserve probe: refused: {e}", file=sys.stderr)
        return 1


@_serving_errors("monitor")
def _run_monitor(cfg) -> int:
    from serving.monitor import run

    return run(cfg)


@_serving_errors("gate")
def _run_gate(cfg) -> int:
    from serving.gate import run

    return run(cfg)


def _run_demo(cfg) -> int:
    from serving.demo import run_demo

    return run_demo(cfg)


# name -> (help, config root factory, runner)
COMMANDS: dict[str, tuple[str, Callable[[], type], Callable[[BaseModel], int]]] = {
    "train": ("train a model with a registered method", _train_root, _run_train),
    "evaluate": ("evaluate a checkpoint clean and under the attack suite", _evaluate_root, _run_evaluate),
    "export": ("export a checkpoint to TorchScript and ONNX, checked for parity", _export_root, _run_export),
    "archive": ("build a TorchServe .mar from an export folder", _archive_root, _run_archive),
    "serve": ("start TorchServe on the model store (loopback, token auth)", _serve_root, _run_serve),
    "stop": ("stop the TorchServe started by serve, and wait until it is gone", _serve_root, _run_stop),
    "status": ("report each served model's workers and readiness", _serve_root, _run_status),
    "probe": ("run one robustness probe of a served model (model=...) or of an archive (archive=...)", _probe_root,
              _run_probe),
    "monitor": ("probe served models on a schedule; metrics, SLO, alert and readiness on loopback", _monitor_root,
                _run_monitor),
    "gate": ("compare two archives' probes and refuse promotion when robustness drops", _gate_root, _run_gate),
    "demo": ("the main job on the embedded default (Fashion-MNIST)", _demo_root, _run_demo),
}


def _bench_entry(module: str, root: str, runner: str):
    def load():
        import importlib

        mod = importlib.import_module(module)
        return getattr(mod, root), getattr(mod, runner)

    return load


# suite -> (help, loader of (config root, runner)); the suites are long jobs, not tests.
BENCHES: dict[str, tuple[str, Callable[[], tuple[type, Callable[[BaseModel], int]]]]] = {
    "train-speed": ("steps/s of every training method, fp32 eager vs the fast mode, side by side",
                    _bench_entry("training.bench.train_speed", "BenchConfig", "run")),
    "render": ("regenerate BENCHMARKS.md sections from their results JSON (stems=[...], default all)",
               _bench_entry("training.bench.report", "RenderConfig", "run")),
    "robust-classifiers": ("standard / pgd-at / trades / agkd-bml under one budget, then the attack suite",
                           _bench_entry("training.bench.robust_classifiers", "BenchConfig", "run")),
    "robust-embedders": ("triplet / est / act / hm / hm+ics under one budget, then the ranking attacks",
                         _bench_entry("training.bench.robust_embedders", "BenchConfig", "run")),
}


def _add_config_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", metavar="FILE", help="YAML config (unknown keys are rejected)")
    sp.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                    help="override one key, dotted (e.g. --set optim.lr=0.01); repeatable")
    sp.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustserve", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, _, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        _add_config_args(sp)
    bench = sub.add_parser("bench", help="run a benchmark suite (a long job) and record it in BENCHMARKS.md")
    bench.add_argument("suite", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[0]}" for k, v in BENCHES.items()))
    _add_config_args(bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # faiss logs its failed SIMD-variant imports at INFO before falling back: noise, not news.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        if args.command == "bench":
            root_cls, runner = BENCHES[args.suite][1]()
        else:
            _, root, runner = COMMANDS[args.command]
            root_cls = root()
        cfg = load_config(root_cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"robustserve {args.command}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    try:
        return runner(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"robustserve {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
