"""Model cards of the zoo: ``card.json`` (plain data, written by ``robustserve zoo add``) and ``card.md``, rendered
from it by :func:`render_markdown` only, so the two never disagree.

A card's measured figures come in *records* (:func:`classifier_record`, :func:`embedder_record`): the points, the
attack budgets and each figure with its 95 % interval. A card holds two: ``evaluation`` (the headline, the
benchmark suite at its budgets) and ``verification`` (a short, stated protocol that ``zoo verify`` reruns by
default), and a third, ``full_test``, once ``zoo verify --full --set record=true`` has rerun the headline protocol
on the whole test set. Accuracies are fractions in [0, 1] with Wilson intervals; retrieval figures are in % as the
retrieval evaluation reports them, with a Wilson interval where the figure is a proportion of queries (R@k, and the raw
figures of ES:R, LTM, GTM and GTT), +- 1.96 standard errors over the queries for the ERS terms and the ERS, and
none for mAP, mAP@R and NMI (whole-ranking figures without a per-query spread here).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from serving.runtime.evaluation.classification import wilson_interval

CARD_JSON = "card.json"
CARD_MD = "card.md"
CARD_FORMAT = 1
WORST = "worst case"


def budget_label(attack: dict[str, Any], num_classes: Optional[int] = None) -> str:
    """An attack's name with its whole budget, from the attack registry's label: ``PGD-20``, ``APGD-CE-100``,
    ``APGD-T-100x9`` (steps x target classes, at most K - 1), with ``, 5 restarts`` when it restarts.
    ``attack``: an AttackSpec as a dict."""
    from serving.runtime.attacks import get_attack

    options = {k: v for k, v in attack.items() if k not in ("name", "steps", "restarts")}
    return get_attack(attack["name"]).label(attack.get("steps"), restarts=int(attack.get("restarts", 1)),
                                            num_classes=num_classes, **options)


def _fraction(value: float, n: int) -> dict[str, Any]:
    k = int(round(value * n))
    lo, hi = wilson_interval(k, n)
    return {"value": value, "k": k, "n": n, "ci95": [lo, hi]}


# Ranking attacks whose raw figure is the share of queries (in %) with a 0/100 outcome each: ES:R and LTM/GTM
# (the attacked query's top-1 still of its class), GTT (the original top-1 still in the top 4).
PROPORTION_ATTACKS = ("ES:R", "LTM", "GTM", "GTT")


def _percent(value: float, n: int) -> dict[str, Any]:
    k = int(round(value / 100 * n))
    lo, hi = wilson_interval(k, n)
    return {"value": value, "k": k, "n": n, "ci95": [100 * lo, 100 * hi]}


def _normal_ci(value: float, se: Optional[float]) -> Optional[list[float]]:
    """value +- 1.96 standard errors over the queries, clipped to the figures' range [0, 100] (a term near 0, such as
    GTT, would otherwise get a negative bound); None without a standard error or when it is 0 (every query alike: no
    interval to judge a rerun by)."""
    if not se:
        return None
    return [max(0.0, value - 1.96 * se), min(100.0, value + 1.96 * se)]


def classifier_record(report: dict, num_classes: Optional[int]) -> dict[str, Any]:
    """The figures of a classifier's ``evaluation.json`` (training.evaluation.run.evaluate): clean accuracy and,
    at the main eps, each attack's cumulative robust accuracy in the cascade and the worst case per point, each
    with its Wilson 95 % interval; the curve over every eps evaluated; the gradient-masking flags."""
    n = int(report["n"])
    attacks = list(report["attacks"])
    rows = [r for r in report["results"] if r.get("in_table", True)] or report["results"]
    main = min(rows, key=lambda r: r["eps"])
    # The report's keys are the short labels, in the suite's order: pair them with the budgets.
    if len(main["attacks"]) != len(attacks):
        raise ValueError(f"the report lists {len(attacks)} attacks but {len(main['attacks'])} cascade columns")
    labels = [budget_label(a, num_classes) for a in attacks]
    figures = {"clean": _fraction(report["clean_accuracy"], n)}
    for lab, value in zip(labels, main["attacks"].values()):
        figures[lab] = _fraction(value, n)
    figures[WORST] = _fraction(main["worst_case"], n)
    sanity = report.get("sanity") or {}
    return {
        "task": "classification",
        "points": report.get("points"),
        "subset": (report.get("config") or {}).get("subset"),
        "seed": (report.get("config") or {}).get("seed", 0),
        "n": n,
        "eps": main["eps"],
        "norm": attacks[0].get("norm", "linf") if attacks else "linf",
        "attacks": [{**a, "label": lab} for a, lab in zip(attacks, labels)],
        "cascade": bool(report.get("cascade", True)),
        "figures": figures,
        "curve": [{"eps": r["eps"], "worst_case": r["worst_case"],
                   "ci95": list(r.get("worst_case_ci95") or wilson_interval(int(round(r["worst_case"] * n)), n))}
                  for r in sorted(report["results"], key=lambda r: r["eps"])],
        "sanity_flags": {k: bool(v.get("flag")) for k, v in sanity.items() if isinstance(v, dict)},
        "seconds": report.get("seconds"),
    }


def embedder_record(report: dict) -> dict[str, Any]:
    """The figures of an embedder's ``evaluation.json``: benign R@1, R@2, mAP@R, NMI on the full test set
    (queries = gallery), and every ERS term with its raw attack figure and the ERS, on the stated queries."""
    gallery = int(report["gallery"])
    figures: dict[str, Any] = {}
    for key, value in report["benign"].items():
        # R@k is a proportion of the queries (in %); mAP, mAP@R and NMI are not.
        figures[key] = _percent(value, gallery) if key.startswith("R@") else {"value": value, "n": gallery,
                                                                              "ci95": None}
    terms = report.get("terms") or {}
    raw = report.get("attacks") or {}
    queries = int(report["queries"])
    se = report.get("terms_se") or {}
    for key, value in terms.items():
        figures[f"ERS term {key}"] = {"value": value, "raw": raw.get(key), "n": queries,
                                      "ci95": _normal_ci(value, se.get(key))}
    for key in PROPORTION_ATTACKS:
        if raw.get(key) is not None:  # in %, one 0/100 outcome per query: a Wilson interval applies
            figures[f"{key} (% of queries)"] = _percent(raw[key], queries)
    if report.get("ERS") is not None:
        figures["ERS"] = {"value": report["ERS"], "n": queries, "ci95": _normal_ci(report["ERS"], report.get("ERS_se"))}
    profile = report.get("profile") or {}
    return {
        "task": "embedding",
        "points": report.get("points"),
        "subset": (report.get("config") or {}).get("subset"),
        "seed": (report.get("config") or {}).get("seed", 0),
        "n": queries,
        "gallery": gallery,
        "profile": profile,
        "attacks": [{"label": f"{k} ({profile.get('name', '')} eps {profile.get('eps', 0):.4f}, "
                              f"{profile.get('steps')} steps)"} for k in terms],
        "figures": figures,
        "seconds": report.get("seconds"),
    }


def outside_ci(card_record: dict, measured: dict) -> list[str]:
    """Each figure of ``measured`` (a record of the same protocol) that falls outside the 95 % interval the card
    gives it, as a sentence; figures the card gives no interval are not judged (see :func:`unchecked`)."""
    bad = []
    for key, ref in card_record["figures"].items():
        ci = ref.get("ci95")
        if ci is None:
            continue
        got = measured["figures"].get(key)
        if got is None:
            bad.append(f"{key}: not measured")
        elif not ci[0] - 1e-9 <= got["value"] <= ci[1] + 1e-9:
            bad.append(f"{key}: {got['value']:.4g} outside the card's 95 % interval [{ci[0]:.4g}, {ci[1]:.4g}] "
                       f"(card: {ref['value']:.4g})")
    return bad


def unchecked(card_record: dict) -> list[str]:
    return [k for k, v in card_record["figures"].items() if v.get("ci95") is None]


# --- markdown ------------------------------------------------------------------------------------------------


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _figure_rows(record: dict) -> list[str]:
    if record["task"] == "classification":
        lines = ["| figure | accuracy (%) | 95 % interval (%) | correct / points |", "|---|---|---|---|"]
        for key, f in record["figures"].items():
            name = key if key in ("clean", WORST) else f"after {key}"
            lines.append(f"| {name} | {_pct(f['value'])} | {_pct(f['ci95'][0])} - {_pct(f['ci95'][1])} | "
                         f"{f['k']} / {f['n']} |")
        return lines
    lines = ["| figure | value | 95 % interval | raw attack figure |", "|---|---|---|---|"]
    for key, f in record["figures"].items():
        ci = f"{f['ci95'][0]:.2f} - {f['ci95'][1]:.2f}" if f.get("ci95") else "none"
        raw = f"{f['raw']:.4g}" if isinstance(f.get("raw"), (int, float)) else ""
        lines.append(f"| {key} | {f['value']:.2f} | {ci} | {raw} |")
    return lines


def _protocol(record: dict) -> str:
    if record["task"] == "classification":
        suite = ", ".join(a["label"] for a in record["attacks"])
        return (f"{record['n']} test points ({record['points']}); {record['norm']} eps {record['eps']:g}; "
                f"{'cascade (each attack on the points all earlier ones failed on)' if record['cascade'] else ''}: "
                f"{suite}")
    p = record.get("profile") or {}
    return (f"{record['n']} queries against a gallery of {record['gallery']} ({record['points']}); ranking attacks "
            f"{p.get('name', '')}: L-inf eps {p.get('eps', 0):.4f}, {p.get('steps')} steps of {p.get('step', 0):.4f}")


def render_markdown(card: dict) -> str:
    """card.md from card.json; nothing in card.md comes from anywhere else."""
    t = card["training"]
    ev = card["evaluation"]
    steps = f"{t['steps']} optimisation steps" if t.get("steps") else "full epochs"
    lines = [f"# {card['name']}", "", card["summary"], ""]
    if card.get("budget_note"):
        lines += [f"> **{card['budget_note']}**", ""]
    lines += [
        "| | |", "|---|---|",
        f"| task | {card['task']} |",
        f"| architecture | {card['arch']} ({card['parameters']:,} parameters) |",
        f"| method | {card['method']} |",
        f"| threat model (training) | {_threat(card.get('threat_model'))} |",
        f"| data | {card['data']['description']} |",
        f"| seed | {t['seed']} |",
        f"| training time | {t['seconds']:.0f} s on {t['hardware']} ({t['epochs']} epoch(s), {steps}) |",
        f"| weights | `{card['weights']['file']}` ({card['weights']['bytes']:,} bytes, state_dict, "
        f"`torch.load(weights_only=True)`) |",
        f"| SHA-256 | `{card['weights']['sha256']}` |",
        f"| spec | `{card['spec_file']}` |",
        "",
        "## Trained with", "", "```sh", t["command"], "```", "",
        "Resolved training config:", "", "```json", json.dumps(t["config"], indent=1, sort_keys=True), "```", "",
        "## Robustness", "",
        f"Protocol: {_protocol(ev)}.", "",
        *_figure_rows(ev), "",
    ]
    if ev["task"] == "classification" and ev.get("sanity_flags"):
        flags = ", ".join(f"{k} {'FLAGGED' if v else 'ok'}" for k, v in ev["sanity_flags"].items())
        lines += [f"Gradient-masking checks: {flags}.", ""]
    for key, title in (("robustness_curve", "Robustness curve"), ("ers_terms", "ERS terms")):
        if card.get("plots", {}).get(key):
            lines += [f"![{title}]({card['plots'][key]})", ""]
    if ev["task"] == "classification":
        if len(ev.get("curve", [])) > 1:
            lines += ["| eps | worst case (%) | 95 % interval (%) |", "|---|---|---|"]
            lines += [f"| {c['eps']:g} | {_pct(c['worst_case'])} | {_pct(c['ci95'][0])} - {_pct(c['ci95'][1])} |"
                      for c in ev["curve"]]
            lines.append("")
    elif ev.get("curve"):
        lines += ["| eps | R@1 under the embedding-shift attack (%) |", "|---|---|"]
        lines += [f"| {c['eps']:.4f} | {c['recall_at_1']:.2f} |" for c in ev["curve"]]
        lines.append("")
    ft = card.get("full_test")
    if ft:
        judged = ("every figure lies inside the 95 % interval of the table above" if ft["within_headline_ci"] else
                  "outside the intervals of the table above: " + "; ".join(ft["outside"]))
        lines += [
            "## On the whole test set", "",
            f"The headline protocol rerun on every test point by `{ft['command']}` ({ft['recorded']}); {judged}.",
            "",
            f"Protocol: {_protocol(ft)}.", "",
            *_figure_rows(ft), "",
        ]
    v = card["verification"]
    lines += [
        "## Verification", "",
        f"`robustserve zoo verify {card['name']}` reruns this protocol and fails when a figure falls outside its "
        f"95 % interval below; `--full` reruns the headline protocol (\"Robustness\") on the whole test set and checks "
        f"it against the headline's intervals.", "",
        f"Protocol: {_protocol(v)}.", "",
        *_figure_rows(v), "",
        f"Card written {card['created']} by `{card['created_by']}`.", "",
    ]
    return "\n".join(lines)


def _threat(t: Optional[dict]) -> str:
    if not t:
        return "none (standard training)"
    return f"{t['norm']} eps {t['eps']:.4g}, step {t['step']:.4g}"
