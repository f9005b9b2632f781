"""Write test-set probabilities of a trained run in the Kaggle submission format."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import model_bundle
from pipeline.errors import PipelineError
from pipeline.feature_sets import load_feature_set
from pipeline.labels import format_examples

logger = logging.getLogger(__name__)

#: Probabilities are clipped to [CLIP, 1 - CLIP] before the rows are
#: renormalised, which caps the log loss of one confident mistake at
#: -log(1e-6) = 13.8 and costs a correct prediction at most about 1e-4.
DEFAULT_CLIP = 1e-6
#: Allowed deviation of a row sum from 1.
ROW_SUM_TOLERANCE = 1e-6


@dataclasses.dataclass
class SubmitResult:
    path: Path
    run: str
    n_rows: int
    without_features: list


def read_template(data: Path, classes: list, feature_ids, skipped_ids) -> tuple[list, list]:
    """Return the submission's (ids, columns) in the order to write them.

    They come from ``DATA/sample_submission.csv`` when it exists. Without
    it, the ids are the test images (with features or skipped) sorted, and
    the columns are ``id`` and the breeds in alphabetical order.
    """
    sample_path = Path(data) / "sample_submission.csv"
    if not sample_path.is_file():
        logger.info("%s not found; writing the test ids sorted and the breeds in alphabetical order", sample_path)
        ids = sorted(set(feature_ids) | set(skipped_ids))
        return ids, ["id", *sorted(classes)]

    try:
        sample = pd.read_csv(sample_path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{sample_path} is not a readable CSV file: {error}") from None
    columns = list(sample.columns)
    if not columns or columns[0] != "id":
        raise PipelineError(f"{sample_path} must start with the column 'id'; found {columns[:3]}.")

    if sample.empty:
        raise PipelineError(
            f"{sample_path} has no rows, so the submission would be empty. Use the "
            f"sample_submission.csv of the competition, or delete it to write the test ids "
            f"sorted with the breeds in alphabetical order."
        )

    breeds = columns[1:]
    missing = sorted(set(classes) - set(breeds))
    extra = sorted(set(breeds) - set(classes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} breeds of the model are not columns of it: {format_examples(missing)}")
        if extra:
            parts.append(f"{len(extra)} columns are breeds the model never saw: {format_examples(extra)}")
        raise PipelineError(
            f"{sample_path} does not match the model's breeds ({'; '.join(parts)}). Train on "
            f"the labels.csv that belongs to this sample_submission.csv."
        )

    ids = sample["id"].astype(str).str.strip()
    repeated = ids[ids.duplicated()].unique()
    if len(repeated):
        raise PipelineError(
            f"{sample_path} lists {len(repeated)} ids more than once: {format_examples(repeated)}."
        )
    return ids.tolist(), columns


def clip_probabilities(probabilities: np.ndarray, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Clip to [clip, 1 - clip] and renormalise each row to sum to 1."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), clip, 1.0 - clip)
    return clipped / clipped.sum(axis=1, keepdims=True)


def validate_submission(frame: pd.DataFrame, ids: list, columns: list) -> None:
    """Check a submission frame against the expected ids and columns.

    Raises
    ------
    PipelineError
        If a column or id is missing, repeated or out of order, or a
        probability is NaN, outside [0, 1], or a row does not sum to 1
        within :data:`ROW_SUM_TOLERANCE`.
    """
    if list(frame.columns) != list(columns):
        missing = [column for column in columns if column not in frame.columns]
        extra = [column for column in frame.columns if column not in columns]
        raise PipelineError(
            f"Submission columns differ from the expected ones (missing: "
            f"{format_examples(missing) or 'none'}; unexpected: {format_examples(extra) or 'none'}; "
            f"or the order differs)."
        )
    frame_ids = frame["id"].astype(str)
    repeated = frame_ids[frame_ids.duplicated()].unique()
    if len(repeated):
        raise PipelineError(f"Submission repeats {len(repeated)} ids: {format_examples(repeated)}.")
    missing_ids = sorted(set(ids) - set(frame_ids))
    if missing_ids:
        raise PipelineError(f"Submission lacks {len(missing_ids)} ids: {format_examples(missing_ids)}.")
    if frame_ids.tolist() != list(ids):
        raise PipelineError("Submission rows are not in the order of the expected ids.")

    values = frame[columns[1:]].to_numpy(dtype=np.float64)
    nan_rows = np.isnan(values).any(axis=1)
    if nan_rows.any():
        raise PipelineError(
            f"Submission has NaN probabilities in {int(nan_rows.sum())} rows: ids "
            f"{format_examples(frame_ids[nan_rows])}."
        )
    outside = ((values < 0) | (values > 1)).any(axis=1)
    if outside.any():
        raise PipelineError(
            f"Submission has probabilities outside [0, 1] in {int(outside.sum())} rows: ids "
            f"{format_examples(frame_ids[outside])}."
        )
    off = np.abs(values.sum(axis=1) - 1.0) > ROW_SUM_TOLERANCE
    if off.any():
        raise PipelineError(
            f"Submission rows do not sum to 1 within {ROW_SUM_TOLERANCE:g} in {int(off.sum())} rows: "
            f"ids {format_examples(frame_ids[off])}."
        )


def validate_submission_file(path: str | os.PathLike, data: str | os.PathLike) -> pd.DataFrame:
    """Read a written submission and validate it against ``DATA/sample_submission.csv``."""
    sample = pd.read_csv(Path(data) / "sample_submission.csv", dtype={"id": str})
    frame = pd.read_csv(path, dtype={"id": str})
    validate_submission(frame, sample["id"].tolist(), list(sample.columns))
    return frame


def submit(
    data: str | os.PathLike,
    features: str | os.PathLike,
    models: str | os.PathLike,
    run: str | None = None,
    output: str | os.PathLike = "submission.csv",
    clip: float = DEFAULT_CLIP,
) -> SubmitResult:
    """Predict the test features with a trained run and write the submission.

    Raises
    ------
    PipelineError
        If the run or the test features are missing, the test features
        differ from the training features (backbones, widths, weights or
        other provenance), or the sample submission does not fit the model.
    """
    if not 0.0 <= clip < 0.5:
        raise PipelineError(f"--clip must be in [0, 0.5); got {clip}.")
    run_dir = model_bundle.find_run_dir(models, run)
    bundle = model_bundle.load_bundle(run_dir)
    classes = bundle["classes"]
    backbones = [source["backbone"] for source in bundle["sources"]]

    feature_set = load_feature_set(features, backbones, "test")
    differences = model_bundle.source_differences(bundle["sources"], feature_set.sources)
    if differences:
        raise PipelineError(
            f"The test features do not match what run {run_dir.name!r} was trained on: "
            f"{'; '.join(differences)}. Compute the test features with the same settings as the "
            f"training features ('make features' with the same BACKBONE, WEIGHTS, PRECISION and "
            f"TTA), or train again on matching features."
        )

    ids, columns = read_template(Path(data), classes, feature_set.ids, feature_set.skipped_ids)
    row_of = {image_id: row for row, image_id in enumerate(feature_set.ids)}
    skipped = set(feature_set.skipped_ids)
    without_features = [image_id for image_id in ids if image_id not in row_of]
    unexplained = [image_id for image_id in without_features if image_id not in skipped]
    if unexplained:
        raise PipelineError(
            f"{len(unexplained)} test ids have no features in "
            f"{' and '.join(str(path) for path in feature_set.paths)}: {format_examples(unexplained)}. "
            f"Compute the features of DATA/test again with 'make features FORCE=1', or check "
            f"that DATA and FEATURES belong together."
        )
    unused = len(set(row_of) - set(ids))
    if unused:
        logger.warning("%d test images with features are not in the sample submission and are left out", unused)

    probabilities = np.empty((len(ids), len(classes)), dtype=np.float64)
    known = [image_id in row_of for image_id in ids]
    rows = [row_of[image_id] for image_id in ids if image_id in row_of]
    if rows:
        probabilities[np.flatnonzero(known)] = bundle["model"].predict_proba(feature_set.features[rows])
    if without_features:
        logger.warning(
            "%d test images could not be decoded when the features were computed; they get the "
            "training-set breed frequencies: %s",
            len(without_features),
            format_examples(without_features),
        )
        probabilities[~np.array(known)] = np.asarray(bundle["class_frequencies"], dtype=np.float64)
    probabilities = clip_probabilities(probabilities, clip)

    frame = pd.DataFrame(probabilities, columns=classes)[columns[1:]]
    frame.insert(0, "id", ids)
    validate_submission(frame, ids, columns)

    output = Path(output)
    write_csv_atomic(frame, output)
    logger.info("wrote %s: %d rows x %d breeds from run %s", output, len(frame), len(columns) - 1, run_dir.name)
    return SubmitResult(path=output, run=run_dir.name, n_rows=len(frame), without_features=without_features)


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` under a temporary name in the same folder, then rename it to ``path``."""
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # Ten significant digits change a row sum of 120 values by at most 1e-8.
        frame.to_csv(tmp_path, index=False, float_format="%.10g")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
