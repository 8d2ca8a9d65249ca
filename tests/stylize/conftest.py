"""Shared fixtures of the stylize tests: a small loss network, style images, VGG file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stylize_helpers import TinyFeatures

from stylize.data import SyntheticScenes


@pytest.fixture
def tiny_loss_net() -> TinyFeatures:
    return TinyFeatures()


@pytest.fixture
def style_files(tmp_path: Path) -> list[str]:
    paths = []
    for i, (seed, name) in enumerate([(7, "waves.png"), (8, "dots.jpg")]):
        path = tmp_path / "styles" / name
        path.parent.mkdir(exist_ok=True)
        SyntheticScenes(1, 48 + 8 * i, seed=seed).render(0).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def random_vgg_file(tmp_path_factory) -> Path:
    """A VGG16 weights file with random values: exercises --vgg-weights without a download."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


