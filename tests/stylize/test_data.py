"""Content folders (recursive, broken files skipped), embedded scenes, style images."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from snexp.runtime.config import ConfigError
from stylize.data import ContentFolder, SyntheticScenes, check_content_dir, load_image


def _photo(path, size=(40, 30), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_is_searched_recursively_and_broken_files_are_skipped(tmp_path, caplog):
    _photo(tmp_path / "a.jpg")
    _photo(tmp_path / "sub" / "deeper" / "b.PNG", colour=(0, 0, 255))
    _photo(tmp_path / "c.webp")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("hello")
    good = _photo(tmp_path / "sub" / "d.bmp")
    with caplog.at_level(logging.INFO):
        folder = ContentFolder.scan(tmp_path, 16)
    # four images found (one in a nested folder); the corrupt one skipped and counted
    assert sorted(p.name for p in folder.files) == ["a.jpg", "b.PNG", "c.webp", "d.bmp"]
    assert "skipped 1 unreadable file(s)" in caplog.text
    assert folder[0].shape == (3, 16, 16) and 0 <= folder[0].min() and folder[0].max() <= 1
    assert good in folder.files


def test_truncated_image_is_replaced_by_the_next_one(tmp_path, caplog):
    _photo(tmp_path / "a.png", size=(64, 64))
    full = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(full[: len(full) // 2])  # header fine, pixels cut
    _photo(tmp_path / "b.png", size=(64, 64), colour=(0, 255, 0))
    with caplog.at_level(logging.WARNING):
        folder = ContentFolder.scan(tmp_path, 8)  # the scan decodes a sample: a.png fails
    assert len(folder) == 2
    assert "1 of 2 sampled images do not decode" in caplog.text and "a.png" in caplog.text
    image = folder[0]
    # the truncated file is skipped, never a crash: item 0 falls through to b.png (green)
    assert image[1].mean() > 0.99 and image[0].mean() < 0.01
    folder.failed.clear()  # as if the scan had not sampled it: found when first read
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        image = folder[0]
    assert image[1].mean() > 0.99
    assert "skipped unreadable" in caplog.text and "a.png" in caplog.text


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    _photo(tmp_path / "huge.png", size=(64, 64))
    _photo(tmp_path / "ok.png", size=(4, 4))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2x the limit
    folder = ContentFolder.scan(tmp_path, 4)
    assert [p.name for p in folder.files] == ["ok.png"]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="holds no readable image"):
        ContentFolder.scan(tmp_path, 16)
    with pytest.raises(ConfigError, match="is not a folder"):
        ContentFolder.scan(tmp_path / "missing", 16)


def test_embedded_scenes_are_deterministic_and_varied():
    a, b = SyntheticScenes(8, 24), SyntheticScenes(8, 24)
    assert torch.equal(a[3], b[3])
    assert a[3].shape == (3, 24, 24)
    assert not torch.equal(a[3], a[4])
    # another seed draws another family (the held-out previews)
    assert not torch.equal(a[0], SyntheticScenes(8, 24, seed=1)[0])
    assert a[0].std() > 0.05  # not a flat image
    with pytest.raises(IndexError):
        a[8]


def test_style_image_resized_by_its_shorter_side(tmp_path):
    path = _photo(tmp_path / "s.png", size=(60, 30))
    assert load_image(path).shape == (3, 30, 60)
    assert load_image(path, 20).shape == (3, 20, 40)
    with pytest.raises(ConfigError, match="not found"):
        load_image(tmp_path / "none.png")


def _png16(path, values, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 48-bit RGB): (H, W[, 3]) uint16."""
    import struct
    import zlib

    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16_bit_images_load_scaled_not_clipped(tmp_path):
    import numpy as np

    grey = (np.arange(12 * 8).reshape(8, 12) * 650).astype(np.uint16)  # 0 .. 61750
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    rgb = (np.arange(8 * 12 * 3).reshape(8, 12, 3) * 230).astype(np.uint16)
    _png16(tmp_path / "rgb48.png", rgb, color_type=2)
    # each 16-bit value v shows as v / 65535 (not clipped to white), within one 8-bit level
    for name, expected in [("grey16.png", np.repeat(grey[None], 3, 0)),
                           ("rgb48.png", rgb.transpose(2, 0, 1))]:
        loaded = load_image(tmp_path / name)
        torch.testing.assert_close(loaded, torch.from_numpy(expected / 65535.0).float(),
                                   atol=1 / 255 + 1e-6, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    # a "portrait phone photo": stored 40 wide x 20 high, red on its left half, EXIF 6 (the
    # camera was turned 90 degrees clockwise: viewers rotate it to 20 wide x 40 high)
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "portrait.jpg")
    # shown upright: 40 high, 20 wide; the stored left (red) half is now the top half
    assert x.shape == (3, 40, 20)
    assert x[0, :15].mean() > 0.9 and x[2, :15].mean() < 0.1
    assert x[2, 25:].mean() > 0.9
    folder = ContentFolder.scan(tmp_path, 8)
    assert folder[0][0, :3].mean() > 0.9 and folder[0][2, 5:].mean() > 0.9


@pytest.mark.parametrize("mode, colour, shown", [
    ("L", 128, (128, 128, 128)),
    ("P", None, (10, 200, 30)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: the white background
    ("LA", (0, 128), (127, 127, 127)),  # black at alpha 128/255 over white
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # no cyan, full magenta and yellow: red
])
def test_other_modes_load_as_shown(tmp_path, mode, colour, shown):
    if mode == "P":
        img = Image.new("RGB", (6, 5), shown).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = Image.new(mode, (6, 5), colour)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path, **({"quality": 100} if mode == "CMYK" else {}))
    x = load_image(path)
    # three channels showing the colour a viewer shows (within JPEG rounding)
    assert x.shape == (3, 5, 6)
    torch.testing.assert_close(x.mean((1, 2)), torch.tensor(shown) / 255.0, atol=3 / 255,
                               rtol=0)


def test_content_folder_of_truncated_images_is_refused_before_work(tmp_path):
    for i in range(3):
        _photo(tmp_path / f"{i}.png", size=(64, 64), colour=(i * 50, 0, 0))
        data = (tmp_path / f"{i}.png").read_bytes()
        (tmp_path / f"{i}.png").write_bytes(data[: len(data) // 2])
    # headers parse, pixels do not: refused when scanned, naming a file and the cause
    with pytest.raises(ConfigError, match="none of the 3 images tried decodes"):
        ContentFolder.scan(tmp_path, 16)
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        check_content_dir(tmp_path)
