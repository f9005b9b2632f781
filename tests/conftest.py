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


class SimulatedCrash(Exception):
    """Raised by a patched function to stand for a crash at that point."""


def crash_after(monkeypatch, batches):
    """Make the journal raise SimulatedCrash instead of appending batch number ``batches`` (from 0)."""
    from pipeline import journal

    original = journal.Journal.append
    calls = {"n": 0}

    def append(self, *args, **kwargs):
        if calls["n"] == batches:
            raise SimulatedCrash()
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(journal.Journal, "append", append)


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


# Fixtures for the train, submit and predict tests.

TINY_BREEDS = ("beagle", "akita", "pug", "boxer")


def write_features(path: Path, ids, features, attrs: dict | None = None, skipped_ids=()) -> Path:
    """Write a feature file; without ``attrs`` it has only 'ids' and 'features', like files of other programs."""
    import h5py

    from pipeline.feature_files import write_feature_file

    path.parent.mkdir(parents=True, exist_ok=True)
    features = np.asarray(features, dtype=np.float32)
    if attrs is None:
        with h5py.File(path, "w") as handle:
            handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
            handle.create_dataset("features", data=features)
        return path
    write_feature_file(path, list(ids), [features], features.shape[1], attrs, skipped_ids=skipped_ids)
    return path


def separable_features(labels: np.ndarray, width: int, seed: int) -> np.ndarray:
    """Return features of shape (len(labels), width) whose classes are far apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(int(labels.max()) + 1, width))
    return (centres[labels] + rng.normal(size=(len(labels), width))).astype(np.float32)


def make_feature_dataset(
    root: Path,
    widths: dict | None = None,
    per_breed: int = 10,
    n_test: int = 8,
    attrs: dict | None = None,
) -> dict:
    """Write labels.csv, sample_submission.csv and train/test feature files of separable classes.

    Each backbone in ``widths`` (name to feature width) gets its own
    features of the same images. The sample submission lists the breeds and
    test ids in a scrambled order, so tests can check that submit follows it.
    """
    widths = widths or {"alpha": 6, "beta": 3}
    data = root / "data"
    features = root / "features"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)

    n_train = per_breed * len(TINY_BREEDS)
    train_labels = np.arange(n_train) % len(TINY_BREEDS)
    train_ids = [f"tr{index:03d}" for index in range(n_train)]
    test_labels = np.arange(n_test) % len(TINY_BREEDS)
    test_ids = [f"te{index:03d}" for index in range(n_test)]
    lines = ["id,breed"] + [f"{image_id},{TINY_BREEDS[label]}" for image_id, label in zip(train_ids, train_labels)]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")

    columns = list(rng.permutation(TINY_BREEDS))
    sample_ids = list(rng.permutation(test_ids))
    rows = [",".join(["id", *columns])] + [",".join([image_id] + ["0.25"] * len(columns)) for image_id in sample_ids]
    (data / "sample_submission.csv").write_text("\n".join(rows) + "\n")

    matrices = {}
    for seed, (backbone, width) in enumerate(widths.items()):
        labels = np.concatenate([train_labels, test_labels])
        matrix = separable_features(labels, width, seed)
        matrices[backbone] = matrix
        file_attrs = None if attrs is None else {"backbone": backbone, **attrs}
        write_features(features / backbone / "train.h5", train_ids, matrix[:n_train], file_attrs)
        write_features(features / backbone / "test.h5", test_ids, matrix[n_train:], file_attrs)
    return {
        "data": data,
        "features": features,
        "models": root / "models",
        "backbones": list(widths),
        "train_ids": train_ids,
        "train_labels": train_labels,
        "test_ids": test_ids,
        "sample_ids": sample_ids,
        "columns": columns,
        "matrices": matrices,
    }


@pytest.fixture
def feature_dataset(tmp_path) -> dict:
    return make_feature_dataset(tmp_path)
