"""Train a classifier on cached features with stratified k-fold cross-validation.

The steps: read ``labels.csv`` and the feature files once, check that they
match, cross-validate, fit the final model on all labelled images, and
write ``MODELS/RUN/`` (model bundle, ``oof.csv``, report) plus one row of
``MODELS/experiments.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import classifiers, model_bundle, report
from pipeline.errors import PipelineError
from pipeline.feature_sets import load_feature_set, parse_backbones
from pipeline.labels import format_examples, read_labels

logger = logging.getLogger(__name__)

EXPERIMENTS_NAME = "experiments.csv"
EXPERIMENT_COLUMNS = [
    "run",
    "backbones",
    "classifier",
    "parameters",
    "folds",
    "seed",
    "cv_log_loss",
    "cv_log_loss_std",
    "cv_accuracy",
    "cv_accuracy_std",
    "fit_seconds",
    "date",
]


@dataclasses.dataclass
class TrainConfig:
    """Training settings: the inputs, the classifier and the output folder.

    ``params`` contains the parameters given on the command line; the others
    keep their defaults from :data:`pipeline.classifiers.CLASSIFIERS`.
    ``jobs`` is the number of folds fitted at once in worker processes, 0
    for one per CPU core.
    """

    data: Path
    features: Path
    backbones: list
    classifier: str = classifiers.DEFAULT_CLASSIFIER
    models: Path = Path("models")
    run: str | None = None
    folds: int = 5
    seed: int = 0
    params: dict = dataclasses.field(default_factory=dict)
    jobs: int = 0


@dataclasses.dataclass
class TrainingData:
    """Labelled features ready for fitting.

    Attributes
    ----------
    ids : ndarray of str, shape (n_images,)
    features : ndarray of float32, shape (n_images, n_features)
    labels : ndarray of int64, shape (n_images,)
        Index into ``classes``.
    classes : list of str
        Breed names, sorted.
    sources : list of dict
        Feature provenance per backbone.
    """

    ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    classes: list
    sources: list


@dataclasses.dataclass
class TrainResult:
    run: str
    run_dir: Path
    fold_metrics: list
    summary: dict
    fit_seconds: float
    report_path: Path

    def metrics_table(self) -> str:
        return format_metrics_table(self.fold_metrics, self.summary)


def default_run_name(backbones: list[str], classifier: str) -> str:
    return f"{'+'.join(backbones)}-{classifier}"


def check_run_name(run: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", run):
        raise PipelineError(
            f"Invalid run name {run!r}: use letters, digits and . _ + - only, "
            f"starting with a letter or digit, because it becomes a folder name."
        )
    return run


def load_training_data(data: Path, features: Path, backbones: list[str]) -> TrainingData:
    """Read ``DATA/labels.csv`` and ``FEATURES/<backbone>/train.h5`` and match them by id.

    Labelled images that the features stage skipped as unreadable are left
    out with a warning.

    Raises
    ------
    PipelineError
        On any mismatch between labels and features, and on invalid files.
    """
    labels_path = Path(data) / "labels.csv"
    labels = read_labels(labels_path)
    feature_set = load_feature_set(features, backbones, "train")
    features_name = " and ".join(str(path) for path in feature_set.paths)

    feature_ids = set(feature_set.ids)
    skipped = set(feature_set.skipped_ids)
    without_features = [image_id for image_id in labels["id"] if image_id not in feature_ids]
    unreadable = [image_id for image_id in without_features if image_id in skipped]
    missing = [image_id for image_id in without_features if image_id not in skipped]
    if missing:
        raise PipelineError(
            f"{len(missing)} ids in {labels_path} have no features in {features_name}: "
            f"{format_examples(missing)}. Compute the features of DATA/train again with "
            f"'make features FORCE=1', or delete those rows from labels.csv."
        )
    if unreadable:
        logger.warning(
            "leaving out %d labelled images that could not be decoded when the features were computed: %s",
            len(unreadable),
            format_examples(unreadable),
        )

    label_ids = set(labels["id"])
    unlabelled = [image_id for image_id in feature_set.ids if image_id not in label_ids]
    if unlabelled:
        raise PipelineError(
            f"{len(unlabelled)} images in {features_name} have no label in {labels_path}: "
            f"{format_examples(unlabelled)}. Add their breeds to labels.csv, or compute the "
            f"features from the labelled images only."
        )

    breeds = labels.set_index("id")["breed"].loc[feature_set.ids].to_numpy()
    classes = sorted(set(breeds))
    index = {breed: position for position, breed in enumerate(classes)}
    encoded = np.fromiter((index[breed] for breed in breeds), dtype=np.int64, count=len(breeds))
    return TrainingData(
        ids=feature_set.ids,
        features=feature_set.features,
        labels=encoded,
        classes=classes,
        sources=feature_set.sources,
    )


def check_folds(data: TrainingData, folds: int) -> None:
    counts = np.bincount(data.labels, minlength=len(data.classes))
    small = [f"{data.classes[k]} ({counts[k]})" for k in np.flatnonzero(counts < folds)]
    if not small:
        return
    if counts.min() >= 2:
        fix = f"Lower FOLDS (--folds) to at most {int(counts.min())}, or add images of those breeds."
    else:
        fix = "Add images of those breeds, or delete their rows from labels.csv."
    raise PipelineError(
        f"{len(small)} breeds have fewer labelled images than the {folds} folds of "
        f"stratified cross-validation: {format_examples(small)}. {fix}"
    )


def resolve_jobs(jobs: int) -> int:
    """Return the number of parallel fits: ``jobs``, or the number of CPU cores for 0."""
    import joblib

    if jobs < 0:
        raise PipelineError(f"--jobs must be 0 (one per CPU core) or more; got {jobs}.")
    return jobs or joblib.cpu_count()


# Below this many matrix cells, starting worker processes costs more than
# fitting the folds one after another.
_PARALLEL_MIN_CELLS = 2_000_000


def cross_validate(
    data: TrainingData,
    classifier: str,
    params: dict,
    folds: int,
    seed: int,
    jobs: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Fit and score one model per fold, ``jobs`` folds at a time.

    Parallel folds run in worker processes; joblib limits the BLAS threads
    of each worker to its share of the cores.

    Returns
    -------
    oof : ndarray of float64, shape (n_images, n_classes)
        Out-of-fold probabilities: each row predicted by the model that did
        not see it.
    fold_of_row : ndarray of int, shape (n_images,)
        Fold (1-based) in which each row was scored.
    fold_metrics : list of dict
        Per fold: ``fold``, ``log_loss``, ``accuracy``, ``seconds`` and what
        the model's ``fit`` returned (iterations or rounds).
    """
    import joblib
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import StratifiedKFold

    jobs = resolve_jobs(jobs)
    n_classes = len(data.classes)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(data.features, data.labels))

    jobs = min(folds, jobs) if data.features.size >= _PARALLEL_MIN_CELLS else 1
    tasks = (
        joblib.delayed(_fit_fold)(
            classifier, params, seed, data.features, data.labels, n_classes, train_rows, test_rows
        )
        for train_rows, test_rows in splits
    )
    # The generator yields each fold as soon as it and the folds before it
    # finish, so the log shows progress during long LightGBM runs.
    results = joblib.Parallel(n_jobs=jobs, return_as="generator")(tasks)

    oof = np.zeros((len(data.labels), n_classes), dtype=np.float64)
    fold_of_row = np.zeros(len(data.labels), dtype=np.int64)
    fold_metrics = []
    for fold, ((_, test_rows), (probabilities, info, seconds)) in enumerate(zip(splits, results), start=1):
        oof[test_rows] = probabilities
        fold_of_row[test_rows] = fold
        metrics = {
            "fold": fold,
            "log_loss": float(log_loss(data.labels[test_rows], probabilities, labels=np.arange(n_classes))),
            "accuracy": float(accuracy_score(data.labels[test_rows], probabilities.argmax(axis=1))),
            "seconds": seconds,
        }
        if "warning" in info:
            logger.warning("fold %d: %s", fold, info.pop("warning"))
        metrics.update({key: value for key, value in info.items() if key != "seconds"})
        fold_metrics.append(metrics)
        logger.info(
            "fold %d/%d: log loss %.4f, accuracy %.4f, %s, %.1f s",
            fold,
            folds,
            metrics["log_loss"],
            metrics["accuracy"],
            _describe_fit(info),
            seconds,
        )
    return oof, fold_of_row, fold_metrics


