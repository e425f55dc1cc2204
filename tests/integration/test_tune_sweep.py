"""``robustserve tune`` end to end: a two-point sweep on real TorchServe instances driven by hey, the winner
written into the archive, every point in the results JSON."""
from __future__ import annotations

import json
import shutil

import pytest

from serving.bench.tune import archive_settings, choose
from serving.cli import main
from tests.unit.serving.builders import archive_small, export_small, write_untrained_checkpoint


needs_hey = pytest.mark.skipif(shutil.which("hey") is None,
                               reason="the load generator hey is not installed (apt-get install hey)")


def tune_small(tmp_path, *settings: str):
    """An untrained SmallCNN archive (batch 16, 5 ms), tuned with 2 s points and ``settings``: (archive, results)."""
    ckpt = write_untrained_checkpoint(tmp_path / "clf" / "model.pt", "smallcnn")
    export = export_small(ckpt, tmp_path / "export")
    mar = archive_small(export, tmp_path / "store", "clf", batch_size=16, max_batch_delay_ms=5)
    results = tmp_path / "tune.json"
    sets = [f"mar={mar}", f"results={results}", "sweep.seconds=2", "sweep.warmup_s=0.5", *settings]
    assert main(["tune", *[a for s in sets for a in ("--set", s)]]) == 0
    return mar, json.loads(results.read_text())


@needs_hey
def test_tune_writes_the_winning_point_into_the_archive(tmp_path):
    mar, out = tune_small(tmp_path, "sweep.batch_sizes=[8]", "sweep.max_batch_delays_ms=[3]", "sweep.workers=[1, 2]",
                          "sweep.concurrency=4")
    measured = [(p["batch_size"], p["max_batch_delay_ms"], p["workers"]) for p in out["points"]]
    assert measured == [(8, 3, 1), (8, 3, 2)]
    assert all(p["requests"] > 0 and p["req_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0 for p in out["points"])
    assert [p["workers_ready"] for p in out["points"]] == [1, 2] and all(p["cpu_pct"]["worker"] > 0
                                                                          for p in out["points"])
    winner = choose(out["points"], out["config"]["p99_tolerance"])
    assert winner is not None and out["chosen"]["batch_size"] == winner["batch_size"]
    assert archive_settings(mar) == {k: winner[k] for k in ("batch_size", "max_batch_delay_ms", "workers")}


@needs_hey
def test_tune_drives_multi_image_v2_requests(tmp_path):
    """sweep.images_per_request: every request is a v2 binary request of N PNGs, answered 200, counted in images/s."""
    _, out = tune_small(tmp_path, "sweep.batch_sizes=[4]", "sweep.max_batch_delays_ms=[2]", "sweep.workers=[1]",
                        "sweep.concurrency=2", "sweep.images_per_request=8")
    (p,) = out["points"]
    assert p["errors"] == 0 and p["requests"] > 0
    assert p["images_per_s"] == pytest.approx(8 * p["req_per_s"], abs=0.1)
    assert "8" in out["config"]["request"] and out["config"]["images_per_request"] == 8
