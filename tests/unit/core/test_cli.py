import subprocess
import sys

import yaml

from serving.cli import main


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--dry-run", "--set", "epochs=7", "--set", "optim.lr=0.3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["epochs"] == 7 and cfg["optim"]["lr"] == 0.3 and cfg["model"]["arch"] == "smallcnn"


def test_every_subcommand_has_config_set_and_dry_run(capsys):
    from serving.cli import COMMANDS

    for name in COMMANDS:
        assert main([name, "--dry-run"]) == 0, name
        assert capsys.readouterr().out.strip(), name


def test_bad_override_exits_2_with_message(capsys):
    assert main(["evaluate", "--set", "eps=oops", "--dry-run"]) == 2
    assert "eps" in capsys.readouterr().err


def test_console_entry_point_is_installed():
    out = subprocess.run([sys.executable, "-m", "serving.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout
