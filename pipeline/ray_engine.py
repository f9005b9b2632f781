"""The features stage on Ray Data, for folders too large for one machine.

The dataset is the sorted list of images (id, location). Two
``map_batches`` stages run on the cluster:

1. decoding and resizing, as Ray tasks on CPU workers, with the decoder of
   the local engine (:func:`pipeline.images.decode_image`);
2. the backbone, in a pool of actors that each build the model once with
   :func:`pipeline.backbones.build_model`, with one GPU per actor when the
   cluster has GPUs.

On a cluster without GPUs both stages reserve the same resources, so Ray
Data fuses them and each CPU actor decodes its own batches.

The driver streams the results in id order with ``iter_batches`` and appends
each batch to the journal of the local engine. Memory on the driver stays
flat, and a failed job resumes after the last written batch. The HDF5 file
is written by :func:`pipeline.features.finish_output`.

Locations are local paths or URIs that pyarrow's file systems read
(``file://``, ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``). Every worker
must be able to read them, and the output is written on the driver.

Ray is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from pipeline import backbones, features, images
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

RAY_MISSING_MESSAGE = (
    "The Ray engine needs Ray Data, which is not installed. Install it with "
    "'pip install -r requirements-ray.txt' (make install does this), or use "
    "--engine local (make: ENGINE=local)."
)

#: CPUs reserved for each decoding task and each CPU model actor.
DEFAULT_CPUS_PER_WORKER = 1.0


@dataclasses.dataclass(frozen=True)
class RayPlan:
    """Resources of one Ray run, resolved against the cluster.

    Attributes
    ----------
    actors : int
        Model actors in the pool.
    cpus_per_worker : float
        CPUs reserved for each decoding task and each CPU model actor.
    gpus_per_actor : int
        1 on a cluster with GPUs, else 0.
    cluster_cpus, cluster_gpus : float
        Resources of the cluster when the run started.
    """

    actors: int
    cpus_per_worker: float
    gpus_per_actor: int
    cluster_cpus: float
    cluster_gpus: float


# --- checking and listing ----------------------------------------------------


def check_args(args) -> None:
    """Check that Ray is installed and that the Ray options are valid.

    Raises
    ------
    PipelineError
        If Ray Data cannot be imported, or an option is not positive.
    """
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise PipelineError(RAY_MISSING_MESSAGE) from None
    actors = getattr(args, "ray_actors", None)
    if actors is not None and actors < 1:
        raise PipelineError(f"--ray-actors must be a positive integer; got {actors}.")
    cpus = getattr(args, "ray_cpus_per_worker", None)
    if cpus is not None and not cpus > 0:
        raise PipelineError(f"--ray-cpus-per-worker must be a positive number; got {cpus}.")


def is_uri(location: str | os.PathLike | None) -> bool:
    """Return whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    if location is None:
        return False
    scheme = urllib.parse.urlsplit(str(location)).scheme
    # One letter is a Windows drive (C:\\...), not a scheme.
    return len(scheme) > 1 and "://" in str(location)


def list_uri_sources(args, backbone) -> list[tuple[str, list, Path]]:
    """Return (name, images, output) for each folder URI to process.

    The URI counterpart of the local listing: ``--images URI`` is one
    folder, ``--data URI`` contains one folder per split. Outputs stay local,
    under ``--features``.
    """
    features_root = Path(args.features)
    if args.images:
        name = _uri_name(args.images)
        output = Path(args.output) if args.output else features_root / backbone.name / f"{name}.h5"
        return [(name, list_uri_images(args.images), output)]
    if args.output:
        raise PipelineError("--output can only be used with --images; with --data the outputs are FEATURES/BACKBONE/SPLIT.h5.")

    data = args.data.rstrip("/")
    if not _is_folder(data):
        raise PipelineError(
            f"Data folder not found: {data}. Point DATA (--data) at a folder in "
            f"the Kaggle layout, with train/ and test/ inside."
        )
    sources = []
    for split in args.splits:
        folder = f"{data}/{split}"
        if not _is_folder(folder):
            raise PipelineError(f"Split folder not found: {folder}. Check DATA (--data) and SPLITS (--splits).")
        # NOTE: unlike a local data folder, labels.csv is not checked against
        # the images here, so labelled ids without an image are not reported.
        sources.append((split, list_uri_images(folder), features_root / backbone.name / f"{split}.h5"))
    return sources


