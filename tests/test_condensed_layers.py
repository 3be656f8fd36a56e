"""CondensedConv2d / CondensedLinear: the structure finalize builds, and that it stays trainable."""

from __future__ import annotations

import torch
from helpers import condense_to

from lgconv import CondensedConv2d, CondensedLinear, LearnedGroupConv, LearnedGroupLinear
from lgconv.layers.learned_group import grouped_order


def test_condensed_conv_is_gather_then_grouped_conv():
    layer = condense_to(LearnedGroupConv(16, 8, learned_groups=4, condense_factor=4), 3)
    condensed = CondensedConv2d.from_learned(layer)
    assert condensed.conv.groups == 4
    assert condensed.conv.in_channels == 4 * 4  # G * in / C
    assert condensed.conv.weight.shape == (8, 4, 1, 1)
    assert condensed.restore is None  # contiguous: no permutation
    keep = layer.group_mask()
    for g in range(4):
        assert condensed.index[4 * g : 4 * g + 4].tolist() == keep[g].nonzero()[:, 0].tolist()
    assert "restore" not in condensed.state_dict()  # rebuilt from the layout, never saved


def test_interleaved_layout_restores_the_original_channel_order():
    layer = condense_to(LearnedGroupConv(8, 8, learned_groups=4, condense_factor=2, layout="interleaved"), 1)
    condensed = CondensedConv2d.from_learned(layer)
    order = grouped_order(8, 4, "interleaved")
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(order[condensed.restore], torch.arange(8))
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(condensed(x), layer(x), atol=1e-6, rtol=1e-6)


def test_an_input_kept_by_several_groups_is_gathered_once_per_group():
    """C < G: the gathered tensor is wider than the input."""
    layer = condense_to(LearnedGroupConv(4, 8, learned_groups=4, condense_factor=2), 1)
    condensed = CondensedConv2d.from_learned(layer)
    assert condensed.index.numel() == 8 > 4
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(condensed(x), layer(x), atol=1e-6, rtol=1e-6)


def test_condensed_layers_keep_mode_and_are_trainable():
    conv = condense_to(LearnedGroupConv(8, 8, learned_groups=2, condense_factor=2), 1).eval()
    condensed = CondensedConv2d.from_learned(conv)
    assert not condensed.training
    condensed(torch.randn(2, 8, 3, 3)).sum().backward()
    assert condensed.conv.weight.grad is not None and condensed.conv.bias.grad is not None

    linear = condense_to(
        LearnedGroupLinear(8, 6, learned_groups=3, condense_factor=2, layout="interleaved"), 1
    )
    dense = CondensedLinear.from_learned(linear)
    x = torch.randn(5, 8)
    torch.testing.assert_close(dense(x), linear(x), atol=1e-6, rtol=1e-6)
    dense(x).sum().backward()
    assert dense.weight.grad.shape == (6, 4)


def test_condensed_linear_with_one_group_is_a_plain_linear_on_the_gathered_features():
    linear = condense_to(LearnedGroupLinear(8, 3, learned_groups=1, condense_factor=2), 1)
    dense = CondensedLinear.from_learned(linear)
    x = torch.randn(4, 8)
    expected = x[:, dense.index] @ dense.weight.T + dense.bias
    torch.testing.assert_close(dense(x), expected)
    assert "groups=1" in repr(dense) and "kept_inputs=4" in repr(dense)


def test_parameter_count_shrinks_by_the_condense_factor():
    layer = condense_to(LearnedGroupConv(32, 64, learned_groups=4, condense_factor=4, bias=False), 3)
    condensed = CondensedConv2d.from_learned(layer)
    assert sum(p.numel() for p in condensed.parameters()) == 32 * 64 // 4


def test_the_native_linear_kernel_computes_the_same_everywhere_it_runs(tmp_path):
    """Eager (the C++ op), rebuilt from its config, TorchScript and ONNX (the ATen form there)."""
    import warnings

    import onnxruntime

    torch.manual_seed(0)
    learned = LearnedGroupLinear(12, 8, learned_groups=4, condense_factor=2, layout="interleaved")
    layer = CondensedLinear.from_learned(condense_to(learned, 1)).eval()
    native = layer.with_kernel("native")
    rebuilt = CondensedLinear.from_config(native.config())
    rebuilt.load_state_dict(native.state_dict())
    x = torch.randn(3, 5, 12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = layer(x)
        scripted = torch.jit.script(native)
        torch.onnx.export(native, (x,), tmp_path / "l.onnx", dynamo=False, input_names=["x"])
        for form in (native, rebuilt, scripted):
            torch.testing.assert_close(form(x), expected, rtol=1e-5, atol=1e-5)
    assert rebuilt.kernel == "native" and native.config()["kernel"] == "native"
    session = onnxruntime.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), expected)
