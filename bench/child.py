"""Measurements that run in a fresh process: ``python -m bench.child KIND JSON``.

The parent (:mod:`bench.run`) starts one child per measurement and times it
from the outside. The child does its work and prints one line
``BENCH-RESULT {json}`` on stdout, with its peak resident set size (RSS)
from ``getrusage`` and any numbers it measured inside.

Kinds
-----
ours
    The pipeline's command line, for example its features stage.
naive
    What the Keras documentation leads to: ``image_dataset_from_directory``
    into memory, then ``model.predict``.
decode
    Decoding and resizing only, no model.
flops
    Floating-point operations per image of each backbone, counted layer by
    layer.
matmul
    Achieved GFLOP/s of large matrix products, as a practical peak.
variants
    Model-only throughput of the backbone under compilation, precision and
    batch-size variants, alternated within the process.
train
    Cross-validation of a classifier, the train stage's way or the naive way.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH-RESULT "

#: Batch size of the naive approach, the default of ``model.predict`` and
#: ``image_dataset_from_directory``.
NAIVE_BATCH_SIZE = 32


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _steady_rate(marks: list[tuple[float, int]]) -> float | None:
    """Return images/s between the first and the last (time, images done) mark, or None."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])


def run_ours(args: dict) -> dict:
    """Run a pipeline command in this process, timing the features stage's batches.

    ``argv`` is parsed by the pipeline's own parser. For ``features`` the
    requests run as the command line runs them, with a progress callback
    that records when each batch is done; the steady rate counts from the
    end of the first batch (model build and first-call tracing excluded)
    to the end of the last.
    """
    from pipeline import cli, features

    argv = args["argv"]
    if argv[0] != "features":
        status = cli.main(argv)
        if status != 0:
            raise SystemExit(f"the pipeline command {argv[0]} exited with status {status}")
        return {}

    parsed = cli.build_parser().parse_args(argv)
    marks = []
    models = features.ModelCache()
    for request in features.plan_requests(parsed):
        features.compute_features(request, progress=lambda done, total: marks.append((time.perf_counter(), done)), models=models)
    return {"images": marks[-1][1] if marks else 0, "steady_rate": _steady_rate(marks)}


def _batch_end_recorder():
    """Return a Keras callback whose ``ends`` lists the end time of each predict batch."""
    import keras

    class BatchEndRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_predict_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    return BatchEndRecorder()


def run_naive(args: dict) -> dict:
    """Embed a folder the way the Keras documentation shows, all in memory.

    The two phases run one after the other, so the steady rate divides the
    images after the first batch by the sum of both phases' times from the
    end of their first batch to the end of their last.
    """
    import importlib

    import keras
    import numpy as np

    from pipeline import backbones

    backbone = backbones.get_backbone(args["backbone"])
    size = backbone.input_size
    dataset = keras.utils.image_dataset_from_directory(
        args["folder"], labels=None, image_size=(size, size), batch_size=NAIVE_BATCH_SIZE, shuffle=False
    )
    # Decoding is timed from the end of the first batch, like the predict
    # phase, so listing the files and starting tf.data count as start-up.
    batches, decode_ends = [], []
    for batch in dataset:
        batches.append(batch.numpy())
        decode_ends.append(time.perf_counter())
    pixels = np.concatenate(batches)

    application = importlib.import_module(f"keras.applications.{backbone.module}")
    model = getattr(application, backbone.constructor)(
        include_top=False,
        weights=None,
        input_shape=(size, size, 3),
        pooling="avg",
        **dict(backbone.kwargs),
    )
    if args["weights"] != "random":
        model.load_weights(args["weights"])
    batch_times = _batch_end_recorder()
    features = model.predict(
        application.preprocess_input(pixels), batch_size=NAIVE_BATCH_SIZE, verbose=0, callbacks=[batch_times]
    )

    count = int(features.shape[0])
    after_first = count - min(NAIVE_BATCH_SIZE, count)
    steady_rate = None
    if after_first > 0 and len(batch_times.ends) >= 2 and len(decode_ends) >= 2:
        decode_seconds = decode_ends[-1] - decode_ends[0]
        predict_seconds = batch_times.ends[-1] - batch_times.ends[0]
        steady_rate = after_first / (decode_seconds + predict_seconds)
    return {"images": count, "steady_rate": steady_rate}


