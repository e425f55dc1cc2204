"""The serving benchmark's repeats reduce to medians, and its section renders them with the ratios."""
from serving.bench.load import OURS, PLAIN, markdown, median_point


def pt(c, rps, p50, p99, worker):
    return {"concurrency": c, "requests": int(rps * 6), "seconds": 6.0, "req_per_s": rps, "p50_ms": p50,
            "p99_ms": p99, "errors": 0, "cpu_pct": {"worker": worker, "frontend": 20.0, "client": 5.0}}


def test_median_of_each_figure():
    m = median_point([pt(32, 1000, 10, 40, 60), pt(32, 1500, 12, 30, 70), pt(32, 1200, 30, 90, 65)])
    assert (m["req_per_s"], m["p50_ms"], m["p99_ms"], m["cpu_pct"]["worker"]) == (1200, 12, 40, 65)
    assert m["concurrency"] == 32 and m["repeats"] == 3
    assert median_point([pt(1, 100, 8, 9, 10)])["repeats"] == 1


def test_markdown_states_repeats_and_ratios():
    result = {"config": {"onnxruntime_threads": 1, "batch_size": 16, "max_batch_delay_ms": 5, "seconds_per_point": 6,
                         "repeats": 3, "classifier": "untrained SmallCNN", "embedder": "untrained C2F2"},
              "machine": {"cores": 2, "load_average_before": [1.0, 1.0, 1.0]},
              "single_image": {PLAIN: [pt(32, 1000, 20, 50, 70)], OURS: [pt(32, 1400, 15, 40, 70)]}}
    md = markdown(result)
    assert "measured 3 times" in md and "median" in md
    assert "| 32 | 1.40 | 0.75 | 0.80 |" in md


def test_markdown_with_the_archive_sized_to_the_machine():
    from serving.bench.load import OURS_SIZED

    result = {"config": {"onnxruntime_threads": 1, "batch_size": 16, "max_batch_delay_ms": 5, "seconds_per_point": 6,
                         "repeats": 1, "sized_workers": 2, "classifier": "c", "embedder": "e"},
              "machine": {"cores": 2, "load_average_before": [0.5, 0.5, 0.5]},
              "single_image": {PLAIN: [pt(8, 500, 10, 20, 50)], OURS: [pt(8, 550, 10, 20, 50)],
                               OURS_SIZED: [pt(8, 1000, 5, 10, 90)]},
              "multi_image": [{**pt(8, 100, 50, 90, 80), "images_per_request": 16, "images_per_s": 1600,
                               "model": OURS},
                              {**pt(8, 200, 30, 60, 160), "images_per_request": 16, "images_per_s": 3200,
                               "model": OURS_SIZED}]}
    md = markdown(result)
    assert "third archive of ours with 2 workers" in md
    assert "| robustserve, 2 workers | 8 | 1,000.0 |" in md
    assert "| 8 | 1.10 | 1.00 | 1.00 | 0.91 | 2.00 | 0.50 | 0.50 |" in md
    # Each archive's multi-image rate against its own single-image rate.
    assert "| robustserve | 16 | 100.0 | 1,600 | 50 | 90 | 0 | 2.9 |" in md
    assert "| robustserve, 2 workers | 16 | 200.0 | 3,200 | 30 | 60 | 0 | 3.2 |" in md
