"""ONNX export (dynamo exporter, dynamic batch) and ONNX Runtime parity for every registered model."""
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.models import list_models

from ._cases import batch_for, build_small


def _export(model, x):
    with warnings.catch_warnings():
        # The exporter warns about missing torchvision ops it never needs here.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (x,),
            None,
            dynamo=True,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_onnx_export_has_a_dynamic_batch_and_matches_eager(name):
    model, spec = build_small(name)
    model.eval()
    # Exported at batch 2 and run at 1 and 3: a batch size baked into the graph would fail one of them.
    session = ort.InferenceSession(_export(model, batch_for(spec, batch=2)), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "x"
    assert not isinstance(inp.shape[0], int), f"batch axis is static: {inp.shape}"
    assert list(inp.shape[1:]) == [spec.channels, *spec.input_size]
    for batch in (1, 3):
        x = batch_for(spec, batch=batch, seed=batch)
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
