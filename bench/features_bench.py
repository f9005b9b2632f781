"""Features-stage benchmarks: throughput, memory, decoding, FLOPs and feature quality."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from bench import report
from bench.runner import ChildResult, alternate, median, run_child

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a features comparison.

    ``kind`` is ``ours`` (the features stage) or ``naive``
    (``image_dataset_from_directory`` and ``model.predict``).
    """

    label: str
    kind: str
    backbone: str
    weights: str
    precision: str = "float32"
    tta: str = "none"
    batch_size: int | None = None
    workers: int | None = None


def first_images(data: Path, count: int | None, work: Path) -> tuple[Path, int]:
    """Link the first ``count`` images of DATA/train, then DATA/test, into one folder.

    ``count=None`` takes all of them. Returns the folder and the number of
    images in it.
    """
    from pipeline import images

    refs = []
    for split in ("train", "test"):
        if (data / split).is_dir():
            refs += images.list_images(data / split)
    if not refs:
        raise SystemExit(f"No images found in {data}/train or {data}/test; point --data at a Kaggle-layout folder.")
    chosen = refs if count is None else refs[:count]
    folder = work / f"images-{len(chosen)}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for ref in chosen:
            source = Path(ref.location)
            (folder / source.name).symlink_to(source.resolve())
    return folder, len(chosen)


def ours_argv(side: Side, folder: Path, output: Path) -> list[str]:
    argv = [
        "features",
        "--images", str(folder),
        "--output", str(output),
        "--backbone", side.backbone,
        "--weights", side.weights,
        "--precision", side.precision,
        "--tta", side.tta,
    ]
    if side.batch_size:
        argv += ["--batch-size", str(side.batch_size)]
    if side.workers:
        argv += ["--workers", str(side.workers)]
    return argv


def run_side(side: Side, folder: Path, work: Path, label: str) -> ChildResult:
    """Embed every image of ``folder`` with one side, in a fresh process."""
    if side.kind == "ours":
        output = work / "outputs" / f"{label}.h5"
        if output.exists():
            output.unlink()
        result = run_child("ours", {"argv": ours_argv(side, folder, output)}, work / "logs", label)
        output.unlink()
        return result
    return run_child(
        "naive",
        {"folder": str(folder), "backbone": side.backbone, "weights": side.weights},
        work / "logs",
        label,
    )


@dataclasses.dataclass
class Throughput:
    """Repeated runs of each side of a comparison on the same images.

    ``results[label]`` lists the child results per repeat.
    """

    sides: list
    count: int
    results: dict

    def steady_rates(self, label: str) -> list[float]:
        """Images/s with start-up excluded, as each child measured it, per repeat."""
        return [result.values.get("steady_rate") or float("nan") for result in self.results[label]]

    def end_to_end_rates(self, label: str) -> list[float]:
        """Images/s over the child's whole life, interpreter start included, per repeat."""
        return [self.count / result.wall_seconds for result in self.results[label]]

    def ratios(self, label: str, reference: str) -> list[float]:
        """Per-repeat ratio of steady rates, ``label`` over ``reference``."""
        return [ours / theirs for ours, theirs in zip(self.steady_rates(label), self.steady_rates(reference))]


def compare_throughput(sides: list[Side], data: Path, count: int, repeats: int, work: Path) -> Throughput:
    """Run every side on the first ``count`` images, ``repeats`` times, alternating."""
    folder, count = first_images(data, count, work)
    by_label = {side.label: side for side in sides}
    results = alternate(
        list(by_label),
        repeats,
        lambda label, repeat: run_side(by_label[label], folder, work, f"{label}-{count}-{repeat}"),
    )
    return Throughput(sides, count, results)


def throughput_table(throughput: Throughput, reference: str, flops_per_image: float | None) -> str:
    rows = []
    for side in throughput.sides:
        steady = throughput.steady_rates(side.label)
        ratio = throughput.ratios(side.label, reference)
        gflops = median(steady) * flops_per_image / 1e9 if flops_per_image else None
        rows.append([
            side.label,
            report.spread(steady, 2),
            report.spread(ratio, 2) if side.label != reference else "1",
            report.number(gflops, 0),
            report.spread(throughput.end_to_end_rates(side.label), 2),
            report.spread([result.peak_rss_mib for result in throughput.results[side.label]], 0),
        ])
    return report.table(
        [
            "side",
            "steady images/s",
            f"ratio to {reference}",
            "achieved GFLOP/s",
            "end-to-end images/s",
            "peak RSS MiB",
        ],
        rows,
    )


