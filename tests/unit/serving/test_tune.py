"""robustserve tune's selection rule, its archive rewrite and its request bodies (the sweep itself:
tests/integration/test_tune_sweep.py)."""
from __future__ import annotations

import json
import zipfile

import pytest
import yaml

from serving.bench.tune import archive_settings, choose, grid, with_settings
from serving.runtime.artifacts import verify_archive_files
from tests.unit.serving.builders import archive_small, unpack


def _p(b, d, w, rps, p99, errors=0):
    return {"batch_size": b, "max_batch_delay_ms": d, "workers": w, "req_per_s": rps, "p99_ms": p99, "errors": errors}


def test_choose_takes_the_fastest_point_whose_p99_is_near_the_lowest():
    points = [_p(1, 2, 1, 500, 20.0), _p(8, 2, 1, 900, 24.0), _p(16, 10, 1, 1200, 40.0), _p(16, 2, 2, 950, 26.0)]
    # Lowest p99 20 ms: within 25 % are 20, 24 (and not 26 or 40); the faster of those wins.
    assert choose(points, 0.25) == points[1]
    # Looser tolerance admits 26 ms and then 40 ms.
    assert choose(points, 0.30) == points[3]
    assert choose(points, 1.0) == points[2]


def test_choose_skips_points_with_errors_and_gives_none_when_all_failed():
    points = [_p(1, 2, 1, 500, 20.0), _p(16, 2, 1, 2000, 10.0, errors=3)]
    # The erroring point is neither chosen nor the p99 reference (else 20 ms would be out of 1.25 x 10 ms).
    assert choose(points, 0.25) == points[0]
    assert choose([_p(1, 2, 1, 500, 20.0, errors=1)], 0.25) is None
    failed = {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 4, "failed": "not ready", "errors": None}
    assert choose([failed, points[0]], 0.25) == points[0]
    assert choose([failed], 0.25) is None


def test_choose_breaks_ties_towards_fewer_workers_then_smaller_batches():
    a, b, c = _p(8, 2, 2, 800, 20.0), _p(16, 2, 1, 800, 20.0), _p(8, 2, 1, 800, 20.0)
    assert choose([a, b, c], 0.25) == c


def test_grid_is_every_combination():
    from serving.bench.tune import Sweep

    g = grid(Sweep(batch_sizes=(1, 8), max_batch_delays_ms=(2,), workers=(1, 2)))
    assert len(g) == 4 and {p["batch_size"] for p in g} == {1, 8} and {p["workers"] for p in g} == {1, 2}


@pytest.fixture(scope="module")
def mar(classifier_export, tmp_path_factory):
    return archive_small(classifier_export, tmp_path_factory.mktemp("tune") / "store", "clf", batch_size=16,
                         max_batch_delay_ms=5)


def test_with_settings_rewrites_the_config_and_keeps_the_archive_verifiable(mar, tmp_path):
    before = zipfile.ZipFile(mar).namelist()
    out = with_settings(mar, tmp_path / "other" / "clf.mar", {"batch_size": 4, "max_batch_delay_ms": 7,
                                                               "workers": 2})
    assert archive_settings(out) == {"batch_size": 4, "max_batch_delay_ms": 7, "workers": 2}
    assert archive_settings(mar) == {"batch_size": 16, "max_batch_delay_ms": 5, "workers": 1}
    assert zipfile.ZipFile(out).namelist() == before
    doc = yaml.safe_load(zipfile.ZipFile(out).read("model-config.yaml"))
    assert doc["handler"] == yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))["handler"]
    assert verify_archive_files(unpack(out, tmp_path / "unpacked"))


def test_with_settings_leaves_the_destination_alone_on_failure(tmp_path):
    bad = tmp_path / "bad.mar"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("spec.json", "{}")
    dest = tmp_path / "dest.mar"
    dest.write_bytes(b"the good archive")
    with pytest.raises(ValueError, match="model-config.yaml"):
        with_settings(bad, dest, {"batch_size": 4})
    assert dest.read_bytes() == b"the good archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mar", "dest.mar"]  # no partial file left


