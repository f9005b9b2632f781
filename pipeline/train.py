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
    """What to train and where to write it.

    ``params`` holds the parameters given on the command line; the others
    keep their defaults from :data:`pipeline.classifiers.CLASSIFIERS`.
    ``threads`` is the number of CPU threads for LightGBM, 0 for all cores.
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
    threads: int = 0


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
    if small:
        raise PipelineError(
            f"{len(small)} breeds have fewer labelled images than the {folds} folds of "
            f"stratified cross-validation: {format_examples(small)}. Lower FOLDS (--folds) "
            f"to at most {int(counts.min())}, or add images of those breeds."
        )


def cross_validate(
    data: TrainingData,
    classifier: str,
    params: dict,
    folds: int,
    seed: int,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Fit and score one model per fold.

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
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import StratifiedKFold

    n_classes = len(data.classes)
    oof = np.zeros((len(data.labels), n_classes), dtype=np.float64)
    fold_of_row = np.zeros(len(data.labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_metrics = []
    for fold, (train_rows, test_rows) in enumerate(splitter.split(data.features, data.labels), start=1):
        started = time.perf_counter()
        model = classifiers.build_classifier(classifier, params, seed=seed, threads=threads)
        info = model.fit(data.features[train_rows], data.labels[train_rows], n_classes)
        oof[test_rows] = model.predict_proba(data.features[test_rows])
        fold_of_row[test_rows] = fold
        seconds = time.perf_counter() - started

        metrics = {
            "fold": fold,
            "log_loss": float(log_loss(data.labels[test_rows], oof[test_rows], labels=np.arange(n_classes))),
            "accuracy": float(accuracy_score(data.labels[test_rows], oof[test_rows].argmax(axis=1))),
            "seconds": seconds,
        }
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
    extra = "rounds" if "rounds" in fold_metrics[0] else "iterations" if "iterations" in fold_metrics[0] else None
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
        data, config.classifier, params, config.folds, config.seed, config.threads
    )
    summary = summarize(fold_metrics)

    rounds = classifiers.final_rounds(config.classifier, fold_metrics)
    final_started = time.perf_counter()
    model = classifiers.build_classifier(config.classifier, params, seed=config.seed, threads=config.threads)
    final_info = model.fit(data.features, data.labels, len(data.classes), rounds=rounds)
    final_seconds = time.perf_counter() - final_started
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
        "threads": config.threads,
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
    counts = np.bincount(data.labels, minlength=len(data.classes))
    bundle = {
        "format": model_bundle.BUNDLE_FORMAT,
        "run": run,
        "classifier": config.classifier,
        "model": model,
        "classes": list(data.classes),
        "sources": data.sources,
        "class_frequencies": (counts / counts.sum()).tolist(),
        "n_train": int(len(data.labels)),
        "config": resolved,
        "cv": cv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _library_versions(),
    }
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
        "fit_seconds": f"{fit_seconds:.1f}",
        "date": date,
    }
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXPERIMENT_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)
