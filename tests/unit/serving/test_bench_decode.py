"""The decode-cost benchmark runs end to end: every maximal request it builds is accepted by the default budgets,
and the image the former limit let through is refused from its header."""
from scripts.bench_decode import bench, markdown


def test_decode_bench_smoke(classifier_export):
    result = bench(classifier_export, repeats=1)
    assert {r["status"] for r in result["rows"].values()} == {200}
    assert result["former_limit"]["status_now"] == 413
    assert result["worst"]["max_s"] == max(r["max_s"] for r in result["rows"].values())
    assert "Worst case" in markdown(result)
