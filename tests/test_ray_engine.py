"""The Ray engine against the local engine, on a local Ray instance with 2 CPUs."""

import logging
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

# Ray reads these when it is imported: no usage statistics are sent, and the
# local instance binds its servers to 127.0.0.1 only.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray", reason="Ray is not installed; 'pip install -r requirements-ray.txt' runs these tests")
pytest.importorskip("ray.data", reason="Ray Data is not installed; 'pip install -r requirements-ray.txt' runs these tests")

from conftest import SimulatedCrash, crash_after, make_layout, write_picture  # noqa: E402
from pipeline import backbones, cli, feature_files, features, journal, ray_engine  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

BATCH = 4
N_TRAIN = 18  # plus two bad images and a truncated one: 21 images, six batches


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """Start one Ray instance for the module: 2 CPUs, no dashboard, loopback only."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_layout(tmp_path_factory.mktemp("ray") / "data", n_train=N_TRAIN, n_test=5)
    (root / "train" / "bad_empty.jpg").write_bytes(b"")
    (root / "train" / "bad_garbage.jpg").write_bytes(b"\x00garbage, not an image")
    good = (root / "train" / "tr000.jpg").read_bytes()
    (root / "train" / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])
    return root


class WarningRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def features_args(data, features_dir, engine, *extra):
    argv = [
        "features",
        "--data", str(data),
        "--features", str(features_dir),
        "--backbone", "mobilenet",
        "--weights", "random",
        "--image-size", "32",
        "--batch-size", str(BATCH),
        "--engine", engine,
        *extra,
    ]
    return cli.build_parser().parse_args(argv)


def run_stage(data, features_dir, engine, *extra, progress=None):
    """Run the features stage; return the summaries and the warnings logged."""
    recorder = WarningRecorder()
    logger = logging.getLogger("pipeline")
    logger.addHandler(recorder)
    try:
        args = features_args(data, features_dir, engine, *extra)
        summaries = [features.compute_features(request, progress=progress) for request in features.plan_requests(args)]
    finally:
        logger.removeHandler(recorder)
    return summaries, recorder.messages


def load(features_dir, split="train"):
    return feature_files.read_feature_file(Path(features_dir) / "mobilenet" / f"{split}.h5")


def assert_same_features(actual, expected):
    assert list(actual.ids) == list(expected.ids)
    scale = float(np.abs(expected.features).max())
    assert scale > 0
    np.testing.assert_allclose(actual.features, expected.features, rtol=1e-5, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def local_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    summaries, warnings = run_stage(data, out, "local")
    return out, summaries, warnings


@pytest.fixture(scope="module")
def ray_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray_out")
    summaries, warnings = run_stage(data, out, "ray")
    return out, summaries, warnings


# --- same features and files as the local engine -------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_ray_features_equal_local(local_run, ray_run, split):
    assert_same_features(load(ray_run[0], split), load(local_run[0], split))


@pytest.mark.parametrize("split", ["train", "test"])
def test_ray_attributes_equal_local_but_engine(local_run, ray_run, split):
    ray_attrs = load(ray_run[0], split).attrs
    local_attrs = load(local_run[0], split).attrs

    assert ray_attrs["engine"] == "ray"
    assert {key: value for key, value in ray_attrs.items() if key != "engine"} == {
        key: value for key, value in local_attrs.items() if key != "engine"
    }


def test_ray_summaries_equal_local(local_run, ray_run):
    ray_summaries, local_summaries = ray_run[1], local_run[1]

    assert [s.output.name for s in ray_summaries] == ["train.h5", "test.h5"]
    assert [(s.images, s.computed, s.skipped) for s in ray_summaries] == [(21, 21, 2), (5, 5, 0)]
    assert [(s.images, s.computed, s.skipped) for s in ray_summaries] == [
        (s.images, s.computed, s.skipped) for s in local_summaries
    ]


def test_ray_leaves_only_outputs(ray_run):
    visible = sorted(p.name for p in (ray_run[0] / "mobilenet").iterdir() if not p.name.endswith(".lock"))

    assert visible == ["test.h5", "train.h5", "train.skipped.txt"]


# --- bad images -------------------------------------------------------------------


def test_bad_images_skipped_and_named(ray_run, data):
    loaded = load(ray_run[0])
    lines = (ray_run[0] / "mobilenet/train.skipped.txt").read_text().splitlines()

    assert loaded.skipped_ids == ["bad_empty", "bad_garbage"]
    assert "cut" in loaded.ids
    assert lines[0] == "bad_empty\tempty file"
    assert lines[1] == "bad_garbage\tcannot decode (not an image format that Pillow reads)"
    assert f"bad_empty ({data / 'train/bad_empty.jpg'}): skipped: empty file" in ray_run[2]
    assert f"cut ({data / 'train/cut.jpg'}): truncated file, decoded partially" in ray_run[2]


def test_bad_images_recorded_as_local(local_run, ray_run):
    ray_list = (ray_run[0] / "mobilenet/train.skipped.txt").read_text()
    local_list = (local_run[0] / "mobilenet/train.skipped.txt").read_text()

    assert ray_list == local_list


def test_warnings_equal_local(local_run, ray_run):
    ray_warnings = [message.replace(str(ray_run[0]), "OUT") for message in ray_run[2]]
    local_warnings = [message.replace(str(local_run[0]), "OUT") for message in local_run[2]]

    assert len(ray_warnings) == 4
    assert ray_warnings == local_warnings


# --- URIs -------------------------------------------------------------------------


def test_file_uri_equals_local(data, local_run, tmp_path):
    summaries, _ = run_stage(data.as_uri(), tmp_path / "out", "ray", "--splits", "train", "--ray-actors", "1")

    loaded = load(tmp_path / "out")
    assert summaries[0].computed == 21
    assert_same_features(loaded, load(local_run[0]))
    assert loaded.skipped_ids == ["bad_empty", "bad_garbage"]


def test_file_uri_listing_matches_local(data):
    refs = ray_engine.list_uri_images((data / "train").as_uri())

    assert [ref.id for ref in refs] == sorted(path.stem for path in (data / "train").iterdir())
    assert refs[0].location == (data / "train" / "bad_empty.jpg").as_uri()


def test_uri_with_space_is_read(tmp_path):
    folder = tmp_path / "with space"
    folder.mkdir()
    write_picture(folder / "a b.jpg", seed=1)

    [ref] = ray_engine.list_uri_images(folder.as_uri())
    pixels, note = ray_engine.decode_ref(ref, 32)

    assert ref.id == "a b"
    assert pixels.shape == (32, 32, 3)
    assert note is None


def test_missing_uri_file_is_skipped_with_reason(tmp_path):
    ref = ray_engine.images.ImageRef("gone", (tmp_path / "gone.jpg").as_uri())

    with pytest.raises(ray_engine.images.DecodeError, match=r"^cannot read \("):
        ray_engine.decode_ref(ref, 32)


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("nope", "Data folder not found: {uri}/nope. Point DATA (--data) at a folder in the Kaggle layout, with train/ and test/ inside."),
        ("data_without_valid", "Split folder not found: {uri}/data_without_valid/valid. Check DATA (--data) and SPLITS (--splits)."),
    ],
)
def test_missing_uri_folders_fail_clearly(tmp_path, folder, message):
    make_layout(tmp_path / "data_without_valid", n_train=1, n_test=1)

    with pytest.raises(PipelineError) as error:
        features.plan_requests(features_args(f"{tmp_path.as_uri()}/{folder}", tmp_path / "out", "ray", "--splits", "valid"))

    assert str(error.value) == message.format(uri=tmp_path.as_uri())


def test_duplicate_ids_in_uri_folder_fail(tmp_path):
    write_picture(tmp_path / "dog.jpg", seed=1)
    write_picture(tmp_path / "dog.png", seed=2, fmt="PNG")

    with pytest.raises(PipelineError, match=r"^Two files in file://.* have the id 'dog': dog\.(jpg|png) and dog\.(jpg|png)\. Keep one of them\.$"):
        ray_engine.list_uri_images(tmp_path.as_uri())


# --- resuming ---------------------------------------------------------------------


def test_ray_resumes_partial_local_run(data, local_run, tmp_path, monkeypatch):
    crash_after(monkeypatch, 2)
    with pytest.raises(SimulatedCrash):
        run_stage(data, tmp_path / "out", "local", "--splits", "train")
    monkeypatch.undo()

    [summary], _ = run_stage(data, tmp_path / "out", "ray", "--splits", "train", "--ray-actors", "1")

    assert summary.computed == 21 - 2 * BATCH
    assert_same_features(load(tmp_path / "out"), load(local_run[0]))
    assert not journal.partial_dir(tmp_path / "out/mobilenet/train.h5").exists()


def test_ray_resumes_after_failure(data, local_run, tmp_path):
    def fail_after_three_batches(done, total):
        if done >= 3 * BATCH:
            raise SimulatedCrash()

    with pytest.raises(SimulatedCrash):
        run_stage(data, tmp_path / "out", "ray", "--splits", "train", "--ray-actors", "1", progress=fail_after_three_batches)
    output = tmp_path / "out/mobilenet/train.h5"
    assert not output.exists()
    assert (journal.partial_dir(output) / "status.bin").stat().st_size == 3 * BATCH

    [summary], _ = run_stage(data, tmp_path / "out", "ray", "--splits", "train", "--ray-actors", "1")

    assert summary.computed == 21 - 3 * BATCH
    assert_same_features(load(tmp_path / "out"), load(local_run[0]))
    assert load(tmp_path / "out").skipped_ids == ["bad_empty", "bad_garbage"]


# --- weights ----------------------------------------------------------------------


def test_offline_message_equals_local(data, tmp_path, isolated_keras_home, monkeypatch):
    import keras

    def fail_download(*args, **kwargs):
        raise Exception("URL fetch failure on https://example: None -- [Errno 101] Network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", fail_download)
    messages = {}
    for engine in ("local", "ray"):
        with pytest.raises(PipelineError) as error:
            features.plan_requests(features_args(data, tmp_path / "out", engine, "--weights", "imagenet"))
        messages[engine] = str(error.value)

    assert messages["ray"] == messages["local"]
    assert messages["ray"].startswith("Could not download the ImageNet weights of mobilenet (URL fetch failure")
    assert not (tmp_path / "out").exists()


def test_unloadable_weights_fail_as_local(data, tmp_path):
    bogus = tmp_path / "bogus.h5"
    with h5py.File(bogus, "w") as handle:
        handle["layer"] = np.ones(3)
    messages = {}
    for engine in ("local", "ray"):
        with pytest.raises(PipelineError) as error:
            run_stage(data, tmp_path / engine, engine, "--splits", "test", "--weights", str(bogus), "--ray-actors", "1")
        messages[engine] = str(error.value)

    assert messages["ray"] == messages["local"]
    assert messages["ray"].startswith(f"Could not load weights {bogus} into mobilenet: ")
    assert not (tmp_path / "ray/mobilenet/test.h5").exists()


def test_weights_file_shipped_to_workers(tmp_path):
    weights_file = tmp_path / "mine.weights.h5"
    weights_file.write_bytes(bytes(range(256)) * 10)
    sha256 = backbones.sha256_of(weights_file)
    elsewhere = backbones.Weights(name="mine.weights.h5", path=tmp_path / "not_on_this_node.weights.h5", sha256=sha256)
    blob = [ray.put(np.fromfile(weights_file, dtype=np.uint8))]

    with ray_engine._local_weights(elsewhere, blob) as local:
        copied = local.path
        assert copied.name == "mine.weights.h5"
        assert copied.read_bytes() == weights_file.read_bytes()
    assert not copied.exists()


# --- options and cluster ---------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ray-actors", "0"], "--ray-actors must be a positive integer; got 0."),
        (["--ray-cpus-per-worker", "0"], "--ray-cpus-per-worker must be a positive number; got 0.0."),
    ],
)
def test_invalid_ray_options(data, tmp_path, extra, message):
    with pytest.raises(PipelineError) as error:
        features.plan_requests(features_args(data, tmp_path / "out", "ray", *extra))

    assert str(error.value) == message


def test_missing_ray_is_reported(data, tmp_path, monkeypatch):
    # None in sys.modules makes "import ray.data" raise ImportError, as without Ray.
    monkeypatch.setitem(sys.modules, "ray.data", None)

    with pytest.raises(PipelineError) as error:
        features.plan_requests(features_args(data, tmp_path / "out", "ray"))

    assert str(error.value) == ray_engine.RAY_MISSING_MESSAGE


def test_default_actors_use_all_cpus():
    request = features.FeatureRequest(
        name="train", refs=[], output=Path("unused.h5"), backbone=backbones.BACKBONES["mobilenet"],
        weights=backbones.Weights("random", None, ""), image_size=32, precision="float32", tta="none",
        batch_size=BATCH, workers=1, engine="ray",
    )

    plan = ray_engine.plan_resources(request)

    assert (plan.actors, plan.cpus_per_worker, plan.gpus_per_actor) == (2, 1.0, 0)


def listening_addresses(port: int) -> list[str]:
    """Return the local addresses (hex, as in /proc/net) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.read().splitlines()[1:]:
                local, _, state = line.split()[1:4]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


def test_local_ray_listens_on_loopback_only():
    gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}

    addresses = listening_addresses(int(gcs_port))

    assert gcs_host == "127.0.0.1"
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    assert addresses
    assert set(addresses) <= loopback
