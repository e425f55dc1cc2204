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