def measure_decode(data: Path, count: int, size: int, repeats: int, cores: int, work: Path) -> dict[str, list[float]]:
    """Return images/s of decoding and resizing only, per method and repeat."""
    folder, count = first_images(data, count, work)
    methods = {
        f"pipeline, {cores} threads": {"method": "pipeline", "workers": cores},
        "pipeline, 1 thread": {"method": "pipeline", "workers": 1},
        "tf.data (as image_dataset_from_directory)": {"method": "tensorflow"},
    }

    def measure(label, repeat):
        args = {"folder": str(folder), "size": size, **methods[label]}
        tag = methods[label]["method"] + str(methods[label].get("workers", ""))
        result = run_child("decode", args, work / "logs", f"decode-{tag}-{repeat}")
        return result.values["images"] / result.values["seconds"]

    return alternate(list(methods), repeats, measure)


#: Process-wide settings tried against the defaults, as environment variables of a child.
ENVIRONMENT_VARIANTS = {
    "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "1 inter-op thread (TF_NUM_INTEROP_THREADS=1)": {"TF_NUM_INTEROP_THREADS": "1"},
}


def _variant(precision: str, batch_size: int, jit: bool = False, fold: bool = True) -> tuple[str, dict]:
    label = f"{precision}, batch {batch_size}{', XLA' if jit else ''}{', batch norm not folded' if not fold else ''}"
    return label, {"precision": precision, "jit_compile": jit, "batch_size": batch_size, "fold_batch_norm": fold}


def measure_variants(backbone: str, rounds: int, work: Path) -> dict[str, dict]:
    """Return model-only images/s of compilation, precision, batch-size and threading variants.

    The result maps a settings label ("defaults" or a key of
    :data:`ENVIRONMENT_VARIANTS`) to the child's ``rates`` (variant label
    to images/s per round) and ``first_call_seconds``.
    """
    in_process = dict(
        _variant(precision, batch_size, jit, fold)
        for precision, batch_size, jit, fold in [
            ("float32", 16, False, True),
            ("float32", 16, True, True),
            ("float32", 16, False, False),
            ("bfloat16", 16, False, True),
            ("bfloat16", 16, True, True),
            ("bfloat16", 16, False, False),
            ("bfloat16", 8, False, True),
            ("bfloat16", 32, False, True),
        ]
    )
    baseline = dict(_variant(precision, 16) for precision in ("float32", "bfloat16"))
    results = {
        "defaults": run_child(
            "variants", {"backbone": backbone, "variants": in_process, "rounds": rounds}, work / "logs", "variants"
        ).values
    }
    for label, environment in ENVIRONMENT_VARIANTS.items():
        tag = "-".join(environment)
        results[label] = run_child(
            "variants",
            {"backbone": backbone, "variants": baseline, "rounds": rounds},
            work / "logs",
            f"variants-{tag}",
            env=environment,
        ).values
    return results


@dataclasses.dataclass
class QualityRun:
    precision: str
    tta: str
    features_dir: Path
    seconds: float
    images: int


def compute_quality_features(data: Path, weights: str, work: Path) -> list[QualityRun]:
    """Compute mobilenet features of DATA/train in float32 and bfloat16, with and without flip TTA."""
    from pipeline import images

    count = len(images.list_images(data / "train"))
    runs = []
    for precision in ("float32", "bfloat16"):
        for tta in ("none", "flip"):
            features_dir = work / f"features-{precision}-{tta}"
            if features_dir.exists():
                shutil.rmtree(features_dir)
            argv = [
                "features", "--data", str(data), "--splits", "train", "--features", str(features_dir),
                "--backbone", "mobilenet", "--weights", weights, "--precision", precision, "--tta", tta,
            ]
            result = run_child("ours", {"argv": argv}, work / "logs", f"quality-{precision}-{tta}")
            runs.append(QualityRun(precision, tta, features_dir, result.wall_seconds, count))
    return runs

