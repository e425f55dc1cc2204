"""The training loop shared by every method: seeded, device-agnostic, DDP-aware, resumable, logged as JSON lines."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from serving.configio import dump_config
from serving.runtime.attacks import eval_mode
from serving.runtime.spec import ModelSpec
from training.checkpoint import load_checkpoint, save_atomic
from training.config import OptimConfig, TrainConfig
from training.device import autocast_dtype, owned_cores, resolve_device, seed_everything

log = logging.getLogger(__name__)


class TrainModule(nn.Module):
    """What DDP wraps: ``forward(x)`` gives the model's output, ``forward(x, "features")`` its features, so methods
    that need the feature map still go through the wrapper and get their gradients synchronised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mode: str = "output"):
        # Outputs in fp32 whatever autocast computed them in: the methods' losses (MART, KL, triplets on angles)
        # are not written for bf16's 8-bit mantissa.
        if mode == "features":
            return tuple(t.float() for t in self.model.features(x))
        return self.model(x).float()


def build_optimizer(cfg: OptimConfig, params, steps_per_epoch: int, epochs: int):
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, steps_per_epoch * epochs)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "multistep":
            epoch = step / steps_per_epoch
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def model_options(cfg: TrainConfig, train_set, task: str) -> dict[str, Any]:
    from training.data import dataset_info

    info = dataset_info(cfg.data.name, **cfg.data.options)
    opts: dict[str, Any] = {
        "channels": train_set.channels,
        "input_size": tuple(train_set.input_size),
        "mean": tuple(info.mean),
        "std": tuple(info.std),
    }
    if task == "classification":
        opts["num_classes"] = train_set.num_classes
        opts["class_names"] = tuple(train_set.class_names)
    opts.update(cfg.model.options)
    return opts


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def fixed_subset(n_total: int, n: int | None, seed: int) -> torch.Tensor | None:
    """The first ``n`` of a seeded permutation: the same points for every run with the same seed."""
    if n is None or n >= n_total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


@torch.no_grad()
def clean_accuracy(model: nn.Module, dataset, device: torch.device, batch_size: int = 512) -> float:
    correct = 0
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(dataset)))
            x, y = dataset.get(idx)
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / max(1, len(dataset))


def check_replicas(model: nn.Module, tol: float = 1e-4) -> None:
    """Raise on every rank when the ranks' weights differ: a method that updates parameters outside DDP, or
    ranks that started from different weights (e.g. a teacher loaded on one rank only), fail loudly here instead
    of silently training divergent models of which only rank 0's is saved."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    mine = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.linspace(0, 1, len(flat), device=flat.device,
                                                                               dtype=flat.dtype)).sum()])
    ref = mine.clone()
    dist.broadcast(ref, 0)
    gap = ((mine - ref).abs() / ref.abs().clamp_min(1.0)).max().reshape(1)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    if gap.item() > tol:
        raise RuntimeError(f"DDP replicas diverged (relative weight-fingerprint gap {gap.item():.3g}); "
                           "every parameter update must go through the DDP-wrapped module")


@dataclass
class Prepared:
    """Everything one training run needs, built once: by :func:`train`, and by the speed benchmark."""

    cfg: TrainConfig
    device: torch.device
    model: nn.Module
    net: nn.Module
    method: Any
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    spec: ModelSpec
    arch_options: dict
    task: str
    test_set: Any
    generator: torch.Generator
    amp_dtype: Optional[torch.dtype]
    channels_last: bool


def prepare(cfg: TrainConfig, rank: int = 0, world: int = 1, device: Optional[torch.device] = None) -> Prepared:
    """Data, model, method, loader, optimizer and scheduler for ``cfg`` (no resume, nothing written)."""
    from training.data import BatchLoader, load_dataset
    from training.methods import build_method, method_class
    from training.models import build_model, model_task

    device = device or resolve_device(cfg.device)
    torch.set_num_threads(cfg.num_threads or owned_cores())
    seed_everything(cfg.seed)  # identical initial weights on every rank
    train_set = load_dataset(cfg.data.name, "train", cfg.data.root, **cfg.data.options)
    test_set = load_dataset(cfg.data.name, "test", cfg.data.root, **cfg.data.options)
    sub = fixed_subset(len(train_set), cfg.data.train_subset, cfg.seed)
    if sub is not None:
        train_set = train_set.subset(sub)

    task = model_task(cfg.model.arch)
    arch_options = model_options(cfg, train_set, task)
    model, spec = build_model(cfg.model.arch, **arch_options)
    robust = method_class(cfg.method.name).adversarial
    spec = spec.model_copy(update={"method": cfg.method.name, "threat_model": cfg.method.attack if robust else None})
    channels_last = cfg.speed.channels_last and len(spec.input_size) == 2
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    generator = seed_everything(cfg.seed * 1000 + rank)  # per-rank randomness for attacks and sampling
    if cfg.init_from:
        start = load_checkpoint(cfg.init_from, device)
        if start["spec"]["arch"] != spec.arch:
            raise ValueError(f"init_from {cfg.init_from} is a {start['spec']['arch']}, this run a {spec.arch}")
        model.load_state_dict(start["model"])
    method = build_method(cfg.method, spec=spec, train_set=train_set, device=device, generator=generator,
                          rank=rank, world_size=world, train_config=cfg)
    method.setup(model)

    loader = method.make_loader(train_set, cfg, rank, world)
    if loader is None:
        loader = BatchLoader(train_set, cfg.batch_size, shuffle=True, drop_last=True, augment=cfg.data.augment,
                             seed=cfg.seed, rank=rank, world_size=world)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    net: nn.Module = TrainModule(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg.optim, trainable, steps_per_epoch, cfg.epochs)
    return Prepared(cfg, device, model, net, method, loader, optimizer, scheduler, steps_per_epoch, spec,
                    arch_options, task, test_set, generator, autocast_dtype(cfg.speed.precision, device),
                    channels_last)


def train_step(p: Prepared, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """One optimiser step on the batch (x [B, C, H, W] in [0, 1], y [B]): the method's loss (its attacks included)
    under bf16 autocast when ``p.amp_dtype`` is set, then backward, step and schedule. Returns the method's figures."""
    x, y = x.to(p.device, non_blocking=True), y.to(p.device, non_blocking=True)
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(p.device.type, dtype=p.amp_dtype or torch.bfloat16, enabled=p.amp_dtype is not None):
        loss, figs = p.method.training_step(p.net, p.model, x, y)
    p.optimizer.zero_grad(set_to_none=True)
    loss.float().backward()
    p.optimizer.step()
    p.scheduler.step()
    return figs


