"""Classification: logits [N, K]; answers top-k labels; probed by the classification attacks' cascade."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from serving.runtime.tasks.base import GateCheck, MetricSample, ServedTask, register_task

LABELS_FILE = "labels.json"
# The checks of serving.runtime.evaluation.classification.gradient_checks, published as flags.
MASKING_CHECKS = ("zero_gradients", "softmax_outputs", "eps_monotone")


def class_labels(spec) -> tuple[str, ...]:
    """The class names of a classification spec, or the class indices as strings."""
    return spec.class_names or tuple(str(i) for i in range(spec.num_classes or 0))


@register_task
class Classification(ServedTask):
    name = "classification"
    output = "logits"
    handler = "handlers/classification.py"
    clean_metric = "accuracy"
    default_attacks = ("pgd", "cw", "apgd-ce")
    default_steps = 20

    def probe_attacks(self) -> tuple[str, ...]:
        from serving.runtime.probing.params import classifier_attacks

        return classifier_attacks()

    def check_spec(self, spec) -> None:
        if not spec.num_classes:
            raise ValueError("a classification spec needs num_classes")

    def parity_adversarial(self, model, x, y, threat, attack, steps, seed):
        from serving.runtime.attacks import build_attack

        return build_attack(attack, model, threat, steps=steps if attack == "pgd" else None, seed=seed)(x, y)

    def export_files(self, spec, folder: Path) -> dict[str, str]:
        (folder / LABELS_FILE).write_text(json.dumps(list(class_labels(spec)), indent=1))
        return {"labels": LABELS_FILE}

    def probe_reference(self, evaluation, checkpoint: dict) -> Optional[tuple[float, str]]:
        if evaluation is not None and evaluation.clean_accuracy is not None:
            return float(evaluation.clean_accuracy), f"evaluation ({evaluation.source})"
        trained = (checkpoint.get("metrics") or {}).get("test_acc")
        return (float(trained), "the trainer's test accuracy") if trained is not None else None

    def evaluation_summary(self, report: dict, source: str):
        from serving.runtime.artifacts import EvaluationSummary

        robust = tuple({"eps": r["eps"], "worst_case": r["worst_case"], "attacks": r.get("attacks", {})}
                       for r in report.get("results", []))
        return EvaluationSummary(source=source, n=int(report["n"]), points=report.get("points"),
                                 clean_accuracy=float(report["clean_accuracy"]), robust=robust)

    def stage_archive(self, stage: Path, build: Any) -> None:
        # TorchServe's own label-map convention, for tools that look for it.
        labels = class_labels(build.manifest.model)
        (stage / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}))

    def service_class(self) -> type:
        from serving.runtime.service import ClassifierService

        return ClassifierService

    def clean_score(self, outputs: np.ndarray, y: np.ndarray) -> float:
        """Accuracy of logits [N, K]."""
        outputs = np.asarray(outputs)
        return float(np.mean(outputs.argmax(1) == y)) if len(outputs) else 0.0

    def measure(self, service, module, cfg, deadline, device) -> dict:
        from serving.runtime.probing.measure import classifier_probe

        return classifier_probe(module, service.forward, service.probes, cfg, deadline=deadline, device=device)

    def headline(self, results: dict) -> Optional[float]:
        """Worst-case robust accuracy at the smallest eps."""
        if not results.get("robust"):
            return None
        return float(min(results["robust"], key=lambda r: r["eps"])["worst_case"])

    def gate_checks(self, base: dict, cand: dict, cfg) -> list[GateCheck]:
        checks: list[GateCheck] = [("clean_accuracy", base["clean_accuracy"], cand["clean_accuracy"],
                                    cfg.max_clean_drop)]
        for row_b, row_c in zip(base["robust"], cand["robust"]):
            checks.append((f"worst_case@eps={row_b['eps']:g}", row_b["worst_case"], row_c["worst_case"],
                           cfg.max_drop))
        return checks

    def summary_lines(self, res: dict) -> list[str]:
        from serving.runtime.evaluation.classification import flag_summary

        lo, hi = res["clean_ci95"]
        lines = [f"  clean accuracy {100 * res['clean_accuracy']:.2f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f}), "
                 f"served engine {100 * res['serving_clean_accuracy']:.2f} %"]
        for row in res["robust"]:
            lo, hi = row["worst_case_ci95"]
            cols = ", ".join(f"{k} {100 * v:.2f}" for k, v in row["attacks"].items())
            lines.append(f"  eps {row['eps']:g}: {cols}; worst case {100 * row['worst_case']:.2f} % "
                         f"(CI {100 * lo:.1f}-{100 * hi:.1f}); transfer to the served engine "
                         f"{100 * row['transfer_worst_case']:.2f} %")
        lines.append(f"  gradient-masking flags: {flag_summary(res['flags'])}")
        return lines

    def metric_samples(self, res: dict) -> Iterator[MetricSample]:
        yield "clean_accuracy_ratio", {}, float(res["clean_accuracy"])
        for row in res["robust"]:
            eps = f"{row['eps']:g}"
            for lbl, v in row["attacks"].items():
                yield "robust_accuracy_ratio", {"attack": lbl, "eps": eps}, float(v)
            yield "robust_accuracy_ratio", {"attack": "worst", "eps": eps}, float(row["worst_case"])
            for lbl, v in row["transfer"].items():
                yield "transfer_robust_accuracy_ratio", {"attack": lbl, "eps": eps}, float(v)
            yield "transfer_robust_accuracy_ratio", {"attack": "worst", "eps": eps}, float(row["transfer_worst_case"])
        for check in MASKING_CHECKS:
            flag = res["flags"].get(check) or {}
            if flag.get("checked", True):  # eps monotonicity needs two or more eps: no figure rather than a 0
                yield "gradient_masking_flag", {"check": check}, float(bool(flag.get("flag")))