def _fit_fold(classifier, params, seed, features, labels, n_classes, train_rows, test_rows):
    started = time.perf_counter()
    model = classifiers.build_classifier(classifier, params, seed=seed)
    info = model.fit(features[train_rows], labels[train_rows], n_classes)
    probabilities = model.predict_proba(features[test_rows])
    return probabilities, info, time.perf_counter() - started


def _describe_fit(info: dict) -> str:
    if "rounds" in info:
        return f"{info['rounds']} rounds"
    if "iterations" in info:
        return f"{info['iterations']} iterations"
    return "fitted"


def summarize(fold_metrics: list[dict]) -> dict:
    summary = {}
    for key in ("log_loss", "accuracy", "seconds"):
        values = np.array([metrics[key] for metrics in fold_metrics])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std())
    return summary


def format_metrics_table(fold_metrics: list[dict], summary: dict) -> str:
    """Return the per-fold and mean ± std metrics as a plain-text table."""
    extra = None
    for key in ("rounds", "iterations"):
        if key in fold_metrics[0]:
            extra = key
    header = f"{'fold':>6}  {'log loss':>15}  {'accuracy':>15}  {'seconds':>8}"
    if extra:
        header += f"  {extra:>10}"
    lines = [header]
    for metrics in fold_metrics:
        line = f"{metrics['fold']:>6}  {metrics['log_loss']:>15.4f}  {metrics['accuracy']:>15.4f}  {metrics['seconds']:>8.1f}"
        if extra:
            line += f"  {metrics[extra]:>10}"
        lines.append(line)
    lines.append(
        f"{'mean':>6}  {summary['log_loss_mean']:>7.4f} ± {summary['log_loss_std']:.4f}  "
        f"{summary['accuracy_mean']:>7.4f} ± {summary['accuracy_std']:.4f}  {summary['seconds_mean']:>8.1f}"
    )
    return "\n".join(lines)


