"""Retrieval: embeddings [N, D]; answers the nearest gallery items; probed by the ranking attacks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from serving.runtime.tasks.base import GateCheck, MetricSample, ServedTask, register_task


@register_task
class Embedding(ServedTask):
    name = "embedding"
    title = "retrieval"
    output = "embedding"
    handler = "handlers/retrieval.py"
    clean_metric = "recall_at_1"
    # ES gives Recall@1 under attack and the embedding shift; QA- and GTT are the cheapest ranking attacks on the
    # query side.
    default_attacks = ("ES", "QA-", "GTT")
    required_attacks = ("ES",)  # Recall@1 under attack and the embedding shift come from ES
    default_steps = 32
    default_step = 3 / 255
    min_probe_n = 2  # Recall@1 of a query needs another image to retrieve

    def probe_attacks(self) -> tuple[str, ...]:
        from serving.runtime.attacks.ranking import RANK_ATTACKS

        return RANK_ATTACKS

    def default_eps(self, threat_eps: Optional[float], input_size: tuple[int, int]) -> float:
        # robrank's radii: 77/255 at 28x28 (MNIST-like), 8/255 for larger images.
        return threat_eps if threat_eps else (77 / 255 if max(input_size) <= 32 else 8 / 255)

    def check_spec(self, spec) -> None:
        if not spec.embedding_dim:
            raise ValueError("an embedding spec needs embedding_dim")

    def parity_adversarial(self, model, x, y, threat, attack, steps, seed):
        # An embedder has no labels to attack: push each embedding away from its clean one (the ES attack).
        import torch

        from serving.runtime.attacks import LpBall
        from serving.runtime.attacks.ranking import embedding_shift_attack

        ball = LpBall.from_threat(threat)
        if attack == "fgsm":
            return embedding_shift_attack(model, x, ball.with_step(ball.eps), 1)
        return embedding_shift_attack(model, x, ball, steps, generator=torch.Generator().manual_seed(seed))

    def parity_scores(self, out: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Similarities to the clean parity embeddings: top-k are nearest neighbours among them."""
        return out @ reference.T

    def evaluation_summary(self, report: dict, source: str):
        from serving.runtime.artifacts import EvaluationSummary

        return EvaluationSummary(source=source, task="embedding", n=report.get("queries"),
                                 points=report.get("points"), benign=report.get("benign"), ers=report.get("ERS"),
                                 ers_terms=report.get("terms"), threat=report.get("profile"))

    def stage_archive(self, stage: Path, build: Any) -> None:
        build.gallery().save(stage)

    def service_class(self) -> type:
        from serving.runtime.service import RetrievalService

        return RetrievalService

    def clean_score(self, outputs: np.ndarray, y: np.ndarray) -> float:
        """Leave-one-out Recall@1 of embeddings [N, D] within the set: the nearest other image shares the label."""
        outputs = np.asarray(outputs, dtype=np.float64)
        if len(outputs) < 2:
            return 0.0
        e = outputs / np.maximum(np.linalg.norm(outputs, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return float(np.mean(y[sim.argmax(1)] == y))

    def measure(self, service, module, cfg, deadline, device) -> dict:
        from serving.runtime.probing.measure import retrieval_probe

        idx = service.index
        return retrieval_probe(module, service.forward, service.probes, cfg, idx.vectors(), idx.labels, idx.ids,
                               deadline=deadline, device=device)

    def headline(self, results: dict) -> Optional[float]:
        """Recall@1 under the embedding-shift attack at the smallest eps."""
        if not results.get("robust"):
            return None
        return float(min(results["robust"], key=lambda r: r["eps"])["recall_at_1_attacked"])

    def gate_checks(self, base: dict, cand: dict, cfg) -> list[GateCheck]:
        checks: list[GateCheck] = [("recall_at_1", base["recall_at_1"], cand["recall_at_1"], cfg.max_clean_drop)]
        for row_b, row_c in zip(base["robust"], cand["robust"]):
            checks.append((f"recall_at_1_attacked@eps={row_b['eps']:.4g}", row_b["recall_at_1_attacked"],
                           row_c["recall_at_1_attacked"], cfg.max_drop))
            checks.append((f"ers_lite@eps={row_b['eps']:.4g}", row_b["ers_lite"], row_c["ers_lite"],
                           cfg.max_ers_drop))
        return checks

    def summary_lines(self, res: dict) -> list[str]:
        lines = [f"  Recall@1 clean {100 * res['recall_at_1']:.2f} % (gallery {res['gallery']}, "
                 f"{res['self_matches_excluded']} self-matches excluded)"]
        for row in res["robust"]:
            lines.append(f"  eps {row['eps']:.4g}: Recall@1 under ES {100 * row['recall_at_1_attacked']:.2f} % "
                         f"(served engine {100 * row['transfer_recall_at_1_attacked']:.2f} %), embedding shift "
                         f"{row['embedding_shift']:.3f}, ERS-lite {row['ers_lite']:.1f} over {sorted(row['terms'])}")
        return lines

    def metric_samples(self, res: dict) -> Iterator[MetricSample]:
        """Figures under attack are those of the first (smallest) eps."""
        row = res["robust"][0]
        yield "recall_at_1_ratio", {"condition": "clean"}, float(res["recall_at_1"])
        yield "recall_at_1_ratio", {"condition": "attacked"}, float(row["recall_at_1_attacked"])
        yield "ers_lite", {}, float(row["ers_lite"])
        yield "embedding_shift", {}, float(row["embedding_shift"])
