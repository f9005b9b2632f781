import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import SimulatedCrash, crash_after, make_layout, shared_dir, write_picture
from pipeline import backbones, cli, feature_files, features, images, journal
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
MODELS = features.ModelCache()


def features_args(data, features_dir, *extra):
    argv = [
        "features",
        "--data", str(data),
        "--features", str(features_dir),
        "--backbone", "mobilenet",
        "--weights", "random",
        "--image-size", "32",
        "--batch-size", "4",
        *extra,
    ]
    return cli.build_parser().parse_args(argv)


def run_stage(data, features_dir, *extra):
    args = features_args(data, features_dir, *extra)
    return [features.compute_features(request, models=MODELS) for request in features.plan_requests(args)]


def assert_features_close(actual, expected):
    """Compare features relative to their scale: random-weight features are tiny (about 1e-18)."""
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def load(features_dir, split="train"):
    return feature_files.read_feature_file(Path(features_dir) / "mobilenet" / f"{split}.h5")


def test_stage_writes_both_splits(kaggle_layout, tmp_path):
    summaries = run_stage(kaggle_layout, tmp_path / "out")

    assert [s.output for s in summaries] == [tmp_path / "out/mobilenet/train.h5", tmp_path / "out/mobilenet/test.h5"]
    assert [s.images for s in summaries] == [12, 5]
    assert [s.computed for s in summaries] == [12, 5]
    assert load(tmp_path / "out", "test").features.shape == (5, 256)


def test_stage_records_provenance(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "out")

    loaded = load(tmp_path / "out")

    assert list(loaded.ids) == [f"tr{i:03d}" for i in range(12)]
    assert loaded.features.shape == (12, 256)
    attrs = loaded.attrs
    assert attrs["backbone"] == "mobilenet"
    assert attrs["input_size"] == 32
    assert attrs["preprocessing"] == "scale [0, 255] to [-1, 1]"
    assert attrs["weights"] == "random"
    assert attrs["weights_sha256"] == ""
    assert attrs["precision"] == "float32"
    assert attrs["tta"] == "none"
    assert attrs["engine"] == "local"
    assert attrs["image_count"] == 12
    assert attrs["skipped_count"] == 0
    assert attrs["image_list_sha256"] == images.image_list_digest(list(loaded.ids))
    assert attrs["keras_version"]
    assert attrs["tensorflow_version"]
    assert attrs["complete"] is True


def test_stage_leaves_only_outputs(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "out")

    visible = sorted(p.name for p in (tmp_path / "out/mobilenet").iterdir() if not p.name.endswith(".lock"))

    assert visible == ["test.h5", "train.h5"]


def test_batch_size_does_not_change_features(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "b4", "--batch-size", "4")
    run_stage(kaggle_layout, tmp_path / "b5", "--batch-size", "5")

    assert_features_close(load(tmp_path / "b4").features, load(tmp_path / "b5").features)


def test_position_does_not_change_features(kaggle_layout, tmp_path):
    subset = make_layout(tmp_path / "subset", n_train=12)
    for index in (0, 1, 2):
        (subset / "train" / f"tr{index:03d}.jpg").unlink()
    run_stage(kaggle_layout, tmp_path / "full")
    run_stage(subset, tmp_path / "part")

    full, part = load(tmp_path / "full"), load(tmp_path / "part")

    assert list(part.ids) == list(full.ids[3:])
    assert_features_close(part.features, full.features[3:])


def test_flip_tta_differs_and_is_recorded(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "plain")
    run_stage(kaggle_layout, tmp_path / "flip", "--tta", "flip")

    plain, flipped = load(tmp_path / "plain"), load(tmp_path / "flip")

    assert flipped.attrs["tta"] == "flip"
    scale = float(np.abs(plain.features).max())
    assert not np.allclose(plain.features, flipped.features, rtol=1e-2, atol=1e-2 * scale)


def test_bfloat16_is_recorded_and_close(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "f32", "--splits", "test")
    run_stage(kaggle_layout, tmp_path / "bf16", "--splits", "test", "--precision", "bfloat16")

    f32, bf16 = load(tmp_path / "f32", "test"), load(tmp_path / "bf16", "test")

    assert bf16.attrs["precision"] == "bfloat16"
    assert bf16.features.dtype == np.float32
    cosine = np.sum(f32.features * bf16.features, axis=1) / (
        np.linalg.norm(f32.features, axis=1) * np.linalg.norm(bf16.features, axis=1)
    )
    assert cosine.min() > 0.9


