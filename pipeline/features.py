"""The features stage: backbone embeddings of every image, cached in HDF5.

Images are listed in sorted id order and processed in fixed batches. Worker
threads read, decode and resize the next batches while the model runs on the
current one. Every finished batch is appended to a journal on disk (see
:mod:`pipeline.journal`), so memory stays flat and a killed run resumes where
it stopped. When all images are done the journal is turned into the HDF5
file described in :mod:`pipeline.feature_files`, atomically.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.metadata
import logging
import os
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

import pipeline
from pipeline import backbones as backbone_table
from pipeline import feature_files, images, journal
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

#: Attributes that decide whether an existing output can be reused.
IDENTITY_ATTRS = (
    "backbone",
    "input_size",
    "weights",
    "weights_sha256",
    "precision",
    "tta",
    "image_count",
    "image_list_sha256",
)

#: At most this many skipped images are named one by one in the log.
MAX_NAMED_WARNINGS = 20


@dataclasses.dataclass
class FeatureRequest:
    """Everything one features run needs, validated before any model is built.

    Attributes
    ----------
    name : str
        Split name (``train``, ``test``) or folder name; used in messages.
    refs : list of ImageRef
        The images, sorted by id.
    output : Path
        The HDF5 file to write.
    backbone : Backbone
    weights : Weights
    image_size : int
        Model input side, in pixels.
    precision : str
        ``float32`` or ``bfloat16`` (``auto`` is resolved by the caller).
    tta : str
        ``none`` or ``flip``.
    batch_size : int
    workers : int
        Decoding threads.
    force : bool
        Recompute even when an output or a partial run does not match.
    engine : str
        ``local`` or ``ray``.
    ray_actors : int or None
        Ray engine: model actors in the pool (None: chosen from the cluster).
    ray_cpus_per_worker : float or None
        Ray engine: CPUs reserved per decoding task and per CPU model actor
        (None: 1).
    """

    name: str
    refs: list
    output: Path
    backbone: backbone_table.Backbone
    weights: backbone_table.Weights
    image_size: int
    precision: str
    tta: str
    batch_size: int
    workers: int
    force: bool = False
    engine: str = "local"
    ray_actors: int | None = None
    ray_cpus_per_worker: float | None = None

    def provenance(self) -> dict:
        """Return the HDF5 attributes that describe this run's features."""
        return {
            "backbone": self.backbone.name,
            "input_size": self.image_size,
            "preprocessing": self.backbone.preprocessing,
            "weights": self.weights.name,
            "weights_sha256": self.weights.sha256,
            "precision": self.precision,
            "tta": self.tta,
            "engine": self.engine,
            "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
            "keras_version": _version("keras"),
            "tensorflow_version": _version("tensorflow"),
            "pipeline_version": pipeline.__version__,
            "image_count": len(self.refs),
            "image_list_sha256": images.image_list_digest([ref.id for ref in self.refs]),
        }


@dataclasses.dataclass
class Summary:
    """Outcome of one features run."""

    output: Path
    images: int
    computed: int
    skipped: int
    seconds: float
    reused: bool = False

    def describe(self) -> str:
        if self.reused:
            return f"{self.output}: up to date ({self.images} images, {self.skipped} skipped); nothing to compute"
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.output}: {self.images} images, {self.skipped} skipped, "
            f"{self.computed} processed in {self.seconds:.1f} s ({rate:.1f} images/s)"
        )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


# --- planning --------------------------------------------------------------