def run_decode(args: dict) -> dict:
    """Time decoding and resizing of a list of files, by two methods.

    ``pipeline``: Pillow with JPEG draft mode in a thread pool of
    ``workers`` threads, as the features stage does. ``tensorflow``: the
    ``tf.io.decode_image`` and ``tf.image.resize`` calls that
    ``image_dataset_from_directory`` makes, in a ``tf.data`` map with
    ``AUTOTUNE`` parallelism.
    """
    import concurrent.futures

    from pipeline import images

    refs = images.list_images(args["folder"])
    size = args["size"]
    method = args["method"]
    if method == "tensorflow":
        import tensorflow as tf

    started = time.perf_counter()
    if method == "pipeline":
        with concurrent.futures.ThreadPoolExecutor(max_workers=args["workers"]) as pool:
            for _ in pool.map(lambda ref: images.decode_file(ref, size), refs):
                pass
    elif method == "tensorflow":

        def load(path):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            return tf.image.resize(image, (size, size), method="bilinear")

        paths = tf.data.Dataset.from_tensor_slices([ref.location for ref in refs])
        for _ in paths.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(32):
            pass
    else:
        raise SystemExit(f"unknown decode method {method!r}")
    seconds = time.perf_counter() - started
    return {"images": len(refs), "seconds": seconds}


def _layer_flops(layer) -> int:
    """Return 2 x the multiply-adds of one convolution or dense layer (0 for others)."""
    import math

    import keras

    name = type(layer).__name__
    if isinstance(layer, keras.layers.DepthwiseConv2D) or name == "DepthwiseConv2D":
        _, height, width, channels = layer.output.shape
        kernel_h, kernel_w = layer.kernel_size
        return 2 * height * width * channels * kernel_h * kernel_w
    if isinstance(layer, keras.layers.Conv2D):
        _, height, width, channels_out = layer.output.shape
        kernel_h, kernel_w = layer.kernel_size
        channels_in = layer.input.shape[-1] // layer.groups
        return 2 * height * width * channels_out * kernel_h * kernel_w * channels_in
    if isinstance(layer, keras.layers.Dense):
        return 2 * math.prod(layer.output.shape[1:]) * layer.input.shape[-1]
    return 0


def _model_flops(model) -> tuple[int, int]:
    """Return (convolution and dense FLOPs, number of those layers) of a model, nested models included."""
    import keras

    total, count = 0, 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner, inner_count = _model_flops(layer)
            total, count = total + inner, count + inner_count
            continue
        flops = _layer_flops(layer)
        total += flops
        count += flops > 0
    return total, count


def run_flops(args: dict) -> dict:
    """Count FLOPs per image of each backbone at its default input size."""
    import importlib

    from pipeline import backbones

    counts = {}
    for name in args["backbones"]:
        backbone = backbones.get_backbone(name)
        application = importlib.import_module(f"keras.applications.{backbone.module}")
        model = getattr(application, backbone.constructor)(
            include_top=False,
            weights=None,
            input_shape=(backbone.input_size, backbone.input_size, 3),
            pooling="avg",
            **dict(backbone.kwargs),
        )
        flops, layers = _model_flops(model)
        counts[name] = {"flops": flops, "layers": layers, "input_size": backbone.input_size}
    return {"backbones": counts}


def run_matmul(args: dict) -> dict:
    """Measure GFLOP/s of square matrix products in NumPy (float32) and TensorFlow (float32, bfloat16)."""
    import numpy as np

    n = args["n"]
    results = {}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3

    def best_rate(function, repeats):
        function()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
        return flops / min(times) / 1e9

    results["numpy_float32"] = best_rate(lambda: a @ b, args["repeats"])

    import tensorflow as tf

    for dtype in ("float32", "bfloat16"):
        x = tf.constant(a, dtype=dtype)
        y = tf.constant(b, dtype=dtype)
        product = tf.function(lambda: tf.reduce_sum(tf.cast(tf.linalg.matmul(x, y)[0, 0], tf.float32)))
        results[f"tensorflow_{dtype}"] = best_rate(lambda: product().numpy(), args["repeats"])
    return {"gflops": results, "n": n}


