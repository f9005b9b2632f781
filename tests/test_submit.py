"""Tests of the submit stage on tiny generated feature files."""

from __future__ import annotations

import os
import re
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_BREEDS, make_feature_dataset, shared_dir, write_features
from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.submit import clip_probabilities, submit, validate_submission, validate_submission_file
from pipeline.train import TrainConfig, train

ATTRS = {"weights": "random", "weights_sha256": "", "input_size": 32, "precision": "float32", "tta": "none"}


def train_tiny(dataset: dict, classifier: str = "logreg", run: str | None = None, backbones=None) -> str:
    params = {"min_data_in_leaf": 2, "pca_components": 4} if classifier == "lightgbm" else {}
    config = TrainConfig(
        data=dataset["data"],
        features=dataset["features"],
        backbones=backbones or dataset["backbones"],
        classifier=classifier,
        models=dataset["models"],
        run=run,
        folds=2,
        params=params,
        jobs=1,
    )
    return train(config).run


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("classifier", ["logreg", "lightgbm"])
def test_submission_matches_sample_column_by_column(feature_dataset, tmp_path, classifier):
    run = train_tiny(feature_dataset, classifier)
    output = tmp_path / "out" / "submission.csv"
    result = submit(feature_dataset["data"], feature_dataset["features"], feature_dataset["models"], run, output)

    sample = pd.read_csv(feature_dataset["data"] / "sample_submission.csv", dtype={"id": str})
    written = pd.read_csv(output, dtype={"id": str})
    assert result.n_rows == len(sample)
    assert list(written.columns) == list(sample.columns)
    for column in sample.columns:
        if column == "id":
            assert written[column].tolist() == sample[column].tolist()
        else:
            assert written[column].between(0.0, 1.0).all(), column
            assert written[column].notna().all(), column
    np.testing.assert_allclose(written[sample.columns[1:]].sum(axis=1), 1.0, atol=1e-6)

    # Separable classes: every test image gets its own breed as the top choice.
    test_breeds = {image_id: TINY_BREEDS[int(image_id[2:]) % 4] for image_id in feature_dataset["test_ids"]}
    top = written.set_index("id")[sample.columns[1:]].idxmax(axis=1)
    assert top.to_dict() == test_breeds
    validate_submission_file(output, feature_dataset["data"])


def test_submit_without_sample_sorts_ids_and_breeds(feature_dataset, tmp_path):
    run = train_tiny(feature_dataset)
    (feature_dataset["data"] / "sample_submission.csv").unlink()
    output = tmp_path / "submission.csv"
    submit(feature_dataset["data"], feature_dataset["features"], feature_dataset["models"], run, output)

    written = pd.read_csv(output, dtype={"id": str})
    assert list(written.columns) == ["id", *sorted(TINY_BREEDS)]
    assert written["id"].tolist() == sorted(feature_dataset["test_ids"])


def test_skipped_test_images_get_class_frequencies(tmp_path, caplog):
    dataset = make_feature_dataset(tmp_path, widths={"alpha": 4}, attrs=ATTRS)
    run = train_tiny(dataset)
    test_ids = dataset["test_ids"]
    matrix = dataset["matrices"]["alpha"][40:]
    write_features(
        dataset["features"] / "alpha" / "test.h5",
        test_ids[2:],
        matrix[2:],
        {"backbone": "alpha", **ATTRS},
        skipped_ids=test_ids[:2],
    )
    output = tmp_path / "submission.csv"
    result = submit(dataset["data"], dataset["features"], dataset["models"], run, output)

    assert sorted(result.without_features) == ["te000", "te001"]
    assert "2 test images could not be decoded when the features were computed" in caplog.text
    assert "te000" in caplog.text
    assert "te001" in caplog.text
    written = pd.read_csv(output, dtype={"id": str}).set_index("id")
    np.testing.assert_allclose(written.loc["te000"].to_numpy(), 0.25, atol=1e-9)


def test_most_recent_run_is_default(feature_dataset, tmp_path):
    train_tiny(feature_dataset, run="older")
    time.sleep(0.01)
    train_tiny(feature_dataset, run="newer")
    os.utime(feature_dataset["models"] / "older" / "model.joblib", (1, 1))
    result = submit(feature_dataset["data"], feature_dataset["features"], feature_dataset["models"], None, tmp_path / "s.csv")
    assert result.run == "newer"


