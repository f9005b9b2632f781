"""Shared fixtures: generated images in a temporary Kaggle layout, offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Environment variable with the path of the shared real data, set by .ci/run.
SHARED_ENV = "PIPELINE_SHARED"


def shared_dir() -> Path:
    """Return the shared data folder, or skip the test with a message."""
    value = os.environ.get(SHARED_ENV)
    if not value:
        pytest.skip(f"{SHARED_ENV} is not set; it points at the real photos, weights and features")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"{SHARED_ENV}={value} is not a folder")
    return path


def write_picture(path: Path, seed: int, size=(48, 40), fmt: str = "JPEG", **save_args) -> None:
    """Write a random but reproducible RGB picture."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt, **save_args)


def make_layout(root: Path, n_train: int = 12, n_test: int = 5, breeds=("akita", "boxer", "pug")) -> Path:
    """Write a Kaggle Dog Breed layout with random pictures and return its folder."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir(parents=True)
    lines = ["id,breed"]
    for index in range(n_train):
        image_id = f"tr{index:03d}"
        write_picture(root / "train" / f"{image_id}.jpg", seed=index)
        lines.append(f"{image_id},{breeds[index % len(breeds)]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    for index in range(n_test):
        write_picture(root / "test" / f"te{index:03d}.jpg", seed=1000 + index)
    return root


@pytest.fixture
def kaggle_layout(tmp_path) -> Path:
    return make_layout(tmp_path / "data")


@pytest.fixture
def isolated_keras_home(tmp_path, monkeypatch) -> Path:
    """Point the Keras cache at an empty folder so no real cached weights are found."""
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home
