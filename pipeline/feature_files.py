"""Read and write feature files: the contract between the pipeline's stages.

A feature file is an HDF5 file with

``ids``
    UTF-8 strings of shape (n_images,): the image ids (file names without
    the extension), sorted.
``features``
    float32 of shape (n_images, n_features), chunked by rows: one embedding
    per id, in the order of ``ids``.
``skipped_ids`` (optional)
    UTF-8 strings: images that could not be decoded and have no row.

and attributes that record where the features come from (see
:data:`PROVENANCE_ATTRS`). Later stages accept any HDF5 file with ``ids`` and
``features``, and attributes are optional there. A file whose ``complete``
attribute is false is rejected, because a run is still writing it or was
interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

FORMAT = "pipeline-features/1"

#: Attributes written by the features stage, with their meaning.
PROVENANCE_ATTRS = {
    "format": "file format identifier",
    "backbone": "backbone name in the backbone table",
    "input_size": "side of the square model input, in pixels",
    "preprocessing": "how pixels were scaled before the backbone",
    "weights": "weights file name, or 'random'",
    "weights_sha256": "sha256 of the weights file ('' for random weights)",
    "precision": "compute precision of the backbone: float32 or bfloat16",
    "tta": "test-time augmentation: none or flip",
    "engine": "local or ray",
    "keras_backend": "Keras backend that ran the model",
    "keras_version": "Keras version",
    "tensorflow_version": "TensorFlow version ('' when not installed)",
    "pipeline_version": "version of this package",
    "image_count": "number of images listed, skipped ones included",
    "skipped_count": "number of images that could not be decoded",
    "image_list_sha256": "digest of the sorted list of image ids",
    "complete": "True once every image has been processed",
}

_STRING_DTYPE = h5py.string_dtype(encoding="utf-8")


@dataclasses.dataclass
class FeatureFile:
    """Contents of one feature file.

    Attributes
    ----------
    path : Path
        The file that was read.
    ids : ndarray of str, shape (n_images,)
    features : ndarray of float32, shape (n_images, n_features)
    attrs : dict
        HDF5 attributes, decoded to Python values; empty for files written
        by other programs.
    skipped_ids : list of str
    """

    path: Path
    ids: np.ndarray
    features: np.ndarray
    attrs: dict
    skipped_ids: list

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])


def _decode_attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(path: str | os.PathLike) -> dict:
    """Return the HDF5 attributes of a feature file as plain Python values."""
    with h5py.File(path, "r") as handle:
        return {key: _decode_attr(value) for key, value in handle.attrs.items()}


def read_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Read and check a feature file.

    Raises
    ------
    PipelineError
        If the file is missing, is not HDF5, lacks ``ids`` or ``features``,
        has mismatched shapes, or is marked incomplete.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"Feature file not found: {path}. Run 'make features' (or "
            f"'python -m pipeline features') to create it, or check the "
            f"FEATURES and BACKBONE settings."
        )
    if not h5py.is_hdf5(path):
        raise PipelineError(
            f"{path} is not an HDF5 file, so it is not a feature file. "
            f"Recreate it with 'make features FORCE=1'."
        )
    with h5py.File(path, "r") as handle:
        attrs = {key: _decode_attr(value) for key, value in handle.attrs.items()}
        missing = [name for name in ("ids", "features") if name not in handle]
        if missing:
            raise PipelineError(
                f"{path} is not a feature file: it has no dataset "
                f"{' or '.join(repr(name) for name in missing)}. A feature file "
                f"needs 'ids' (n_images,) and 'features' (n_images, n_features)."
            )
        if attrs.get("complete") is False:
            raise PipelineError(
                f"{path} is incomplete: a features run is still writing it or "
                f"was interrupted. Run 'make features' again to finish it."
            )
        ids = handle["ids"].asstr()[...] if handle["ids"].dtype.kind == "O" else handle["ids"][...]
        ids = np.asarray([_decode_attr(value) for value in ids], dtype=object)
        features = handle["features"]
        if features.ndim != 2:
            raise PipelineError(
                f"{path}: dataset 'features' must be 2-D (n_images, n_features); "
                f"got shape {features.shape}."
            )
        if features.shape[0] != len(ids):
            raise PipelineError(
                f"{path}: 'ids' has {len(ids)} rows but 'features' has "
                f"{features.shape[0]}; the file is damaged. Recreate it with "
                f"'make features FORCE=1'."
            )
        matrix = features[...].astype(np.float32, copy=False)
        skipped = []
        if "skipped_ids" in handle:
            skipped = [_decode_attr(value) for value in handle["skipped_ids"].asstr()[...]]
    return FeatureFile(path=path, ids=ids, features=matrix, attrs=attrs, skipped_ids=skipped)


def write_feature_file(
    path: str | os.PathLike,
    ids: list[str],
    row_blocks: Iterable[np.ndarray],
    n_features: int,
    attrs: dict,
    skipped_ids: Iterable[str] = (),
) -> None:
    """Write a complete feature file atomically, one block of rows at a time.

    The file is written under a temporary name with ``complete=False`` and
    renamed to ``path`` only after the last row and ``complete=True`` are
    stored, so a reader never sees a partial file under ``path``.

    Parameters
    ----------
    ids : list of str, length n_images
    row_blocks : iterable of ndarray of shape (n_rows, n_features)
        The features in the order of ``ids``; their row counts must add up
        to ``len(ids)``.
    attrs : dict
        Provenance attributes; ``complete`` is set here.
    """
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    skipped_ids = list(skipped_ids)
    try:
        with h5py.File(tmp_path, "w") as handle:
            for key, value in attrs.items():
                handle.attrs[key] = "" if value is None else value
            handle.attrs["format"] = FORMAT
            handle.attrs["complete"] = False
            handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=_STRING_DTYPE)
            chunk_rows = max(1, min(len(ids), max(1, (1 << 20) // (4 * max(n_features, 1)))))
            dataset = handle.create_dataset(
                "features",
                shape=(len(ids), n_features),
                dtype=np.float32,
                chunks=(chunk_rows, n_features) if ids else None,
            )
            start = 0
            for block in row_blocks:
                stop = start + len(block)
                if stop > len(ids):
                    raise ValueError(f"more feature rows than ids ({len(ids)}); this is a bug")
                dataset[start:stop] = block
                start = stop
            if start != len(ids):
                raise ValueError(f"{start} feature rows for {len(ids)} ids; this is a bug")
            handle.create_dataset(
                "skipped_ids", data=np.asarray(skipped_ids, dtype=object), dtype=_STRING_DTYPE
            )
            handle.attrs["complete"] = True
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