@pytest.mark.parametrize("batches_before_crash", [0, 1, 2])
def test_resume_after_crash_is_identical(kaggle_layout, tmp_path, monkeypatch, batches_before_crash):
    run_stage(kaggle_layout, tmp_path / "clean", "--splits", "train")
    crash_after(monkeypatch, batches_before_crash)
    with pytest.raises(SimulatedCrash):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")
    monkeypatch.undo()

    assert not (tmp_path / "out/mobilenet/train.h5").exists()
    [summary] = run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")

    assert summary.computed == 12 - 4 * batches_before_crash
    np.testing.assert_array_equal(load(tmp_path / "out").features, load(tmp_path / "clean").features)
    assert not journal.partial_dir(tmp_path / "out/mobilenet/train.h5").exists()


def test_resume_cuts_torn_write(kaggle_layout, tmp_path, monkeypatch):
    run_stage(kaggle_layout, tmp_path / "clean", "--splits", "train")
    crash_after(monkeypatch, 2)
    with pytest.raises(SimulatedCrash):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")
    monkeypatch.undo()
    partial = journal.partial_dir(tmp_path / "out/mobilenet/train.h5")
    with open(partial / "status.bin", "ab") as handle:
        handle.write(b"\x00\x00\x00")
    with open(partial / "features.bin", "ab") as handle:
        handle.write(b"\x01" * 1500)

    [summary] = run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")

    assert summary.computed == 4
    np.testing.assert_array_equal(load(tmp_path / "out").features, load(tmp_path / "clean").features)


def test_resume_after_crash_while_writing_hdf5(kaggle_layout, tmp_path, monkeypatch):
    run_stage(kaggle_layout, tmp_path / "clean", "--splits", "train")

    def crash(*args, **kwargs):
        raise SimulatedCrash()

    monkeypatch.setattr(feature_files, "write_feature_file", crash)
    with pytest.raises(SimulatedCrash):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")
    monkeypatch.undo()

    [summary] = run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")

    assert summary.computed == 0
    np.testing.assert_array_equal(load(tmp_path / "out").features, load(tmp_path / "clean").features)


def test_resume_after_kill_9(tmp_path):
    data = make_layout(tmp_path / "data", n_train=160, n_test=1)
    run_stage(data, tmp_path / "clean", "--splits", "train")
    argv = [
        sys.executable, "-m", "pipeline", "features", "--data", str(data), "--features", str(tmp_path / "out"),
        "--backbone", "mobilenet", "--weights", "random", "--image-size", "32", "--batch-size", "4",
        "--splits", "train", "--workers", "1",
    ]
    journal_file = journal.partial_dir(tmp_path / "out/mobilenet/train.h5") / "features.bin"
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal_file.exists() and journal_file.stat().st_size > 0:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()

    [summary] = run_stage(data, tmp_path / "out", "--splits", "train")

    assert 0 < summary.computed < 160
    np.testing.assert_array_equal(load(tmp_path / "out").features, load(tmp_path / "clean").features)


def test_complete_file_is_reused(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "out")
    output = tmp_path / "out/mobilenet/train.h5"
    before = output.stat().st_mtime_ns

    summaries = run_stage(kaggle_layout, tmp_path / "out")

    assert [s.reused for s in summaries] == [True, True]
    assert output.stat().st_mtime_ns == before
    assert summaries[0].describe() == f"{output}: up to date (12 images, 0 skipped); nothing to compute"


def test_changed_image_set_needs_force(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "out")
    write_picture(kaggle_layout / "train" / "zz_new.jpg", seed=99)
    output = tmp_path / "out/mobilenet/train.h5"

    with pytest.raises(PipelineError) as error:
        run_stage(kaggle_layout, tmp_path / "out")

    assert str(error.value) == (
        f"{output} already exists but was computed for image_count=12, not 13. Pass --force "
        f"(make: FORCE=1) to recompute it; the old file is replaced only when the new one is complete."
    )
    [train, _] = run_stage(kaggle_layout, tmp_path / "out", "--force")
    assert train.computed == 13
    assert "zz_new" in load(tmp_path / "out").ids


