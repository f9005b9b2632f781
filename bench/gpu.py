"""Features benchmark on one GPU: ``python -m bench.gpu`` (started by ``bench/gpu.sh``).

Measures a backbone (``inception_resnet_v2`` by default) with random
weights in bfloat16 three ways: decoding only (the pipeline's Pillow
thread pool, one thread per core), the model only (``predict_on_batch`` on
random pixels), and the features stage end to end and in the steady state.
The images are real photos when a Kaggle-layout folder is given and
generated JPEGs otherwise. The smaller of the decoding and model rates
bounds the stage.

It needs Keras with a GPU backend (JAX here) but not TensorFlow: the naive
side of the CPU benchmark (``image_dataset_from_directory``) is a
TensorFlow function, so this run measures the features stage alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import features_bench, machine, report
from bench.runner import median, run_child

logger = logging.getLogger("bench.gpu")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="inception_resnet_v2", help="backbone, with random weights (default: %(default)s)")
    parser.add_argument("--data", help="Kaggle-layout folder of photos (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=8192, help="images to embed; 0 takes all of --data (default: %(default)s)")
    parser.add_argument("--generate", type=int, default=8192, help="JPEGs to generate when --data is not given (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads (default: the number of CPU cores)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the stage runs (default: %(default)s)")
    parser.add_argument("--output", default="docs/benchmarks-gpu.md", help="Markdown report to write (default: %(default)s)")
    parser.add_argument("--workdir", help="folder for images, outputs and logs (default: a temporary folder, removed at the end)")
    return parser


def generate_photos(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` 500 x 375 JPEGs (quality 90) of smooth random colour fields into ``folder/train``.

    The size is the median of the Kaggle dog photos; smooth content decodes
    about as fast as a photo, unlike white noise.
    """
    import numpy as np
    from PIL import Image

    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
        image.save(train / f"generated{index:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.images and args.images < 2 * args.batch_size:
        print(f"error: --images must be 0 or at least twice --batch-size ({args.batch_size}); got {args.images}", file=sys.stderr)
        return 2

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        if args.data:
            data = Path(args.data)
            source = f"real photos from `{data}`"
        else:
            data = work / "generated"
            if not (data / "train").is_dir():
                logger.info("generating %d JPEGs in %s", args.generate, data)
                generate_photos(data, args.generate)
            source = f"{args.generate} generated 500 × 375 JPEGs (no --data given)"
        text = measure(args, data, source, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    text = text.replace("{MINUTES}", f"{(time.perf_counter() - started) / 60:.1f}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(text)
    return 0


def measure(args, data: Path, source: str, work: Path) -> str:
    from pipeline import backbones

    host = machine.describe_machine()
    size = backbones.get_backbone(args.backbone).input_size
    folder, count = features_bench.first_images(data, args.images or None, work)
    decoded = run_child(
        "decode",
        {"folder": str(folder), "size": size, "method": "pipeline", "workers": args.workers},
        work / "logs",
        "decode",
    ).values
    decode_rate = decoded["images"] / decoded["seconds"]

    variant = {"precision": "bfloat16", "jit_compile": False, "batch_size": args.batch_size}
    model_only = run_child(
        "variants",
        {"backbone": args.backbone, "variants": {"bfloat16": variant}, "rounds": 5},
        work / "logs",
        "model",
    ).values
    model_rate = median(model_only["rates"]["bfloat16"])

    side = features_bench.Side(
        "ours bfloat16", "ours", args.backbone, "random", "bfloat16", batch_size=args.batch_size, workers=args.workers
    )
    throughput = features_bench.compare_throughput([side], data, count, args.repeats, work)
    steady = median(throughput.steady_rates(side.label))
    bound = "decoding" if decode_rate < model_rate else "the model"

    rows = [
        [f"decoding only, {args.workers} threads", report.number(decode_rate, 0)],
        [f"model only, bfloat16, batch {args.batch_size}", report.spread(model_only["rates"]["bfloat16"], 0)],
        [f"features stage, steady ({count} images, first batch excluded)", report.spread(throughput.steady_rates(side.label), 0)],
        [f"features stage, end to end ({count} images, start-up included)", report.spread(throughput.end_to_end_rates(side.label), 0)],
    ]
    return "\n".join([
        "# GPU benchmark",
        "",
        "Generated by `bench/gpu.sh` (`python -m bench.gpu`).",
        "",
        f"- Command: `python -m bench.gpu {' '.join(sys.argv[1:])}`; the run took {{MINUTES}} minutes.",
        f"- GPU: {host.gpu}. CPU: {host.cpu_model}, {host.cores} cores.",
        f"- Keras backend: {os.environ.get('KERAS_BACKEND', 'tensorflow')}; "
        + ", ".join(f"{name} {version}" for name, version in host.libraries.items()) + ".",
        f"- Data: {source}.",
        f"- {args.backbone}, random weights, {size} px, bfloat16, batch {args.batch_size}, {args.workers} decoding threads, "
        f"{args.repeats} repeat(s). First model call (compilation): {model_only['first_call_seconds']['bfloat16']:.1f} s.",
        "",
        report.table(["measurement", "images/s"], rows),
        "",
        f"Bound: {bound} (decoding {decode_rate:.0f} images/s against the model's {model_rate:.0f}). "
        f"Target: at least 4,000 images/s in the steady state: {report.verdict(steady >= 4000)} ({steady:.0f}).",
    ]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
