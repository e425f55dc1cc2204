"""Hardness Manipulation with the Gradual Adversary and the Intra-Class Structure term.

Zhou and Patel, "Enhancing Adversarial Robustness for Deep Metric Learning", CVPR 2022. Per batch: mine
source triplets on the benign batch, pick a destination hardness per triplet (a benign triplet mined with
another rule, a pseudo-hardness of the previous adversarial loss, or a constant), run HM's PGD toward it,
then train on the adversarial triplet, plus lambda * ICS when ``ics_lambda > 0``.

The Gradual Adversary's previous loss is per process: under DDP each rank updates it from its own shard's
adversarial loss, without an all-reduce (as robrank, which keeps it on the module), and checkpoints hold
rank 0's value, which every rank restores on resume.
"""
from __future__ import annotations

from typing import Union

import torch
from pydantic import Field, field_validator

from training.metric import (PSEUDO_HARDNESS, SAMPLERS, GradualAdversary, hardness, hardness_manipulation,
                             ics_loss, sample_triplets, triplet_loss_pml)
from training.methods._embedding import EmbeddingMethod, EmbeddingOptions, SamplerName
from training.methods.base import register_method


class HMOptions(EmbeddingOptions):
    source: SamplerName = "softhard"
    # a sampler name (destination from benign triplets), a pseudo-hardness name, or a constant in [-2, 2]
    destination: Union[float, str] = "lga"
    ics_lambda: float = Field(0.0, ge=0)  # paper: 0.5 (0.05 on many-class data such as SOP)
    early_stop_tol: float = Field(1e-7, ge=0)

    @field_validator("destination")
    @classmethod
    def _check_destination(cls, v):
        if isinstance(v, str):
            if v not in SAMPLERS and v not in PSEUDO_HARDNESS:
                raise ValueError(f"destination {v!r} is neither a sampler ({', '.join(SAMPLERS)}) nor a "
                                 f"pseudo-hardness ({', '.join(PSEUDO_HARDNESS)}) nor a number in [-2, 2]")
        elif not -2.0 <= v <= 2.0:
            raise ValueError(f"a constant destination lies in [-2, 2], got {v}")
        return v


@register_method("hm")
class HM(EmbeddingMethod):
    Options = HMOptions

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        dest = self.options.destination
        self.adversary = None if isinstance(dest, str) and dest in SAMPLERS else \
            GradualAdversary(dest, self.options.margin)

    def destination(self, emb: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        """H_D per source triplet, [t]."""
        if self.adversary is not None:
            return torch.full((t,), self.adversary.target(), device=emb.device)
        a, p, n = sample_triplets(emb, y, self.options.destination, self.options.margin, self.mining_generator)
        return hardness(emb[a], emb[p], emb[n])

    def training_step(self, net, model, x, y):
        o = self.options
        self.prepare(model)
        emb = self.benign_embeddings(model, x)
        a, p, n = sample_triplets(emb, y, o.source, o.margin, self.mining_generator)
        t = a.numel()
        dest = self.destination(emb, y, t)
        if o.destination == o.source:
            # HM[H_S, H_S] is plain training on the source triplets: nothing to move.
            xa, xp, xn, taken = x[a], x[p], x[n], 0
        else:
            r = hardness_manipulation(model, x[a], x[p], x[n], dest, self.ball, self.steps, o.early_stop_tol)
            xa, xp, xn, taken = r.xa, r.xp, r.xn, r.steps
        parts = [xa, xp, xn] + ([x[a], x[p]] if o.ics_lambda > 0 else [])
        e = net(torch.cat(parts))
        ea, ep, en = e[:t], e[t:2 * t], e[2 * t:3 * t]
        loss_adv = triplet_loss_pml(ea, ep, en, o.margin)
        loss = loss_adv
        figs = {"loss_adv": loss_adv.item(), "dest": dest.mean().item(), "pgd_steps": float(taken)}
        if o.ics_lambda > 0:
            ics = ics_loss(e[3 * t:4 * t], ea, e[4 * t:])
            loss = loss + o.ics_lambda * ics
            figs["ics"] = ics.item()
        if self.adversary is not None:
            self.adversary.update(loss_adv.item())
        with torch.no_grad():
            figs["hardness_src"] = hardness(emb[a], emb[p], emb[n]).mean().item()
            figs["hardness_adv"] = hardness(ea, ep, en).mean().item()
        figs["loss"] = loss.item()
        return loss, figs

    def state_dict(self) -> dict:
        return self.adversary.state_dict() if self.adversary is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state)
