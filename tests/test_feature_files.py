import h5py
import numpy as np
import pytest

from pipeline import feature_files
from pipeline.errors import PipelineError


def write_example(path, n=5, d=3, attrs=None, skipped=("bad",)):
    ids = [f"id{i}" for i in range(n)]
    rows = np.arange(n * d, dtype=np.float32).reshape(n, d)
    blocks = [rows[:2], rows[2:]]
    feature_files.write_feature_file(path, ids, blocks, d, attrs or {"backbone": "mobilenet"}, skipped_ids=skipped)
    return ids, rows


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "train.h5"
    ids, rows = write_example(path)

    loaded = feature_files.read_feature_file(path)

    assert list(loaded.ids) == ids
    np.testing.assert_array_equal(loaded.features, rows)
    assert loaded.features.dtype == np.float32
    assert loaded.skipped_ids == ["bad"]
    assert loaded.attrs["complete"] is True
    assert loaded.attrs["format"] == feature_files.FORMAT
    assert loaded.attrs["backbone"] == "mobilenet"


def test_written_datasets_follow_contract(tmp_path):
    path = tmp_path / "train.h5"
    write_example(path)

    with h5py.File(path, "r") as handle:
        assert handle["ids"].dtype == h5py.string_dtype(encoding="utf-8")
        assert handle["ids"].shape == (5,)
        assert handle["features"].dtype == np.float32
        assert handle["features"].shape == (5, 3)
        assert handle["features"].chunks is not None


def test_write_leaves_no_temporary_file(tmp_path):
    write_example(tmp_path / "train.h5")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.h5"]


def test_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "train.h5"
    write_example(path)

    with pytest.raises(ValueError, match="this is a bug"):
        feature_files.write_feature_file(path, ["a", "b"], [np.zeros((1, 3), np.float32)], 3, {})

    assert len(feature_files.read_feature_file(path).ids) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.h5"]


def test_read_foreign_file_without_attributes(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["ids"] = np.array([b"a", b"b"])
        handle["features"] = np.ones((2, 4), dtype=np.float64)

    loaded = feature_files.read_feature_file(path)

    assert list(loaded.ids) == ["a", "b"]
    assert loaded.features.dtype == np.float32
    assert loaded.attrs == {}


def test_read_missing_file(tmp_path):
    path = tmp_path / "train.h5"

    with pytest.raises(PipelineError) as error:
        feature_files.read_feature_file(path)

    assert str(error.value) == (
        f"Feature file not found: {path}. Run 'make features' (or 'python -m pipeline features') "
        f"to create it, or check the FEATURES and BACKBONE settings."
    )


def test_read_not_hdf5(tmp_path):
    path = tmp_path / "train.h5"
    path.write_text("id,breed\n")

    with pytest.raises(PipelineError) as error:
        feature_files.read_feature_file(path)

    assert str(error.value) == (
        f"{path} is not an HDF5 file, so it is not a feature file. Recreate it with 'make features FORCE=1'."
    )


def test_read_not_a_feature_file(tmp_path):
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as handle:
        handle["embeddings"] = np.ones((2, 4))

    with pytest.raises(PipelineError) as error:
        feature_files.read_feature_file(path)

    assert str(error.value) == (
        f"{path} is not a feature file: it has no dataset 'ids' or 'features'. A feature file needs "
        f"'ids' (n_images,) and 'features' (n_images, n_features)."
    )


def test_read_incomplete_file(tmp_path):
    path = tmp_path / "train.h5"
    write_example(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["complete"] = False

    with pytest.raises(PipelineError) as error:
        feature_files.read_feature_file(path)

    assert str(error.value) == (
        f"{path} is incomplete: a features run is still writing it or was interrupted. "
        f"Run 'make features' again to finish it."
    )


def test_read_mismatched_rows(tmp_path):
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as handle:
        handle["ids"] = np.array([b"a", b"b", b"c"])
        handle["features"] = np.ones((2, 4), dtype=np.float32)

    with pytest.raises(PipelineError, match=r"'ids' has 3 rows but 'features' has 2; the file is damaged\."):
        feature_files.read_feature_file(path)
