"""Contract every registered model keeps: shapes, features, gradients, normalisation, TorchScript."""
import inspect
import io

import pytest
import torch
import torch.nn.functional as F

from training.models import Normalize, list_models, model_task

from ._cases import batch_for, build_small

# TorchScript is the serving artifact a handler attacks (ONNX has no gradients), so its deprecation in
# torch 2.13 is known and accepted; the warning would only bury real ones.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

MODELS = list_models()
EMBEDDERS = [m for m in MODELS if model_task(m) == "embedding"]


def _out_dim(spec):
    return spec.num_classes if spec.task == "classification" else spec.embedding_dim


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_finite(name):
    model, spec = build_small(name)
    model.eval()
    x = batch_for(spec, batch=3)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, _out_dim(spec))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_forward_argument_is_named_x(name):
    # ONNX export's dynamic_shapes is keyed by this name.
    model, _ = build_small(name)
    assert list(inspect.signature(model.forward).parameters) == ["x"]


@pytest.mark.parametrize("name", MODELS)
def test_forward_leaves_its_input_untouched(name):
    model, spec = build_small(name)
    x = batch_for(spec)
    before = x.clone()
    model(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", EMBEDDERS)
def test_embeddings_have_unit_norm_and_differ_across_inputs(name):
    model, spec = build_small(name)
    model.eval()
    with torch.no_grad():
        emb = model(batch_for(spec, batch=4))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    # A collapsed embedder (every image to one point) would also have unit norm.
    assert (emb[0] - emb[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_features_shapes_and_same_pass_output(name):
    model, spec = build_small(name)
    model.eval()
    x = batch_for(spec, batch=3)
    with torch.no_grad():
        fmap, pooled, out = model.features(x)
        expected = model(x)
    assert fmap.dim() == 4 and fmap.shape[0] == 3 and fmap.shape[2] >= 1 and fmap.shape[3] >= 1
    # rep is what the output layer (the model's last nn.Linear) consumes: AGKD-BML's triplet representation.
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert pooled.dim() == 2 and pooled.shape == (3, head.in_features)
    with torch.no_grad():
        from_rep = head(pooled)
    if spec.task != "classification":  # embedders: unit-norm output
        from_rep = torch.nn.functional.normalize(from_rep, dim=1)
    torch.testing.assert_close(from_rep, out)
    assert out.shape == (3, _out_dim(spec))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # Every fmap is taken after a ReLU: AGKD-BML's attention map assumes non-negative activations.
    assert (fmap >= 0).all() and (fmap > 0).any()


@pytest.mark.parametrize("name", MODELS)
def test_features_are_differentiable_with_respect_to_the_input(name):
    """features() gives the tensors the methods need, not detached copies: gradients flow through them."""
    model, spec = build_small(name)
    model.eval()
    x = batch_for(spec).requires_grad_(True)
    fmap, pooled, logits = model.features(x)
    assert fmap.requires_grad and pooled.requires_grad and logits.requires_grad
    (grad,) = torch.autograd.grad(fmap.sum() + pooled.sum() + logits.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model, spec = build_small(name)
    model.train()
    x = batch_for(spec, batch=4)
    out = model(x)
    if spec.task == "classification":
        loss = F.cross_entropy(out, torch.arange(4) % spec.num_classes)
    else:
        # A random projection: the sum of a unit vector's entries alone has a degenerate gradient direction.
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    not_finite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not_finite == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


@pytest.mark.parametrize("name", MODELS)
def test_normalize_is_the_first_layer_and_uses_the_spec(name):
    model, spec = build_small(name)
    model.eval()
    attr, first = next(iter(model.named_children()))
    assert isinstance(first, Normalize)
    assert not list(first.parameters()), "mean/std must be buffers, never trained"
    assert {"mean", "std"} <= {n for n, _ in first.named_buffers()}
    assert tuple(first.mean.flatten().tolist()) == pytest.approx(spec.mean)
    assert tuple(first.std.flatten().tolist()) == pytest.approx(spec.std)
    # Normalisation happens exactly once, at the start: skipping the layer and feeding pre-normalised
    # pixels gives the same output.
    x = batch_for(spec)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = model(x)
        setattr(model, attr, torch.nn.Identity())
        got = model((x - mean) / std)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_normalize_buffers_travel_in_the_state_dict(name):
    model, _ = build_small(name)
    attr, _ = next(iter(model.named_children()))
    keys = set(model.state_dict())
    assert {f"{attr}.mean", f"{attr}.std"} <= keys


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager_and_keeps_features(name):
    model, spec = build_small(name)
    model.eval()
    x = batch_for(spec, batch=3)
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        eager_out = model(x)
        eager_feats = model.features(x)
        for module in (scripted, loaded):
            torch.testing.assert_close(module(x), eager_out, atol=1e-5, rtol=0)
            for got, want in zip(module.features(x), eager_feats):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_is_differentiable_for_attacks_at_serving_time(name):
    model, spec = build_small(name)
    model.eval()
    scripted = torch.jit.script(model)
    x = batch_for(spec).requires_grad_(True)
    (grad,) = torch.autograd.grad(scripted(x).sum(), x)
    (expected,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_is_deterministic_and_batch_independent(name):
    """Dropout and BatchNorm must follow eval(): one image's output cannot depend on its batch-mates."""
    model, spec = build_small(name)
    model.eval()
    x = batch_for(spec, batch=3)
    with torch.no_grad():
        full = model(x)
        alone = model(x[:1])
        again = model(x)
    torch.testing.assert_close(alone, full[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, full, atol=0, rtol=0)
