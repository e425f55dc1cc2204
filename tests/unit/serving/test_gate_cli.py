from serving.cli import main


def test_gate_names_a_task_mismatch(classifier_export, embedder_export, capsys):
    rc = main(["gate", "--set", f"baseline={classifier_export}", "--set", f"candidate={embedder_export}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "is a classification model and the candidate" in err and "a gate compares two models of one task" in err
    assert "probe set or attack config" not in err