def test_markdown_marks_the_chosen_point_and_shows_failed_ones():
    from serving.bench.tune import markdown, rule

    ok = {**_p(8, 2, 1, 900.0, 24.0), "p50_ms": 9.0, "cpu_pct": {"worker": 80.0}, "load_average": 1.0}
    slow = {**_p(1, 2, 1, 300.0, 60.0), "p50_ms": 20.0, "cpu_pct": {"worker": 70.0}, "load_average": 1.0}
    failed = {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 4, "failed": "not ready", "errors": None}
    result = {"model": "clf", "task": "classification", "rule": rule(0.25), "points": [slow, ok, failed],
              "chosen": {k: ok[k] for k in ("batch_size", "max_batch_delay_ms", "workers", "req_per_s", "p50_ms",
                                            "p99_ms")},
              "config": {"concurrency": 16, "request": "one 28 x 28 PNG", "warmup_s": 1, "seconds": 5},
              "machine": {"cores": 2, "load_average_before": [1.0, 1.0, 1.0]}}
    rows = [line for line in markdown(result).splitlines() if line.startswith("| ") and "batch size" not in line]
    assert rows[1].endswith("**chosen** |") and not rows[0].endswith("**chosen** |")
    assert "failed: not ready" in rows[2]


def test_a_tune_whose_points_all_fail_leaves_the_archive_alone_and_records_why(mar, tmp_path, monkeypatch):
    import json
    import shutil

    import serving.bench.tune as tune_mod

    if shutil.which("hey") is None:
        pytest.skip("the load generator hey is not installed")

    def no_server(*args, **kwargs):
        raise TimeoutError("models not ready after 1 s")

    monkeypatch.setattr(tune_mod, "measure", no_server)
    before = mar.read_bytes()
    results = tmp_path / "tune.json"
    cfg = tune_mod.TuneConfig(mar=str(mar), results=str(results),
                              sweep=tune_mod.Sweep(batch_sizes=(1, 4), max_batch_delays_ms=(2,), workers=(1,)))
    with pytest.raises(RuntimeError, match="left as it was"):
        tune_mod.tune(cfg)
    assert mar.read_bytes() == before
    out = json.loads(results.read_text())
    assert out["chosen"] is None and [p["failed"] for p in out["points"]] == ["models not ready after 1 s"] * 2


def test_multi_image_requests_are_what_the_standard_client_sends_and_the_server_reads():
    """The v2 body tune and the serving bench drive multi-image requests with: the same tensors as tritonclient's
    binary request, and the server's own parser gets the PNGs back."""
    import numpy as np
    import tritonclient.http as httpclient

    from serving.runtime import v2binary

    pngs = [b"\x89PNG first", b"\x89PNG second, longer"]
    body, length = v2binary.binary_request(pngs)
    t = httpclient.InferInput("images", [2], "BYTES")
    t.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    ref, ref_length = httpclient.InferenceServerClient.generate_request_body([t])
    for b, n in ((body, length), (ref, ref_length)):
        header, data = v2binary.split_request(b, n)
        inputs = json.loads(header)["inputs"]
        tensors = v2binary.binary_inputs(inputs, data)
        assert inputs[0]["shape"] == [2] and inputs[0]["datatype"] == "BYTES"
        assert tensors[0] == pngs
    assert body[length:] == ref[ref_length:]  # the tensor bytes are identical


def test_load_of_single_and_multi_image_points(mar, tmp_path):
    from serving.bench.tune import Load, Sweep, read_manifest

    m = read_manifest(mar)
    one = Load(m, Sweep(), tmp_path)
    assert (one.content_type, one.path, one.headers, one.images) == ("image/png", "/predictions/{name}", {}, 1)
    assert one.body.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "multi").mkdir()
    multi = Load(m, Sweep(images_per_request=16), tmp_path / "multi")
    assert multi.path == "/v2/models/{name}/infer" and multi.content_type == "application/octet-stream"
    assert int(multi.headers["Inference-Header-Content-Length"]) < len(multi.body.read_bytes())
    assert "16" in multi.what


def test_markdown_of_a_multi_image_sweep_shows_images_per_second():
    from serving.bench.tune import markdown, rule

    ok = {**_p(8, 2, 1, 100.0, 24.0), "p50_ms": 9.0, "cpu_pct": {"worker": 80.0}, "load_average": 1.0,
          "images_per_s": 1600.0}
    result = {"model": "clf", "task": "classification", "rule": rule(0.25), "points": [ok],
              "chosen": {k: ok[k] for k in ("batch_size", "max_batch_delay_ms", "workers", "req_per_s", "p50_ms",
                                            "p99_ms")},
              "config": {"concurrency": 8, "images_per_request": 16, "request": "16 PNGs", "warmup_s": 1,
                         "seconds": 5},
              "machine": {"cores": 2, "load_average_before": [1.0, 1.0, 1.0]}}
    lines = markdown(result).splitlines()
    head = next(line for line in lines if line.startswith("| batch size"))
    row = next(line for line in lines if line.startswith("| 8 "))
    assert "images/s" in head and "1,600.0" in row
    assert head.count("|") == row.count("|")