def run_variants(args: dict) -> dict:
    """Time ``predict_on_batch`` of the pipeline's model under several variants, alternating.

    Each variant is ``{"precision", "jit_compile", "batch_size"}`` and
    optionally ``"fold_batch_norm": False`` to build the model without
    folding batch normalization into the convolutions. The
    first call of each variant (tracing, XLA compilation) is timed apart.
    """
    import numpy as np

    from pipeline import backbones

    backbone = backbones.get_backbone(args["backbone"])
    weights = backbones.resolve_weights(backbone, "random")
    size = backbone.input_size
    rng = np.random.default_rng(0)

    fold_batch_norm = backbones._fold_batch_norm
    models, first_call = {}, {}
    for key, variant in args["variants"].items():
        folded = variant.get("fold_batch_norm", True)
        model_key = (variant["precision"], variant["jit_compile"], folded)
        if model_key not in models:
            # The unfolded variant measures what folding batch normalization gains.
            backbones._fold_batch_norm = fold_batch_norm if folded else (lambda network: network)
            model = backbones.build_model(backbone, weights, size, variant["precision"])
            backbones._fold_batch_norm = fold_batch_norm
            if variant["jit_compile"]:
                model.compile(jit_compile=True)
            models[model_key] = model
        pixels = rng.integers(0, 256, (variant["batch_size"], size, size, 3), dtype=np.uint8)
        started = time.perf_counter()
        models[model_key].predict_on_batch(pixels)
        first_call[key] = time.perf_counter() - started

    rates = {key: [] for key in args["variants"]}
    for _ in range(args["rounds"]):
        for key, variant in args["variants"].items():
            model = models[(variant["precision"], variant["jit_compile"], variant.get("fold_batch_norm", True))]
            pixels = rng.integers(0, 256, (variant["batch_size"], size, size, 3), dtype=np.uint8)
            started = time.perf_counter()
            model.predict_on_batch(pixels)
            rates[key].append(variant["batch_size"] / (time.perf_counter() - started))
    return {"rates": rates, "first_call_seconds": first_call}


def _training_data(args: dict):
    """Return the train stage's TrainingData for real embeddings or a synthetic set."""
    import numpy as np

    from pipeline import train

    if args["dataset"] == "real":
        return train.load_training_data(Path(args["data"]), Path(args["features"]), [args["backbone"]])
    from pipeline import synthetic_features

    shape = args["synthetic"]
    features, labels = synthetic_features.make_features(
        shape["images"], shape["features"], shape["classes"], separation=shape["separation"], seed=0
    )
    ids = np.array([f"synthetic{row:05d}" for row in range(len(labels))])
    classes = [f"class{label:03d}" for label in range(shape["classes"])]
    return train.TrainingData(ids=ids, features=features, labels=labels, classes=classes, sources=[])


def _naive_estimator(classifier: str, rounds: int | None = None):
    """Return the library's classifier with its defaults, LightGBM stopped after ``rounds`` if given."""
    if classifier == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression()
    from lightgbm import LGBMClassifier

    # verbose=-1 only silences LightGBM's per-tree warnings; the model is the default one.
    if rounds is None:
        return LGBMClassifier(verbose=-1)
    return LGBMClassifier(verbose=-1, n_estimators=rounds)