def list_uri_images(uri: str) -> list[images.ImageRef]:
    """List the images of a folder URI, sorted by id, with the rules of :func:`images.list_images`.

    Raises
    ------
    PipelineError
        If the folder cannot be opened or is missing, contains no images, or two
        files share an id.
    """
    import pyarrow.fs

    uri = uri.rstrip("/")
    if not _is_folder(uri):
        raise PipelineError(f"Image folder not found: {uri}. Check the DATA (--data) or --images URI.")
    filesystem, path = _open_filesystem(uri)
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))
    except OSError as error:
        raise PipelineError(f"Failed to list {uri}: {error}. Check the URI and the credentials of its file system.") from None

    refs = {}
    for entry in entries:
        name = PurePosixPath(entry.path).name
        stem, suffix = os.path.splitext(name)
        if entry.type != pyarrow.fs.FileType.File or suffix.lower() not in images.IMAGE_EXTENSIONS:
            continue
        if stem in refs:
            raise PipelineError(
                f"Two files in {uri} have the id {stem!r}: "
                f"{_uri_name(refs[stem].location)} and {name}. Keep one of them."
            )
        refs[stem] = images.ImageRef(id=stem, location=f"{uri}/{urllib.parse.quote(name)}")
    if not refs:
        raise PipelineError(f"No images found in {uri} (looked for {', '.join(images.IMAGE_EXTENSIONS)}).")
    return [refs[key] for key in sorted(refs)]


def _uri_name(uri: str) -> str:
    return urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(uri.rstrip("/")).path).name)


def _open_filesystem(uri: str):
    """Return (pyarrow file system, path) for a URI, or raise a PipelineError."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
        raise PipelineError(
            f"Failed to open {uri}: {error}. Use a local folder or a URI that pyarrow's "
            f"file systems read (file://, s3://, gs://, hdfs://, abfs://)."
        ) from None


def _is_folder(uri: str) -> bool:
    import pyarrow.fs

    filesystem, path = _open_filesystem(uri)
    try:
        return filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory
    except OSError:
        return False


# --- reading and decoding on the workers ------------------------------------


@functools.lru_cache(maxsize=16)
def _filesystem_of(scheme: str, netloc: str):
    """Return (file system, root path) of ``scheme://netloc/``, built once per worker process."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{netloc}/")


def read_uri(location: str) -> bytes:
    """Read the bytes of a file URI; raises OSError if it cannot be read."""
    import pyarrow

    parts = urllib.parse.urlsplit(location)
    try:
        filesystem, root = _filesystem_of(parts.scheme, parts.netloc)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as error:
        raise OSError(str(error)) from None
    path = f"{root.rstrip('/')}/{urllib.parse.unquote(parts.path.lstrip('/'))}"
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def decode_ref(ref: images.ImageRef, size: int) -> tuple[np.ndarray, str | None]:
    """Read and decode one image, local or URI; raises DecodeError with the reason if it fails."""
    if not is_uri(ref.location):
        return images.decode_file(ref, size)
    try:
        data = read_uri(ref.location)
    except OSError as error:
        raise images.DecodeError(f"cannot read ({error.strerror or error})") from None
    return images.decode_image(data, size)


def decode_batch(batch: dict, image_size: int) -> dict:
    """Decode one batch of (index, id, location) rows: the first ``map_batches`` stage.

    Returns the columns index, id, pixels (uint8, shape (n, size, size, 3)),
    reason (why an image was skipped, '' when decoded) and note.
    """
    count = len(batch["id"])
    pixels = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    reasons, notes = [], []
    for offset in range(count):
        ref = images.ImageRef(id=str(batch["id"][offset]), location=str(batch["location"][offset]))
        reason, note = features.decode_into(pixels, offset, functools.partial(decode_ref, ref, image_size))
        reasons.append(reason)
        notes.append(note)
    return {
        "index": batch["index"],
        "id": batch["id"],
        "pixels": pixels,
        "reason": np.asarray(reasons, dtype=object),
        "note": np.asarray(notes, dtype=object),
    }


