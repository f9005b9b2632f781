"""Tests of the classifier table and the two models on tiny generated data."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import separable_features
from pipeline import classifiers
from pipeline.errors import PipelineError
from pipeline.train import TrainingData, cross_validate

N_CLASSES = 4


def tiny_problem(per_class: int = 12, width: int = 6, seed: int = 0):
    labels = np.arange(per_class * N_CLASSES) % N_CLASSES
    return separable_features(labels, width, seed), labels


def test_resolve_params_defaults():
    params = classifiers.resolve_params("lightgbm", {})
    expected = {parameter.name: parameter.default for parameter in classifiers.LIGHTGBM_PARAMETERS}
    assert params == expected


def test_resolve_params_override_converts_type():
    params = classifiers.resolve_params("logreg", {"C": "2", "max_iter": 50.0})
    assert params["C"] == 2.0
    assert params["max_iter"] == 50
    assert isinstance(params["max_iter"], int)


@pytest.mark.parametrize(
    "classifier, overrides, message",
    [
        ("logreg", {"C": 0.0}, "--C must be at least 1e-09; got 0.0."),
        ("logreg", {"tol": "nan"}, "--tol must be a finite number; got nan."),
        ("logreg", {"C": "inf"}, "--C must be a finite number; got inf."),
        ("lightgbm", {"learning_rate": float("nan")}, "--learning-rate must be a finite number; got nan."),
        ("lightgbm", {"learning_rate": 2.0}, "--learning-rate must be at most 1.0; got 2.0."),
        ("lightgbm", {"valid_fraction": 0.9}, "--valid-fraction must be at most 0.5; got 0.9."),
        ("lightgbm", {"C": 1.0}, "--C applies to logreg only; got it with --classifier lightgbm."),
        ("logreg", {"depth": 3}, "depth is not a classifier parameter; got it with --classifier logreg."),
        ("svm", {}, "Unknown classifier 'svm'; choose one of: logreg, lightgbm."),
    ],
)
def test_resolve_params_errors(classifier, overrides, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        classifiers.resolve_params(classifier, overrides)


def test_logreg_probabilities_cover_absent_class():
    features, labels = tiny_problem()
    keep = labels != 2
    model = classifiers.build_classifier("logreg", classifiers.resolve_params("logreg", {}))
    model.fit(features[keep], labels[keep], N_CLASSES)
    probabilities = model.predict_proba(features)
    assert probabilities.shape == (len(labels), N_CLASSES)
    assert np.all(probabilities[:, 2] == 0.0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.filterwarnings("error")
def test_logreg_max_iter_warning_names_fix():
    features, labels = tiny_problem()
    params = classifiers.resolve_params("logreg", {"max_iter": 1, "tol": 1e-10, "C": 100.0})
    info = classifiers.build_classifier("logreg", params).fit(features, labels, N_CLASSES)
    assert info["warning"] == (
        "logreg stopped at max_iter=1 before reaching tol=1e-10; raise --max-iter or --tol, or lower --C"
    )


def test_lightgbm_early_stopping_then_fixed_rounds():
    features, labels = tiny_problem(per_class=20)
    params = classifiers.resolve_params("lightgbm", {"min_data_in_leaf": 2, "pca_components": 4, "max_rounds": 400})
    model = classifiers.build_classifier("lightgbm", params)
    info = model.fit(features, labels, N_CLASSES)
    assert 1 <= info["rounds"] <= 400
    assert info["seconds"] > 0
    assert model.predict_proba(features).shape == (len(labels), N_CLASSES)

    refit = classifiers.build_classifier("lightgbm", params)
    assert refit.fit(features, labels, N_CLASSES, rounds=7)["rounds"] == 7
    assert refit.booster.num_trees() == 7 * N_CLASSES


def test_lightgbm_warns_when_no_tree_splits():
    features, labels = tiny_problem(per_class=5)
    params = classifiers.resolve_params("lightgbm", {"pca_components": 4, "max_rounds": 50})

    info = classifiers.build_classifier("lightgbm", params).fit(features, labels, N_CLASSES)

    assert info["rounds"] == 1
    assert info["warning"] == (
        "LightGBM stopped after 1 round, so its trees have hardly any splits; with 16 training rows "
        "lower --min-data-in-leaf (now 20)"
    )


def test_lightgbm_stops_on_slice_of_training_part(monkeypatch):
    """Early stopping may only see rows of the fold's training part, never the scored part."""
    per_class = 10
    features, labels = tiny_problem(per_class=per_class)
    # Column 0 carries the row number so the spy can tell which rows a fit saw.
    features = np.hstack([np.arange(len(labels), dtype=np.float32)[:, None], features])
    seen = []
    original_fit = classifiers.LightGBMModel.fit

    def spy(self, x, y, n_classes, rounds=None):
        seen.append(set(x[:, 0].astype(int)))
        return original_fit(self, x, y, n_classes, rounds)

    monkeypatch.setattr(classifiers.LightGBMModel, "fit", spy)
    data = TrainingData(
        ids=np.array([f"id{row}" for row in range(len(labels))], dtype=object),
        features=features,
        labels=labels,
        classes=["a", "b", "c", "d"],
        sources=[],
    )
    params = classifiers.resolve_params("lightgbm", {"min_data_in_leaf": 2, "pca_components": 3, "max_rounds": 50})
    _, fold_of_row, _ = cross_validate(data, "lightgbm", params, folds=2, seed=0, jobs=1)

    assert len(seen) == 2
    for fold, rows in enumerate(seen, start=1):
        scored = set(np.flatnonzero(fold_of_row == fold))
        assert rows.isdisjoint(scored)
        assert rows | scored == set(range(len(labels)))


@pytest.mark.parametrize(
    "labels, fraction",
    [
        (np.arange(40) % 4, 0.1),
        (np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]), 0.25),
        (np.array([0, 0, 0, 0, 1, 2, 2, 2]), 0.25),
    ],
)
def test_split_validation_partitions_rows(labels, fraction):
    fit_rows, valid_rows = classifiers._split_validation(labels, fraction, seed=0)
    assert set(fit_rows).isdisjoint(valid_rows)
    assert sorted([*fit_rows, *valid_rows]) == list(range(len(labels)))
    assert len(valid_rows) >= 1


def test_final_rounds_is_mean_of_folds():
    infos = [{"rounds": 100}, {"rounds": 121}, {"rounds": 130}]
    assert classifiers.final_rounds("lightgbm", infos) == 117
    assert classifiers.final_rounds("logreg", [{"iterations": 9}]) is None


def test_synthetic_dataset_trains(tmp_path):
    from pipeline.synthetic_features import write_dataset
    from pipeline.train import TrainConfig, train

    root = write_dataset(tmp_path / "synthetic", n_images=150, n_features=32, n_classes=3, separation=1.0)
    result = train(
        TrainConfig(data=root, features=root / "features", backbones=["synthetic"], models=tmp_path / "models", folds=3)
    )
    assert result.summary["accuracy_mean"] > 0.8
