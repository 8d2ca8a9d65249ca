"""Gram matrices, normalization and the perceptual losses on known tensors; VGG16 loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snexp.runtime.config import ConfigError
from stylize.loss import (
    VGG16_FILE,
    PerceptualLoss,
    VGG16Features,
    VGGOutputs,
    gram_matrix,
    imagenet_normalize,
    load_vgg16,
    total_variation,
)


class Identity4(nn.Module):
    """A 'loss network' whose four features are its input: losses become pixel formulas."""

    def forward(self, x):
        return VGGOutputs(x, x, x, x)


def test_gram_matrix_of_known_features_is_normalized_by_chw():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    g = gram_matrix(f)
    # <f0,f0> = 30, <f0,f1> = 6, <f1,f1> = 2, divided by C*H*W = 8
    torch.testing.assert_close(g, torch.tensor([[[30.0, 6.0], [6.0, 2.0]]]) / 8)


def test_imagenet_normalize_leaves_its_input_untouched():
    x = torch.full((1, 3, 2, 2), 0.5)
    y = imagenet_normalize(x)
    assert torch.equal(x, torch.full((1, 3, 2, 2), 0.5))
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor(
        [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]))


def test_total_variation_of_a_ramp():
    y = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 3, 4)  # +1 per column, rows equal
    assert total_variation(y).item() == pytest.approx(1.0)


def test_loss_values_on_known_tensors():
    style = torch.zeros(3, 4, 4)
    criterion = PerceptualLoss(Identity4(), [style], content_weight=2.0, style_weight=3.0,
                               tv_weight=0.5)
    content = torch.zeros(1, 3, 4, 4)
    output = content + 0.229 * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    losses = criterion(output, content, 0)
    # the red channel differs by exactly 1 std after normalization: content MSE = 1/3
    assert losses.content.item() == pytest.approx(2.0 * (1 / 3), rel=1e-5)
    # style: 4 layers, each the MSE between Gram matrices of output and of the black style
    g_out = gram_matrix(imagenet_normalize(output))
    g_sty = gram_matrix(imagenet_normalize(style[None]))
    expected = 4 * 3.0 * ((g_out - g_sty) ** 2).mean().item()
    assert losses.style.item() == pytest.approx(expected, rel=1e-5)
    assert losses.tv.item() == 0.0  # a flat image has no variation
    assert losses.total.item() == pytest.approx(losses.content.item() + losses.style.item())


def test_output_equal_to_style_and_content_has_zero_loss():
    image = torch.rand(1, 3, 8, 8)
    losses = PerceptualLoss(Identity4(), [image[0]])(image.clone(), image, 0)
    assert losses.content.item() == 0.0 and losses.style.item() == pytest.approx(0.0, abs=1e-9)


def test_missing_vgg_weights_say_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(ConfigError) as info:
        load_vgg16()
    text = str(info.value)
    # the message names the exact cache path, the file, where it comes from and the flag
    assert str(tmp_path / "th" / "hub" / "checkpoints" / VGG16_FILE) in text
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in text
    assert "--vgg-weights FILE" in text
    with pytest.raises(ConfigError, match="--vgg-weights nope.pth does not exist"):
        load_vgg16("nope.pth")


def test_a_file_that_is_not_vgg16_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="cannot use .* as VGG16 weights"):
        load_vgg16(path)


def test_vgg16_weights_load_from_a_file(random_vgg_file):
    net = load_vgg16(random_vgg_file)
    saved = torch.load(random_vgg_file, weights_only=True)
    # the first conv holds the file's weights, the net is frozen and stays in eval mode
    torch.testing.assert_close(net.slices[0][0].weight, saved["features.0.weight"])
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training
    out = net(torch.rand(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in out] == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                  (512, 4, 4)]


def test_vgg16_features_take_torchvisions_layer_slices():
    net = VGG16Features()
    # relu1_2, relu2_2, relu3_3 and relu4_3 end the four slices
    assert [type(s[-1]).__name__ for s in net.slices] == ["ReLU"] * 4
    assert [len(s) for s in net.slices] == [4, 5, 7, 7]


def test_gram_matrix_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    f = (torch.randn(2, 16, 12, 12) + 1).to(torch.bfloat16)  # bf16 features, as autocast gives
    exact = gram_matrix(f.double()).float()  # the same bf16 values, multiplied in float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = gram_matrix(f)
    # autocast does not recast bmm to bf16: float32 result, float32 accuracy (bf16 would be
    # off by ~1e-2 relative: 8 bits of mantissa)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, exact, rtol=1e-5, atol=1e-6)


def test_losses_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    style, content = torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8)
    output = content + 0.1 * torch.randn_like(content)
    criterion = PerceptualLoss(Identity4(), [style[0]], content_weight=2.0, style_weight=3.0,
                               tv_weight=0.5)
    plain = criterion(output, content, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(output, content, 0)
    # with a loss network that makes no bf16 features, autocast changes nothing at all
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_content_target_runs_vgg_only_up_to_the_content_layer():
    torch.manual_seed(0)
    net = VGG16Features()
    x = torch.rand(1, 3, 32, 32)
    criterion = PerceptualLoss(net, [x[0]])
    calls = []
    for i, part in enumerate(net.slices):
        part.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    target = criterion.content_target(x)
    # relu2_2 ends the second slice: slices 3 and 4 do not run; same values as a full pass
    assert calls == [0, 1]
    torch.testing.assert_close(target, net(imagenet_normalize(x)).relu2_2)


def test_vgg_file_with_another_hash_loads_with_a_warning_naming_it(random_vgg_file, caplog,
                                                                    monkeypatch):
    import logging

    import stylize.loss as loss

    with caplog.at_level(logging.WARNING, logger="stylize.loss"):
        load_vgg16(random_vgg_file)
    # random weights: the SHA-256 does not begin with torchvision's 397923af
    assert str(random_vgg_file) in caplog.text and "397923af" in caplog.text
    caplog.clear()
    monkeypatch.setattr(loss, "VGG16_SHA256_PREFIX", loss.sha256_of(random_vgg_file)[:8])
    with caplog.at_level(logging.WARNING, logger="stylize.loss"):
        load_vgg16(random_vgg_file)
    assert "SHA-256" not in caplog.text  # a matching prefix: no warning