class ModelSetupError(PipelineError):
    """A PipelineError of a model actor, such as weights that do not load, sent to the driver.

    Ray Data (2.60) appends retry advice to the arguments of a worker's
    exception, so the original text is kept in ``message``.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class EmbedActor:
    """The backbone as a Ray Data callable class: one model per actor, built once.

    Parameters
    ----------
    backbone : Backbone
    weights : Weights
        Resolved on the driver. The actor loads ``weights.path`` when that
        file exists on its node with the same sha256, and otherwise the bytes
        shipped through the object store in ``weights_blob``.
    weights_blob : list of ObjectRef
        The weights file's bytes, empty for random weights. An actor fetches
        them only when its node lacks the file.
    threads : int
        TensorFlow threads of a CPU actor (its reserved CPUs).
    """

    def __init__(self, backbone, weights, weights_blob, image_size, precision, batch_size, flip, threads):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        backbones.gpu_available()  # imports Keras with TensorFlow's start-up notices hidden
        _configure_tensorflow(threads)
        self.model = None
        self.setup_error = None
        try:
            with _local_weights(weights, weights_blob) as local:
                self.model = backbones.build_model(backbone, local, image_size, precision)
        except PipelineError as error:
            # Raised from __call__ instead: Ray passes the exception of a
            # failed task to the driver, but only the text of a failed actor
            # constructor.
            self.setup_error = ModelSetupError(str(error))
        self.batch_size = batch_size
        self.flip = flip

    def __call__(self, batch: dict) -> dict:
        if self.setup_error is not None:
            raise self.setup_error
        rows = features.embed_decoded(self.model, batch["pixels"], batch["reason"], self.batch_size, self.flip)
        return {
            "index": batch["index"],
            "id": batch["id"],
            "features": rows,
            "reason": batch["reason"],
            "note": batch["note"],
        }


def _configure_tensorflow(threads: int) -> None:
    """Limit a CPU actor to its reserved CPUs and let GPU actors share a device."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        # NOTE: not run in this project yet (no GPU was available); memory
        # growth lets two actors share one GPU under fractional num_gpus.
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        return
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@contextlib.contextmanager
def _local_weights(weights, weights_blob):
    """Yield Weights whose file exists on this node, copied from the object store if needed."""
    if weights.is_random or _has_file(weights.path, weights.sha256):
        yield weights
        return
    import ray

    folder = Path(tempfile.mkdtemp(prefix="pipeline-weights-"))
    try:
        path = folder / weights.name
        np.asarray(ray.get(weights_blob[0])).tofile(path)
        if backbones.sha256_of(path) != weights.sha256:
            raise RuntimeError(f"weights {weights.name} changed in transfer to a Ray worker; this is a bug")
        yield dataclasses.replace(weights, path=path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _has_file(path, sha256: str) -> bool:
    return path is not None and Path(path).is_file() and backbones.sha256_of(Path(path)) == sha256


# --- the run on the driver ------------------------------------------------------


def connect(cpus: int | None = None) -> None:
    """Connect to Ray as Ray does: to ``RAY_ADDRESS`` when set, else to a new local instance.

    A local instance gets the machine's cores (or ``cpus``), no dashboard,
    and listens on the loopback interface only. When this process already
    called ``ray.init``, that connection is used.
    """
    # Ray's anonymous usage statistics are sent to a server outside the
    # cluster; they stay off unless the user turns them on.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray 2.60 reads this at import time: with 0, a local instance binds
        # its servers to 127.0.0.1 (as on macOS and Windows) instead of all
        # interfaces, so other machines cannot join or reach it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        # Workers on other machines import this package from the driver's copy.
        ray.init(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
        return
    logger.info("starting a local Ray instance")
    ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False)


def plan_resources(request: features.FeatureRequest) -> RayPlan:
    """Choose the actor count and resources for a request on the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    cluster_cpus = float(resources.get("CPU", 0))
    cluster_gpus = float(resources.get("GPU", 0))
    cpus_per_worker = request.ray_cpus_per_worker or DEFAULT_CPUS_PER_WORKER
    gpus_per_actor = 1 if cluster_gpus >= 1 else 0
    if request.ray_actors:
        actors = request.ray_actors
    elif gpus_per_actor:
        actors = int(cluster_gpus)
    else:
        # Without GPUs, Ray Data fuses decoding into the model actors (their
        # resources are equal), so the actors get all CPUs.
        actors = max(1, int(cluster_cpus / cpus_per_worker))

    needed_cpus = actors * cpus_per_worker
    if gpus_per_actor and actors > cluster_gpus:
        logger.warning(
            "%d model actors need %d GPUs but the Ray cluster has %g; the actors "
            "start as GPUs join (set --ray-actors to at most %g to avoid waiting)",
            actors, actors, cluster_gpus, cluster_gpus,
        )
    elif not gpus_per_actor and needed_cpus > cluster_cpus:
        logger.warning(
            "%d model actors need %g CPUs but the Ray cluster has %g; the actors start "
            "as CPUs join (lower --ray-actors or --ray-cpus-per-worker to avoid waiting)",
            actors, needed_cpus, cluster_cpus,
        )
    return RayPlan(actors, cpus_per_worker, gpus_per_actor, cluster_cpus, cluster_gpus)


def compute_features(request: features.FeatureRequest, progress: Callable[[int, int], None] | None = None) -> features.Summary:
    """Compute the feature file of one request on Ray; the caller holds the output lock.

    Parameters
    ----------
    progress : callable (done, total), optional
        Called after each batch written, with the number of images done.
    """
    started = time.perf_counter()
    run_journal, done = features.start_journal(request)
    try:
        if done < len(request.refs):
            connect()
            plan = plan_resources(request)
            logger.info(
                "%s: Ray cluster with %g CPUs and %g GPUs; %d model actor(s) with %s each, batches of %d images",
                request.output, plan.cluster_cpus, plan.cluster_gpus, plan.actors,
                "1 GPU" if plan.gpus_per_actor else f"{plan.cpus_per_worker:g} CPU",
                run_journal.batch_size,
            )
            _write_results(request, plan, run_journal, done, progress)
        run_journal.close()
        skipped = features.finish_output(request, run_journal)
    finally:
        run_journal.close()

    seconds = time.perf_counter() - started
    return features.Summary(request.output, len(request.refs), len(request.refs) - done, len(skipped), seconds)


def build_dataset(request: features.FeatureRequest, plan: RayPlan, start: int, batch_size: int):
    """Return the Ray dataset of (index, id, features, reason, note) for the images from ``start`` on."""
    import pyarrow as pa
    import ray

    refs = request.refs[start:]
    # One input block per batch, so decoding spreads over as many tasks as there are batches.
    block_rows = batch_size
    blocks = [
        pa.table({
            "index": pa.array(range(start + block_start, start + block_start + len(chunk)), type=pa.int64()),
            "id": pa.array([ref.id for ref in chunk], type=pa.string()),
            "location": pa.array([ref.location for ref in chunk], type=pa.string()),
        })
        for block_start in range(0, len(refs), block_rows)
        for chunk in [refs[block_start : block_start + block_rows]]
    ]
    dataset = ray.data.from_arrow(blocks)
    options = dataset.context.execution_options
    # Batches reach the driver in id order, so each is appended as it arrives.
    options.preserve_order = True
    dataset.context.enable_progress_bars = False
    # Worker exceptions reach the driver as raised, not wrapped in Ray Data's
    # UserCodeException, so _write_results can find a ModelSetupError.
    dataset.context.raise_original_map_exception = True

    weights_blob = []
    if not request.weights.is_random:
        # Workers on other machines may not have the driver's weights file.
        weights_blob = [ray.put(np.fromfile(request.weights.path, dtype=np.uint8))]

    decoded = dataset.map_batches(
        decode_batch,
        fn_kwargs={"image_size": request.image_size},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=plan.cpus_per_worker,
    )
    return decoded.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "backbone": request.backbone,
            "weights": request.weights,
            "weights_blob": weights_blob,
            "image_size": request.image_size,
            "precision": request.precision,
            "batch_size": batch_size,
            "flip": request.tta == "flip",
            "threads": max(1, int(plan.cpus_per_worker)),
        },
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=plan.cpus_per_worker if not plan.gpus_per_actor else 1,
        num_gpus=plan.gpus_per_actor or None,
    )


def _write_results(request, plan, run_journal, start, progress) -> None:
    """Stream the dataset's batches into the journal, in id order."""
    refs = request.refs
    batch_size = run_journal.batch_size
    dataset = build_dataset(request, plan, start, batch_size)
    expected = start
    warned = 0
    batches = iter(dataset.iter_batches(batch_size=batch_size, batch_format="numpy"))
    try:
        for batch in batches:
            count = len(batch["index"])
            batch_refs = refs[expected : expected + count]
            _check_order(batch, expected, batch_refs)
            warned = features.record_batch(
                run_journal, expected, batch_refs, batch["features"], batch["reason"], batch["note"], warned
            )
            expected += count
            if progress is not None:
                progress(expected, len(refs))
    except Exception as error:
        setup_error = _model_setup_error_in(error)
        if setup_error is None:
            raise
        raise PipelineError(setup_error.message) from None
    finally:
        # Stops the actors now, even while a traceback keeps this frame alive.
        batches.close()
    if expected != len(refs):
        raise RuntimeError(f"Ray returned {expected - start} of {len(refs) - start} images; this is a bug")


def _check_order(batch: dict, expected: int, batch_refs: list) -> None:
    indexes = np.asarray(batch["index"])
    if not np.array_equal(indexes, np.arange(expected, expected + len(indexes))):
        raise RuntimeError(f"Ray returned images {indexes[:3]}... where {expected} was next; this is a bug")
    if [str(image_id) for image_id in batch["id"]] != [ref.id for ref in batch_refs]:
        raise RuntimeError(f"Ray returned other ids than expected at image {expected}; this is a bug")


def _model_setup_error_in(error: BaseException) -> ModelSetupError | None:
    """Return the ModelSetupError inside Ray's exception chain, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        original = getattr(error, "cause", None)
        for candidate in (original, error):
            if isinstance(candidate, ModelSetupError) and hasattr(candidate, "message"):
                return candidate
        error = error.__cause__ or original
    return None