def test_renamed_image_needs_force(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "out")
    (kaggle_layout / "train" / "tr000.jpg").rename(kaggle_layout / "train" / "tr999.jpg")

    with pytest.raises(PipelineError, match=r"was computed for image_list_sha256='[0-9a-f]{64}', not '[0-9a-f]{64}'\. Pass --force"):
        run_stage(kaggle_layout, tmp_path / "out")


def test_changed_weights_need_force(kaggle_layout, tmp_path):
    run_stage(kaggle_layout, tmp_path / "out", "--splits", "test")
    weights_file = save_mobilenet_weights(tmp_path / "other.weights.h5", seed=7)

    with pytest.raises(PipelineError, match=r"was computed for weights='random', not 'other\.weights\.h5'; weights_sha256=''"):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "test", "--weights", str(weights_file))


def test_partial_run_of_other_features_needs_force(kaggle_layout, tmp_path, monkeypatch):
    crash_after(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")
    monkeypatch.undo()
    output = tmp_path / "out/mobilenet/train.h5"

    with pytest.raises(PipelineError) as error:
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train", "--tta", "flip")

    assert str(error.value) == (
        f"An interrupted run for {output} was computing other features (tta='none', not 'flip'). "
        f"Pass --force (make: FORCE=1) to discard it and start over."
    )
    [summary] = run_stage(kaggle_layout, tmp_path / "out", "--splits", "train", "--tta", "flip", "--force")
    assert summary.computed == 12


def test_non_hdf5_output_needs_force(kaggle_layout, tmp_path):
    output = tmp_path / "out/mobilenet/train.h5"
    output.parent.mkdir(parents=True)
    output.write_text("not ours")

    with pytest.raises(PipelineError) as error:
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")

    assert str(error.value) == (
        f"{output} already exists but is not an HDF5 file. Pass --force (make: FORCE=1) to replace it "
        f"with computed features."
    )


def test_foreign_hdf5_output_needs_force(kaggle_layout, tmp_path):
    output = tmp_path / "out/mobilenet/train.h5"
    output.parent.mkdir(parents=True)
    with h5py.File(output, "w") as handle:
        handle["ids"] = np.array([b"a"])
        handle["features"] = np.ones((1, 256), dtype=np.float32)

    with pytest.raises(PipelineError, match=r"already exists but was computed for backbone=None, not 'mobilenet'"):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")


def test_failed_run_without_rows_does_not_block(kaggle_layout, tmp_path):
    bogus = tmp_path / "bogus.h5"
    with h5py.File(bogus, "w") as handle:
        handle["layer"] = np.ones(3)
    with pytest.raises(PipelineError, match="Could not load weights"):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train", "--weights", str(bogus))

    [summary] = run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")

    assert summary.computed == 12
    assert load(tmp_path / "out").attrs["weights"] == "random"


def test_second_writer_fails(kaggle_layout, tmp_path):
    output = tmp_path / "out/mobilenet/train.h5"
    [request, _] = features.plan_requests(features_args(kaggle_layout, tmp_path / "out"))

    with journal.OutputLock(output):
        with pytest.raises(PipelineError) as error:
            features.compute_features(request, models=MODELS)

    assert str(error.value) == (
        f"Another run (process {os.getpid()}) is writing {output}. Wait for it to finish or stop it; "
        f"two runs cannot write the same file."
    )
    assert not output.exists()


def test_bad_images_are_skipped_and_recorded(kaggle_layout, tmp_path, caplog):
    train = kaggle_layout / "train"
    (train / "empty.jpg").write_bytes(b"")
    (train / "garbage.jpg").write_bytes(b"GIF89a not really")
    write_picture(train / "png_named_jpg.jpg", seed=5, fmt="PNG")
    write_picture(train / "bmp_named_jpg.jpg", seed=6, fmt="BMP")
    good = (train / "tr000.jpg").read_bytes()
    (train / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])

    with caplog.at_level(logging.WARNING):
        [summary, _] = run_stage(kaggle_layout, tmp_path / "out")

    loaded = load(tmp_path / "out")
    assert summary.skipped == 2
    assert loaded.skipped_ids == ["empty", "garbage"]
    assert loaded.attrs["skipped_count"] == 2
    assert loaded.attrs["image_count"] == 17
    assert "empty" not in loaded.ids
    assert {"png_named_jpg", "bmp_named_jpg", "cut"} <= set(loaded.ids)
    assert len(loaded.ids) == 15
    skipped_file = tmp_path / "out/mobilenet/train.skipped.txt"
    assert skipped_file.read_text().splitlines()[0] == "empty\tempty file"
    assert skipped_file.read_text().splitlines()[1] == "garbage\tcannot decode (not an image format that Pillow reads)"
    assert f"empty ({train / 'empty.jpg'}): skipped: empty file" in caplog.text
    assert f"cut ({train / 'cut.jpg'}): truncated file, decoded partially" in caplog.text
    assert f"2 of 17 images could not be decoded and were skipped; they are listed in {skipped_file}" in caplog.text
    assert summary.describe().startswith(f"{summary.output}: 17 images, 2 skipped, 17 processed in ")


