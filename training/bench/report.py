"""BENCHMARKS.md, generated: every figure table there is the rendering of one results JSON.

A results file ``benchmarks/results/<stem>.json`` names its suite (``"suite"``); the suite's module renders it
(``markdown(result) -> str``). Its section in BENCHMARKS.md lies between two marker lines::

    <!-- generated: benchmarks/results/<stem>.json -->
    ...
    <!-- end generated: <stem> -->

and starts with the command that regenerates it (``robustserve bench render --set stems=<stem>``) and the command
that measured it. A second variant of a suite (another ``results=`` path) gets a section of its own. Prose that interprets the
figures lives outside the markers, in hand-written sections that name the JSON they read.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Callable

from serving.runtime.spec import Frozen

RESULTS_DIR = Path("benchmarks/results")
# The repository root: the benchmark scripts under scripts/ render their own results, and an installed
# `robustserve` does not have the root on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = Path("BENCHMARKS.md")

# suite -> (module with markdown(result), section title)
SUITES: dict[str, tuple[str, str]] = {
    "train-speed": ("training.bench.train_speed", "Training speed: fp32 eager vs the fast mode"),
    "robust-classifiers": ("training.bench.robust_classifiers", "Robust classifiers (Fashion-MNIST)"),
    "robust-embedders": ("training.bench.robust_embedders", "Robust embedders (Fashion-MNIST)"),
    "serving": ("serving.bench.load", "Serving: robustserve against the plainest handler"),
    "tune": ("serving.bench.tune", "Serving: batch size, delay and workers chosen by `robustserve tune`"),
    "retrieval-search": ("serving.bench.search", "Retrieval: exact and HNSW gallery search as the gallery grows"),
    "decode-budget": ("scripts.bench_decode", "Decode cost of one maximal request"),
    "ers-definitions": ("scripts.bench_ers_definitions", "Ranking attacks: LTM and GTM, ours and robrank's code"),
}

_BEGIN = "<!-- generated: {path} -->"
_END = "<!-- end generated: {stem} -->"


def results_path(stem: str, results_dir: Path = RESULTS_DIR) -> Path:
    return Path(results_dir) / f"{stem}.json"


def renderer(suite: str) -> tuple[Callable[[dict], str], str]:
    if suite not in SUITES:
        raise ValueError(f"no renderer for suite {suite!r}; known: {', '.join(sorted(SUITES))}")
    module, title = SUITES[suite]
    if module.startswith("scripts.") and str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    return importlib.import_module(module).markdown, title


def render(stem: str, results_dir: Path = RESULTS_DIR) -> str:
    """The whole section (markers included) for ``benchmarks/results/<stem>.json``."""
    path = results_path(stem, results_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the benchmark first")
    result = json.loads(path.read_text())
    markdown, title = renderer(result.get("suite", ""))
    variant = "" if stem == result["suite"].replace("-", "_") else f" [{stem}]"
    head = [
        _BEGIN.format(path=path.as_posix()),
        f"## {title}{variant}",
        "",
        f"Measured by `{result.get('command', '?')}`; this section is generated from `{path.as_posix()}` by "
        f"`robustserve bench render --set stems={stem}`.",
        "",
    ]
    return "\n".join(head) + "\n" + markdown(result).rstrip("\n") + "\n" + _END.format(stem=stem) + "\n"


def _pattern(stem: str, results_dir: Path) -> re.Pattern:
    begin = re.escape(_BEGIN.format(path=results_path(stem, results_dir).as_posix()))
    end = re.escape(_END.format(stem=stem))
    return re.compile(rf"^{begin}\n.*?^{end}\n", re.S | re.M)


def render_into(stem: str, md: Path = BENCHMARKS_MD, results_dir: Path = RESULTS_DIR) -> str:
    """Writes (replaces, or appends) the section of ``stem`` in ``md``; returns the section."""
    section = render(stem, results_dir)
    md = Path(md)
    text = md.read_text() if md.is_file() else "# Benchmarks\n"
    pattern = _pattern(stem, results_dir)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)
    return section


def generated_stems(md: Path = BENCHMARKS_MD) -> list[str]:
    """The stems whose generated sections ``md`` holds, in order."""
    text = Path(md).read_text() if Path(md).is_file() else ""
    return re.findall(r"^<!-- end generated: (\S+) -->$", text, re.M)


def stale_sections(md: Path = BENCHMARKS_MD, results_dir: Path = RESULTS_DIR) -> list[str]:
    """The stems whose section in ``md`` differs from what their JSON renders now (empty: all in sync)."""
    text = Path(md).read_text()
    stale = []
    for stem in generated_stems(md):
        m = _pattern(stem, results_dir).search(text)
        if m is None or m.group(0) != render(stem, results_dir):
            stale.append(stem)
    return stale


def render_all(md: Path = BENCHMARKS_MD, results_dir: Path = RESULTS_DIR) -> list[str]:
    stems = generated_stems(md)
    for stem in stems:
        render_into(stem, md, results_dir)
    return stems


class RenderConfig(Frozen):
    """``robustserve bench render``: regenerate BENCHMARKS.md sections from their results JSON."""

    stems: tuple[str, ...] = ("all",)  # results file stems; "all": every generated section BENCHMARKS.md holds
    benchmarks_md: str = str(BENCHMARKS_MD)
    results_dir: str = str(RESULTS_DIR)


def run(cfg: RenderConfig) -> int:
    md, results = Path(cfg.benchmarks_md), Path(cfg.results_dir)
    stems = generated_stems(md) if "all" in cfg.stems else list(cfg.stems)
    for stem in stems:
        render_into(stem, md, results)
        print(f"rendered {results_path(stem, results).as_posix()} into {md}")
    return 0
