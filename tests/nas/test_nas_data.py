"""Data: embedded shapes are deterministic, splits are seeded and disjoint, errors are clear."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nas.data import SHAPES, Cutout, DataConfig, build_splits, make_shapes
from snexp.runtime.config import ConfigError

SMALL = dict(embedded_train=300, embedded_test=50, valid_size=100)


def test_embedded_images_are_deterministic_from_the_seed():
    x1, y1 = make_shapes(64, seed=3)
    x2, y2 = make_shapes(64, seed=3)
    x3, _ = make_shapes(64, seed=4)
    assert x1.shape == (64, 3, 32, 32) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    # all ten classes appear, and images are not blank
    assert set(make_shapes(500, 0)[1].tolist()) == set(range(len(SHAPES)))
    assert x1.float().std() > 20


def test_embedded_splits_are_seeded_disjoint_and_capped():
    splits = build_splits(DataConfig(**SMALL, limit=120, valid_limit=40))
    assert len(splits.train) == 120 and len(splits.valid) == 40 and len(splits.test) == 50
    assert len(splits.train_full) == 160
    assert not set(splits.train.indices) & set(splits.valid.indices)
    assert splits.num_classes == 10 and splits.in_channels == 3
    again = build_splits(DataConfig(**SMALL, limit=120, valid_limit=40))
    assert splits.valid.indices == again.valid.indices
    image, label = splits.valid[0]
    # standardized float images; the valid split is not augmented
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image, again.valid[0][0]) and 0 <= label < 10


def test_a_valid_split_larger_than_the_data_is_refused():
    with pytest.raises(ConfigError, match="valid_size=400"):
        build_splits(DataConfig(embedded_train=300, embedded_test=10, valid_size=400))


def test_missing_cifar_says_where_to_put_the_files(tmp_path):
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    with pytest.raises(ConfigError, match="cifar-10-batches-py") as info:
        build_splits(cfg)
    assert "data.download=true" in str(info.value)


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (40 + i, 30), color).save(tmp_path / cls / f"{i}.png")
    splits = build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), valid_size=4,
                                     size=16))
    # a tenth becomes the test split, the rest is split into train and valid
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (14, 4, 2)
    assert splits.num_classes == 2 and splits.train[0][0].shape == (3, 16, 16)


COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def _images(folder, classes, n=3):
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), COLORS[cls]).save(folder / cls / f"{i}.png")


def _color_of(image) -> str:
    # the only strong channel of a standardized solid-colour image names its class
    return list(COLORS)[int(image.mean((1, 2)).argmax())]


@pytest.mark.parametrize("layout", ["train+test", "test lacks classes", "root+test"])
def test_image_folder_labels_come_from_the_training_folder(tmp_path, layout):
    if layout == "root+test":  # class folders at the root, test/ beside them
        _images(tmp_path, COLORS)
        _images(tmp_path / "test", ["bee", "cat"])
    else:
        _images(tmp_path / "train", COLORS)
        _images(tmp_path / "test", ["bee", "cat"] if layout == "test lacks classes" else COLORS)
    splits = build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), valid_size=2,
                                     size=8, augment=False))
    # three classes (test/ is no class), indexed by the training folder's sorted names
    assert splits.num_classes == 3
    for ds in (splits.train, splits.valid, splits.test):
        for i in range(len(ds)):
            image, label = ds[i]
            assert list(COLORS)[label] == _color_of(image)
    assert {splits.test[i][1] for i in range(len(splits.test))} >= {1, 2}


def test_image_folder_refuses_a_test_class_unknown_to_training(tmp_path):
    _images(tmp_path / "train", ["ant", "bee"])
    _images(tmp_path / "test", ["ant", "cat"])
    with pytest.raises(ConfigError, match="classes that the training folder .* lacks: cat"):
        build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path), valid_size=2))


def test_valid_size_below_one_is_a_share():
    # 0.1 of 300 training images; it adapts to small data instead of being refused
    splits = build_splits(DataConfig(embedded_train=300, embedded_test=10, valid_size=0.1))
    assert (len(splits.train), len(splits.valid)) == (270, 30)
    with pytest.raises(ValueError, match="whole count"):
        DataConfig(valid_size=2.5)


def test_cutout_zeroes_a_square_only():
    torch.manual_seed(0)
    img = torch.ones(3, 32, 32)
    out = Cutout(16)(img)
    zeros = (out == 0).all(0).sum()
    assert 0 < zeros <= 256 and torch.equal(img, torch.ones(3, 32, 32))
