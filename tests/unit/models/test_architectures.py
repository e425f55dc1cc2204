"""Per-architecture facts: parameter counts against the reference nets, feature-map geometry."""

import pytest
import torch

from training.models import Normalize, build_model


def _count(name, **options):
    # Meta tensors: counting WRN-28-10's 36 M parameters costs no memory and no init time.
    with torch.device("meta"):
        model, _ = build_model(name, **options)
    return sum(p.numel() for p in model.parameters())


def test_smallcnn_matches_trades_smallcnn_parameter_count():
    # TRADES' SmallCNN at 1x28x28, 10 classes: convs 320 + 9,248 + 18,496 + 36,928,
    # fcs 1024*200+200 + 200*200+200 + 200*10+10 = 312,202 (the STACK's "0.31 M").
    assert _count("smallcnn") == 312_202


def test_c2f2_matches_robrank_c2f2_parameter_count():
    # robrank's ranking C2F2 (conv5x5 pad 2: 32, 64; fc 3136->1024; fc 1024->512):
    # 832 + 51,264 + 3,212,288 + 524,800 = 3,789,184, the STACK's "3.8 M" (within 3.75-3.85 M).
    n = _count("c2f2")
    assert 3_750_000 <= n <= 3_850_000
    assert n == 3_789_184


def test_resnet18_cifar_matches_the_standard_parameter_count():
    assert _count("resnet18-cifar") == 11_173_962


def test_wrn_28_10_matches_the_reference_parameter_count():
    assert _count("wrn-28-10") == 36_479_194


def test_resnet18_embedder_is_trunk_plus_linear_512_to_d():
    # ImageNet ResNet-18 without its 1000-way fc (11,176,512) plus 512*D + D.
    assert _count("resnet18-embedder") == 11_176_512 + 512 * 512 + 512
    assert _count("resnet18-embedder", embedding_dim=128) == 11_176_512 + 512 * 128 + 128


def test_head_sizes_follow_the_options():
    assert _count("smallcnn", num_classes=3) == 312_202 - 7 * 201
    assert _count("c2f2", embedding_dim=128) == 3_789_184 - 384 * 1025


def test_smallcnn_fmap_is_the_last_conv_before_its_pool():
    model, _ = build_model("smallcnn")
    model.eval()
    fmap, pooled, logits = model.features(torch.rand(2, 1, 28, 28))
    assert fmap.shape == (2, 64, 8, 8) and pooled.shape == (2, 200) and logits.shape == (2, 10)


def test_smallcnn_takes_other_channels_and_sizes():
    model, spec = build_model("smallcnn", channels=3, input_size=32, num_classes=4)
    model.eval()
    fmap, _, logits = model.features(torch.rand(2, 3, 32, 32))
    assert fmap.shape == (2, 64, 10, 10) and logits.shape == (2, 4)
    assert spec.mean == (0.2860,) * 3


def test_smallcnn_width_multiplies_the_conv_channels():
    # width 2: convs 640 + 36,928 + 73,856 + 147,584, fc1 2048*200+200, fc2 and fc3 as before.
    assert _count("smallcnn", width=2) == 640 + 36_928 + 73_856 + 147_584 + 2048 * 200 + 200 + 40_200 + 2_010
    model, _ = build_model("smallcnn", width=2)
    model.eval()
    fmap, rep, logits = model.features(torch.rand(2, 1, 28, 28))
    assert fmap.shape == (2, 128, 8, 8) and rep.shape == (2, 200) and logits.shape == (2, 10)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="width"):
            build_model("smallcnn", width=bad)


def test_c2f2_fmap_and_embedding():
    model, _ = build_model("c2f2")
    model.eval()
    fmap, pooled, emb = model.features(torch.rand(2, 1, 28, 28))
    assert fmap.shape == (2, 64, 14, 14) and pooled.shape == (2, 1024) and emb.shape == (2, 512)


def test_wrn_fmap_is_after_the_final_bn_relu():
    model, _ = build_model("wrn-28-10", depth=10, widen_factor=2, input_size=16)
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    fmap, _, _ = model.features(x)
    assert fmap.shape == (2, 128, 4, 4)
    with torch.no_grad():
        h = model.conv1(model.normalize(x))
        raw = model.block3(model.block2(model.block1(h)))
        torch.testing.assert_close(fmap, torch.relu(model.bn(raw)))


def test_wrn_depth_sets_the_number_of_blocks():
    for depth, per_group in ((10, 1), (16, 2), (28, 4)):
        with torch.device("meta"):
            model, _ = build_model("wrn-28-10", depth=depth, widen_factor=1)
        assert [len(g) for g in (model.block1, model.block2, model.block3)] == [per_group] * 3


def test_wrn_dropout_option_is_applied_in_training_only():
    model, _ = build_model("wrn-28-10", depth=10, widen_factor=1, input_size=8, dropout=0.3)
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("stem, size, fmap_side", [("imagenet", 64, 2), ("cifar", 32, 4)])
def test_resnet18_embedder_stems(stem, size, fmap_side):
    model, spec = build_model("resnet18-embedder", stem=stem, input_size=size, embedding_dim=16)
    model.eval()
    fmap, pooled, emb = model.features(torch.rand(2, 3, size, size))
    assert fmap.shape == (2, 512, fmap_side, fmap_side) and pooled.shape == (2, 512) and emb.shape == (2, 16)
    assert spec.input_size == (size, size)


def test_resnet18_cifar_keeps_resolution_in_its_stem():
    model, _ = build_model("resnet18-cifar", input_size=16)
    model.eval()
    fmap, pooled, logits = model.features(torch.rand(2, 3, 16, 16))
    # No max-pool and a stride-1 stem: only the three stride-2 stages shrink the map (16 -> 2).
    assert fmap.shape == (2, 512, 2, 2) and logits.shape == (2, 10)


def test_normalize_computes_per_channel_standardisation():
    norm = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    torch.testing.assert_close(norm(x), torch.ones(1, 2, 2, 2))
    assert list(norm.parameters()) == [] and set(dict(norm.named_buffers())) == {"mean", "std"}
    with pytest.raises(ValueError, match="same non-zero length"):
        Normalize((0.5,), (0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5,), (0.0,))