def plan_requests(args) -> list[FeatureRequest]:
    """Check the command-line arguments and list the runs to do.

    Everything that can be checked without running the model is checked
    here: folders, image lists, labels, the weights file (downloaded if
    needed) and existing outputs.
    """
    backbone = backbone_table.get_backbone(args.backbone)
    image_size = backbone_table.check_input_size(backbone, args.image_size)
    if args.batch_size is not None and args.batch_size < 1:
        raise PipelineError(f"--batch-size must be a positive integer; got {args.batch_size}.")
    if args.workers is not None and args.workers < 1:
        raise PipelineError(f"--workers must be a positive integer; got {args.workers}.")
    if getattr(args, "engine", "local") == "ray":
        from pipeline import ray_engine

        ray_engine.check_args(args)

    sources = _list_sources(args, backbone)
    on_gpu = backbone_table.gpu_available()
    weights = backbone_table.resolve_weights(backbone, args.weights)
    precision = backbone_table.resolve_precision(args.precision)
    batch_size = args.batch_size or (256 if on_gpu else 32)
    workers = args.workers or os.cpu_count() or 1

    requests = [
        FeatureRequest(
            name=name,
            refs=refs,
            output=output,
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            precision=precision,
            tta=args.tta,
            batch_size=batch_size,
            workers=workers,
            force=args.force,
            engine=getattr(args, "engine", "local"),
            ray_actors=getattr(args, "ray_actors", None),
            ray_cpus_per_worker=getattr(args, "ray_cpus_per_worker", None),
        )
        for name, refs, output in sources
    ]
    for request in requests:
        check_existing_output(request)
    return requests


def _list_sources(args, backbone) -> list[tuple[str, list, Path]]:
    """Return (name, images, output) for each folder to process."""
    if getattr(args, "engine", "local") == "ray":
        from pipeline import ray_engine

        if ray_engine.is_uri(args.images or args.data):
            return ray_engine.list_uri_sources(args, backbone)
    features_root = Path(args.features)
    if args.images:
        folder = Path(args.images)
        output = Path(args.output) if args.output else features_root / backbone.name / f"{folder.name}.h5"
        return [(folder.name, images.list_images(folder), output)]
    if args.output:
        raise PipelineError("--output can only be used with --images; with --data the outputs are FEATURES/BACKBONE/SPLIT.h5.")

    data = Path(args.data)
    if not data.is_dir():
        raise PipelineError(
            f"Data folder not found: {data}. Point DATA (--data) at a folder in "
            f"the Kaggle layout, with train/ and test/ inside."
        )
    sources = []
    for split in args.splits:
        folder = data / split
        if not folder.is_dir():
            raise PipelineError(
                f"Split folder not found: {folder}. Check DATA (--data) and SPLITS (--splits)."
            )
        refs = images.list_images(folder)
        if split == "train":
            _warn_missing_labelled(data / "labels.csv", refs, folder)
        sources.append((split, refs, features_root / backbone.name / f"{split}.h5"))
    return sources


def _warn_missing_labelled(labels_path: Path, refs: list, folder: Path) -> None:
    """Name the ids of labels.csv that have no image in train/."""
    if not labels_path.is_file():
        return
    import pandas as pd

    try:
        labelled = pd.read_csv(labels_path, usecols=["id"], dtype=str)["id"]
    except ValueError:
        raise PipelineError(f"{labels_path} has no 'id' column; a Kaggle labels.csv has the columns id,breed.") from None
    present = {ref.id for ref in refs}
    missing = [image_id for image_id in labelled if image_id not in present]
    if missing:
        logger.warning(
            "%d id(s) of %s have no image in %s: %s%s. Training will stop on them; "
            "restore the images or remove their rows from labels.csv.",
            len(missing),
            labels_path,
            folder,
            ", ".join(missing[:5]),
            ", ..." if len(missing) > 5 else "",
        )


