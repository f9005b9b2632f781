"""Tests of the train stage on tiny generated feature files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_BREEDS, make_feature_dataset, shared_dir, write_features
from pipeline import cli, model_bundle
from pipeline.errors import PipelineError
from pipeline.feature_sets import load_feature_set, parse_backbones
from pipeline.train import TrainConfig, cross_validate, load_training_data, train

# Small enough for 40 images; the defaults are sized for thousands.
TINY_LIGHTGBM = {"min_data_in_leaf": 2, "pca_components": 4, "max_rounds": 1000}
TINY_PARAMS = {"logreg": {}, "lightgbm": TINY_LIGHTGBM}


def config_for(dataset: dict, **changes) -> TrainConfig:
    settings = {
        "data": dataset["data"],
        "features": dataset["features"],
        "backbones": dataset["backbones"],
        "models": dataset["models"],
        "folds": 2,
        "jobs": 1,
    }
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("classifier", ["logreg", "lightgbm"])
def test_train_writes_run(feature_dataset, classifier):
    config = config_for(feature_dataset, classifier=classifier, params=TINY_PARAMS[classifier])
    result = train(config)

    run_dir = feature_dataset["models"] / f"alpha+beta-{classifier}"
    assert result.run_dir == run_dir
    assert result.summary["accuracy_mean"] >= 0.9
    assert result.summary["log_loss_mean"] < 0.5
    for name in ("model.joblib", "run.json", "oof.csv", "report.md", "confusion.png"):
        assert (run_dir / name).is_file(), name

    bundle = model_bundle.load_bundle(run_dir)
    assert bundle["classes"] == sorted(TINY_BREEDS)
    assert [source["backbone"] for source in bundle["sources"]] == ["alpha", "beta"]
    assert [source["width"] for source in bundle["sources"]] == [6, 3]
    assert bundle["config"]["classifier"] == classifier
    assert bundle["config"]["folds"] == 2
    assert len(bundle["cv"]["folds"]) == 2
    assert bundle["class_frequencies"] == pytest.approx([0.25] * 4)

    oof = pd.read_csv(run_dir / "oof.csv")
    assert list(oof.columns) == ["id", "breed", "fold", *sorted(TINY_BREEDS)]
    assert sorted(oof["id"]) == feature_dataset["train_ids"]
    assert set(oof["fold"]) == {1, 2}
    assert np.allclose(oof[sorted(TINY_BREEDS)].sum(axis=1), 1.0, atol=1e-5)

    report = (run_dir / "report.md").read_text()
    assert "## Cross-validation" in report
    assert "## Per-breed accuracy" in report
    assert "## Most confused breed pairs" in report
    assert "![confusion matrix](confusion.png)" in report


def test_lightgbm_final_model_uses_cv_rounds(feature_dataset):
    result = train(config_for(feature_dataset, classifier="lightgbm", params=TINY_LIGHTGBM))
    bundle = model_bundle.load_bundle(result.run_dir)
    fold_rounds = [metrics["rounds"] for metrics in result.fold_metrics]
    expected = int(round(np.mean(fold_rounds)))
    assert bundle["config"]["final_rounds"] == expected
    assert bundle["model"].booster.current_iteration() == expected


def test_train_reload_predicts_the_same(feature_dataset):
    result = train(config_for(feature_dataset))
    bundle = model_bundle.load_bundle(result.run_dir)
    features = load_feature_set(feature_dataset["features"], ["alpha", "beta"], "test").features
    before = bundle["model"].predict_proba(features)

    model_bundle.save_bundle(result.run_dir, bundle)
    after = model_bundle.load_bundle(result.run_dir)["model"].predict_proba(features)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("classifier", ["logreg", "lightgbm"])
def test_parallel_folds_match_sequential(feature_dataset, monkeypatch, classifier):
    from pipeline import train as train_module
    from pipeline.classifiers import resolve_params

    data = load_training_data(feature_dataset["data"], feature_dataset["features"], ["alpha", "beta"])
    params = resolve_params(classifier, TINY_PARAMS[classifier])
    sequential, _, _ = cross_validate(data, classifier, params, folds=2, seed=0, jobs=1)
    monkeypatch.setattr(train_module, "_PARALLEL_MIN_CELLS", 0)
    parallel, _, metrics = cross_validate(data, classifier, params, folds=2, seed=0, jobs=2)
    np.testing.assert_allclose(parallel, sequential, rtol=1e-10, atol=1e-12)
    assert [fold["fold"] for fold in metrics] == [1, 2]


def test_experiments_csv_gets_one_row_per_run(feature_dataset):
    train(config_for(feature_dataset))
    train(config_for(feature_dataset, backbones=["alpha"], params={"C": 0.5}))

    with open(feature_dataset["models"] / "experiments.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == ["alpha+beta-logreg", "alpha-logreg"]
    assert rows[1]["backbones"] == "alpha"
    assert rows[1]["classifier"] == "logreg"
    assert json.loads(rows[1]["parameters"])["C"] == 0.5
    assert float(rows[0]["cv_accuracy"]) == 1.0
    assert float(rows[0]["fit_seconds"]) > 0
    assert rows[0]["date"]


def test_backbones_join_by_id_in_given_order(tmp_path):
    dataset = make_feature_dataset(tmp_path)
    alpha = dataset["matrices"]["alpha"][:40]
    beta = dataset["matrices"]["beta"][:40]
    # Store beta's rows in reverse order: the join must follow ids, not rows.
    ids = dataset["train_ids"]
    write_features(dataset["features"] / "beta" / "train.h5", ids[::-1], beta[::-1])

    joined = load_feature_set(dataset["features"], ["beta", "alpha"], "train")
    assert list(joined.ids) == ids[::-1]
    np.testing.assert_array_equal(joined.features, np.hstack([beta, alpha])[::-1])
    assert [source["backbone"] for source in joined.sources] == ["beta", "alpha"]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("alpha", ["alpha"]),
        ("alpha,beta", ["alpha", "beta"]),
        ("alpha beta", ["alpha", "beta"]),
        ("beta, alpha", ["beta", "alpha"]),
        (["alpha", "beta"], ["alpha", "beta"]),
    ],
)
def test_parse_backbones(value, expected):
    assert parse_backbones(value) == expected


def test_parse_backbones_rejects_repeats():
    with pytest.raises(PipelineError, match=re.escape("Backbone alpha is given more than once in 'alpha beta alpha'")):
        parse_backbones("alpha beta alpha")


def test_feature_provenance_is_stored(tmp_path):
    attrs = {"weights": "random", "weights_sha256": "", "input_size": 32, "precision": "float32", "tta": "none"}
    dataset = make_feature_dataset(tmp_path, widths={"alpha": 5}, attrs=attrs)
    result = train(config_for(dataset, backbones=["alpha"]))
    sources = model_bundle.load_bundle(result.run_dir)["sources"]
    assert sources == [{"backbone": "alpha", "width": 5, **attrs}]


# Input errors: each test breaks one thing and checks the whole message.


def _rewrite_labels(dataset: dict, edit) -> Path:
    path = dataset["data"] / "labels.csv"
    labels = pd.read_csv(path, dtype=str)
    labels = edit(labels)
    labels.to_csv(path, index=False)
    return path


def test_error_labels_without_features(feature_dataset):
    extra = pd.DataFrame({"id": ["new001", "new002"], "breed": ["pug", "pug"]})
    path = _rewrite_labels(feature_dataset, lambda labels: pd.concat([labels, extra]))
    features = feature_dataset["features"]
    message = (
        f"2 ids in {path} have no features in {features / 'alpha' / 'train.h5'} and "
        f"{features / 'beta' / 'train.h5'}: new001, new002. Compute the features of DATA/train "
        f"again with 'make features FORCE=1', or delete those rows from labels.csv."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_features_without_label(feature_dataset):
    path = _rewrite_labels(feature_dataset, lambda labels: labels.iloc[7:])
    features = feature_dataset["features"]
    message = (
        f"7 images in {features / 'alpha' / 'train.h5'} and {features / 'beta' / 'train.h5'} have "
        f"no label in {path}: tr000, tr001, tr002, tr003, tr004, ... (2 more). Add their breeds "
        f"to labels.csv, or compute the features from the labelled images only."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_duplicate_label_ids(feature_dataset):
    path = _rewrite_labels(feature_dataset, lambda labels: pd.concat([labels, labels.iloc[[3, 5, 5]]]))
    message = f"{path} lists 2 ids more than once: tr003, tr005. Keep one row per image id."
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_duplicate_feature_ids(feature_dataset):
    ids = list(feature_dataset["train_ids"])
    ids[1] = ids[0]
    path = write_features(feature_dataset["features"] / "alpha" / "train.h5", ids, feature_dataset["matrices"]["alpha"][:40])
    message = (
        f"{path} has 1 duplicate ids: tr000. Each image needs exactly one row; recreate the "
        f"file with 'make features FORCE=1'."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_empty_breeds(feature_dataset):
    def blank(labels):
        labels.loc[[2, 4], "breed"] = ""
        return labels

    path = _rewrite_labels(feature_dataset, blank)
    message = f"{path} has 2 rows with an empty breed: ids tr002, tr004. Fill in the breed or delete those rows."
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_empty_ids(feature_dataset):
    def blank(labels):
        labels.loc[3, "id"] = ""
        return labels

    path = _rewrite_labels(feature_dataset, blank)
    message = f"{path} has 1 rows with an empty id: lines 5. Fill in the image id or delete those rows."
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_error_non_finite_features(feature_dataset, bad_value):
    matrix = feature_dataset["matrices"]["beta"][:40].copy()
    matrix[[0, 9], 1] = bad_value
    path = write_features(feature_dataset["features"] / "beta" / "train.h5", feature_dataset["train_ids"], matrix)
    message = (
        f"{path} has NaN or infinite features in 2 rows: ids tr000, tr009. Recompute the file "
        f"with 'make features FORCE=1' (with PRECISION=float32 if it was bfloat16)."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_backbones_disagree_on_ids(feature_dataset):
    ids = list(feature_dataset["train_ids"])
    ids[-1] = "other999"
    features = feature_dataset["features"]
    write_features(features / "beta" / "train.h5", ids, feature_dataset["matrices"]["beta"][:40])
    message = (
        f"The feature files disagree on the set of images (1 ids only in "
        f"{features / 'alpha' / 'train.h5'}: tr039; 1 ids only in {features / 'beta' / 'train.h5'}: "
        f"other999). Compute both backbones' features from the same image folder."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_incomplete_feature_file(feature_dataset):
    path = feature_dataset["features"] / "alpha" / "train.h5"
    with h5py.File(path, "a") as handle:
        handle.attrs["complete"] = False
    message = (
        f"{path} is incomplete: a features run is still writing it or was interrupted. "
        f"Run 'make features' again to finish it."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_hdf5_without_features(feature_dataset):
    path = feature_dataset["features"] / "alpha" / "train.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("embeddings", data=np.zeros((2, 2)))
    message = (
        f"{path} is not a feature file: it has no dataset 'ids' or 'features'. A feature file "
        f"needs 'ids' (n_images,) and 'features' (n_images, n_features)."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_not_hdf5(feature_dataset):
    path = feature_dataset["features"] / "alpha" / "train.h5"
    path.write_text("id,feature\n")
    message = f"{path} is not an HDF5 file, so it is not a feature file. Recreate it with 'make features FORCE=1'."
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_missing_feature_file(feature_dataset):
    features = feature_dataset["features"]
    message = (
        f"Feature file not found: {features / 'gamma' / 'train.h5'}. Run 'make features "
        f"BACKBONE=...' to create it, or check FEATURES (--features, now {features}) and "
        f"BACKBONE (--backbone)."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset, backbones=["alpha", "gamma"]))


def test_error_fewer_images_than_folds(feature_dataset):
    message = (
        "4 breeds have fewer labelled images than the 12 folds of stratified cross-validation: "
        "akita (10), beagle (10), boxer (10), pug (10). Lower FOLDS (--folds) to at most 10, or "
        "add images of those breeds."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset, folds=12))


def test_error_breed_with_one_image(feature_dataset):
    def relabel(labels):
        labels.loc[0, "breed"] = "corgi"
        return labels

    _rewrite_labels(feature_dataset, relabel)
    message = (
        "1 breeds have fewer labelled images than the 2 folds of stratified cross-validation: "
        "corgi (1). Add images of those breeds, or delete their rows from labels.csv."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset))


def test_error_parameter_of_other_classifier(feature_dataset):
    message = "--learning-rate applies to lightgbm only; got it with --classifier logreg."
    with pytest.raises(PipelineError, match=re.escape(message)):
        train(config_for(feature_dataset, params={"learning_rate": 0.1}))


def test_error_invalid_run_name(feature_dataset):
    with pytest.raises(PipelineError, match=re.escape("Invalid run name '../escape'")):
        train(config_for(feature_dataset, run="../escape"))


def test_skipped_labelled_images_are_left_out(tmp_path, caplog):
    dataset = make_feature_dataset(tmp_path, widths={"alpha": 4}, attrs={"weights": "random"})
    ids = dataset["train_ids"]
    matrix = dataset["matrices"]["alpha"][:40]
    write_features(
        dataset["features"] / "alpha" / "train.h5", ids[1:], matrix[1:], {"backbone": "alpha"}, skipped_ids=[ids[0]]
    )
    data = load_training_data(dataset["data"], dataset["features"], ["alpha"])
    assert len(data.ids) == 39
    assert "leaving out 1 labelled images that could not be decoded" in caplog.text
    assert "tr000" in caplog.text


# Command line.


def test_cli_train_prints_table(feature_dataset, capsys):
    code = cli.main(
        [
            "train",
            "--data", str(feature_dataset["data"]),
            "--features", str(feature_dataset["features"]),
            "--backbone", "alpha, beta",
            "--models", str(feature_dataset["models"]),
            "--folds", "2",
            "--run", "cli-run",
            "--C", "0.5",
        ]
    )  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0
    assert "mean" in output
    assert "run cli-run: CV log loss" in output
    bundle = model_bundle.load_bundle(feature_dataset["models"] / "cli-run")
    assert bundle["config"]["params"]["C"] == 0.5


def test_cli_train_error_exits_2(feature_dataset, capsys):
    code = cli.main(["train", "--data", str(feature_dataset["data"]), "--features", "nowhere", "--backbone", "alpha"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: Feature file not found: nowhere/alpha/train.h5.")
    assert "Traceback" not in captured.err


# Real ImageNet embeddings of 2,400 dog photos (120 breeds), when available.


def _real_training_data():
    shared = shared_dir()
    features = shared / "features"
    data = shared / "data" / "dogs-dev"
    if not (features / "efficientnet_lite0" / "train.h5").is_file():
        pytest.skip(f"{features / 'efficientnet_lite0' / 'train.h5'} not found")
    return load_training_data(data, features, ["efficientnet_lite0"])


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "classifier, params, min_accuracy",
    [
        ("logreg", {}, 0.65),
        # Capping the rounds keeps this test near 20 s on 2 cores; the full
        # default LightGBM reaches about 0.62.
        ("lightgbm", {"learning_rate": 0.3, "max_rounds": 120}, 0.4),
    ],
)
def test_real_embeddings_beat_chance(classifier, params, min_accuracy):
    from pipeline.classifiers import resolve_params

    data = _real_training_data()
    oof, _, fold_metrics = cross_validate(data, classifier, resolve_params(classifier, params), folds=3, seed=0)
    accuracy = float(np.mean(oof.argmax(axis=1) == data.labels))
    chance = 1 / len(data.classes)
    assert accuracy > min_accuracy, f"{classifier} accuracy {accuracy:.3f}; chance is {chance:.3f}"
    assert len(fold_metrics) == 3
