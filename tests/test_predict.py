"""Tests of predict on generated photos with a randomly initialised backbone (offline)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import write_features, write_picture
from pipeline import cli, model_bundle
from pipeline.errors import PipelineError
from pipeline.predict import predict_photos
from pipeline.train import TrainConfig, train

BREEDS = ("akita", "boxer", "pug")
IMAGE_SIZE = 32
ATTRS = {
    "backbone": "mobilenet",
    "weights": "random",
    "weights_sha256": "",
    "input_size": IMAGE_SIZE,
    "precision": "float32",
    "tta": "none",
}


def _train_on_photos(root, attrs: dict, backbone: str = "mobilenet", run: str = "photos") -> dict:
    from pipeline.features import embed_paths

    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(12):
        path = photos / f"tr{index:03d}.jpg"
        write_picture(path, seed=index)
        paths.append(path)
    matrix, ok_paths, failures = embed_paths(paths, "mobilenet", "random", image_size=IMAGE_SIZE)
    assert not failures

    data = root / "data"
    data.mkdir(exist_ok=True)
    ids = [path.stem for path in ok_paths]
    lines = ["id,breed"] + [f"{image_id},{BREEDS[index % 3]}" for index, image_id in enumerate(ids)]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    write_features(root / "features" / backbone / "train.h5", ids, matrix, {**attrs, "backbone": backbone})
    config = TrainConfig(
        data=data, features=root / "features", backbones=[backbone], models=root / "models", run=run, folds=2, jobs=1
    )
    train(config)
    return {"models": root / "models", "paths": paths, "matrix": matrix}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_on_photos(tmp_path_factory.mktemp("predict"), ATTRS)


def test_predict_top_breeds_and_failures(trained, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    missing = tmp_path / "missing.jpg"
    good = trained["paths"][:2]

    predictions, failures = predict_photos([good[0], broken, missing, good[1]], models=trained["models"], top=3)

    assert [prediction.path for prediction in predictions] == good
    assert set(failures) == {broken, missing}
    assert failures[missing] == "file not found"
    for prediction in predictions:
        assert len(prediction.breeds) == 3
        assert sorted(prediction.breeds) == sorted(BREEDS)
        assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
        assert sum(prediction.probabilities) == pytest.approx(1.0)


def test_predict_uses_the_training_backbone(trained):
    """The probabilities equal the model's on the features the train stage stored."""
    predictions, _ = predict_photos(trained["paths"][:3], models=trained["models"], top=3)
    bundle = model_bundle.load_bundle(trained["models"] / "photos")
    expected = bundle["model"].predict_proba(trained["matrix"][:3])
    for prediction, row in zip(predictions, expected):
        got = dict(zip(prediction.breeds, prediction.probabilities))
        np.testing.assert_allclose([got[breed] for breed in bundle["classes"]], row, rtol=1e-4, atol=1e-6)


def test_cli_predict_prints_top_breeds(trained, capsys):
    code = cli.main(["predict", str(trained["paths"][0]), "--models", str(trained["models"]), "--top", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == str(trained["paths"][0])
    assert len(lines) == 3
    assert re.fullmatch(r"  \d\.\d{4}  (akita|boxer|pug)", lines[1])


def test_cli_predict_unreadable_photo_exits_1(trained, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code = cli.main(["predict", str(broken), str(trained["paths"][0]), "--models", str(trained["models"])])
    captured = capsys.readouterr()
    assert code == 1
    assert str(trained["paths"][0]) in captured.out
    assert f"{broken}: could not be read:" in captured.err


def test_error_backbone_not_in_table(tmp_path):
    from pipeline import backbones

    root = tmp_path / "foreign"
    features = root / "features" / "efficientnet_lite0"
    ids = [f"tr{index:03d}" for index in range(8)]
    write_features(features / "train.h5", ids, np.random.default_rng(0).normal(size=(8, 4)))
    (root / "data").mkdir()
    (root / "data" / "labels.csv").write_text("id,breed\n" + "".join(f"{i},{BREEDS[n % 2]}\n" for n, i in enumerate(ids)))
    train(TrainConfig(data=root / "data", features=root / "features", backbones=["efficientnet_lite0"], models=root / "models", folds=2))
    message = (
        f"Run 'efficientnet_lite0-logreg' was trained on features of efficientnet_lite0, which "
        f"this pipeline cannot compute, so it cannot embed new photos for it. predict works with "
        f"runs trained on the backbones {', '.join(sorted(backbones.BACKBONES))}; train one with "
        f"'make features train BACKBONE=mobilenet'."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        predict_photos([tmp_path / "x.jpg"], models=root / "models")


def test_error_weights_differ_from_training(tmp_path):
    run_root = tmp_path / "sha"
    _train_on_photos(run_root, {**ATTRS, "weights_sha256": "0123456789abcdef"}, run="sha")
    message = (
        "The mobilenet weights random (sha256 none) differ from the weights run 'sha' was trained "
        "with (sha256 0123456789ab, file 'random'). Pass the right file with --weights."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        predict_photos([run_root / "photos" / "tr000.jpg"], models=run_root / "models")


def test_error_no_photos(trained):
    with pytest.raises(PipelineError, match=re.escape("No photo given; pass one or more image files.")):
        predict_photos([], models=trained["models"])


def test_error_imagenet_weights_not_cached(tmp_path, isolated_keras_home):
    from pipeline import backbones

    weights_file = backbones.BACKBONES["mobilenet"].weights_file
    run_root = tmp_path / "imagenet"
    _train_on_photos(run_root, {**ATTRS, "weights": weights_file, "weights_sha256": "abc"}, run="imagenet")
    message = (
        f"The mobilenet weights {weights_file} are not in the Keras cache "
        f"{isolated_keras_home / 'models'}. Pass the weights file the run was trained with: "
        f"--weights path/to/{weights_file}."
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        predict_photos([run_root / "photos" / "tr000.jpg"], models=run_root / "models")
