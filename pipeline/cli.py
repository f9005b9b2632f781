"""Command line: ``python -m pipeline COMMAND``.

The command line owns all output: it configures logging, shows progress bars
and prints results. Library modules only log and return values. A
:class:`~pipeline.errors.PipelineError` is printed as one message without a
traceback, and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.errors import PipelineError

logger = logging.getLogger("pipeline")


def _add_features_parser(subparsers) -> None:
    from pipeline import backbones

    parser = subparsers.add_parser(
        "features",
        help="cache backbone embeddings of images in HDF5",
        description=(
            "Run a pretrained backbone once over every image and write "
            "FEATURES/BACKBONE/SPLIT.h5 (datasets 'ids' and 'features'). "
            "Either --data (a Kaggle-layout folder with train/ and test/) or "
            "--images (any folder of images) selects the input."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default="data", help="Kaggle-layout folder (default: %(default)s)")
    source.add_argument("--images", help="a folder of images; writes --output instead of FEATURES/BACKBONE/SPLIT.h5")
    parser.add_argument("--output", help="output HDF5 file with --images (default: FEATURES/BACKBONE/<folder name>.h5)")
    parser.add_argument("--features", default="features", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--backbone",
        default=backbones.DEFAULT_BACKBONE,
        choices=sorted(backbones.BACKBONES),
        help="backbone (default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (Keras cache), a path to a local .h5 weights file, or "
        "'random' (untrained, for tests and benchmarks only) (default: %(default)s)",
    )
    parser.add_argument("--splits", nargs="+", default=["train", "test"], help="subfolders of --data to process (default: train test)")
    parser.add_argument("--image-size", type=int, help="model input side in pixels (default: the backbone's)")
    parser.add_argument("--batch-size", type=int, help="images per model call (default: 32 on a CPU, 256 on a GPU)")
    parser.add_argument("--workers", type=int, help="decoding threads (default: the number of CPU cores)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute precision: auto is bfloat16 on a GPU and float32 on a CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--tta",
        default="none",
        choices=["none", "flip"],
        help="test-time augmentation: flip averages each image's embedding with its mirror's (default: %(default)s)",
    )
    parser.add_argument("--engine", default="local", choices=["local", "ray"], help="local process or a Ray cluster (default: %(default)s)")
    parser.add_argument(
        "--ray-actors",
        type=int,
        help="Ray engine: model actors in the pool (default: one per GPU of the cluster; "
        "without GPUs, the cluster's CPUs divided by --ray-cpus-per-worker)",
    )
    parser.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        help="Ray engine: CPUs reserved for each decoding task and each CPU model actor, "
        "which also sets a CPU actor's TensorFlow threads (default: 1)",
    )
    parser.add_argument("--force", action="store_true", help="recompute existing or partial outputs that do not match")
    parser.set_defaults(handler=_run_features)


def _run_features(args) -> int:
    from pipeline import features, progress

    requests = features.plan_requests(args)
    model_cache = features.ModelCache()
    for request in requests:
        with progress.reporter(f"{request.backbone.name} {request.name}") as report:
            summary = features.compute_features(request, progress=report, models=model_cache)
        print(summary.describe())
    return 0


def _add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on a small generated sample with random weights",
        description=(
            "Generate a small Kaggle-layout sample and run the pipeline on it "
            "with random weights. It proves the installation works; it does "
            "not classify dogs."
        ),
    )
    parser.add_argument("--workdir", default="demo", help="folder for the sample and all outputs (default: %(default)s)")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from pipeline import demo

    return demo.run(args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Fine-grained image classification by transfer learning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_features_parser(subparsers)
    # Train, submit and predict parsers.
    _add_demo_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up notices are noise for users; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Other libraries log only warnings; this package's progress is INFO.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.handler(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