RESUME_FREE_KEYS = ("resume", "out_dir", "epochs", "device", "num_threads", "eval_every", "speed")


def _config_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(now)):
            out += _config_diff(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}: {saved!r} -> {now!r}"]


def resume_mismatch(saved_config: dict, cfg: TrainConfig) -> list[str]:
    """The keys (with old -> new values) in which ``cfg`` differs from the config that wrote a checkpoint,
    ignoring keys that may change across a resume (epochs, device, threads, speed options, ...)."""
    saved, now = dict(saved_config), cfg.model_dump(mode="json")
    for k in RESUME_FREE_KEYS:
        saved.pop(k, None)
        now.pop(k, None)
    return _config_diff(saved, now)


def train(cfg: TrainConfig) -> Path:
    """Train per ``cfg``; returns the output folder holding ``model.pt``, ``last.pt``, ``config.yaml``,
    ``metrics.jsonl``. Under torchrun, every rank trains its shard and rank 0 writes. A refused resume writes
    nothing, so the folder's record never disagrees with its weights."""
    rank, world, local_rank = _dist_env()
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    last = out / "last.pt"
    state = None
    if cfg.resume and last.is_file():
        state = load_checkpoint(last, device)
        diff = resume_mismatch(state["config"], cfg)
        if diff:
            raise ValueError(f"{last} was written by a different config ({'; '.join(diff)}); use another out_dir, "
                             "the same settings, or --set resume=false")
    owns_group = False
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        # A caller that trains several models in one torchrun job initialises the group once itself: re-initialising
        # after destroy_process_group hangs under torchrun's agent store.
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns_group = True
    p = prepare(cfg, rank, world, device)
    model, method, optimizer, scheduler, generator = p.model, p.method, p.optimizer, p.scheduler, p.generator
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        log.info("training %s: device %s, %d threads, %s, %s", cfg.method.name, device, torch.get_num_threads(),
                 "bf16 autocast" if p.amp_dtype else "fp32", "channels_last" if p.channels_last else "NCHW")

    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state.get("method_state", {}))
        if "rng" in state:
            generator.set_state(state["rng"]["generator"].cpu())
            torch.set_rng_state(state["rng"]["torch"].cpu())
        start_epoch = state["epoch"]
        if is_main:
            log.info("resumed from %s at epoch %d", last, start_epoch)

    metrics_path = out / "metrics.jsonl"
    metrics = {}
    steps_per_epoch = p.steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        p.loader.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        running: dict[str, float] = {}
        bar = tqdm(total=steps_per_epoch, desc=f"{cfg.method.name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not is_main, leave=False, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
        for step, (x, y) in enumerate(p.loader):
            if step >= steps_per_epoch:
                break
            figs = train_step(p, x, y)
            for k, v in figs.items():
                running[k] = running.get(k, 0.0) + float(v)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in figs.items()})
        bar.close()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "seconds": round(seconds, 2), "lr": scheduler.get_last_lr()[0],
                   **{k: v / max(1, steps_per_epoch) for k, v in running.items()}}
        if is_main and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs) \
                and p.task == "classification":
            metrics["test_acc"] = clean_accuracy(model, p.test_set, device)
        if is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info("epoch %d: %s", epoch + 1, json.dumps(metrics))
            weights = {k: v.contiguous() for k, v in model.state_dict().items()}
            base = {"model": weights, "spec": p.spec.model_dump(mode="json"), "arch_options": p.arch_options,
                    "config": cfg.model_dump(mode="json"), "epoch": epoch + 1, "metrics": metrics}
            save_atomic(base, out / "model.pt")
            save_atomic({**base, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "method_state": method.state_dict(), "rng": {"generator": generator.get_state(),
                                                                      "torch": torch.get_rng_state()}}, last)
        if world > 1:
            check_replicas(model)
            dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return out
