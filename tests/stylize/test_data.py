"""Content folders (recursive, broken files skipped), embedded scenes, style images."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from snexp.runtime.config import ConfigError
from stylize.data import ContentFolder, SyntheticScenes, load_image


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
    folder = ContentFolder.scan(tmp_path, 8)
    assert len(folder) == 2
    with caplog.at_level(logging.WARNING):
        image = folder[0]
    # the truncated file is skipped, never a crash: item 0 falls through to b.png (green)
    assert image[1].mean() > 0.99 and image[0].mean() < 0.01
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
