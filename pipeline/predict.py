"""Predict the top breeds of new photos with a trained run.

The photos are embedded in memory by the backbones and weights the run was
trained on (each backbone is built once for all photos), joined like the
training features, and classified.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipeline import model_bundle
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

DEFAULT_TOP = 5


@dataclasses.dataclass
class Prediction:
    """Top breeds of one photo, most probable first."""

    path: Path
    breeds: list
    probabilities: list


def _weights_argument(source: dict, weights_override: str | None) -> str:
    """Return the ``weights`` argument for :func:`pipeline.features.embed_paths`.

    Training features record the weights by file name. The Keras ImageNet
    file of a backbone is taken from the Keras cache, without downloading
    it. Any other file must be passed with ``--weights``.
    """
    from pipeline import backbones

    recorded = source.get("weights")
    if weights_override:
        return weights_override
    if recorded == "random":
        return "random"
    table_row = backbones.BACKBONES[source["backbone"]]
    if recorded in (None, "", "imagenet", table_row.weights_file):
        cached = backbones.keras_cache_dir() / table_row.weights_file
        if not cached.is_file():
            raise PipelineError(
                f"The {table_row.name} weights {table_row.weights_file} are not in the Keras "
                f"cache {cached.parent}. Pass the weights file the run was trained with: "
                f"--weights path/to/{table_row.weights_file}."
            )
        return "imagenet"
    raise PipelineError(
        f"The run was trained on {source['backbone']} features with the weights file "
        f"{recorded!r}, which is not the Keras ImageNet file. Pass that file with --weights."
    )


def check_backbones(sources: list[dict], run: str) -> None:
    """Raise if predict cannot compute the features of one of the run's backbones."""
    from pipeline import backbones

    unknown = [source["backbone"] for source in sources if source["backbone"] not in backbones.BACKBONES]
    if unknown:
        raise PipelineError(
            f"Run {run!r} was trained on features of {', '.join(unknown)}, which this pipeline "
            f"cannot compute, so it cannot embed new photos for it. predict works with runs "
            f"trained on the backbones {', '.join(sorted(backbones.BACKBONES))}; train one with "
            f"'make features train BACKBONE=mobilenet'."
        )


def predict_photos(
    photos: list,
    models: str = "models",
    run: str | None = None,
    top: int = DEFAULT_TOP,
    weights: str | None = None,
) -> tuple[list[Prediction], dict]:
    """Return the top breeds of each photo that can be read, and the failures.

    Parameters
    ----------
    photos : list of path-like
    weights : str, optional
        Weights file to use instead of the one the run records; allowed
        only for a run with one backbone. Its sha256 must match the run's.

    Returns
    -------
    predictions : list of Prediction
        In the order of ``photos``, without the failed ones.
    failures : dict of Path to str
        Photos that could not be read, with the reason.
    """
    from pipeline import backbones, features

    if top < 1:
        raise PipelineError(f"--top must be at least 1; got {top}.")
    paths = [Path(photo) for photo in photos]
    if not paths:
        raise PipelineError("No photo given; pass one or more image files.")

    run_dir = model_bundle.find_run_dir(models, run)
    bundle = model_bundle.load_bundle(run_dir)
    sources = bundle["sources"]
    check_backbones(sources, run_dir.name)
    if weights and len(sources) > 1:
        raise PipelineError(
            f"--weights applies to runs with one backbone; run {run_dir.name!r} uses "
            f"{'+'.join(source['backbone'] for source in sources)}."
        )

    failures = {
        path: "is a folder; pass image files" if path.is_dir() else "file not found"
        for path in paths
        if not path.is_file()
    }
    readable = [path for path in paths if path not in failures]
    if not readable:
        return [], failures

    # Keras starts here, with TensorFlow's start-up notices hidden.
    backbones.gpu_available()
    blocks, ok_sets = [], []
    for source in sources:
        table_row = backbones.get_backbone(source["backbone"])
        weights_argument = _weights_argument(source, weights)
        resolved = backbones.resolve_weights(table_row, weights_argument)
        recorded_sha = source.get("weights_sha256")
        if recorded_sha is not None and recorded_sha != resolved.sha256:
            raise PipelineError(
                f"The {table_row.name} weights {resolved.name} (sha256 {resolved.sha256[:12] or 'none'}) "
                f"differ from the weights run {run_dir.name!r} was trained with (sha256 "
                f"{recorded_sha[:12] or 'none'}, file {source.get('weights')!r}). Pass the right file "
                f"with --weights."
            )
        matrix, ok_paths, failed = features.embed_paths(
            readable,
            table_row.name,
            str(resolved.path) if resolved.path else "random",
            image_size=source.get("input_size"),
            precision=source.get("precision", "float32"),
            tta=source.get("tta", "none"),
        )
        failures.update(failed)
        if matrix.shape[1] != source["width"]:
            raise PipelineError(
                f"{table_row.name} produced {matrix.shape[1]} features per photo but run "
                f"{run_dir.name!r} was trained on {source['width']}; train the run again."
            )
        blocks.append(dict(zip(ok_paths, matrix)))
        ok_sets.append(set(ok_paths))

    ok_paths = [path for path in readable if all(path in ok for ok in ok_sets)]
    predictions = []
    if ok_paths:
        matrix = np.stack([np.concatenate([block[path] for block in blocks]) for path in ok_paths])
        probabilities = bundle["model"].predict_proba(matrix)
        classes = bundle["classes"]
        count = min(top, len(classes))
        for path, row in zip(ok_paths, probabilities):
            order = np.argsort(-row, kind="stable")[:count]
            predictions.append(
                Prediction(path=path, breeds=[classes[k] for k in order], probabilities=[float(row[k]) for k in order])
            )
    return predictions, failures
