"""The zoo's embedders under two readings of the LTM and GTM attacks: ours, and robrank's code as it runs.

Our ranking attacks (:mod:`serving.runtime.attacks.ranking`) depart from robrank's code in two places, both where
the code does not do what its own comments describe:

- **GTM**: robrank's ``QCSelector._sel_gtm`` computes ``argrank[i, mask_unmatch[i]].argmin()``, a position inside
  the list of items whose label differs from the clean top-1's, and uses it as a gallery index. The attack then
  pulls the query towards gallery item number p (p = how many such items precede the nearest one in gallery order),
  not towards the nearest unmatching item. Ours pulls towards the nearest unmatching item.
- **LTM**: robrank's ``mask_same.scatter(1, loc_self, False)`` is not in place, so the query's own clean copy stays
  in the same-class minimum. Ours leaves it out.

Published ERS figures (robrank's Fashion-MNIST rows among them) come from robrank's code, so a comparison with them
needs our models measured the way that code measures. This script runs, on the queries and seeds of each card's
headline evaluation, LTM and GTM both ways, side by side in one run, and reports the ERS each reading gives (the
other eight terms are the card's: the two readings share them). Our reading must reproduce the card's LTM and
GTM exactly (same queries, same seeds); the result records whether it did.

    .venv/bin/python scripts/bench_ers_definitions.py [--models c2f2-hm-ics c2f2-act] [--queries 1000]
        [--out benchmarks/results/ers_definitions.json]

``robustserve bench render --set stems=ers_definitions`` renders the result into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_ers_definitions")

# robrank's own Fashion-MNIST C2F2 rows (doc/dmltab-fashion.txt in cdluminate/robrank), raw values in the order
# CA+ CA- QA+ QA- TMA ES:D ES:R LTM GTM GTT, for reference beside ours.
ROBRANK_ROWS = {
    "robrank rc2f2p:ptripletN (ACT)": {"R@1": 78.7, "raw": [33.6, 14.6, 38.5, 12.1, 0.259, 0.541, 48.5, 59.5, 60.2,
                                                            0.1]},
    "robrank rc2f2d:ptripletN (EST)": {"R@1": 76.6, "raw": [14.9, 36.1, 20.9, 48.6, 0.966, 0.288, 62.0, 28.0, 20.8,
                                                            0.0]},
}


def _robrank_gtm_target(tgt):
    """GTM's target as robrank's code picks it: the nearest unmatching item's position among the unmatching items,
    read as a gallery index."""
    from serving.runtime.attacks.ranking import _dist

    g, labels = tgt.gallery, tgt.labels
    d = _dist(tgt.orig, g).masked_fill(~tgt.not_self(), float("inf"))
    other = labels.unsqueeze(0) != labels[d.argmin(dim=1)].unsqueeze(1)
    before = torch.arange(g.shape[0], device=g.device).unsqueeze(0) < tgt.target.unsqueeze(1)
    return (other & before).sum(dim=1)


def _robrank_ltm(e, t):
    """LTM's objective as robrank's code runs it: ours with no row's own item left out, so the query's clean copy
    stays in the same-class minimum."""
    from serving.runtime.attacks.ranking import RANK_OBJECTIVES

    return RANK_OBJECTIVES["LTM"](e, dataclasses.replace(t, self_idx=torch.full_like(t.self_idx, -1)))


def _attack(model, name: str, reading: str, xq, yq, self_idx, gallery, labels, profile, seed: int,
            batch_size: int) -> torch.Tensor:
    """Per-query Recall@1 (%) after attack ``name`` under ``reading`` ('ours' or 'robrank')."""
    from serving.runtime.attacks.base import eval_mode
    from serving.runtime.attacks.core import grad_enabled
    from serving.runtime.attacks.pgd import pgd
    from serving.runtime.attacks.ranking import RANK_ATTACKS, rank_attack, select_targets
    from serving.runtime.attacks.threat import LpBall
    from serving.runtime.evaluation.retrieval import embed, measure

    ball = LpBall("linf", profile.eps, profile.step)
    g = torch.Generator().manual_seed(seed * 1009 + RANK_ATTACKS.index(name))  # as attack_queries seeds it
    orig = gallery[self_idx]
    out = []
    for s in range(0, len(xq), batch_size):
        rows = torch.arange(s, min(s + batch_size, len(xq)))
        tgt = select_targets(name, orig[rows], self_idx[rows], yq[rows], gallery, labels, generator=g)
        if reading == "robrank" and name == "GTM":
            tgt.target = _robrank_gtm_target(tgt)
        if reading == "robrank" and name == "LTM":
            with eval_mode(model), grad_enabled():
                x_adv = pgd(lambda xa: _robrank_ltm(model(xa), tgt), xq[rows], ball, profile.steps,
                            random_start=False)
        else:
            x_adv = rank_attack(model, name, xq[rows], tgt, ball, profile.steps)
        out.append(measure(name, embed(model, x_adv), tgt)["r1"].cpu())
    return torch.cat(out)


def run(models: list[str], queries: int, zoo_dir: str, command: str) -> dict:
    from serving.runtime.evaluation.retrieval import ERS_TERMS, PROFILES, ers, ers_terms, embed, standard_error
    from serving.zoo.commands import entry_dir, load
    from training.data import load_dataset
    from training.trainer import fixed_subset

    rows = {}
    for name in models:
        model, spec, card = load(zoo_dir, name)
        ev = json.loads((entry_dir(zoo_dir, name) / "evaluation.json").read_text())  # the headline evaluation
        seed = int(ev["config"]["seed"])
        if ev["queries"] != queries:
            log.warning("%s: the card's evaluation used %d queries, this run %d: the ERS columns mix the two",
                        name, ev["queries"], queries)
        data = card["training"]["config"]["data"]
        test = load_dataset(data["name"], "test", data["root"], **data["options"])
        x, y = test.get(torch.arange(len(test)))
        idx = fixed_subset(len(test), queries, seed)
        gallery = embed(model, x)
        profile = PROFILES[ev["profile"]["name"]]
        row = {"method": card["method"], "R@1": ev["benign"]["R@1"], "card_ERS": ev["ERS"], "queries": queries,
               "card_queries": ev["queries"], "seed": seed, "profile": ev["profile"]["name"], "attacks": {}}
        raw_ours = dict(ev["attacks"])
        raw_robrank = dict(ev["attacks"])
        for attack in ("LTM", "GTM"):
            res = {}
            for reading in ("ours", "robrank"):
                t0 = time.perf_counter()
                r1 = _attack(model, attack, reading, x[idx], y[idx], idx, gallery, y, profile, seed, 250)
                res[reading] = {"recall_at_1": float(r1.mean()), "se": standard_error(r1),
                                "seconds": round(time.perf_counter() - t0, 1)}
                res[reading + "_per_query"] = r1
                log.info("%s %s (%s): R@1 %.1f (%.0f s)", name, attack, reading, res[reading]["recall_at_1"],
                         res[reading]["seconds"])
            diff = res.pop("robrank_per_query").double() - res.pop("ours_per_query").double()
            res["difference"] = {"mean": float(diff.mean()), "se": standard_error(diff)}
            res["ours_matches_card"] = abs(res["ours"]["recall_at_1"] - ev["attacks"][attack]) < 1e-6
            row["attacks"][attack] = res
            raw_ours[attack] = res["ours"]["recall_at_1"]
            raw_robrank[attack] = res["robrank"]["recall_at_1"]
        row["terms_ours"] = ers_terms(raw_ours)
        row["terms_robrank"] = ers_terms(raw_robrank)
        row["ERS_ours"] = ers(raw_ours)
        row["ERS_robrank"] = ers(raw_robrank)
        rows[name] = row
    reference = {}
    for label, r in ROBRANK_ROWS.items():
        raw = dict(zip(ERS_TERMS, r["raw"]))
        reference[label] = {"R@1": r["R@1"], "terms": ers_terms(raw), "ERS": ers(raw)}
    return {"suite": "ers-definitions", "command": command, "rows": rows, "reference": reference,
            "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                        "torch": torch.__version__}}


def markdown(result: dict) -> str:
    from serving.runtime.evaluation.retrieval import ERS_TERMS

    lines = [
        "LTM and GTM as our attacks run them and as robrank's code runs them (its GTM target is a position in the "
        "list of unmatching items read as a gallery index; its LTM keeps the query's own clean copy in the "
        "same-class minimum), on the queries and seeds of each zoo card's evaluation; the other eight terms are "
        "the card's. Recall@1 in % with its standard error over queries; the difference is paired, query by "
        "query.",
        "",
        "| model | R@1 | attack | ours | robrank's code | difference | ours = card |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        for attack, a in row["attacks"].items():
            lines.append(
                f"| {name} | {row['R@1']:.1f} | {attack} | {a['ours']['recall_at_1']:.1f} ± {a['ours']['se']:.1f} | "
                f"{a['robrank']['recall_at_1']:.1f} ± {a['robrank']['se']:.1f} | "
                f"{a['difference']['mean']:+.1f} ± {a['difference']['se']:.1f} | "
                f"{'yes' if a['ours_matches_card'] else 'no'} |")
    lines += ["", "ERS terms (100 = unharmed) and the ERS under each reading, beside robrank's own Fashion-MNIST rows "
              "(`doc/dmltab-fashion.txt` in cdluminate/robrank, measured by its code):", "",
              "| model | reading | R@1 | " + " | ".join(ERS_TERMS) + " | ERS |",
              "|---|---|---|" + "---|" * len(ERS_TERMS) + "---|"]
    for name, row in result["rows"].items():
        for reading in ("ours", "robrank"):
            t = row[f"terms_{reading}"]
            label = "ours" if reading == "ours" else "robrank's LTM/GTM"
            lines.append(f"| {name} | {label} | {row['R@1']:.1f} | " + " | ".join(f"{t[k]:.1f}" for k in ERS_TERMS)
                         + f" | **{row[f'ERS_{reading}']:.1f}** |")
    for label, r in result["reference"].items():
        lines.append(f"| {label} | robrank's code | {r['R@1']:.1f} | "
                     + " | ".join(f"{r['terms'][k]:.1f}" for k in ERS_TERMS) + f" | **{r['ERS']:.1f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["c2f2-hm-ics", "c2f2-act"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--zoo-dir", default=str(ROOT / "zoo"))
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ers_definitions.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from serving.bench import write

    command = ("scripts/bench_ers_definitions.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    result = run(args.models, args.queries, args.zoo_dir, command)
    out = write(result, args.out)
    print(markdown(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
