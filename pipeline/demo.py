"""``make demo``: the main job on a small generated sample, offline.

Runs features, train (logreg and LightGBM, 2 folds) and submit, then checks
the submissions.

The sample is in the Kaggle Dog Breed Identification layout, with a few
"breeds" of synthetic pictures. The backbone runs with random weights, so
the demo proves that an installation works end to end; it does not classify
dogs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEMO_BREEDS = ("beagle", "borzoi", "chihuahua", "pug", "whippet")
DEMO_IMAGE_SIZE = 128


def make_sample(root: str | Path, breeds=DEMO_BREEDS, per_breed: int = 8, n_test: int = 10, seed: int = 0) -> Path:
    """Write a small Kaggle-layout sample and return its folder.

    Each breed gets its own hue and stripe direction, so the classes are
    separable even on random-weight features. Writes ``train/<id>.jpg``,
    ``test/<id>.jpg``, ``labels.csv`` and ``sample_submission.csv``.
    """
    import pandas as pd

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)

    rows = []
    for class_index, breed in enumerate(breeds):
        for _ in range(per_breed):
            image_id = rng.bytes(16).hex()
            _synthetic_picture(rng, class_index, len(breeds)).save(root / "train" / f"{image_id}.jpg", quality=90)
            rows.append((image_id, breed))
    pd.DataFrame(rows, columns=["id", "breed"]).to_csv(root / "labels.csv", index=False)

    test_ids = []
    for index in range(n_test):
        image_id = rng.bytes(16).hex()
        _synthetic_picture(rng, index % len(breeds), len(breeds)).save(root / "test" / f"{image_id}.jpg", quality=90)
        test_ids.append(image_id)
    sample = pd.DataFrame({"id": test_ids})
    for breed in sorted(breeds):
        sample[breed] = 1.0 / len(breeds)
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


def _synthetic_picture(rng, class_index: int, n_classes: int, size: int = 160) -> Image.Image:
    hue = int(255 * class_index / n_classes)
    y, x = np.mgrid[0:size, 0:size]
    angle = np.pi * class_index / n_classes
    stripes = (np.sin((x * np.cos(angle) + y * np.sin(angle)) / 6.0) > 0).astype(np.uint8)
    hsv = np.stack(
        [
            np.full((size, size), hue, dtype=np.uint8),
            (120 + 100 * stripes).astype(np.uint8),
            rng.integers(120, 255, (size, size), dtype=np.uint8),
        ],
        axis=-1,
    )
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def run(workdir: str | Path) -> int:
    """Generate the sample in ``workdir`` and run the pipeline on it."""
    from pipeline import cli

    workdir = Path(workdir)
    data = make_sample(workdir / "data")
    features = workdir / "features"
    print(
        f"Demo: generated {len(list((data / 'train').iterdir()))} train and "
        f"{len(list((data / 'test').iterdir()))} test images in {data}.\n"
        f"The backbone runs with RANDOM weights: this checks the installation; "
        f"it does not classify dogs. For real features use WEIGHTS=imagenet "
        f"(the default) or WEIGHTS=path/to/weights.h5."
    )
    status = cli.main(
        [
            "features",
            "--data", str(data),
            "--features", str(features),
            "--weights", "random",
            "--image-size", str(DEMO_IMAGE_SIZE),
        ]
    )
    if status != 0:
        return status

    from pipeline import demo_models

    status = demo_models.run_train_and_submit(data, features, workdir / "models", workdir, backbone="inception_resnet_v2")
    if status != 0:
        return status
    print(
        f"Demo finished: features in {features / 'inception_resnet_v2'}, runs and reports in "
        f"{workdir / 'models'}, validated submissions {workdir / 'submission-logreg.csv'} and "
        f"{workdir / 'submission-lightgbm.csv'}."
    )
    return 0
