"""``python -m stylize.apply``: round trip, folders, style blends, colour, tiling, export."""

from __future__ import annotations

import importlib.util
import os
import stat

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from stylize.apply import main
from stylize.data import SyntheticScenes, load_image
from stylize.export import missing_onnx_packages
from stylize.infer import _YCC, preserve_color, stylize
from stylize.net import TransformerNet
from stylize.saved import save_model


def _lively(net):
    """Non-trivial norm parameters, and an output layer that spans [0, 1] as a trained one."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        # at initialization the 0-255 network outputs ~0 (black); a trained one spans 0-255
        net.conv_out.conv.weight.mul_(net.pixel_scale)
        net.conv_out.conv.bias.mul_(net.pixel_scale).add_(net.pixel_scale / 2)
    return net


def _trained_like(norm="sn", num_styles=1):
    """A small network with non-trivial norm parameters and running statistics."""
    torch.manual_seed(0)
    net = _lively(TransformerNet(norm, width=0.125, blocks=1, num_styles=num_styles))
    net.train()
    for s in range(num_styles):
        net(torch.rand(2, 3, 24, 24), s if num_styles > 1 else None)
    return net.eval()


@pytest.fixture
def model_file(tmp_path):
    net = _trained_like()
    return save_model(tmp_path / "model.pt", net, styles=["waves"]), net


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    SyntheticScenes(1, 64, seed=3).render(0).crop((0, 0, 50, 37)).save(path)  # 50x37, odd
    return path


def test_round_trip_save_load_apply(tmp_path, model_file, photo, capsys):
    path, net = model_file
    out = tmp_path / "out.png"
    main(["--model", str(path), "--input", str(photo), "--output", str(out), "--device", "cpu"])
    result = to_tensor(Image.open(out))
    # the output has the input's size and is the network's output up to 8-bit rounding
    assert result.shape == (3, 37, 50)
    expected = net(load_image(photo)[None]).clamp(0, 1)[0]
    assert (result - expected).abs().max() <= 0.5 / 255 + 1e-6
    assert "stylized 1 image(s)" in capsys.readouterr().out


def test_existing_output_is_not_overwritten_without_asking(tmp_path, model_file, photo, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"mine")
    args = ["--model", str(model_file[0]), "--input", str(photo), "--output", str(out)]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    main(args + ["--overwrite"])
    assert Image.open(out).size == (50, 37)


def test_folder_input_mirrors_the_tree_and_size_keeps_the_output_size(tmp_path, model_file):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    SyntheticScenes(1, 40, seed=4).render(0).save(src / "a.jpg")
    SyntheticScenes(1, 30, seed=5).render(0).resize((30, 21)).save(src / "sub" / "b.png")
    (src / "junk.png").write_bytes(b"broken")
    main(["--model", str(model_file[0]), "--input", str(src), "--output", str(tmp_path / "o"),
          "--size", "24"])
    # every readable image is stylized at 24 px and written back at its own size
    assert Image.open(tmp_path / "o" / "a.jpg").size == (40, 40)
    assert Image.open(tmp_path / "o" / "sub" / "b.png").size == (30, 21)
    assert not (tmp_path / "o" / "junk.png").exists()


def test_style_mix_and_index_of_a_two_style_model(tmp_path, photo):
    net = _trained_like("sn", num_styles=2)
    path = save_model(tmp_path / "m.pt", net, styles=["a", "b"])
    x = load_image(photo)[None]
    outs = {}
    for name, flags in {"one": ["--style-index", "1"], "mix": ["--style-mix", "1,3"]}.items():
        main(["--model", str(path), "--input", str(photo), "--output",
              str(tmp_path / f"{name}.png")] + flags)
        outs[name] = to_tensor(Image.open(tmp_path / f"{name}.png"))
    tol = 0.5 / 255 + 1e-6
    assert (outs["one"] - net(x, 1).clamp(0, 1)[0]).abs().max() <= tol
    # 1,3 is normalized to a 25/75 blend of the two styles
    mixed = net(x, torch.tensor([0.25, 0.75])).clamp(0, 1)[0]
    assert (outs["mix"] - mixed).abs().max() <= tol
    assert (outs["mix"] - outs["one"]).abs().max() > 5 / 255
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--input", str(photo), "--output",
              str(tmp_path / "x.png"), "--style-index", "2"])


def test_preserve_color_keeps_content_chroma_and_stylized_luminance():
    torch.manual_seed(0)
    content, stylized = 0.25 + 0.5 * torch.rand(2, 1, 3, 8, 8)
    out = preserve_color(content, stylized)
    ycc = lambda t: torch.einsum("ij,njhw->nihw", _YCC, t)  # noqa: E731
    torch.testing.assert_close(ycc(out)[:, 0], ycc(stylized)[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ycc(out)[:, 1:], ycc(content)[:, 1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", ["sn", "in", "bn"])
def test_tiling_equals_untiled_output_away_from_seams(norm):
    net = _trained_like(norm)
    x = torch.rand(1, 3, 96, 96)
    full = stylize(net, x)
    tiled = stylize(net, x, tile=64, overlap=16)  # tiles [0, 64) and [32, 96) per axis
    assert tiled.shape == full.shape
    # pixels seen by one tile only, farther than the receptive field from its inner edge
    away = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
    torch.testing.assert_close(tiled[..., away, :][..., away], full[..., away, :][..., away],
                               atol=1e-5, rtol=0)


def test_torch_export_program_matches_pytorch(tmp_path, model_file):
    path = tmp_path / "model.pt2"
    main(["--model", str(model_file[0]), "--export", str(path)])
    program = torch.export.load(path)
    for size in [(64, 64), (37, 50)]:  # height and width are dynamic
        x = torch.rand(1, 3, *size)
        torch.testing.assert_close(program.module()(x), model_file[1](x), atol=1e-4, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or bool(
    missing_onnx_packages()), reason="ONNX extra not installed (pip install onnx onnxscript "
                                     "onnxruntime)")
def test_onnx_model_matches_pytorch(tmp_path, model_file):
    import onnxruntime

    path = tmp_path / "model.onnx"
    main(["--model", str(model_file[0]), "--export", str(path)])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(64, 64), (37, 50)]:
        x = torch.rand(1, 3, *size)
        (y,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), model_file[1](x), atol=1e-4, rtol=0)


@pytest.mark.skipif(not missing_onnx_packages(), reason="the ONNX extra is installed")
def test_onnx_export_without_the_extra_says_what_to_install(tmp_path, model_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", str(model_file[0]), "--export", str(tmp_path / "m.onnx")])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "pip install" in err and "onnx" in err
    assert not (tmp_path / "m.onnx").exists()


def test_tiles_join_without_seams_on_the_full_network(caplog):
    torch.manual_seed(0)
    net = _lively(TransformerNet("sn"))  # Johnson's network: 5 blocks, width 1, reach 58 px
    net.train()
    net(torch.rand(2, 3, 32, 32))  # running statistics for the BN branch
    net.eval()
    x = SyntheticScenes(1, 200, seed=5)[0][None, :, :176]  # (1, 3, 176, 200)
    full = stylize(net, x)
    with caplog.at_level("WARNING"):
        tiled = stylize(net, x, tile=160)  # default overlap 120 px: 2 x 2 tiles
    assert "seams" not in caplog.text
    # every pixel equals the whole-image result to far below one 8-bit level
    assert 0.05 < full.std() and (tiled - full).abs().max() * 255 < 0.05


def test_an_overlap_below_the_reach_warns_and_shows_at_the_joins(caplog):
    net = _trained_like("sn")  # 1 block: reach 26 px, exact from 53 px of overlap
    x = SyntheticScenes(1, 96, seed=5)[0][None]
    with caplog.at_level("WARNING"):
        rough = stylize(net, x, tile=64, overlap=16)
    assert "seams may show" in caplog.text
    assert (rough - stylize(net, x)).abs().max() * 255 > 0.5


def _bad_apply(tmp_path, model_file, capsys, *flags):
    with pytest.raises(SystemExit) as info:
        main(["--model", str(model_file[0]), *flags])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize("size", [(1, 1), (1000, 3)])
def test_tiny_input_is_refused_before_anything_is_written(tmp_path, model_file, capsys, size):
    Image.new("RGB", size, (90, 90, 90)).save(tmp_path / "tiny.png")
    err = _bad_apply(tmp_path, model_file, capsys, "--input", str(tmp_path / "tiny.png"),
                     "--output", str(tmp_path / "out.png"))
    assert f"{size[0]}x{size[1]} pixels" in err and not (tmp_path / "out.png").exists()


def test_output_without_an_image_extension_is_refused(tmp_path, model_file, photo, capsys):
    err = _bad_apply(tmp_path, model_file, capsys, "--input", str(photo), "--output",
                     str(tmp_path / "result"))
    assert "not an image file extension" in err and not (tmp_path / "result").exists()


def test_style_mix_refuses_non_finite_weights(tmp_path, photo, capsys):
    path = save_model(tmp_path / "m.pt", _trained_like("sn", num_styles=2), styles=["a", "b"])
    for mix in ("nan,1", "inf,1"):
        err = _bad_apply(tmp_path, (path,), capsys, "--input", str(photo), "--output",
                         str(tmp_path / "o.png"), "--style-mix", mix)
        assert "finite" in err and not (tmp_path / "o.png").exists()


def test_portrait_photo_is_stylized_and_saved_upright(tmp_path, model_file):
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees: 24 wide, 40 high
    img.save(tmp_path / "portrait.jpg", exif=exif)
    main(["--model", str(model_file[0]), "--input", str(tmp_path / "portrait.jpg"), "--output",
          str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (24, 40)


def test_a_folder_skips_truncated_images_and_counts_them(tmp_path, model_file, photo, capsys):
    # Rule: a truncated photo in a folder is skipped and counted (as training does); the
    # others are all stylized, before and after it.
    src = tmp_path / "in"
    src.mkdir()
    whole = photo.read_bytes()
    for name in ("a.png", "c.png"):
        (src / name).write_bytes(whole)
    (src / "b.png").write_bytes(whole[: len(whole) // 2])  # its header reads, its pixels do not
    main(["--model", str(model_file[0]), "--input", str(src), "--output", str(tmp_path / "o"),
          "--device", "cpu"])
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "c.png"]
    assert f"stylized 2 image(s) into {tmp_path / 'o'}; skipped 1 unreadable" in out
    assert str(src / "b.png") in out


def test_an_output_folder_inside_the_input_is_not_stylized_again(tmp_path, model_file, photo,
                                                                capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(photo.read_bytes())
    args = ["--model", str(model_file[0]), "--input", str(src), "--output", str(src / "styled"),
            "--device", "cpu"]
    main(args)
    first = (src / "styled/a.png").read_bytes()
    main([*args, "--overwrite"])
    # The second run stylizes a.png only: no styled/styled/a.png, and a.png's result is the same.
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*.png")) == ["a.png",
                                                                          "styled/a.png"]
    assert (src / "styled/a.png").read_bytes() == first
    assert "ignoring 1 file(s) in the output folder" in capsys.readouterr().out


def test_outputs_get_the_umask_permissions(tmp_path, model_file, photo):
    old = os.umask(0o022)
    try:
        main(["--model", str(model_file[0]), "--input", str(photo), "--output",
              str(tmp_path / "out.png"), "--device", "cpu"])
    finally:
        os.umask(old)
    # Rule: what a user's umask allows, like any file they write (0o644 under 022).
    assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o644
    assert stat.S_IMODE(model_file[0].stat().st_mode) & 0o044 == 0o044  # teammates can read it


def test_a_read_only_output_folder_is_refused_before_anything_is_written(tmp_path, model_file,
                                                                        photo, capsys):
    # A really read-only file system (a tmpfs mounted ro; needs root, else skipped): refused
    # with one paragraph, exit 2, before any image is stylized.
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(SystemExit) as info:
            main(["--model", str(model_file[0]), "--input", str(photo), "--output",
                  str(folder / "out.png"), "--device", "cpu"])
        err = " ".join(capsys.readouterr().err.split())
        assert info.value.code == 2
        assert f"--output {folder}: {folder} is not writable (read-only folder or file " \
               "system); choose a folder you can write to. Nothing was written" in err
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)
