import json

import torch

from tests.unit.serving.builders import write_untrained_checkpoint
from training.checkpoint import load_checkpoint, load_model, save_weights_only


def test_the_weights_only_form_loads_like_the_full_one(tmp_path):
    full = write_untrained_checkpoint(tmp_path / "run" / "model.pt", seed=3)
    save_weights_only(load_checkpoint(full), tmp_path / "zoo" / "model.pt")
    # The .pt is a bare state_dict: it loads with weights_only=True, and the rest is plain JSON beside it.
    state = torch.load(tmp_path / "zoo" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((tmp_path / "zoo" / "model.json").read_text())
    assert set(meta) == {"spec", "arch_options", "config", "epoch", "metrics"}
    a, spec_a, _ = load_model(full)
    b, spec_b, ckpt = load_model(tmp_path / "zoo" / "model.pt")
    assert spec_a == spec_b and ckpt["config"] == load_checkpoint(full)["config"]
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