def check_existing_output(request: FeatureRequest) -> None:
    """Reject an existing output or partial run that describes other features.

    A complete output with the same identity is reused later; one with
    another identity, or a foreign file, needs ``--force``.
    """
    if request.force:
        return
    expected = request.provenance()
    if request.output.exists():
        if not h5py.is_hdf5(request.output):
            raise PipelineError(
                f"{request.output} already exists but is not an HDF5 file. Pass --force "
                f"(make: FORCE=1) to replace it with computed features."
            )
        try:
            attrs = feature_files.read_attrs(request.output)
        except OSError:
            attrs = {}
        differences = _differences(expected, attrs)
        if differences or attrs.get("complete") is not True:
            raise PipelineError(
                f"{request.output} already exists but was computed "
                f"{'for ' + '; '.join(differences) if differences else 'by another program or is incomplete'}. "
                f"Pass --force (make: FORCE=1) to recompute it; the old file is "
                f"replaced only when the new one is complete."
            )
    manifest = journal.Journal.read_manifest(request.output)
    if manifest is not None and journal.Journal.has_rows(request.output):
        # A partial run without rows (it failed before its first batch) is
        # discarded silently; one with rows is work that --force throws away.
        differences = _differences(expected, manifest)
        if differences:
            raise PipelineError(
                f"An interrupted run for {request.output} was computing other "
                f"features ({'; '.join(differences)}). Pass --force (make: "
                f"FORCE=1) to discard it and start over."
            )


def _differences(expected: dict, found: dict) -> list[str]:
    differences = []
    for key in IDENTITY_ATTRS:
        if found.get(key) != expected[key]:
            if key == "image_list_sha256" and found.get("image_count") != expected["image_count"]:
                continue  # the count already names the change
            differences.append(f"{key}={found.get(key)!r}, not {expected[key]!r}")
    return differences


# --- computing -------------------------------------------------------------


class ModelCache:
    """Builds each distinct backbone model once, on first use."""

    def __init__(self):
        self._models = {}

    def get(self, request: FeatureRequest):
        key = (request.backbone.name, request.weights.sha256, request.weights.name, request.image_size, request.precision)
        if key not in self._models:
            self._models[key] = backbone_table.build_model(
                request.backbone, request.weights, request.image_size, request.precision
            )
        return self._models[key]


def compute_features(
    request: FeatureRequest,
    progress: Callable[[int, int], None] | None = None,
    models: "ModelCache | None" = None,
) -> Summary:
    """Compute, or reuse, the feature file of one request.

    Parameters
    ----------
    progress : callable (done, total), optional
        Called after each batch with the number of images done.
    models : ModelCache, optional
        Shares one built model between the requests of a command.
    """
    started = time.perf_counter()
    with journal.OutputLock(request.output):
        check_existing_output(request)
        if request.output.exists() and not request.force:
            attrs = feature_files.read_attrs(request.output)
            return Summary(request.output, len(request.refs), 0, int(attrs.get("skipped_count", 0)), 0.0, reused=True)

        if request.engine == "ray":
            from pipeline import ray_engine

            return ray_engine.compute_features(request, progress=progress)

        # A run killed while writing the HDF5 file leaves its temporary file behind.
        for stale in request.output.parent.glob(f".{request.output.name}.tmp-*"):
            stale.unlink()
        run_journal, done = start_journal(request)
        try:
            if done < len(request.refs):
                model = (models or ModelCache()).get(request)
                _run_batches(request, model, run_journal, done, progress)
            run_journal.close()
            skipped = finish_output(request, run_journal)
        finally:
            run_journal.close()

    seconds = time.perf_counter() - started
    return Summary(request.output, len(request.refs), len(request.refs) - done, len(skipped), seconds)


def start_journal(request: FeatureRequest) -> tuple[journal.Journal, int]:
    """Open the journal of a request and return it with the number of images already done.

    A partial run left by either engine is resumed unless ``request.force``
    is set; the caller holds the output lock.
    """
    manifest = {**request.provenance(), "batch_size": request.batch_size, "n_features": request.backbone.n_features}
    previous = journal.Journal.read_manifest(request.output)
    # check_existing_output let through only a matching partial run or one without rows.
    resume = bool(previous) and not request.force and not _differences(manifest, previous)
    if resume:
        # Resume with the interrupted run's batches so the features are identical.
        manifest["batch_size"] = int(previous["batch_size"])
    run_journal = journal.Journal(request.output, manifest, len(request.refs))
    done = run_journal.start(resume=resume)
    if done:
        logger.info("%s: resuming after %d of %d images", request.output, done, len(request.refs))
    return run_journal, done