def train(config: TrainConfig) -> TrainResult:
    """Cross-validate, fit the final model and write the run folder."""
    backbones = parse_backbones(config.backbones)
    params = classifiers.resolve_params(config.classifier, config.params)
    run = check_run_name(config.run or default_run_name(backbones, config.classifier))
    if config.folds < 2:
        raise PipelineError(f"FOLDS (--folds) must be at least 2; got {config.folds}.")

    data = load_training_data(Path(config.data), Path(config.features), backbones)
    check_folds(data, config.folds)
    logger.info(
        "training %s on %d images x %d features (%s), %d breeds, %d folds",
        config.classifier,
        len(data.labels),
        data.features.shape[1],
        "+".join(backbones),
        len(data.classes),
        config.folds,
    )

    started = time.perf_counter()
    oof, fold_of_row, fold_metrics = cross_validate(
        data, config.classifier, params, config.folds, config.seed, config.jobs
    )
    summary = summarize(fold_metrics)

    rounds = classifiers.final_rounds(config.classifier, fold_metrics)
    final_started = time.perf_counter()
    model = classifiers.build_classifier(config.classifier, params, seed=config.seed)
    final_info = model.fit(data.features, data.labels, len(data.classes), rounds=rounds)
    final_seconds = time.perf_counter() - final_started
    if "warning" in final_info:
        logger.warning("final model: %s", final_info.pop("warning"))
    fit_seconds = time.perf_counter() - started
    logger.info("final model on all %d images: %s, %.1f s", len(data.labels), _describe_fit(final_info), final_seconds)

    run_dir = Path(config.models) / run
    if (run_dir / model_bundle.BUNDLE_NAME).exists():
        logger.info("replacing the existing run %s", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    resolved = {
        "data": str(config.data),
        "features": str(config.features),
        "backbones": backbones,
        "classifier": config.classifier,
        "params": params,
        "folds": config.folds,
        "seed": config.seed,
        "jobs": config.jobs,
        "final_rounds": rounds,
    }
    cv = {
        "folds": fold_metrics,
        **summary,
        "oof_log_loss": _overall_log_loss(data.labels, oof),
        "final_fit": {key: value for key, value in final_info.items() if key != "seconds"},
        "final_fit_seconds": final_seconds,
        "fit_seconds": fit_seconds,
    }
    bundle = make_bundle(run, config.classifier, model, data, resolved, cv)
    model_bundle.save_bundle(run_dir, bundle)
    write_oof(run_dir / "oof.csv", data, oof, fold_of_row)
    report_path = report.write_report(
        run_dir,
        run=run,
        classes=data.classes,
        labels=data.labels,
        probabilities=oof,
        table=format_metrics_table(fold_metrics, summary),
        config=resolved,
        sources=data.sources,
        fit_seconds=fit_seconds,
    )
    append_experiment(Path(config.models) / EXPERIMENTS_NAME, run, resolved, summary, fit_seconds, bundle["created"])
    return TrainResult(
        run=run,
        run_dir=run_dir,
        fold_metrics=fold_metrics,
        summary=summary,
        fit_seconds=fit_seconds,
        report_path=report_path,
    )


def make_bundle(run: str, classifier: str, model, data: TrainingData, config: dict, cv: dict) -> dict:
    """Return the model bundle described in :mod:`pipeline.model_bundle`."""
    counts = np.bincount(data.labels, minlength=len(data.classes))
    return {
        "format": model_bundle.BUNDLE_FORMAT,
        "run": run,
        "classifier": classifier,
        "model": model,
        "classes": list(data.classes),
        "sources": data.sources,
        "class_frequencies": (counts / counts.sum()).tolist(),
        "n_train": int(len(data.labels)),
        "config": config,
        "cv": cv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _library_versions(),
    }


def _overall_log_loss(labels: np.ndarray, oof: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(labels, oof, labels=np.arange(oof.shape[1])))


def _library_versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("scikit-learn", "lightgbm", "numpy", "joblib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = ""
    return versions


def write_oof(path: Path, data: TrainingData, oof: np.ndarray, fold_of_row: np.ndarray) -> None:
    """Write out-of-fold probabilities: id, breed, fold, then one column per breed."""
    frame = pd.DataFrame(oof, columns=data.classes)
    frame.insert(0, "fold", fold_of_row)
    frame.insert(0, "breed", [data.classes[label] for label in data.labels])
    frame.insert(0, "id", data.ids)
    model_bundle.write_text_atomic(path, frame.to_csv(index=False, float_format="%.6g"))


def append_experiment(
    path: Path, run: str, config: dict, summary: dict, fit_seconds: float, date: str
) -> None:
    """Append one row to ``MODELS/experiments.csv``, writing the header if the file is new."""
    row = {
        "run": run,
        "backbones": "+".join(config["backbones"]),
        "classifier": config["classifier"],
        "parameters": json.dumps(config["params"], sort_keys=True),
        "folds": config["folds"],
        "seed": config["seed"],
        "cv_log_loss": f"{summary['log_loss_mean']:.5f}",
        "cv_log_loss_std": f"{summary['log_loss_std']:.5f}",
        "cv_accuracy": f"{summary['accuracy_mean']:.5f}",
        "cv_accuracy_std": f"{summary['accuracy_std']:.5f}",
        "fit_seconds": f"{fit_seconds:.3f}",
        "date": date,
    }
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXPERIMENT_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)
