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


def _add_train_parser(subparsers) -> None:
    from pipeline import backbones, classifiers

    parser = subparsers.add_parser(
        "train",
        help="cross-validate a classifier on cached features and save the model",
        description=(
            "Read DATA/labels.csv and FEATURES/BACKBONE/train.h5, run stratified "
            "k-fold cross-validation, fit the final model on all labelled images "
            "and write MODELS/RUN/ (model.joblib, oof.csv, report.md) plus a row "
            "of MODELS/experiments.csv."
        ),
    )
    parser.add_argument("--data", default="data", help="folder with labels.csv (default: %(default)s)")
    parser.add_argument("--features", default="features", help="folder with BACKBONE/train.h5 (default: %(default)s)")
    parser.add_argument(
        "--backbone",
        default=backbones.DEFAULT_BACKBONE,
        help="backbone name, or several separated by commas or spaces; their features are "
        "joined by image id and concatenated in this order (default: %(default)s)",
    )
    parser.add_argument(
        "--classifier",
        default=classifiers.DEFAULT_CLASSIFIER,
        choices=list(classifiers.CLASSIFIERS),
        help="classifier (default: %(default)s)",
    )
    parser.add_argument("--models", default="models", help="output folder of all runs (default: %(default)s)")
    parser.add_argument("--run", help="name of the run's folder (default: BACKBONE-CLASSIFIER)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold split and the models (default: %(default)s)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="folds fitted at once in worker processes; 0 means one per CPU core (default: %(default)s)",
    )
    for name, parameters in classifiers.CLASSIFIERS.items():
        group = parser.add_argument_group(f"{name} parameters")
        for parameter in parameters:
            group.add_argument(
                parameter.option,
                dest=parameter.name,
                type=parameter.kind,
                default=argparse.SUPPRESS,
                help=f"{parameter.help} (default: {parameter.default})",
            )
    parser.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    from pathlib import Path

    from pipeline import classifiers, train

    overrides = {name: getattr(args, name) for name in classifiers.all_parameters() if hasattr(args, name)}
    config = train.TrainConfig(
        data=Path(args.data),
        features=Path(args.features),
        backbones=[args.backbone],
        classifier=args.classifier,
        models=Path(args.models),
        run=args.run,
        folds=args.folds,
        seed=args.seed,
        params=overrides,
        jobs=args.jobs,
    )
    result = train.train(config)
    print(result.metrics_table())
    print(
        f"run {result.run}: CV log loss {result.summary['log_loss_mean']:.4f} "
        f"± {result.summary['log_loss_std']:.4f}, accuracy {result.summary['accuracy_mean']:.4f} "
        f"± {result.summary['accuracy_std']:.4f}, fit time {result.fit_seconds:.1f} s"
    )
    print(f"wrote {result.run_dir}/ (model.joblib, oof.csv, {result.report_path.name})")
    return 0


def _add_submit_parser(subparsers) -> None:
    from pipeline import submit

    parser = subparsers.add_parser(
        "submit",
        help="write test-set probabilities of a trained run as a Kaggle submission",
        description=(
            "Predict FEATURES/BACKBONE/test.h5 with a trained run and write the "
            "probabilities in the columns and row order of DATA/sample_submission.csv."
        ),
    )
    parser.add_argument("--data", default="data", help="folder with sample_submission.csv (default: %(default)s)")
    parser.add_argument("--features", default="features", help="folder with BACKBONE/test.h5 (default: %(default)s)")
    parser.add_argument("--models", default="models", help="folder of the runs (default: %(default)s)")
    parser.add_argument("--run", help="run to use (default: the most recently trained run in --models)")
    parser.add_argument("--output", default="submission.csv", help="submission file to write (default: %(default)s)")
    parser.add_argument(
        "--clip",
        type=float,
        default=submit.DEFAULT_CLIP,
        help="clip probabilities to [CLIP, 1 - CLIP] before renormalising each row (default: %(default)s)",
    )
    parser.set_defaults(handler=_run_submit)


def _run_submit(args) -> int:
    from pipeline import submit

    result = submit.submit(args.data, args.features, args.models, args.run, args.output, args.clip)
    note = f", {len(result.without_features)} without features" if result.without_features else ""
    print(f"wrote {result.path}: {result.n_rows} rows from run {result.run}{note}")
    return 0


def _add_predict_parser(subparsers) -> None:
    from pipeline import predict

    parser = subparsers.add_parser(
        "predict",
        help="print the top breeds of photos with a trained run",
        description=(
            "Embed each photo with the backbones and weights a run was trained on "
            "and print its most probable breeds."
        ),
    )
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="image files")
    parser.add_argument("--models", default="models", help="folder of the runs (default: %(default)s)")
    parser.add_argument("--run", help="run to use (default: the most recently trained run in --models)")
    parser.add_argument("--top", type=int, default=predict.DEFAULT_TOP, help="breeds to print per photo (default: %(default)s)")
    parser.add_argument(
        "--weights",
        help="weights file for a run whose weights are not the Keras ImageNet file "
        "(default: the weights the run was trained with)",
    )
    parser.set_defaults(handler=_run_predict)


def _run_predict(args) -> int:
    from pipeline import predict

    predictions, failures = predict.predict_photos(
        args.photos, models=args.models, run=args.run, top=args.top, weights=args.weights
    )
    for prediction in predictions:
        print(prediction.path)
        for breed, probability in zip(prediction.breeds, prediction.probabilities):
            print(f"  {probability:.4f}  {breed}")
    for path, reason in failures.items():
        print(f"{path}: could not be read: {reason}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Fine-grained image classification by transfer learning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_features_parser(subparsers)
    # Train, submit and predict parsers.
    _add_train_parser(subparsers)
    _add_submit_parser(subparsers)
    _add_predict_parser(subparsers)
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