def _run_batches(request, model, run_journal, start, progress) -> None:
    batch_size = run_journal.batch_size
    refs = request.refs
    flip = request.tta == "flip"
    warned = 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=request.workers, thread_name_prefix="decode") as pool:
        # Decoding runs up to a few batches ahead of the model, and no further,
        # so memory does not grow with the number of images.
        window = max(2 * batch_size, 4 * request.workers)
        pending = collections.deque()
        next_index = start

        def refill():
            nonlocal next_index
            while next_index < len(refs) and len(pending) < window:
                pending.append(pool.submit(images.decode_file, refs[next_index], request.image_size))
                next_index += 1

        refill()
        for batch_start in range(start, len(refs), batch_size):
            batch_refs = refs[batch_start : batch_start + batch_size]
            pixels = np.zeros((batch_size, request.image_size, request.image_size, 3), dtype=np.uint8)
            reasons, notes = [], []
            for offset in range(len(batch_refs)):
                reason, note = decode_into(pixels, offset, pending.popleft().result)
                reasons.append(reason)
                notes.append(note)
            refill()

            rows = embed_decoded(model, pixels, reasons, batch_size, flip)
            warned = record_batch(run_journal, batch_start, batch_refs, rows, reasons, notes, warned)
            if progress is not None:
                progress(batch_start + len(batch_refs), len(refs))


def decode_into(pixels: np.ndarray, offset: int, decode: Callable[[], tuple]) -> tuple[str, str]:
    """Store one decoded image in ``pixels[offset]`` and return (skip reason, note).

    ``decode`` returns (pixels, note) or raises DecodeError. The reason is ''
    when the image was decoded, and the note is '' when it has none. A
    skipped image leaves its row of ``pixels`` unchanged.
    """
    try:
        pixels[offset], note = decode()
    except images.DecodeError as error:
        return str(error), ""
    return "", note or ""


def embed_decoded(model, pixels: np.ndarray, reasons, batch_size: int, flip: bool) -> np.ndarray:
    """Return the float32 features of one batch, with zero rows for skipped images.

    Parameters
    ----------
    pixels : ndarray of uint8, shape (n, size, size, 3)
        Padded with zeros to ``batch_size`` rows, so that every model call
        has the same shape.
    reasons : sequence of str, length n
        Skip reason of each image ('' when decoded).

    Returns
    -------
    ndarray of float32, shape (n, n_features)
    """
    count = len(reasons)
    if len(pixels) < batch_size:
        padded = np.zeros((batch_size, *pixels.shape[1:]), dtype=np.uint8)
        padded[:count] = pixels[:count]
        pixels = padded
    rows = _embed_batch(model, pixels, flip)[:count]
    rows[np.asarray([bool(reason) for reason in reasons], dtype=bool)] = 0.0
    return rows


def record_batch(run_journal, batch_start: int, batch_refs, rows, reasons, notes, warned: int) -> int:
    """Append one batch to the journal and log its image problems.

    Returns the number of images warned about so far, ``warned`` included.
    """
    status = np.full(len(batch_refs), journal.OK, dtype=np.uint8)
    skipped = []
    for offset, ref in enumerate(batch_refs):
        if reasons[offset]:
            status[offset] = journal.SKIPPED
            skipped.append((batch_start + offset, ref.id, str(reasons[offset])))
            warned = _warn_image(warned, ref, f"skipped: {reasons[offset]}")
        elif notes[offset]:
            warned = _warn_image(warned, ref, str(notes[offset]))
    run_journal.append(batch_start, rows, status, skipped)
    return warned