def test_error_unknown_run(feature_dataset, tmp_path):
    train_tiny(feature_dataset, run="known")
    models = feature_dataset["models"]
    message = (
        f"Run 'other' not found: {models / 'other' / 'model.joblib'} does not exist (trained runs "
        f"in {models}: known). Check RUN (--run) and MODELS (--models), or train it with "
        f"'make train RUN=other'."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(feature_dataset["data"], feature_dataset["features"], models, "other", tmp_path / "s.csv")


def test_error_no_runs(feature_dataset, tmp_path):
    models = tmp_path / "empty"
    message = (
        f"No trained run in {models}. Run 'make train' first, or set MODELS (--models) to the "
        f"folder that holds the runs."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(feature_dataset["data"], feature_dataset["features"], models, None, tmp_path / "s.csv")


@pytest.mark.parametrize(
    "key, test_value, expected",
    [
        ("weights", "other.h5", "alpha weights: model 'random', features 'other.h5'"),
        ("weights_sha256", "abc", "alpha weights_sha256: model '', features 'abc'"),
        ("input_size", 64, "alpha input_size: model 32, features 64"),
        ("tta", "flip", "alpha tta: model 'none', features 'flip'"),
    ],
)
def test_error_test_features_provenance_mismatch(tmp_path, key, test_value, expected):
    dataset = make_feature_dataset(tmp_path, widths={"alpha": 4}, attrs=ATTRS)
    run = train_tiny(dataset)
    path = dataset["features"] / "alpha" / "test.h5"
    with h5py.File(path, "a") as handle:
        handle.attrs[key] = test_value
    message = (
        f"The test features do not match what run 'alpha-logreg' was trained on: {expected}. "
        f"Compute the test features with the same settings as the training features ('make "
        f"features' with the same BACKBONE, WEIGHTS, PRECISION and TTA), or train again on "
        f"matching features."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(dataset["data"], dataset["features"], dataset["models"], run, tmp_path / "s.csv")


def test_error_test_features_width_mismatch(feature_dataset, tmp_path):
    run = train_tiny(feature_dataset)
    write_features(feature_dataset["features"] / "beta" / "test.h5", feature_dataset["test_ids"], np.zeros((8, 5)))
    message = "The test features do not match what run 'alpha+beta-logreg' was trained on: beta width: model 3, features 5."
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(feature_dataset["data"], feature_dataset["features"], feature_dataset["models"], run, tmp_path / "s.csv")


def test_error_sample_breeds_differ_from_model(feature_dataset, tmp_path):
    run = train_tiny(feature_dataset)
    path = feature_dataset["data"] / "sample_submission.csv"
    sample = pd.read_csv(path, dtype={"id": str}).rename(columns={"pug": "poodle"})
    sample.to_csv(path, index=False)
    message = (
        f"{path} does not match the model's breeds (1 breeds of the model are not columns of it: "
        f"pug; 1 columns are breeds the model never saw: poodle). Train on the labels.csv that "
        f"belongs to this sample_submission.csv."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(feature_dataset["data"], feature_dataset["features"], feature_dataset["models"], run, tmp_path / "s.csv")


def test_error_sample_without_rows(feature_dataset, tmp_path):
    run = train_tiny(feature_dataset)
    path = feature_dataset["data"] / "sample_submission.csv"
    pd.read_csv(path, dtype={"id": str}).head(0).to_csv(path, index=False)
    message = (
        f"{path} has no rows, so the submission would be empty. Use the sample_submission.csv of "
        f"the competition, or delete it to write the test ids sorted with the breeds in alphabetical order."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(feature_dataset["data"], feature_dataset["features"], feature_dataset["models"], run, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_error_sample_id_without_features(feature_dataset, tmp_path):
    run = train_tiny(feature_dataset)
    path = feature_dataset["data"] / "sample_submission.csv"
    sample = pd.read_csv(path, dtype={"id": str})
    sample.loc[len(sample)] = ["te999", 0.25, 0.25, 0.25, 0.25]
    sample.to_csv(path, index=False)
    features = feature_dataset["features"]
    message = (
        f"1 test ids have no features in {features / 'alpha' / 'test.h5'} and "
        f"{features / 'beta' / 'test.h5'}: te999. Compute the features of DATA/test again with "
        f"'make features FORCE=1', or check that DATA and FEATURES belong together."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        submit(feature_dataset["data"], features, feature_dataset["models"], run, tmp_path / "s.csv")


def test_clip_probabilities_bounds_and_sums():
    probabilities = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    clipped = clip_probabilities(probabilities, 1e-3)
    assert clipped.min() > 0.0
    assert clipped.max() < 1.0
    np.testing.assert_allclose(clipped.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(clipped[1], probabilities[1])


def _valid_frame():
    frame = pd.DataFrame({"id": ["a", "b"], "x": [0.4, 1.0], "y": [0.6, 0.0]})
    return frame, ["a", "b"], ["id", "x", "y"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f.assign(x=[np.nan, 1.0]), "Submission has NaN probabilities in 1 rows: ids a."),
        (lambda f: f.assign(x=[0.4, 1.5], y=[0.6, -0.5]), "Submission has probabilities outside [0, 1] in 1 rows: ids b."),
        (lambda f: f.assign(y=[0.5, 0.0]), "Submission rows do not sum to 1 within 1e-06 in 1 rows: ids a."),
        (lambda f: f.assign(id=["a", "a"]), "Submission repeats 1 ids: a."),
        (lambda f: f.iloc[::-1], "Submission rows are not in the order of the expected ids."),
        (lambda f: f[["id", "y", "x"]], "Submission columns differ from the expected ones"),
    ],
)
def test_validate_submission_errors(edit, message):
    frame, ids, columns = _valid_frame()
    validate_submission(frame, ids, columns)
    with pytest.raises(PipelineError, match=re.escape(message)):
        validate_submission(edit(frame), ids, columns)


def test_cli_submit(feature_dataset, tmp_path, capsys):
    train_tiny(feature_dataset)
    output = tmp_path / "cli.csv"
    code = cli.main(
        [
            "submit",
            "--data", str(feature_dataset["data"]),
            "--features", str(feature_dataset["features"]),
            "--models", str(feature_dataset["models"]),
            "--output", str(output),
        ]
    )  # fmt: skip
    assert code == 0
    assert f"wrote {output}: 8 rows from run alpha+beta-logreg" in capsys.readouterr().out
    assert output.is_file()


def test_real_embeddings_submission(tmp_path):
    shared = shared_dir()
    features = shared / "features"
    data = shared / "data" / "dogs-dev"
    if not (features / "efficientnet_lite0" / "test.h5").is_file():
        pytest.skip(f"{features / 'efficientnet_lite0' / 'test.h5'} not found")
    config = TrainConfig(
        data=data, features=features, backbones=["efficientnet_lite0"], models=tmp_path / "models", folds=2
    )
    run = train(config).run
    output = tmp_path / "submission.csv"
    submit(data, features, tmp_path / "models", run, output)
    frame = validate_submission_file(output, data)
    assert frame.shape == (600, 121)
