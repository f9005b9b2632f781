"""Save, find and load trained runs (``MODELS/RUN/model.joblib``).

A bundle is a dict with these keys:

``format``
    :data:`BUNDLE_FORMAT`.
``model``
    The fitted model from :mod:`pipeline.classifiers`.
``classes``
    Breed names in the column order of ``model.predict_proba``.
``sources``
    The features the model expects, one dict per backbone in
    concatenation order (see :mod:`pipeline.feature_sets`).
``class_frequencies``
    Share of each class in the training labels, in ``classes`` order;
    submit gives it to test images without features.
``config``, ``cv``, ``created``, ``versions``
    The resolved training configuration, the cross-validation metrics,
    the creation time (ISO 8601) and library versions.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import joblib

from pipeline.errors import PipelineError
from pipeline.feature_sets import PROVENANCE_KEYS

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "pipeline-model/1"
BUNDLE_NAME = "model.joblib"
SUMMARY_NAME = "run.json"


def save_bundle(run_dir: Path, bundle: dict) -> Path:
    """Write the bundle and a JSON summary of it (all but the model) atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / BUNDLE_NAME
    tmp_path = run_dir / f".{BUNDLE_NAME}.tmp-{os.getpid()}"
    try:
        joblib.dump(bundle, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()

    summary = {key: value for key, value in bundle.items() if key != "model"}
    write_text_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2, default=str) + "\n")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp_path.write_text(text, encoding="utf-8")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def find_run_dir(models: str | os.PathLike, run: str | None = None) -> Path:
    """Return ``MODELS/RUN``, or the run with the newest bundle when ``run`` is None.

    Raises
    ------
    PipelineError
        If the run, or any run, does not exist.
    """
    models = Path(models)
    if run:
        run_dir = models / run
        if not (run_dir / BUNDLE_NAME).is_file():
            available = sorted(path.parent.name for path in models.glob(f"*/{BUNDLE_NAME}"))
            choices = f"trained runs in {models}: {', '.join(available)}" if available else f"no trained run in {models}"
            raise PipelineError(
                f"Run {run!r} not found: {run_dir / BUNDLE_NAME} does not exist ({choices}). "
                f"Check RUN (--run) and MODELS (--models), or train it with 'make train RUN={run}'."
            )
        return run_dir

    bundles = sorted(models.glob(f"*/{BUNDLE_NAME}"), key=lambda path: path.stat().st_mtime)
    if not bundles:
        raise PipelineError(
            f"No trained run in {models}. Run 'make train' first, or set MODELS (--models) "
            f"to the folder that holds the runs."
        )
    run_dir = bundles[-1].parent
    logger.info("using the most recent run %s", run_dir.name)
    return run_dir


def load_bundle(run_dir: Path) -> dict:
    """Load and check ``run_dir/model.joblib``."""
    path = run_dir / BUNDLE_NAME
    try:
        bundle = joblib.load(path)
    except (OSError, EOFError, ValueError, KeyError, ModuleNotFoundError, AttributeError) as error:
        raise PipelineError(
            f"Could not load the model {path}: {error}. Train the run again with 'make train RUN={run_dir.name}'."
        ) from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise PipelineError(
            f"{path} is not a model bundle of this pipeline (expected format {BUNDLE_FORMAT}). "
            f"Train the run again with 'make train RUN={run_dir.name}'."
        )
    return bundle


def source_differences(expected: list[dict], found: list[dict]) -> list[str]:
    """Describe how the found feature sources differ from the expected ones.

    Backbones and widths must be equal. A provenance attribute is compared
    when both sides record it. One recorded on only one side is logged as a
    warning, because files written by other programs carry no attributes.
    """
    expected_names = [source["backbone"] for source in expected]
    found_names = [source["backbone"] for source in found]
    if expected_names != found_names:
        return [f"backbones: model {'+'.join(expected_names)}, features {'+'.join(found_names)}"]

    differences = []
    for model_source, feature_source in zip(expected, found):
        name = model_source["backbone"]
        if model_source["width"] != feature_source["width"]:
            differences.append(
                f"{name} width: model {model_source['width']}, features {feature_source['width']}"
            )
        for key in PROVENANCE_KEYS:
            in_model, in_features = key in model_source, key in feature_source
            if in_model and in_features and model_source[key] != feature_source[key]:
                differences.append(f"{name} {key}: model {model_source[key]!r}, features {feature_source[key]!r}")
            elif in_model != in_features:
                logger.warning(
                    "cannot check %s %s: only the %s records it (%r)",
                    name,
                    key,
                    "model" if in_model else "feature file",
                    model_source.get(key, feature_source.get(key)),
                )
    return differences
