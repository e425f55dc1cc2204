"""``robustserve bench train-speed``: training steps per second of every method in fp32 eager (NCHW, no autocast)
against the fast mode (the trainer's defaults on this device: channels_last, and bf16 autocast where the hardware
does bf16), measured side by side in one run: the variants take turns, a few steps each, for several rounds, and the
median step time of each is reported, so load from other jobs on a shared machine hits every variant alike.

Where the time goes: one step of every variant under an op timer splits it into convolutions (forward and backward)
and the rest, so the speed-up of each part shows what bounds the whole. The batch-size lever is measured beside it: the fast mode at twice the recipe's batch,
in images per second.

Also measures the APGD logit cache: APGD-CE with the success check answered from the loss pass's logits against a
fresh forward pass per iterate (the behaviour before the cache recognised detached aliases).

Writes ``benchmarks/results/train_speed.json``; ``robustserve bench render`` turns it into its BENCHMARKS.md section.
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from serving.configio import load_config
from serving.runtime.spec import Frozen
from training.config import SpeedConfig, TrainConfig

log = logging.getLogger(__name__)

# method -> (config file, per-method overrides): the repository's own recipes, on a small subset.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("configs/classifiers/standard.yaml", {}),
    "pgd-at": ("configs/classifiers/pgd-at.yaml", {}),
    "trades": ("configs/classifiers/trades.yaml", {}),
    "agkd-bml": ("configs/classifiers/agkd-bml.yaml", {}),
    "est": ("configs/embedders/est.yaml", {}),
    "act": ("configs/embedders/act.yaml", {}),
    "hm": ("configs/embedders/hm-ics.yaml", {}),
}

MODES: dict[str, SpeedConfig] = {
    "fp32-eager": SpeedConfig(precision="fp32", channels_last=False),
    "fast": SpeedConfig(),
    "bf16+cl": SpeedConfig(precision="bf16", channels_last=True),
}


class BenchConfig(Frozen):
    methods: tuple[str, ...] = tuple(METHODS)
    modes: tuple[str, ...] = ("fp32-eager", "fast")  # fp32-eager is the reference; bf16+cl forces bf16
    rounds: int = Field(5, ge=1)
    steps_per_round: int = Field(2, ge=1)
    warmup_steps: int = Field(1, ge=0)
    train_subset: int = Field(2048, ge=256)
    attack_steps: int | None = Field(None, ge=1)  # None: each recipe's own (10 for classifiers, 32 for embedders)
    # The robustness check: the same short PGD-AT run in each mode, then one attack cascade on the same test points;
    # the fast mode must land within the reference's 95 % interval. 0 steps: skipped.
    check_steps: int = Field(300, ge=0)
    check_points: int = Field(1000, ge=100)
    apgd_steps: int = Field(100, ge=1)
    apgd_batch: int = Field(128, ge=1)
    # The fast mode at twice the recipe's batch for these methods (images/s against the recipe's batch); () skips.
    batch_lever: tuple[str, ...] = ("standard", "pgd-at")
    # The fast mode with the model's forward under torch.compile (default inductor) for these methods; () skips.
    compile_lever: tuple[str, ...] = ("pgd-at",)
    breakdown_steps: int = Field(2, ge=0)  # steps of each variant under the op timer; 0 skips the breakdown
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1)  # None: the cores this process owns
    results: str = "benchmarks/results/train_speed.json"
    benchmarks_md: str = "BENCHMARKS.md"
    command: str = "robustserve bench train-speed"


def _config(cfg: BenchConfig, method: str, mode: str, out: Path, teacher: Path | None) -> TrainConfig:
    path, extra = METHODS[method]
    sets = [f"data.train_subset={cfg.train_subset}", f"device={cfg.device}", f"out_dir={out}", "eval_every=0",
            f"speed.precision={MODES[mode].precision}", f"speed.channels_last={MODES[mode].channels_last}"]
    if cfg.num_threads:
        sets.append(f"num_threads={cfg.num_threads}")
    if cfg.attack_steps:
        sets.append(f"method.attack_steps={cfg.attack_steps}")
    if teacher is not None:
        sets.append(f"method.options.teacher={teacher}")
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, path, sets)


CONV_OPS = frozenset({"aten.convolution", "aten.convolution_backward", "aten._convolution", "aten.mkldnn_convolution",
                      "aten.cudnn_convolution", "aten.conv2d"})


class OpTimer:
    """Wall time of every aten op run under it, split into convolutions and the rest. Ops are timed where they are
    dispatched (below autograd and autocast), one at a time, so on a CPU the split adds up to the step's op time."""

    def __init__(self, device: torch.device) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        from torch.utils.flop_counter import flop_registry

        timer = self
        self.seconds = {"conv": 0.0, "other": 0.0}
        self.conv_flops = 0
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                sync()
                t0 = time.perf_counter()
                out = func(*args, **(kwargs or {}))
                sync()
                key = "conv" if str(func.overloadpacket) in CONV_OPS else "other"
                timer.seconds[key] += time.perf_counter() - t0
                if key == "conv" and func.overloadpacket in flop_registry:
                    timer.conv_flops += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
                return out

        self.mode = Mode()


