"""The model zoo: every card matches its weights and renders from its JSON; every model loads weights-only, exports
with parity and passes ``zoo verify`` (its card's verification protocol); ``zoo add`` writes an entry from a run
folder, and verification fails when an entry's weights are not the ones its card measured."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil

import pytest
import torch

from serving.cli import main
from serving.zoo.card import CARD_JSON, CARD_MD, budget_label, render_markdown
from serving.zoo.commands import (
    REPO_ZOO,
    ZooAddConfig,
    ZooExportConfig,
    ZooVerifyConfig,
    add,
    export,
    headline,
    load,
    names,
    read_card,
    verify,
)
from tests.unit.serving.builders import write_untrained_checkpoint

ZOO = REPO_ZOO
MODELS = names(ZOO)
CLASSIFIERS = [n for n in MODELS if read_card(ZOO / n)["task"] == "classification"]


@pytest.fixture(autouse=True)
def one_thread():
    """The zoo commands run single-threaded here (num_threads=1: on a shared 2-core machine, oversubscribed
    OpenMP threads cost far more than they give); the process's setting is restored after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_zoo_holds_models():
    assert MODELS, f"no model cards under {ZOO}"


@pytest.mark.parametrize("name", MODELS)
def test_card_hash_matches_weights(name):
    card = read_card(ZOO / name)
    weights = ZOO / name / card["weights"]["file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["weights"]["sha256"]
    assert weights.stat().st_size == card["weights"]["bytes"]
    # The repository carries the weights: SmallCNN is 1.3 MB, C2F2 (robrank's 28 x 28 embedder, 3.8 M float32
    # parameters) 15 MB; anything larger belongs outside git.
    assert weights.stat().st_size < 16 << 20, "zoo weights should be at most a C2F2's size"


@pytest.mark.parametrize("name", MODELS)
def test_card_renders_from_its_json(name):
    card = read_card(ZOO / name)
    assert (ZOO / name / CARD_MD).read_text() == render_markdown(card)
    for plot in card["plots"].values():
        assert (ZOO / name / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if card["task"] == "classification":
        assert "robustness_curve" in card["plots"]
    else:
        assert "ers_terms" in card["plots"]


@pytest.mark.parametrize("name", MODELS)
def test_weights_load_weights_only(name):
    card = read_card(ZOO / name)
    state = torch.load(ZOO / name / card["weights"]["file"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model, spec, _ = load(ZOO, name)
    assert spec.arch == card["arch"] and spec.method == card["method"]
    assert set(model.state_dict()) == set(state)


@pytest.mark.parametrize("name", MODELS)
def test_exports_with_parity_and_verifies(name, tmp_path):
    out = export(ZooExportConfig(zoo_dir=str(ZOO), name=name, out_dir=str(tmp_path / "export"), num_threads=1))
    manifest = json.loads((out / "spec.json").read_text())
    card = read_card(ZOO / name)
    for checks in manifest["parity"]["checks"].values():
        assert all(c["max_abs_diff"] <= manifest["parity"]["tolerance"] and c["top1_equal"] for c in checks)
    assert manifest["exported"]["checkpoint_sha256"] == card["weights"]["sha256"]
    if card["task"] == "classification":  # the card's figures travel into spec.json
        assert manifest["evaluation"]["clean_accuracy"] == card["evaluation"]["figures"]["clean"]["value"]
    ok, lines = verify(ZooVerifyConfig(zoo_dir=str(ZOO), name=name, out_dir=str(tmp_path / "verify"), num_threads=1))
    assert ok, "\n".join(lines)


def test_budget_labels_carry_every_step():
    assert budget_label({"name": "apgd-t", "steps": 100}, num_classes=10) == "APGD-T-100x9"
    assert budget_label({"name": "apgd-t", "steps": 50}, num_classes=4) == "APGD-T-50x3"
    assert budget_label({"name": "apgd-ce", "steps": 100}) == "APGD-CE-100"
    assert budget_label({"name": "pgd", "steps": 20, "restarts": 5}) == "PGD-20, 5 restarts"
    assert budget_label({"name": "fgsm", "steps": 1}) == "FGSM"


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    """An entry added from a run folder holding an untrained SmallCNN, on 12 test points, without the curve."""
    root = tmp_path_factory.mktemp("zoo")
    run = root / "run"
    write_untrained_checkpoint(run / "model.pt")
    (run / "config.yaml").write_text("method: {name: standard}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 2.5}) + "\n")
    dest = add(ZooAddConfig(zoo_dir=str(root / "zoo"), run_dir=str(run), name="untrained", subset=12, curve_eps=(),
                            sanity_checks=False, verify_subset=12, command="robustserve train ...",
                            budget_note="untrained", num_threads=1))
    return root / "zoo", dest


def test_add_writes_a_complete_entry(added):
    zoo, dest = added
    assert names(zoo) == ["untrained"]
    card = json.loads((dest / CARD_JSON).read_text())
    assert (dest / CARD_MD).read_text() == render_markdown(card)
    assert card["training"]["command"] == "robustserve train ..." and card["training"]["seconds"] == 2.5
    labels = [a["label"] for a in card["evaluation"]["attacks"]]
    assert labels[-1] == "APGD-T-100x9", labels  # the benchmark suite's budgets, not the verification's
    assert card["evaluation"]["n"] == 12 and card["verification"]["n"] == 12
    for f in card["evaluation"]["figures"].values():
        assert f["ci95"][0] <= f["value"] <= f["ci95"][1]
    assert json.loads((dest / "evaluation.json").read_text())["checkpoint"] == "model.pt"
    with pytest.raises(FileExistsError):
        add(ZooAddConfig(zoo_dir=str(zoo), run_dir=str(dest.parent.parent / "run"), name="untrained"))


def test_verify_fails_when_the_weights_are_not_the_carded_ones(added, tmp_path):
    zoo, dest = added
    assert verify(ZooVerifyConfig(zoo_dir=str(zoo), name="untrained", out_dir=str(tmp_path / "a"), num_threads=1))[0]
    fake = tmp_path / "zoo"
    shutil.copytree(dest, fake / "untrained")
    # Weights changed behind the card's back: refused before any evaluation.
    trained = read_card(ZOO / CLASSIFIERS[0])
    shutil.copy(ZOO / CLASSIFIERS[0] / trained["weights"]["file"], fake / "untrained" / "model.pt")
    with pytest.raises(ValueError, match="SHA-256"):
        verify(ZooVerifyConfig(zoo_dir=str(fake), name="untrained", out_dir=str(tmp_path / "b"), num_threads=1))
    # A card re-hashed to other weights: the figures no longer lie in its intervals.
    card = read_card(fake / "untrained")
    card["weights"].update(sha256=trained["weights"]["sha256"], bytes=trained["weights"]["bytes"])
    (fake / "untrained" / CARD_JSON).write_text(json.dumps(card))
    ok, lines = verify(ZooVerifyConfig(zoo_dir=str(fake), name="untrained", out_dir=str(tmp_path / "c"),
                                       num_threads=1))
    assert not ok and any("OUTSIDE" in line for line in lines), "\n".join(lines)


def test_verify_full_records_the_whole_test_set_in_the_card(added, tmp_path):
    """``verify --full --set record=true`` on an untrained SmallCNN (cheap: most of its attacks end after the few
    points it gets right): the whole test set's figures land in card.json and card.md, the weights stay the carded
    ones and the headline record stays the 12-point one."""
    zoo, dest = added
    copy = tmp_path / "zoo"
    shutil.copytree(dest, copy / "untrained")
    before = read_card(copy / "untrained")
    with pytest.raises(ValueError, match="add --full"):
        verify(ZooVerifyConfig(zoo_dir=str(copy), name="untrained", record=True, num_threads=1))
    ok, lines = verify(ZooVerifyConfig(zoo_dir=str(copy), name="untrained", full=True, record=True,
                                       out_dir=str(tmp_path / "v"), num_threads=1))
    card = read_card(copy / "untrained")
    full = card["full_test"]
    assert full["n"] == 10000 and full["points"] == "full test set"
    assert full["within_headline_ci"] == ok and (not full["outside"]) == ok
    assert card["evaluation"] == before["evaluation"] and card["weights"] == before["weights"]
    md = (copy / "untrained" / CARD_MD).read_text()
    assert md == render_markdown(card) and "## On the whole test set" in md
    assert json.loads((copy / "untrained" / card["full_test_file"]).read_text())["checkpoint"] == "model.pt"
    assert headline(card).endswith("(10000 points)")
    assert verify(ZooVerifyConfig(zoo_dir=str(copy), name="untrained", out_dir=str(tmp_path / "w"),
                                  num_threads=1))[0], "the entry still verifies after the rewrite"


def test_every_zoo_example_is_a_valid_invocation(tmp_path, monkeypatch, capsys):
    from serving.cli import ZOO

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pgd-at").mkdir(parents=True)  # the run folder `zoo add`'s example names
    for action, cmd in ZOO.items():
        argv = shlex.split(cmd.example)
        assert argv[:3] == ["robustserve", "zoo", action], cmd.example
        assert main(argv[1:] + ["--dry-run"]) == 0, (cmd.example, capsys.readouterr().err)
    assert main(["zoo", "add", "runs/none", "--name", "x", "--dry-run"]) == 2
    assert "run_dir: runs/none does not exist" in capsys.readouterr().err


def test_cli_lists_and_refuses_unknown_names(capsys):
    assert main(["zoo", "list", "--set", f"zoo_dir={ZOO}"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in MODELS)
    assert main(["zoo", "show", "no-such-model", "--set", f"zoo_dir={ZOO}"]) == 1
    assert "no zoo model 'no-such-model'" in capsys.readouterr().err
    assert main(["zoo", "verify", MODELS[0], "--full", "--set", f"zoo_dir={ZOO}", "--dry-run"]) == 0
    assert "full: true" in capsys.readouterr().out


def test_embedder_records_give_intervals_where_the_figures_allow_them():
    from serving.zoo.card import embedder_record, outside_ci

    terms = {k: 50.0 for k in ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")}
    report = {"task": "embedding", "gallery": 10000, "queries": 100, "points": "queries: first 100",
              "benign": {"R@1": 80.0, "mAP@R": 40.0}, "attacks": {"ES:R": 50.0, "LTM": 0.0, "CA+": 3.0},
              "terms": terms, "terms_se": {**{k: 2.0 for k in terms}, "LTM": 0.0}, "ERS": 50.0, "ERS_se": 1.0,
              "profile": {"name": "rob28", "eps": 0.302, "step": 0.0118, "steps": 32}, "config": {"subset": 100}}
    rec = embedder_record(report)
    f = rec["figures"]
    assert f["R@1"]["ci95"][0] < 80.0 < f["R@1"]["ci95"][1] and f["mAP@R"]["ci95"] is None
    assert f["ERS term CA+"]["ci95"] == [50.0 - 3.92, 50.0 + 3.92] and f["ERS term LTM"]["ci95"] is None
    assert f["ES:R (% of queries)"]["k"] == 50 and f["ERS"]["ci95"] == [50.0 - 1.96, 50.0 + 1.96]
    moved = embedder_record({**report, "benign": {"R@1": 70.0, "mAP@R": 10.0}})
    assert [b.split(":")[0] for b in outside_ci(rec, moved)] == ["R@1"]  # mAP@R has no interval to leave
    rare = embedder_record({**report, "terms": {**terms, "GTT": 0.03}, "terms_se": {"GTT": 0.017}})
    assert rare["figures"]["ERS term GTT"]["ci95"] == [0.0, 0.03 + 1.96 * 0.017]  # a percentage never goes below 0
