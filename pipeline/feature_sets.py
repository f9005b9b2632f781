"""Load the feature files of one or more backbones and join them by image id.

Train, submit and predict describe the features a model expects by a list
of *sources*, one dict per backbone in concatenation order::

    {"backbone": "mobilenet", "width": 256, "weights": "...", ...}

with the provenance attributes of :data:`PROVENANCE_KEYS` that the feature
file carries. Files written by other programs carry none of them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.feature_files import read_feature_file
from pipeline.labels import format_examples

logger = logging.getLogger(__name__)

#: Feature-file attributes that must be equal between training and test
#: features, because they change what the embedding means.
PROVENANCE_KEYS = ("weights", "weights_sha256", "input_size", "precision", "tta")


@dataclasses.dataclass
class FeatureSet:
    """Features of several backbones, joined by id.

    Attributes
    ----------
    ids : ndarray of str, shape (n_images,)
        In the order of the first backbone's file.
    features : ndarray of float32, shape (n_images, sum of widths)
        Each backbone's columns in the order of ``sources``.
    sources : list of dict
        One per backbone: ``backbone``, ``width`` and the provenance
        attributes present in its file.
    skipped_ids : list of str
        Images that some backbone could not decode, sorted.
    paths : list of Path
        The files that were read.
    """

    ids: np.ndarray
    features: np.ndarray
    sources: list
    skipped_ids: list
    paths: list


def parse_backbones(value) -> list[str]:
    """Split backbone names given as one string (commas or spaces) or a list.

    Raises
    ------
    PipelineError
        If no name is given or a name repeats.
    """
    if isinstance(value, str):
        value = [value]
    names = [name for item in value for name in re.split(r"[,\s]+", item) if name]
    if not names:
        raise PipelineError("No backbone given; set BACKBONE (--backbone) to one or more names.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise PipelineError(
            f"Backbone {', '.join(repeated)} is given more than once in {' '.join(names)!r}; "
            f"list each backbone once."
        )
    return names


def feature_path(features_dir: str | Path, backbone: str, split: str) -> Path:
    return Path(features_dir) / backbone / f"{split}.h5"


def source_of(backbone: str, width: int, attrs: dict) -> dict:
    """Return the provenance record of one backbone's features."""
    source = {"backbone": backbone, "width": int(width)}
    for key in PROVENANCE_KEYS:
        if key in attrs:
            value = attrs[key]
            source[key] = value.item() if isinstance(value, np.generic) else value
    return source


def load_feature_set(features_dir: str | Path, backbones: list[str], split: str) -> FeatureSet:
    """Read ``FEATURES/<backbone>/<split>.h5`` for each backbone and join them.

    Raises
    ------
    PipelineError
        If a file is missing, incomplete or not a feature file, repeats an
        id, contains NaN or infinite values, or if the files disagree on
        the set of ids.
    """
    paths = [feature_path(features_dir, backbone, split) for backbone in backbones]
    # Check every file exists before reading any, so a typo fails fast.
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise PipelineError(
            f"Feature file not found: {format_examples(missing)}. Run 'make features "
            f"BACKBONE=...' to create it, or check FEATURES (--features, now "
            f"{features_dir}) and BACKBONE (--backbone)."
        )

    files = []
    for backbone, path in zip(backbones, paths):
        feature_file = read_feature_file(path)
        _check_unique_ids(feature_file.ids, path)
        _check_finite(feature_file.ids, feature_file.features, path)
        recorded = feature_file.attrs.get("backbone")
        if recorded and recorded != backbone:
            raise PipelineError(
                f"{path} contains features of backbone {recorded!r}, not {backbone!r} as "
                f"its folder says. Move it to {feature_path(features_dir, recorded, split)} "
                f"or recompute it with 'make features BACKBONE={backbone}'."
            )
        logger.info("read %s: %d images x %d features", path, *feature_file.features.shape)
        files.append(feature_file)

    first = files[0]
    ids = first.ids
    blocks = [first.features]
    for feature_file in files[1:]:
        _check_same_ids(first, feature_file)
        position = {image_id: row for row, image_id in enumerate(feature_file.ids)}
        order = np.fromiter((position[image_id] for image_id in ids), dtype=np.int64, count=len(ids))
        blocks.append(feature_file.features[order])
    features = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)

    sources = [source_of(backbone, f.n_features, f.attrs) for backbone, f in zip(backbones, files)]
    skipped = sorted({image_id for f in files for image_id in f.skipped_ids})
    return FeatureSet(ids=ids, features=features, sources=sources, skipped_ids=skipped, paths=paths)


def _check_unique_ids(ids: np.ndarray, path: Path) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    repeated = unique[counts > 1]
    if len(repeated):
        raise PipelineError(
            f"{path} has {len(repeated)} duplicate ids: {format_examples(repeated)}. "
            f"Each image needs exactly one row; recreate the file with 'make features FORCE=1'."
        )


def _check_finite(ids: np.ndarray, features: np.ndarray, path: Path) -> None:
    bad_rows = ~np.isfinite(features).all(axis=1)
    if bad_rows.any():
        raise PipelineError(
            f"{path} has NaN or infinite features in {int(bad_rows.sum())} rows: ids "
            f"{format_examples(ids[bad_rows])}. Recompute the file with 'make features "
            f"FORCE=1' (with PRECISION=float32 if it was bfloat16)."
        )


def _check_same_ids(first, other) -> None:
    first_ids = set(first.ids)
    other_ids = set(other.ids)
    if first_ids == other_ids:
        return
    only_first = sorted(first_ids - other_ids)
    only_other = sorted(other_ids - first_ids)
    parts = []
    if only_first:
        parts.append(f"{len(only_first)} ids only in {first.path}: {format_examples(only_first)}")
    if only_other:
        parts.append(f"{len(only_other)} ids only in {other.path}: {format_examples(only_other)}")
    raise PipelineError(
        f"The feature files disagree on the set of images ({'; '.join(parts)}). "
        f"Compute both backbones' features from the same image folder."
    )