def op_breakdown(p, batches, steps: int) -> dict[str, float]:
    """Seconds per step spent in convolutions and in every other op, and the convolutions' floating-point
    operations per step (forward and backward, by torch's flop-counter formulas), over ``steps`` steps under
    :class:`OpTimer`."""
    from training.trainer import train_step

    timer = OpTimer(p.device)
    with timer.mode:
        for _ in range(steps):
            train_step(p, *next(batches))
    return {**{k: v / steps for k, v in timer.seconds.items()}, "conv_flops": timer.conv_flops / steps}


def gemm_rate(device: torch.device, rounds: int, n: int = 1024) -> dict[str, float]:
    """GFLOP/s of an n x n matrix product in fp32 and in bf16 on the bench's threads (the variants taking turns,
    median of ``rounds``): what the machine's dense arithmetic reaches, beside which the convolutions' rates read."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mats = {name: (torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt))
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    times: dict[str, list[float]] = {k: [] for k in mats}
    for _ in range(max(3, rounds)):
        for name, (a, b) in mats.items():
            torch.mm(a, b)
            sync()
            t0 = time.perf_counter()
            for _ in range(5):
                torch.mm(a, b)
            sync()
            times[name].append((time.perf_counter() - t0) / 5)
    return {f"{k}_gflops": 2 * n ** 3 / statistics.median(v) / 1e9 for k, v in times.items()} | {"n": n}


def _teacher(cfg: BenchConfig, work: Path) -> Path:
    """A `standard` model.pt for AGKD-BML to distil from: one step is enough, speed does not depend on its quality."""
    from training.trainer import train

    tcfg = _config(cfg, "standard", "fp32-eager", work / "teacher", None)
    tcfg = tcfg.model_copy(update={"epochs": 1, "max_steps_per_epoch": 1})
    return train(tcfg) / "model.pt"


def measure_training(cfg: BenchConfig, work: Path) -> dict[str, dict[str, Any]]:
    from training.trainer import prepare, train_step

    teacher = _teacher(cfg, work) if "agkd-bml" in cfg.methods else None
    runs: dict[tuple[str, str], Any] = {}
    for method in cfg.methods:
        for mode in cfg.modes:
            tc = _config(cfg, method, mode, work / f"{method}-{mode}", teacher if method == "agkd-bml" else None)
            p = prepare(tc)
            runs[(method, mode)] = (p, iter(_batches(p)), tc)
    for method in cfg.batch_lever:
        if method in cfg.methods and "fast" in cfg.modes:
            tc = _config(cfg, method, "fast", work / f"{method}-fast-batch2x", None)
            tc = tc.model_copy(update={"batch_size": 2 * tc.batch_size})
            p = prepare(tc)
            runs[(method, "fast-batch2x")] = (p, iter(_batches(p)), tc)
    for method in cfg.compile_lever:
        if method in cfg.methods and "fast" in cfg.modes:
            tc = _config(cfg, method, "fast", work / f"{method}-fast-compiled", None)
            p = prepare(tc)
            p.model.forward = torch.compile(p.model.forward, dynamic=False)  # the attacks and the update call it
            runs[(method, "fast-compiled")] = (p, iter(_batches(p)), tc)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for key, (p, batches, _) in runs.items():
        for _ in range(cfg.warmup_steps):
            train_step(p, *next(batches))
    for r in range(cfg.rounds):
        for key, (p, batches, _) in runs.items():
            for _ in range(cfg.steps_per_round):
                x, y = next(batches)
                t0 = time.perf_counter()
                train_step(p, x, y)
                times[key].append(time.perf_counter() - t0)
        log.info("round %d/%d done", r + 1, cfg.rounds)
    batches_of = {k: b for k, (_, b, _) in runs.items()}
    out: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        row: dict[str, Any] = {}
        ref = statistics.median(times[(method, cfg.modes[0])])
        for mode in cfg.modes:
            p, _, tc = runs[(method, mode)]
            med = statistics.median(times[(method, mode)])
            row[mode] = {"seconds_per_step": med, "steps_per_second": 1.0 / med, "speedup": ref / med,
                         "batch_size": tc.batch_size, "images_per_second": tc.batch_size / med,
                         "autocast": str(p.amp_dtype) if p.amp_dtype else None, "channels_last": p.channels_last,
                         "arch": tc.model.arch, "attack_steps": tc.method.attack_steps}
            if cfg.breakdown_steps:
                row[mode]["op_seconds_per_step"] = op_breakdown(p, batches_of[(method, mode)], cfg.breakdown_steps)
        for lever in ("fast-batch2x", "fast-compiled"):
            if (method, lever) in runs:
                _, _, tc = runs[(method, lever)]
                med = statistics.median(times[(method, lever)])
                row[lever] = {"batch_size": tc.batch_size, "seconds_per_step": med,
                              "images_per_second": tc.batch_size / med,
                              "vs_fast_images_per_second": tc.batch_size / med / row["fast"]["images_per_second"]}
        out[method] = row
    return out


def _batches(p):
    while True:
        for batch in p.loader:
            yield batch


def measure_apgd_cache(cfg: BenchConfig) -> dict[str, Any]:
    """APGD-CE on a SmallCNN batch: success checks from the cache vs a fresh forward pass each iterate."""
    from serving.runtime.attacks.apgd import apgd
    from serving.runtime.attacks.base import LogitCache, classifier_success
    from serving.runtime.attacks.objectives import get_objective
    from serving.runtime.attacks.pgd import classifier_loss
    from serving.runtime.attacks.threat import LpBall
    from training.models import build_model

    class Uncached(LogitCache):
        def detached(self, x):
            self.misses += 1
            with torch.no_grad():
                return self.model(x)

    torch.manual_seed(0)
    model, _ = build_model("smallcnn", channels=1, input_size=(28, 28), mean=(0.5,), std=(0.5,), num_classes=10)
    model.eval()
    x, y = torch.rand(cfg.apgd_batch, 1, 28, 28), torch.randint(0, 10, (cfg.apgd_batch,))
    ball = LpBall(norm="linf", eps=0.1, step=0.01)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    forwards: dict[str, int] = {}
    for _ in range(max(2, cfg.rounds // 2)):
        for name, kind in (("uncached", Uncached), ("cached", LogitCache)):
            cache = kind(model)
            t0 = time.perf_counter()
            apgd(classifier_loss(cache, get_objective("ce"), y, None), x, ball, cfg.apgd_steps,
                 success_fn=classifier_success(cache, y, None), generator=torch.Generator().manual_seed(0))
            times[name].append(time.perf_counter() - t0)
            forwards[name] = cfg.apgd_steps + 1 + cache.misses
    cached, uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])
    return {"steps": cfg.apgd_steps, "batch": cfg.apgd_batch, "seconds_cached": cached,
            "seconds_uncached": uncached, "speedup": uncached / cached, "forward_passes": forwards}


def robustness_check(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """PGD-AT for ``check_steps`` optimiser steps in each mode (same seed, data order and recipe), then clean
    accuracy and the PGD-20 -> APGD-CE cascade at eps 0.1 on the same ``check_points`` test points, in fp32."""
    from serving.runtime.evaluation.classification import wilson_interval
    from training.config import AttackSpec, EvaluateConfig
    from training.evaluation.run import evaluate
    from training.trainer import train

    out: dict[str, Any] = {}
    for mode in cfg.modes:
        tc = _config(cfg, "pgd-at", mode, work / f"check-{mode}", None)
        tc = tc.model_copy(update={"epochs": 1, "max_steps_per_epoch": cfg.check_steps,
                                   "data": tc.data.model_copy(update={"train_subset": None})})
        t0 = time.perf_counter()
        run_dir = train(tc)
        seconds = time.perf_counter() - t0
        suite = (AttackSpec(name="pgd", steps=20), AttackSpec(name="apgd-ce", steps=cfg.apgd_steps))
        rep = evaluate(EvaluateConfig(checkpoint=str(run_dir / "model.pt"), subset=cfg.check_points, eps=(0.1,),
                                      attacks=suite, sanity_checks=False, device=cfg.device,
                                      num_threads=cfg.num_threads))
        row = rep["results"][0]
        k = round(row["worst_case"] * rep["n"])
        out[mode] = {"train_seconds": seconds, "clean": rep["clean_accuracy"], "worst_case": row["worst_case"],
                     "worst_case_ci95": list(wilson_interval(k, rep["n"])), "attacks": row["attacks"],
                     "n": rep["n"]}
    ref = out[cfg.modes[0]]
    for mode in cfg.modes[1:]:
        lo, hi = ref["worst_case_ci95"]
        out[mode]["within_reference_ci"] = lo <= out[mode]["worst_case"] <= hi
    return out


def run(cfg: BenchConfig) -> int:
    from training.bench.robust_classifiers import op_count_ratio
    from training.device import bf16_native, cpu_bf16_units, owned_cores, resolve_device

    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        rows = measure_training(cfg, Path(tmp))
        check = robustness_check(cfg, Path(tmp)) if cfg.check_steps else None
    result: dict[str, Any] = {
        "suite": "train-speed",
        "command": cfg.command,
        "modes": {m: MODES[m].model_dump(mode="json") for m in cfg.modes},
        "rows": rows,
        "apgd_cache": measure_apgd_cache(cfg),
        "gemm": gemm_rate(device, cfg.rounds) if cfg.breakdown_steps else None,
        "robustness_check": check,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": cfg.num_threads or owned_cores(), "device": str(device),
                    "bf16_native": bf16_native(device), "cpu_bf16_units": cpu_bf16_units()},
        "config": cfg.model_dump(mode="json"),
    }
    if {"agkd-bml", "pgd-at"} <= set(rows):
        ref = cfg.modes[-1]
        result["agkd_bml_over_pgd_at"] = {
            "measured": rows["agkd-bml"][ref]["seconds_per_step"] / rows["pgd-at"][ref]["seconds_per_step"],
            "op_count_bound": op_count_ratio(rows["pgd-at"][ref]["attack_steps"]), "mode": ref}
    path = Path(cfg.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    from training.bench.report import render_into

    print(render_into(path.stem, Path(cfg.benchmarks_md), path.parent))
    return 0


def _breakdown_lines(result: dict, modes: list[str]) -> list[str]:
    """The op-timer table (convolutions against the rest, per mode) and the batch-size lever, where measured."""
    rows = {k: r for k, r in result["rows"].items() if all("op_seconds_per_step" in r[m] for m in modes)}
    lines: list[str] = []
    if rows and len(modes) > 1:
        ref, fast = modes[0], modes[-1]
        g = result.get("gemm")
        lines += ["", f"Where the time goes: {result['config']['breakdown_steps']} more steps of each variant under an "
                      "op timer (every aten op timed where it is dispatched), split into convolutions (forward and "
                      f"backward) and every other op. Speed-ups are {fast} against {ref}, per part. Conv GFLOP/s: the "
                      "convolutions' floating-point operations per step (torch's flop counter) over their time."]
        if g:
            lines += ["", f"For scale, a {g['n']} x {g['n']} matrix product on the same threads: "
                          f"{g['fp32_gflops']:.0f} GFLOP/s in fp32, {g['bf16_gflops']:.0f} GFLOP/s in bf16 "
                          f"({g['bf16_gflops'] / g['fp32_gflops']:.2f}x)."]
        lines += ["", f"| method | conv share of {ref} | {ref} conv GFLOP/s | {fast} conv GFLOP/s | conv speed-up | "
                      f"{ref} other s/step | {fast} other s/step | other speed-up |", "|---|---|---|---|---|---|---|---|"]
        for method, r in rows.items():
            a, b = r[ref]["op_seconds_per_step"], r[fast]["op_seconds_per_step"]
            share = a["conv"] / (a["conv"] + a["other"])
            lines.append(f"| {method} | {100 * share:.0f} % | {a['conv_flops'] / a['conv'] / 1e9:.0f} | "
                         f"{b['conv_flops'] / b['conv'] / 1e9:.0f} | {a['conv'] / b['conv']:.2f}x | "
                         f"{a['other']:.3f} | {b['other']:.3f} | {a['other'] / b['other']:.2f}x |")
    lever = {k: r["fast-batch2x"] for k, r in result["rows"].items() if "fast-batch2x" in r}
    if lever:
        lines += ["", "Batch size as a lever: the fast mode at twice the recipe's batch, timed in the same rounds, "
                      "in images per second against the fast mode at the recipe's batch: " +
                  "; ".join(f"{k} (batch {v['batch_size']}): {v['images_per_second']:,.0f} images/s, "
                            f"**{v['vs_fast_images_per_second']:.2f}x**" for k, v in lever.items()) + "."]
    compiled = {k: r["fast-compiled"] for k, r in result["rows"].items() if "fast-compiled" in r}
    if compiled:
        lines += ["", "torch.compile as a lever: the fast mode with the model's forward compiled (default inductor, "
                      "static shapes; the warm-up steps absorb the compilation), timed in the same rounds, against the "
                      "fast mode in eager: " +
                  "; ".join(f"{k}: {v['seconds_per_step']:.3f} s/step, **{v['vs_fast_images_per_second']:.2f}x**"
                            for k, v in compiled.items()) + "."]
    return lines


def markdown(result: dict) -> str:
    modes = list(result["modes"])
    m = result["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['threads']} threads, device {m['device']}, native bf16: "
        f"{'yes' if m['bf16_native'] else 'no (the fast mode then runs fp32 with channels_last)'}"
        + (f" ({m['cpu_bf16_units']})" if m.get("cpu_bf16_units") else "") + f"; torch {m['torch']}.",
        f"Each variant ran {result['config']['rounds']} rounds of {result['config']['steps_per_round']} steps, the "
        "variants taking turns; figures are median seconds per optimiser step (attacks included) on the "
        f"repository's recipes (configs/), {result['config']['train_subset']:,}-image subset.",
        "",
        "| method | arch | batch | attack steps | " + " | ".join(f"{k} s/step" for k in modes)
        + " | " + " | ".join(f"{k} speed-up" for k in modes[1:]) + " |",
        "|---" * (4 + 2 * len(modes) - 1) + "|",
    ]
    for method, row in result["rows"].items():
        first = row[modes[0]]
        cells = [method, first["arch"], str(first["batch_size"]), str(first["attack_steps"])]
        cells += [f"{row[k]['seconds_per_step']:.3f}" for k in modes]
        cells += [f"**{row[k]['speedup']:.2f}x**" for k in modes[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _breakdown_lines(result, modes)
    a = result["apgd_cache"]
    lines += ["", f"APGD-CE-{a['steps']} on a batch of {a['batch']} (SmallCNN): success checks answered from the "
                  f"loss pass's logits take {a['seconds_cached']:.2f} s against {a['seconds_uncached']:.2f} s with a "
                  f"fresh forward pass per iterate (**{a['speedup']:.2f}x**; forward passes "
                  f"{a['forward_passes']['cached']} vs {a['forward_passes']['uncached']})."]
    chk = result.get("robustness_check")
    if chk:
        first = next(iter(chk.values()))
        lines += ["", f"Robustness check: PGD-AT (configs/classifiers/pgd-at.yaml), {result['config']['check_steps']} "
                      f"optimiser steps on all 60,000 images in each mode, then clean accuracy and PGD-20 -> "
                      f"APGD-CE-{result['config']['apgd_steps']} at eps 0.1 on {first['n']:,} test points, in fp32:",
                  "", "| mode | clean | worst case (95 % CI) | train s | within the reference's CI |",
                  "|---|---|---|---|---|"]
        for mode, c in chk.items():
            lo, hi = c["worst_case_ci95"]
            within = ("reference" if "within_reference_ci" not in c
                      else "yes" if c["within_reference_ci"] else "**no**")
            lines.append(f"| {mode} | {100 * c['clean']:.2f} | {100 * c['worst_case']:.2f} ({100 * lo:.1f}-"
                         f"{100 * hi:.1f}) | {c['train_seconds']:.0f} | {within} |")
    r = result.get("agkd_bml_over_pgd_at")
    if r:
        lines += ["", f"AGKD-BML / PGD-AT per step ({r['mode']}): **{r['measured']:.2f}x** measured, "
                      f"{r['op_count_bound']:.2f}x by op count (forward = 1, backward = 2)."]
    return "\n".join(lines) + "\n"
