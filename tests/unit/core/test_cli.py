import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from serving.cli import COMMANDS, main


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--dry-run", "--set", "epochs=7", "--set", "optim.lr=0.3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["epochs"] == 7 and cfg["optim"]["lr"] == 0.3 and cfg["model"]["arch"] == "smallcnn"


@pytest.fixture
def example_files(tmp_path, monkeypatch):
    """A folder holding the files the subcommands' help examples name, as the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/pgd-at/export").mkdir(parents=True)
    torch.save({"model": {}}, tmp_path / "runs/pgd-at/model.pt")
    (tmp_path / "model_store").mkdir()
    (tmp_path / "model_store/clf.mar").write_bytes(b"")
    (tmp_path / "runs/v2").mkdir()
    (tmp_path / "runs/v2/clf.mar").write_bytes(b"")
    return tmp_path


def test_every_subcommand_example_is_a_valid_invocation(example_files, capsys):
    """The example in each subcommand's --help resolves (keys, values, files) under --dry-run."""
    for name, cmd in COMMANDS.items():
        argv = shlex.split(cmd.example)
        assert argv[:2] == ["robustserve", name], cmd.example
        assert main(argv[1:] + ["--dry-run"]) == 0, (cmd.example, capsys.readouterr().err)
        assert capsys.readouterr().out.strip(), name


def test_each_subcommand_help_lists_its_own_keys_defaults_and_example(capsys):
    seen = {}
    for name, cmd in COMMANDS.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert cmd.example in out and "keys (default):" in out, name
        seen[name] = out
    assert "optim.lr" in seen["train"] and "0.05" in seen["train"]
    assert "optim.lr" not in seen["serve"] and "ports.management" in seen["serve"]
    assert "probe.steps" in seen["probe"] and "workdir" in seen["probe"]
    # status, stop and health find the server from its work folder: they list that key, not serve's ports.
    for name in ("status", "stop", "health"):
        assert "workdir" in seen[name] and "ports.management" not in seen[name]
    assert len(set(seen.values())) == len(seen)


def test_dry_run_checks_that_named_files_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--dry-run"]) == 2
    assert "checkpoint: runs/train/model.pt does not exist" in capsys.readouterr().err
    assert main(["gate", "--set", "baseline=nope.mar", "--dry-run"]) == 2
    assert "baseline: nope.mar does not exist" in capsys.readouterr().err
    not_ckpt = tmp_path / "c.yaml"
    not_ckpt.write_text("a: 1\n")
    assert main(["export", "--set", f"checkpoint={not_ckpt}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint" in err and len(err.strip().splitlines()) == 1


def test_dry_run_checks_device_names(capsys):
    assert main(["train", "--set", "device=gpu", "--dry-run"]) == 2
    assert "'gpu' is not a device name; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["train", "--set", "device=cpu", "--dry-run"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["evaluate", "--set", "checkpoint=.", "--set", "device=cuda", "--dry-run"]) == 2
        assert "CUDA is not available here; use --set device=cpu" in capsys.readouterr().err


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "train.yaml"
    bad.write_text("epochs: 3\noptim: {lr: [0.1\n")
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "line " in err and "Traceback" not in err


def test_unknown_key_names_the_valid_ones(capsys):
    assert main(["probe", "--set", "server.workdir=/srv/robustserve", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'workdir'?" in err and "valid keys here: workdir, model, archive" in err
    assert main(["train", "--set", "optim.lrr=0.1", "--dry-run"]) == 2
    assert "did you mean 'lr'?" in capsys.readouterr().err


def test_one_work_folder_key_for_every_command_that_talks_to_a_server(capsys):
    for name in ("serve", "status", "stop", "health", "probe", "monitor"):
        assert main([name, "--set", "workdir=/srv/robustserve", "--dry-run"]) == 0, name
        assert yaml.safe_load(capsys.readouterr().out)["workdir"] == "/srv/robustserve"


def test_scalar_for_a_list_key(capsys):
    assert main(["evaluate", "--set", "checkpoint=.", "--set", "eps=0.05", "--dry-run"]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err
    assert main(["probe", "--set", "probe.eps=0.05", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["probe"]["eps"] == [0.05]


def test_bad_override_exits_2_with_message(capsys):
    assert main(["evaluate", "--set", "eps=oops", "--dry-run"]) == 2
    assert "eps" in capsys.readouterr().err


def test_a_user_mistake_at_run_time_is_one_line_and_a_fault_points_to_v(tmp_path, capsys, monkeypatch):
    # No server ever ran from this folder: the probe key is missing, which the message says, in one line.
    assert main(["probe", "--set", "model=clf", "--set", f"workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no probe key in" in err and "Traceback" not in err
    from serving import cli

    def broken(cfg):
        raise KeyError("x")

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "gate", cli.COMMANDS["gate"].__class__(
        **{**cli.COMMANDS["gate"].__dict__, "runner": broken, "must_exist": ()}))
    assert main(["gate"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "KeyError" in err and "-v" in err
    with pytest.raises(KeyError):
        main(["-v", "gate"])
    monkeypatch.setitem(cli.COMMANDS, "train", cli.COMMANDS["train"].__class__(
        **{**cli.COMMANDS["train"].__dict__, "runner": interrupted}))
    assert main(["train"]) == 130
    assert capsys.readouterr().err.strip() == ("robustserve train: interrupted; the same command resumes from the "
                                                "last checkpoint")


def test_console_entry_point_is_installed():
    out = subprocess.run([sys.executable, "-m", "serving.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout


def test_attacks_named_alone_take_their_own_default_steps(tmp_path, capsys):
    """`attacks=[{name: fgsm}, {name: pgd}]` runs: FGSM takes its one step and PGD its default, without steps given."""
    from pathlib import Path

    ckpt = Path(__file__).resolve().parents[3] / "zoo" / "smallcnn-pgd-at" / "model.pt"
    code = main(["evaluate", "--set", f"checkpoint={ckpt}", "--set", "attacks=[{name: fgsm}, {name: pgd}]",
                 "--set", "subset=16", "--set", "batch_size=16", "--set", "sanity_checks=false", "--set",
                 "device=cpu", "--set", f"out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = yaml.safe_load((tmp_path / "evaluation.json").read_text())
    assert [(a["name"], a["steps"]) for a in report["attacks"]] == [("fgsm", 1), ("pgd", 10)]
    assert "FGSM" in out and "PGD-10" in out
