"""``robustserve``: one console command with subcommands. Each takes ``--config FILE``, repeated
``--set key=value`` overrides and ``--dry-run`` (print the resolved config and stop)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from pydantic import BaseModel

from serving.client import workdir_args
from serving.configio import ConfigError, defaults_of, dump_config, load_config

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


def _tune_root():
    from serving.bench.tune import TuneConfig

    return TuneConfig


def _run_tune(cfg) -> int:
    from serving.bench.tune import run

    return run(cfg)


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
    from serving.runtime.evaluation.classification import flag_summary

    print(f"sanity flags: {json.dumps(flag_summary(report.get('sanity', {})))}")
    print(f"report: {report['files']['report']}\nplot: {report['files']['plot']}")
    return 0


def _run_export(cfg) -> int:
    from serving.export import export

    return _print_export(export(cfg))


def _print_export(out) -> int:
    from serving.export import summary

    info = summary(out)
    print(f"exported {info['name']} to {out}")
    for name, f in info["files"].items():
        print(f"  {name:12s} {out / f}")
    for eng, figs in info["parity"].items():
        print(f"  parity {eng}: " + ", ".join(f"{k} max |diff| {v:.2g}" for k, v in figs.items()))
    return 0


def _run_archive(cfg) -> int:
    from serving.archive import archive

    print(f"archived: {archive(cfg)}")
    return 0


def _run_serve(cfg, foreground: bool = False) -> int:
    from serving.serve import describe_access, run_foreground, start, status

    if foreground:
        return run_foreground(cfg)
    inst = start(cfg)
    st = status(cfg)
    print(f"TorchServe is running (pid {st.get('pid')}), work folder {inst.work}")
    for name, m in st["models"].items():
        ready = sum(w["status"] == "READY" for w in m.get("workers", []))
        print(f"  {name}: {ready}/{len(m.get('workers', []))} workers ready, batch {m.get('batch_size')}")
    print(describe_access(inst))
    print(f"stop it with: robustserve stop{workdir_args(inst.work)}")
    return 0


def _run_stop(cfg) -> int:
    from serving.client import Instance
    from serving.serve import stop

    inst = Instance(cfg)
    if inst.pid() is None and inst.answers():
        # Found over HTTP but not as a process here: it runs in another PID namespace (container). Leave its
        # files alone: they are how its own namespace stops it.
        print(f"robustserve stop: error: the TorchServe of {inst.work} answers but its process is not visible "
              f"from here; stop it where it runs (its container)", file=sys.stderr)
        return 1
    print("TorchServe stopped" if stop(cfg) else f"no TorchServe running from {inst.work}")
    return 0


def _run_health(cfg) -> int:
    from serving.serve import healthy

    ok = healthy(cfg)
    print("healthy" if ok else "not healthy (not running, a model without a READY worker, or /ping failing)")
    return 0 if ok else 1


def _run_status(cfg) -> int:
    from serving.serve import status

    st = status(cfg)
    if not st["running"]:
        print(f"TorchServe is not running (work folder {st['workdir']})")
        return 3
    where = f"pid {st['pid']}" if st["pid"] is not None else "found over HTTP"
    print(f"TorchServe running, {where}, work folder {st['workdir']}")
    if "error" in st:
        print(f"  cannot list models: {st['error']}")
        return 1
    for name, m in st["models"].items():
        workers = ", ".join(f"{w['id']}:{w['status']}" for w in m.get("workers", [])) or "none"
        print(f"  {name} v{m.get('version')}: {'READY' if m.get('ready') else 'NOT READY'}; workers {workers}; "
              f"batch {m.get('batch_size')}, delay {m.get('max_batch_delay_ms')} ms")
        probe = m.get("last_probe")
        if probe:
            why = f" ({probe['error']})" if probe.get("error") else ""
            print(f"    last probe {probe.get('id')}: {probe.get('status')}{why}")
    return 0 if st["models"] and all(m.get("ready") for m in st["models"].values()) else 1


def _run_probe(cfg) -> int:
    from serving.probe import ProbeFailed, run

    try:
        return run(cfg)
    except ProbeFailed as e:
        print(f"robustserve probe: refused: {e}", file=sys.stderr)
        return 1


def _run_monitor(cfg) -> int:
    from serving.monitor import run

    return run(cfg)


def _run_gate(cfg) -> int:
    from serving.gate import run

    return run(cfg)


def _run_demo(cfg) -> int:
    from serving.demo import run_demo

    return run_demo(cfg)


def _zoo_root(name: str):
    def load():
        from serving.zoo import commands

        return getattr(commands, name)

    return load


def _run_zoo_list(cfg) -> int:
    from serving.zoo.commands import list_models

    rows = list_models(cfg)
    if not rows:
        print(f"no models in {cfg.zoo_dir}")
    for r in rows:
        print(f"{r['name']:28s} {r['task']:14s} {r['arch']}/{r['method']}: {r['headline']}"
              + (f"  [{r['budget_note']}]" if r["budget_note"] else ""))
    return 0


def _run_zoo_show(cfg) -> int:
    from serving.zoo.commands import show

    print(show(cfg), end="")
    return 0


def _run_zoo_export(cfg) -> int:
    from serving.zoo.commands import export

    return _print_export(export(cfg))


def _run_zoo_serve(cfg) -> int:
    from serving.zoo.commands import prepare_serve

    return _run_serve(prepare_serve(cfg))


def _run_zoo_verify(cfg) -> int:
    from serving.zoo.commands import verify

    ok, lines = verify(cfg)
    print("\n".join(lines))
    print("verified: every judged figure lies inside the card's 95 % interval" if ok else
          "FAILED: a figure falls outside the card's 95 % interval")
    return 0 if ok else 1


def _run_zoo_add(cfg) -> int:
    from serving.zoo.commands import add, headline, read_card

    dest = add(cfg)
    print(f"added {dest}: {headline(read_card(dest))}")
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    root: Callable[[], type]  # the config root's factory (imports stay lazy)
    runner: Callable[..., int]
    example: str  # one real invocation, shown in the subcommand's --help and checked by a test
    must_exist: tuple[str, ...] = ()  # dotted keys naming files or folders that must be there (None: not set)
    help_keys: Optional[tuple[str, ...]] = None  # the keys --help lists; None: all
    # Positional arguments and flags, each filling the config key of its dest after --config and --set:
    # (dest, argparse keywords, with "flag" naming an option instead of a positional).
    args: tuple[tuple[str, dict[str, Any]], ...] = ()


COMMANDS: dict[str, Command] = {
    "train": Command("train a model with a registered method", _train_root, _run_train,
                     "robustserve train --set method.name=pgd-at --set epochs=5 --set out_dir=runs/pgd-at",
                     ("data.root",)),
    "evaluate": Command("evaluate a checkpoint clean and under the attack suite", _evaluate_root, _run_evaluate,
                        "robustserve evaluate --set checkpoint=runs/pgd-at/model.pt --set eps=0.1 "
                        "--set 'attacks=[{name: pgd}]'", ("checkpoint", "data.root")),
    "export": Command("export a checkpoint to TorchScript and ONNX, checked for parity", _export_root, _run_export,
                      "robustserve export --set checkpoint=runs/pgd-at/model.pt", ("checkpoint", "data_root")),
    "archive": Command("build a TorchServe .mar from an export folder", _archive_root, _run_archive,
                       "robustserve archive --set export_dir=runs/pgd-at/export --set name=clf", ("export_dir",)),
    "tune": Command("choose batch size, max batch delay and workers by measurement (hey against a real TorchServe "
                    "per point) and write the best into the archive's model-config.yaml", _tune_root, _run_tune,
                    "robustserve tune --set archive.export_dir=runs/pgd-at/export --set archive.name=clf "
                    "--set 'sweep.batch_sizes=[1, 16]'", ("mar",),
                    # archive.* takes every key of `robustserve archive` (see its --help); these are the usual ones.
                    help_keys=("archive.export_dir", "archive.name", "archive.model_store", "archive.overwrite", "mar",
                               "results", *(f"sweep.{k}" for k in (
                                   "batch_sizes", "max_batch_delays_ms", "workers", "concurrency",
                                   "images_per_request", "seconds", "warmup_s", "p99_tolerance", "ready_timeout_s",
                                   "seed")))),
    "serve": Command("start TorchServe on the model store (loopback, token auth); --foreground: stay and stop it "
                     "on SIGTERM (a container's main process)", _serve_root, _run_serve,
                     "robustserve serve --set 'models=[clf]' --set ports.inference=8090", ("model_store",)),
    "stop": Command("stop the TorchServe of a work folder, and wait until it is gone", _serve_root, _run_stop,
                    "robustserve stop --set workdir=runs/serve", help_keys=("workdir", "stop_timeout_s")),
    "status": Command("report each served model's workers and readiness (exit 0: all ready, 1: not all, "
                      "3: not running)", _serve_root, _run_status, "robustserve status --set workdir=runs/serve",
                      help_keys=("workdir",)),
    "health": Command("exit 0 when every model has a READY worker and /ping answers (a container health check)",
                      _serve_root, _run_health, "robustserve health --set workdir=/srv/robustserve",
                      help_keys=("workdir",)),
    "probe": Command("run one robustness probe of a served model (model=...) or of an archive (archive=...)",
                     _probe_root, _run_probe, "robustserve probe --set model=clf --set 'probe.eps=[0.05, 0.1]'",
                     ("archive",)),
    "monitor": Command("probe served models on a schedule; metrics, SLO, alert and readiness on loopback",
                       _monitor_root, _run_monitor,
                       "robustserve monitor --set workdir=runs/serve --set floor=0.4 --set interval_s=300"),
    "gate": Command("compare two archives' probes and refuse promotion when robustness drops", _gate_root, _run_gate,
                    "robustserve gate --set baseline=model_store/clf.mar --set candidate=runs/v2/clf.mar",
                    ("baseline", "candidate")),
    "demo": Command("the main job on the embedded default (Fashion-MNIST)", _demo_root, _run_demo,
                    "robustserve demo --set out_dir=runs/demo"),
}
_NAME = (("name", {"metavar": "NAME"}),)
# `robustserve zoo ACTION`: the model zoo (serving/zoo).
ZOO: dict[str, Command] = {
    "list": Command("list the zoo's models with their headline figures", _zoo_root("ZooListConfig"), _run_zoo_list,
                    "robustserve zoo list --set zoo_dir=zoo"),
    "show": Command("print a zoo model's card", _zoo_root("ZooShowConfig"), _run_zoo_show,
                    "robustserve zoo show smallcnn-pgd-at --set zoo_dir=zoo", args=_NAME),
    "export": Command("export a zoo model to TorchScript and ONNX, checked for parity", _zoo_root("ZooExportConfig"),
                      _run_zoo_export, "robustserve zoo export smallcnn-pgd-at --set out_dir=runs/zoo/export",
                      args=_NAME),
    "serve": Command("export, archive and serve zoo models in one command (loopback, token auth)",
                     _zoo_root("ZooServeConfig"), _run_zoo_serve,
                     "robustserve zoo serve smallcnn-pgd-at --set serve.ports.inference=8090",
                     args=(("names", {"metavar": "NAME", "nargs": "+"}),)),
    "verify": Command("rerun a card's verification protocol (--full: its headline protocol on the whole test set); "
                      "exit 1 when a figure falls outside the card's 95 % interval", _zoo_root("ZooVerifyConfig"),
                      _run_zoo_verify, "robustserve zoo verify smallcnn-pgd-at --set num_threads=1",
                      args=(*_NAME, ("full", {"flag": "--full", "action": "store_true"}))),
    "add": Command("evaluate a training run folder with the benchmark suite and write it into the zoo with its card",
                   _zoo_root("ZooAddConfig"), _run_zoo_add,
                   "robustserve zoo add runs/pgd-at --name smallcnn-pgd-at --set subset=2000", ("run_dir",),
                   args=(("run_dir", {"metavar": "RUN_DIR"}), ("name", {"flag": "--name", "required": True}))),
}
# Keys read from the work folder rather than from the config, for commands that find a running server.
SERVER_COMMANDS = ("stop", "status", "health")


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
    "tune": ("robustserve tune's sweep on an export (default: an untrained SmallCNN), recorded as a benchmark",
             _bench_entry("serving.bench.tune", "TuneBenchConfig", "run_bench")),
    "robust-classifiers": ("standard / pgd-at / trades / agkd-bml under one budget, then the attack suite",
                           _bench_entry("training.bench.robust_classifiers", "BenchConfig", "run")),
    "robust-embedders": ("triplet / est / act / hm / hm+ics under one budget, then the ranking attacks",
                         _bench_entry("training.bench.robust_embedders", "BenchConfig", "run")),
}


def _add_config_args(sp: argparse.ArgumentParser, example_key: str) -> None:
    sp.add_argument("--config", metavar="FILE", help="YAML config (unknown keys are rejected)")
    sp.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                    help=f"override one key, dotted (e.g. --set {example_key}); repeatable; a scalar for a list key "
                         f"is a one-element list")
    sp.add_argument("--dry-run", action="store_true",
                    help="check the config (keys, values, device, files that must exist), print it and exit")


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        out = []
        for k, v in data.items():
            out += _leaves(v, f"{prefix}{k}.")
        return out
    return [(prefix[:-1], data)]


def keys_help(root: type, only: Optional[Sequence[str]] = None) -> str:
    """Every key of a command's config (or those in ``only``) with its default, one per line, nested keys
    dotted."""
    width = 0
    rows = []
    for key, value in _leaves(defaults_of(root)):
        if only is not None and key not in only:
            continue
        shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        shown = shown[:-4].rstrip() if shown.endswith("\n...") else shown.removesuffix("...").strip()
        rows.append((key, shown))
        width = max(width, len(key))
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _example_key(example: str) -> str:
    try:
        return example.split("--set ", 1)[1].split(" --", 1)[0].strip("'")
    except IndexError:
        return "key=value"


class _LazyHelpParser(argparse.ArgumentParser):
    """A subcommand parser whose epilog (the keys and their defaults) is built only when --help is asked for:
    building it imports the command's config root, which may import torch."""

    def __init__(self, *args, command: Optional[Command] = None, **kw):
        super().__init__(*args, **kw)
        self._command = command

    def format_help(self) -> str:
        cmd = self._command
        if cmd is not None and self.epilog is None:
            self.epilog = f"keys (default):\n{keys_help(cmd.root(), cmd.help_keys)}\n\nexample:\n  {cmd.example}"
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustserve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_LazyHelpParser)
    for name, cmd in COMMANDS.items():
        description = cmd.help
        if name in SERVER_COMMANDS:
            description += (". The server is found from its work folder (workdir): addresses and keys are read "
                            "there; serve's other keys are accepted, so that serve's --config file works here too.")
        sp = sub.add_parser(name, help=cmd.help, description=textwrap.fill(description, 100), command=cmd,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "serve":
            sp.add_argument("--foreground", action="store_true",
                            help="stay in the foreground and stop the server on SIGTERM/SIGINT (container entry point)")
        _add_config_args(sp, _example_key(cmd.example))
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and tracebacks on errors")
    bench = sub.add_parser("bench", help="run a benchmark suite (a long job) and record it in BENCHMARKS.md",
                           description="run a benchmark suite (a long job) and record it in BENCHMARKS.md; "
                                       "--dry-run lists a suite's keys",
                           epilog="example:\n  robustserve bench robust-classifiers --dry-run",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("suite", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[0]}" for k, v in BENCHES.items()))
    _add_config_args(bench, "seed=1")
    zoo = sub.add_parser("zoo", help="the model zoo: list, show, export, serve, verify, add",
                         description="the model zoo (zoo/<name>/: weights, spec, card): " + ", ".join(ZOO))
    zoo_sub = zoo.add_subparsers(dest="action", required=True, parser_class=_LazyHelpParser)
    for action, cmd in ZOO.items():
        sp = zoo_sub.add_parser(action, help=cmd.help, description=textwrap.fill(cmd.help, 100), command=cmd,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        for dest, kw in cmd.args:
            kw = dict(kw)
            flag = kw.pop("flag", None)
            if flag:
                sp.add_argument(flag, dest=dest, **kw)
            else:
                sp.add_argument(dest, **kw)
        _add_config_args(sp, _example_key(cmd.example))
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and tracebacks on errors")
    return p


def _arg_overrides(cmd: Command, args: argparse.Namespace) -> list[str]:
    """A command's positionals and flags as ``key=value`` overrides (JSON values are YAML), applied after the
    --set ones; an unset flag leaves its key alone."""
    out = []
    for dest, kw in cmd.args:
        value = getattr(args, dest)
        if value is None or (kw.get("action") == "store_true" and not value):
            continue
        out.append(f"{dest}={json.dumps(value)}")
    return out


def _at(cfg: BaseModel, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def preflight(command: str, cfg: BaseModel) -> None:
    """What can be checked before any work: device names and their presence here, and the files and folders the
    command reads. Raises ConfigError with a message saying what to do."""
    devices = [(k, v) for k, v in _leaves(cfg.model_dump(mode="json")) if k.rsplit(".", 1)[-1] == "device"]
    for key, name in devices:
        if isinstance(name, str):
            _check_device(key, name)
    cmd = ZOO.get(command.removeprefix("zoo ")) if command.startswith("zoo ") else COMMANDS.get(command)
    for key in (cmd.must_exist if cmd else ()):
        value = _at(cfg, key)
        if value is not None and not Path(str(value)).exists():
            raise ConfigError(f"{key}: {value} does not exist")
    if command in ("evaluate", "export"):
        from training.checkpoint import checkpoint_problem

        problem = checkpoint_problem(cfg.checkpoint)
        if problem:
            raise ConfigError(f"checkpoint: {problem}")


def _check_device(key: str, name: str) -> None:
    if name == "auto":
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}: {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {name!r} asked for, but CUDA is not available here; use --set {key}=cpu "
                              f"(or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ConfigError(f"{key}: {name!r}: only cpu and cuda devices are supported")


# Errors that are the user's to fix: their message is the whole story. Anything else is a fault of ours: one
# line and a pointer to -v.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ValueError, RuntimeError, TimeoutError, ConnectionError)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    more = " (more with -v)" if len(lines) > 1 else ""
    return lines[0] + more


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # faiss logs its failed SIMD-variant imports at INFO before falling back: noise, not news.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    name = args.command
    try:
        overrides = list(args.overrides)
        if name == "bench":
            root_cls, runner = BENCHES[args.suite][1]()
        elif name == "zoo":
            cmd = ZOO[args.action]
            name = f"zoo {args.action}"
            runner, root_cls = cmd.runner, cmd.root()
            overrides += _arg_overrides(cmd, args)
        else:
            runner, root_cls = COMMANDS[name].runner, COMMANDS[name].root()
        cfg = load_config(root_cls, args.config, overrides)
        preflight(name, cfg)
    except ConfigError as e:
        print(f"robustserve {name}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    try:
        return runner(cfg, foreground=True) if getattr(args, "foreground", False) else runner(cfg)
    except KeyboardInterrupt:
        hint = "; the same command resumes from the last checkpoint" if name == "train" else ""
        print(f"robustserve {name}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            raise
        if isinstance(e, USER_ERRORS):
            msg = "\n".join(str(e).strip().splitlines()) if isinstance(e, ConfigError) else _one_line(e)
            print(f"robustserve {name}: error: {msg}", file=sys.stderr)
        else:
            print(f"robustserve {name}: error: {type(e).__name__}: {_one_line(e)} (a fault of robustserve, not of "
                  f"your input: run with -v for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