def _embed_batch(model, pixels: np.ndarray, flip: bool) -> np.ndarray:
    """Return float32 features of a full batch, averaged with the mirror images under flip."""
    rows = np.asarray(model.predict_on_batch(pixels), dtype=np.float32)
    if flip:
        mirrored = np.ascontiguousarray(pixels[:, :, ::-1, :])
        rows = (rows + np.asarray(model.predict_on_batch(mirrored), dtype=np.float32)) / 2.0
    return rows


def _warn_image(warned: int, ref, message: str) -> int:
    if warned < MAX_NAMED_WARNINGS:
        logger.warning("%s (%s): %s", ref.id, ref.location, message)
    elif warned == MAX_NAMED_WARNINGS:
        logger.warning("more images have problems; the skipped ones are listed beside the output in a .skipped.txt file")
    return warned + 1


def finish_output(request: FeatureRequest, run_journal) -> list:
    """Write the HDF5 file and the skipped-image list from a finished journal."""
    status = run_journal.status()
    if len(status) != len(request.refs):
        raise RuntimeError(f"journal has {len(status)} of {len(request.refs)} images; this is a bug")
    skipped = run_journal.skipped()
    ok_ids = [ref.id for ref, code in zip(request.refs, status) if code == journal.OK]
    attrs = {**request.provenance(), "skipped_count": len(skipped), "batch_size": run_journal.batch_size}

    skipped_path = skipped_list_path(request.output)
    if skipped:
        tmp = skipped_path.with_name(f".{skipped_path.name}.tmp")
        tmp.write_text("".join(f"{image_id}\t{reason}\n" for image_id, reason in skipped), encoding="utf-8")
        os.replace(tmp, skipped_path)
        logger.warning(
            "%d of %d images could not be decoded and were skipped; they are listed in %s",
            len(skipped),
            len(request.refs),
            skipped_path,
        )
    elif skipped_path.exists():
        skipped_path.unlink()

    feature_files.write_feature_file(
        request.output,
        ok_ids,
        run_journal.row_blocks(),
        request.backbone.n_features,
        attrs,
        skipped_ids=[image_id for image_id, _ in skipped],
    )
    run_journal.remove()
    return skipped


def skipped_list_path(output: Path) -> Path:
    """Return the text file beside an output that lists its skipped images."""
    return output.with_suffix(".skipped.txt")


# --- small in-memory use (predict) -------------------------------------------


def embed_paths(
    paths,
    backbone: str,
    weights: str,
    image_size: int | None = None,
    precision: str = "float32",
    tta: str = "none",
    batch_size: int = 32,
):
    """Embed a few images in memory, for prediction on new photos.

    Returns
    -------
    features : ndarray of float32, shape (n_ok, n_features)
    ok_paths : list of Path
        The images that were decoded, in the order of ``features``.
    failures : dict of Path to str
        The images that could not be read, with the reason.
    """
    table_row = backbone_table.get_backbone(backbone)
    size = backbone_table.check_input_size(table_row, image_size)
    resolved = backbone_table.resolve_weights(table_row, weights)
    model = backbone_table.build_model(table_row, resolved, size, backbone_table.resolve_precision(precision))

    decoded, ok_paths, failures = [], [], {}
    for path in map(Path, paths):
        try:
            pixels, _ = images.decode_file(images.ImageRef(path.stem, str(path)), size)
        except images.DecodeError as error:
            failures[path] = str(error)
            continue
        decoded.append(pixels)
        ok_paths.append(path)

    rows = []
    for start in range(0, len(decoded), batch_size):
        batch = np.zeros((batch_size, size, size, 3), dtype=np.uint8)
        chunk = decoded[start : start + batch_size]
        batch[: len(chunk)] = chunk
        rows.append(_embed_batch(model, batch, tta == "flip")[: len(chunk)])
    features = np.concatenate(rows) if rows else np.zeros((0, table_row.n_features), dtype=np.float32)
    return features, ok_paths, failures