def run_train(args: dict) -> dict:
    """Cross-validate one classifier, the train stage's way or the naive way, and time it.

    ``side`` is ``ours`` (the train stage's ``cross_validate`` with the
    classifier's defaults, then the final refit) or ``naive`` (the
    library's estimator with its defaults on the raw features, in the same
    stratified folds). Returns the CV and refit seconds and the out-of-fold
    log loss.
    """
    import numpy as np
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import StratifiedKFold

    from pipeline import classifiers, train

    data = _training_data(args)
    classifier, folds, seed = args["classifier"], args["folds"], args["seed"]
    n_classes = len(data.classes)
    result = {"images": int(len(data.labels)), "features": int(data.features.shape[1]), "classes": n_classes}

    started = time.perf_counter()
    if args["side"] == "ours":
        params = classifiers.resolve_params(classifier, {})
        oof, _, fold_metrics = train.cross_validate(data, classifier, params, folds, seed)
        result["cv_seconds"] = time.perf_counter() - started
        infos = [{key: value for key, value in metrics.items() if key in ("rounds", "iterations")} for metrics in fold_metrics]
        result["fold_fit"] = infos
        if args["refit"]:
            started = time.perf_counter()
            model = classifiers.build_classifier(classifier, params, seed=seed)
            model.fit(data.features, data.labels, n_classes, rounds=classifiers.final_rounds(classifier, fold_metrics))
            result["refit_seconds"] = time.perf_counter() - started
    else:
        # Slow naive fits may run only the first folds, and LightGBM only its
        # first rounds: the CV time is then scaled up to all folds and rounds,
        # and the log loss covers the scored rows (none when rounds are cut).
        folds_run = min(args.get("max_folds") or folds, folds)
        rounds = args.get("naive_rounds") if classifier == "lightgbm" else None
        default_rounds = _naive_estimator(classifier).get_params().get("n_estimators")
        oof = np.zeros((len(data.labels), n_classes))
        scored = np.zeros(len(data.labels), dtype=bool)
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        fold_seconds = []
        for fold, (train_rows, test_rows) in enumerate(splitter.split(data.features, data.labels)):
            if fold == folds_run:
                break
            fold_started = time.perf_counter()
            estimator = _naive_estimator(classifier, rounds)
            if rounds:
                # Time each round, so start-up (binning the features) is not scaled with the rounds.
                round_ends = []
                estimator.fit(
                    data.features[train_rows],
                    data.labels[train_rows],
                    callbacks=[lambda env: round_ends.append(time.perf_counter())],
                )
                per_round = (round_ends[-1] - round_ends[0]) / max(len(round_ends) - 1, 1)
                fold_seconds.append(round_ends[0] - fold_started + per_round * (default_rounds - 1))
            else:
                estimator.fit(data.features[train_rows], data.labels[train_rows])
            oof[np.ix_(test_rows, estimator.classes_)] = estimator.predict_proba(data.features[test_rows])
            scored[test_rows] = True
            if not rounds:
                fold_seconds.append(time.perf_counter() - fold_started)
        result["cv_seconds"] = float(np.mean(fold_seconds)) * folds
        result["folds_run"] = folds_run
        result["rounds_run"] = rounds
        if args["refit"] and folds_run == folds and rounds is None:
            started = time.perf_counter()
            _naive_estimator(classifier).fit(data.features, data.labels)
            result["refit_seconds"] = time.perf_counter() - started

    labels = data.labels
    if args["side"] != "ours":
        if result["rounds_run"]:
            return result
        oof, labels = oof[scored], labels[scored]
    oof = np.clip(oof, 1e-15, None)
    oof /= oof.sum(axis=1, keepdims=True)
    result["log_loss"] = float(log_loss(labels, oof, labels=np.arange(n_classes)))
    result["accuracy"] = float(accuracy_score(labels, oof.argmax(axis=1)))
    return result


KINDS = {
    "ours": run_ours,
    "naive": run_naive,
    "decode": run_decode,
    "flops": run_flops,
    "matmul": run_matmul,
    "variants": run_variants,
    "train": run_train,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in KINDS:
        print(f"usage: python -m bench.child {{{','.join(KINDS)}}} JSON", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The pipeline's log lines (folds, rounds, warnings) go to the child's log file.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    result = KINDS[argv[0]](json.loads(argv[1]))
    result["seconds_in_child"] = time.perf_counter() - started
    result["peak_rss_mib"] = _peak_rss_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