def test_missing_labelled_image_is_named(kaggle_layout, tmp_path, caplog):
    with open(kaggle_layout / "labels.csv", "a") as handle:
        handle.write("ghost,pug\n")

    with caplog.at_level(logging.WARNING):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "train")

    assert (
        f"1 id(s) of {kaggle_layout / 'labels.csv'} have no image in {kaggle_layout / 'train'}: ghost. "
        f"Training will stop on them; restore the images or remove their rows from labels.csv."
    ) in caplog.text


def test_images_folder_option(kaggle_layout, tmp_path):
    output = tmp_path / "photos.h5"
    args = cli.build_parser().parse_args(
        ["features", "--images", str(kaggle_layout / "test"), "--output", str(output),
         "--backbone", "mobilenet", "--weights", "random", "--image-size", "32"]
    )

    [request] = features.plan_requests(args)
    features.compute_features(request, models=MODELS)

    assert list(feature_files.read_feature_file(output).ids) == [f"te{i:03d}" for i in range(5)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image-size", "16"], "--image-size must be at least 32 for mobilenet; got 16."),
        (["--batch-size", "0"], "--batch-size must be a positive integer; got 0."),
        (["--splits", "valid"], "Split folder not found: {data}/valid. Check DATA (--data) and SPLITS (--splits)."),
        (["--weights", "nowhere.h5"], "Weights file not found: nowhere.h5. Pass 'imagenet', 'random' or the path of an existing .h5 file for mobilenet."),
    ],
)
def test_invalid_arguments(kaggle_layout, tmp_path, extra, message):
    with pytest.raises(PipelineError) as error:
        features.plan_requests(features_args(kaggle_layout, tmp_path / "out", *extra))

    assert str(error.value) == message.format(data=kaggle_layout)
    assert not (tmp_path / "out").exists()


def test_missing_data_folder(tmp_path):
    with pytest.raises(PipelineError) as error:
        features.plan_requests(features_args(tmp_path / "nope", tmp_path / "out"))

    assert str(error.value) == (
        f"Data folder not found: {tmp_path / 'nope'}. Point DATA (--data) at a folder in the Kaggle layout, "
        f"with train/ and test/ inside."
    )


def save_mobilenet_weights(path, seed):
    import keras

    keras.utils.set_random_seed(seed)
    network = keras.applications.MobileNet(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", alpha=0.25
    )
    network.save_weights(str(path))
    return path


def test_local_weights_file_is_loaded(kaggle_layout, tmp_path):
    import keras

    weights_file = save_mobilenet_weights(tmp_path / "mine.weights.h5", seed=3)
    run_stage(kaggle_layout, tmp_path / "out", "--splits", "test", "--weights", str(weights_file))
    loaded = load(tmp_path / "out", "test")

    network = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", alpha=0.25)
    network.load_weights(str(weights_file))
    pixels = np.stack([images.decode_file(ref, 32)[0] for ref in images.list_images(kaggle_layout / "test")])
    expected = network.predict_on_batch(pixels.astype(np.float32) / 127.5 - 1.0)

    assert loaded.attrs["weights"] == "mine.weights.h5"
    assert loaded.attrs["weights_sha256"] == backbones.sha256_of(weights_file)
    assert_features_close(loaded.features, expected)


def test_weights_for_other_model_fail_clearly(kaggle_layout, tmp_path):
    bogus = tmp_path / "bogus.h5"
    with h5py.File(bogus, "w") as handle:
        handle["layer"] = np.ones(3)

    with pytest.raises(PipelineError, match=r"Could not load weights .*bogus\.h5 into mobilenet: .* The file must be Keras weights for MobileNet without its top \(include_top=False\), such as mobilenet_2_5_224_tf_no_top\.h5\."):
        run_stage(kaggle_layout, tmp_path / "out", "--splits", "test", "--weights", str(bogus))
    assert not (tmp_path / "out/mobilenet/test.h5").exists()


def offline_message(keras_home, reason):
    backbone = backbones.BACKBONES["mobilenet"]
    return (
        f"Could not download the ImageNet weights of mobilenet ({reason}). Keras expects the file "
        f"mobilenet_2_5_224_tf_no_top.h5 from {backbone.weights_url}. Download it on a machine with "
        f"internet access and put it in {keras_home / 'models'} (set KERAS_HOME to use another cache "
        f"folder), or pass the file directly with WEIGHTS=path/to/mobilenet_2_5_224_tf_no_top.h5 "
        f"(--weights on the command line). No features were written."
    )


def test_offline_download_message_patched(kaggle_layout, tmp_path, isolated_keras_home, monkeypatch):
    import keras

    def fail_download(*args, **kwargs):
        raise Exception("URL fetch failure on https://example: None -- [Errno 101] Network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", fail_download)

    with pytest.raises(PipelineError) as error:
        run_stage(kaggle_layout, tmp_path / "out", "--weights", "imagenet")

    assert str(error.value) == offline_message(
        isolated_keras_home, "URL fetch failure on https://example: None -- [Errno 101] Network is unreachable"
    )
    assert not (tmp_path / "out").exists()


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_download_message_through_closed_proxy(kaggle_layout, tmp_path):
    keras_home = tmp_path / "keras_home"
    proxy = f"http://127.0.0.1:{closed_loopback_port()}"
    env = {**os.environ, "KERAS_HOME": str(keras_home), "HTTPS_PROXY": proxy, "https_proxy": proxy,
           "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    argv = [sys.executable, "-m", "pipeline", "features", "--data", str(kaggle_layout),
            "--features", str(tmp_path / "out"), "--backbone", "mobilenet", "--weights", "imagenet"]

    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: Could not download the ImageNet weights of mobilenet (")
    assert last_line.endswith(offline_message(keras_home, "X").split("(X)")[1])
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not list((keras_home / "models").glob("*")) if (keras_home / "models").exists() else True


def test_cli_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True)

    assert result.returncode == 0
    assert "features" in result.stdout
    assert "demo" in result.stdout


def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "features", "--data", str(tmp_path / "nope"), "--backbone", "mobilenet",
         "--weights", "random"],
        cwd=REPO, capture_output=True, text=True,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Data folder not found: {tmp_path / 'nope'}. Point DATA (--data) at a folder in the Kaggle "
        f"layout, with train/ and test/ inside."
    )


def test_real_photos_same_breed_closer(tmp_path):
    shared = shared_dir()
    import pandas as pd

    labels = pd.read_csv(shared / "data/dogs-dev/labels.csv")
    chosen = labels.groupby("breed").head(4)
    chosen = chosen[chosen["breed"].isin(sorted(labels["breed"].unique())[:10])]
    folder = tmp_path / "photos"
    folder.mkdir()
    for image_id in chosen["id"]:
        (folder / f"{image_id}.jpg").symlink_to(shared / "data/dogs-dev/train" / f"{image_id}.jpg")
    output = tmp_path / "real.h5"
    args = cli.build_parser().parse_args(
        ["features", "--images", str(folder), "--output", str(output), "--backbone", "mobilenet",
         "--weights", str(shared / "weights/mobilenet_2_5_224_tf_no_top.h5")]
    )
    [request] = features.plan_requests(args)
    features.compute_features(request)

    loaded = feature_files.read_feature_file(output)
    breeds = chosen.set_index("id").loc[list(loaded.ids), "breed"].to_numpy()
    unit = loaded.features / np.linalg.norm(loaded.features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    same = breeds[:, None] == breeds[None, :]
    off_diagonal = ~np.eye(len(breeds), dtype=bool)

    assert len(loaded.ids) == 40
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.05
