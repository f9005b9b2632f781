"""Command line of the benchmark: ``python -m bench`` (``make bench``).

Runs every comparison with both sides alternating in this invocation,
prints the report and writes it to ``docs/benchmarks.md``. Examples::

    python -m bench --data ../shared/data/dogs-dev --images 96
    python -m bench --sections train --full
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import features_bench, machine, report, train_bench
from bench.runner import median, run_child

logger = logging.getLogger("bench")

#: Side of the square matrices whose product measures the practical peak.
MATMUL_SIZE = 3072

SECTIONS = ("hardware", "decode", "variants", "features", "memory", "quality", "train")

#: Heading of the README paragraphs drafted from the measured numbers at the end of the report.
README_DRAFT_HEADING = "README draft"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/dogs-dev", help="Kaggle-layout folder of real photos (default: %(default)s)")
    parser.add_argument(
        "--images",
        type=int,
        default=96,
        help="images for the inception_resnet_v2 comparison; a multiple of 32 keeps padded batches out of "
        "the steady rate (default: %(default)s)",
    )
    parser.add_argument("--mobilenet-images", type=int, default=512, help="images for the mobilenet comparison and the small memory run (default: %(default)s)")
    parser.add_argument("--memory-images", type=int, default=0, help="images for the large memory run; 0 takes every image of train/ and test/ (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each features comparison (default: %(default)s)")
    parser.add_argument("--train-repeats", type=int, default=1, help="alternating repeats of the minutes-long train comparisons (default: %(default)s)")
    parser.add_argument("--mobilenet-weights", default="../shared/weights/mobilenet_2_5_224_tf_no_top.h5", help="real MobileNet (alpha 0.25) weights file (default: %(default)s)")
    parser.add_argument("--train-features", default="../shared/features", help="folder with BACKBONE/train.h5 of real embeddings for the train comparisons (default: %(default)s)")
    parser.add_argument("--train-backbone", default="efficientnet_lite0", help="backbone subfolder of --train-features (default: %(default)s)")
    parser.add_argument("--synthetic-images", type=int, default=10_000, help="rows of the synthetic train set, 1536 features and 120 classes (default: %(default)s, the Kaggle scale)")
    parser.add_argument("--full", action="store_true", help="run every fold of the naive train sides, naive LightGBM on the full-scale synthetic set included (hours on a 2-core machine)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--output", default="docs/benchmarks.md", help="Markdown report to write (default: %(default)s)")
    parser.add_argument("--workdir", help="folder for image links, features and child logs (default: a new temporary folder, removed at the end)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    data = Path(args.data)
    if not (data / "train").is_dir():
        print(f"error: {data}/train not found; point --data (make: BENCH_DATA) at a Kaggle-layout folder", file=sys.stderr)
        return 2
    sections = set(args.sections)
    needs_weights = sections & {"features", "memory", "quality"}
    if needs_weights and not Path(args.mobilenet_weights).is_file():
        print(f"error: MobileNet weights not found: {args.mobilenet_weights}; pass --mobilenet-weights or leave out the sections {', '.join(sorted(needs_weights))}", file=sys.stderr)
        return 2
    train_file = Path(args.train_features) / args.train_backbone / "train.h5"
    if "train" in sections and not train_file.is_file():
        print(f"error: real embeddings not found: {train_file}; pass --train-features and --train-backbone, or leave out the train section", file=sys.stderr)
        return 2
    if args.images < 64:
        print(f"error: --images must be at least 64, so the steady rate spans at least one batch after the first; got {args.images}", file=sys.stderr)
        return 2

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        text = run_sections(args, data, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    text = text.replace("{BENCH_MINUTES}", f"{minutes:.0f}")
    text = text.replace("{BENCH_END_LOAD}", ", ".join(f"{load:.1f}" for load in os.getloadavg()))

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {output} ({minutes:.1f} minutes)", file=sys.stderr)
    return 0


def run_sections(args, data: Path, work: Path) -> str:
    host = machine.describe_machine()
    findings = {}
    parts = [header(args, host)]
    sections = set(args.sections)

    if "hardware" in sections:
        parts.append(hardware_section(host, work, findings))
    if "decode" in sections:
        parts.append(decode_section(args, data, host, work, findings))
    if "variants" in sections:
        parts.append(variants_section(work, findings))
    if "features" in sections:
        parts.append(features_section(args, data, work, findings))
    if "memory" in sections:
        parts.append(memory_section(args, data, work, findings))
    if "quality" in sections:
        parts.append(quality_section(args, data, work, findings))
    if "train" in sections:
        parts.append(train_bench.train_section(args, data, work, findings))
    parts.append(speed_notes(findings))
    parts.append(gpu_section())
    parts.append(targets_section(findings))
    parts.append(readme_draft(findings, host))
    return "\n\n".join(parts) + "\n"


def header(args, host: machine.Machine) -> str:
    command = "python -m bench " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    libraries = ", ".join(f"{name} {version}" for name, version in host.libraries.items())
    clock = f"{host.nominal_ghz:.2f} GHz nominal" if host.nominal_ghz else "clock unknown"
    return "\n".join([
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`); do not edit by hand. Every comparison runs its sides "
        "in the same invocation, alternating, and reports the median with the range (min–max) over the "
        "repeats, because the machines are shared and timings are noisy. Each measurement that loads a "
        "model runs in a fresh process; its peak RSS is that process's `ru_maxrss`.",
        "",
        f"- Date: {datetime.date.today().isoformat()}; the whole run took {{BENCH_MINUTES}} minutes.",
        f"- Command: `{command}` (from `make bench`, run in the repository root).",
        f"- CPU: {host.cpu_model}, {host.cores} cores, {clock}; flags: {', '.join(host.flags) or 'none of note'}.",
        f"- Memory: {host.memory_gib:.1f} GiB. GPU: {host.gpu}.",
        f"- Load average (1, 5, 15 min) at the start: {', '.join(f'{load:.1f}' for load in os.getloadavg())}; "
        "at the end: {BENCH_END_LOAD}. Other processes on a shared machine slow every side alike.",
        f"- Python {host.python}; {libraries}.",
        f"- Data: `{args.data}`; the first N images are the first N ids of train/, then test/, in sorted order.",
    ])


def hardware_section(host: machine.Machine, work: Path, findings: dict) -> str:
    flops = run_child("flops", {"backbones": ["inception_resnet_v2", "mobilenet"]}, work / "logs", "flops").values
    matmul = run_child("matmul", {"n": MATMUL_SIZE, "repeats": 5}, work / "logs", "matmul").values["gflops"]
    findings["flops"] = {name: entry["flops"] for name, entry in flops["backbones"].items()}
    findings["matmul"] = matmul

    fp32_per_cycle = machine.fp32_flops_per_cycle(host)
    bf16_per_cycle = machine.bf16_flops_per_cycle(host)
    ghz = host.nominal_ghz or float("nan")
    fp32_peak = host.cores * ghz * fp32_per_cycle
    bf16_peak = host.cores * ghz * bf16_per_cycle if bf16_per_cycle else None
    findings["fp32_peak"] = fp32_peak
    findings["bf16_peak"] = bf16_peak

    flop_rows = [
        [name, entry["input_size"], entry["layers"], report.number(entry["flops"] / 1e9, 2)]
        for name, entry in flops["backbones"].items()
    ]
    peak_rows = [
        ["float32, nominal", f"{host.cores} × {ghz:.2f} GHz × {fp32_per_cycle}", report.number(fp32_peak, 0)],
        ["bfloat16 (AMX), nominal", f"{host.cores} × {ghz:.2f} GHz × {bf16_per_cycle}" if bf16_per_cycle else "no AMX",
         report.number(bf16_peak, 0)],
        [f"float32, NumPy matmul {MATMUL_SIZE}²", "measured, best of 5", report.number(matmul["numpy_float32"], 0)],
        [f"float32, TensorFlow matmul {MATMUL_SIZE}²", "measured, best of 5", report.number(matmul["tensorflow_float32"], 0)],
        [f"bfloat16, TensorFlow matmul {MATMUL_SIZE}²", "measured, best of 5", report.number(matmul["tensorflow_bfloat16"], 0)],
    ]
    return "\n".join([
        "## Hardware limit",
        "",
        "FLOPs per image are counted from the Keras model, layer by layer: 2 × multiply-adds of every "
        "convolution, depthwise convolution and dense layer (batch normalization, activations and pooling "
        "add well under 1% and are left out).",
        "",
        report.table(["backbone", "input px", "conv/dense layers", "GFLOPs per image"], flop_rows),
        "",
        "Peak estimate: cores × clock × FLOPs per cycle per core. float32 uses AVX-512 FMA: 16 lanes × 2 "
        "(multiply and add) × 2 FMA units = 64; bfloat16 uses the AMX tile unit, 1,024 per cycle (Intel's "
        "figure for Sapphire Rapids). The nominal clock is the TSC rate; under load the cores boost above "
        "it, and a virtual machine does not report by how much, so the nominal peaks are estimates that "
        "may be low. The measured matrix products (best of 5) are a practical ceiling on this machine at "
        "the time of the run: the TensorFlow products reached "
        f"{matmul['tensorflow_float32'] / fp32_peak:.0%} of the nominal float32 peak and "
        + (f"{matmul['tensorflow_bfloat16'] / bf16_peak:.0%} of the nominal AMX peak." if bf16_peak else "no AMX."),
        "",
        report.table(["peak", "how", "GFLOP/s"], peak_rows),
    ])


def decode_section(args, data: Path, host: machine.Machine, work: Path, findings: dict) -> str:
    count = max(args.mobilenet_images, 200)
    rates = features_bench.measure_decode(data, count, 299, args.repeats, host.cores, work)
    findings["decode"] = {label: median(values) for label, values in rates.items()}
    rows = [[label, report.spread(values, 0)] for label, values in rates.items()]
    return "\n".join([
        "## Decoding only",
        "",
        f"Read, decode and resize {count} real photos to 299 × 299, no model, {args.repeats} alternating "
        f"repeat{'s' if args.repeats != 1 else ''} (interpreter start-up excluded). The pipeline decodes JPEGs with Pillow's draft mode (DCT "
        "scaling) in a thread pool; `tf.data` decodes at full size.",
        "",
        report.table(["decoder", "images/s"], rows),
    ])


def variants_section(work: Path, findings: dict) -> str:
    results = features_bench.measure_variants("inception_resnet_v2", 3, work)
    findings["variants"] = {
        (settings, label): median(rates) for settings, values in results.items() for label, rates in values["rates"].items()
    }
    rows = [
        [settings, label, report.spread(rates, 2), report.number(values["first_call_seconds"][label], 1)]
        for settings, values in results.items()
        for label, rates in values["rates"].items()
    ]
    return "\n".join([
        "## Model only: precision, XLA, batch size, oneDNN and threads",
        "",
        "`inception_resnet_v2` (random weights, 299 px) as the features stage builds it, "
        "`predict_on_batch` on random pixels, no decoding, 3 rounds. Batch normalization is folded into the "
        "convolutions unless the variant says otherwise. The variants of one settings row "
        "alternate within one process; each other settings row is another process, run after it, so compare "
        "across them with more caution. XLA is Keras 3 `model.compile(jit_compile=True)`.",
        "",
        report.table(["settings", "variant", "images/s", "first call s (tracing, compiling)"], rows),
    ])


def features_section(args, data: Path, work: Path, findings: dict) -> str:
    random_sides = [
        features_bench.Side("ours float32", "ours", "inception_resnet_v2", "random", "float32"),
        features_bench.Side("ours bfloat16", "ours", "inception_resnet_v2", "random", "bfloat16"),
        features_bench.Side("naive float32", "naive", "inception_resnet_v2", "random"),
    ]
    irv2_throughput = features_bench.compare_throughput(random_sides, data, args.images, args.repeats, work)
    findings["irv2"] = {
        side.label: {"steady": median(irv2_throughput.steady_rates(side.label)), "ratio": median(irv2_throughput.ratios(side.label, "naive float32"))}
        for side in random_sides
    }

    weights = str(Path(args.mobilenet_weights).resolve())
    mobilenet_sides = [
        features_bench.Side("ours float32", "ours", "mobilenet", weights, "float32"),
        features_bench.Side("naive float32", "naive", "mobilenet", weights),
    ]
    mobilenet_throughput = features_bench.compare_throughput(mobilenet_sides, data, args.mobilenet_images, args.repeats, work)
    findings["mobilenet"] = {
        side.label: {"steady": median(mobilenet_throughput.steady_rates(side.label)), "ratio": median(mobilenet_throughput.ratios(side.label, "naive float32"))}
        for side in mobilenet_sides
    }
    findings["memory_small"] = {
        side.label: (mobilenet_throughput.count, median([result.peak_rss_mib for result in mobilenet_throughput.results[side.label]]))
        for side in mobilenet_sides
    }

    return "\n".join([
        "## Features stage on real photos",
        "",
        "Ours: `python -m pipeline features --images FOLDER` with the default batch size and decoding "
        "threads. Naive: `keras.utils.image_dataset_from_directory(FOLDER, labels=None, batch_size=32)` "
        "into one array, `preprocess_input`, then `model.predict(batch_size=32)`, as the Keras "
        "documentation shows. Both include decoding and resizing. *Steady* excludes start-up (interpreter, "
        "TensorFlow import, model build, first-call tracing), timed inside the process: ours from the end "
        "of the first batch to the end of the last, through the stage's progress callback. The naive "
        "approach decodes everything before predicting, so its steady time is the sum of both phases, each "
        "from the end of its first batch to the end of its last. "
        "*End-to-end* is images / the process's wall time, start-up included. *Achieved GFLOP/s* is steady "
        "images/s × the FLOPs per image above. The ratio is the median of the per-repeat ratios.",
        "",
        f"### inception_resnet_v2, random weights, 299 px: {irv2_throughput.count} images, {args.repeats} repeats",
        "",
        throughput_table_with_flops(irv2_throughput, findings.get("flops", {}).get("inception_resnet_v2")),
        "",
        peak_sentence(findings),
        "",
        f"### mobilenet (alpha 0.25), real weights, 224 px: {mobilenet_throughput.count} images, {args.repeats} repeats",
        "",
        throughput_table_with_flops(mobilenet_throughput, findings.get("flops", {}).get("mobilenet")),
    ])


def peak_sentence(findings: dict) -> str:
    """Say how far the inception_resnet_v2 rates are from the peaks of the hardware section."""
    if "flops" not in findings or "matmul" not in findings:
        return "Run the hardware section too to compare these rates with the peaks."
    flops = findings["flops"]["inception_resnet_v2"]
    parts = []
    for label, precision, nominal, measured in (
        ("ours float32", "float32", findings["fp32_peak"], findings["matmul"]["tensorflow_float32"]),
        ("ours bfloat16", "bfloat16", findings["bf16_peak"], findings["matmul"]["tensorflow_bfloat16"]),
    ):
        achieved = findings["irv2"][label]["steady"] * flops / 1e9
        share = f"{achieved / nominal:.0%} of the nominal {precision} peak" if nominal else "no nominal peak"
        parts.append(f"{precision} {achieved:.0f} GFLOP/s is {share} and {achieved / measured:.0%} of the measured {precision} matrix product")
    return "Against the hardware limit: " + "; ".join(parts) + "."


def throughput_table_with_flops(throughput, flops_per_image) -> str:
    return features_bench.throughput_table(throughput, "naive float32", flops_per_image)


def memory_section(args, data: Path, work: Path, findings: dict) -> str:
    weights = str(Path(args.mobilenet_weights).resolve())
    sides = [
        features_bench.Side("ours float32", "ours", "mobilenet", weights, "float32"),
        features_bench.Side("naive float32", "naive", "mobilenet", weights),
    ]
    count = args.memory_images or None
    folder, count = features_bench.first_images(data, count, work)
    by_label = {side.label: side for side in sides}
    results = {}
    for label in by_label:
        results[label] = features_bench.run_side(by_label[label], folder, work, f"memory-{label.replace(' ', '-')}")
    findings["memory_large"] = {label: (count, result.peak_rss_mib) for label, result in results.items()}

    small = findings.get("memory_small")
    if small is None:
        small_folder, small_count = features_bench.first_images(data, args.mobilenet_images, work)
        small = {
            label: (small_count, features_bench.run_side(side, small_folder, work, f"memory-small-{label.replace(' ', '-')}").peak_rss_mib)
            for label, side in by_label.items()
        }
        findings["memory_small"] = small

    rows = []
    for label in by_label:
        small_count, small_rss = small[label]
        large_count, large_rss = findings["memory_large"][label]
        rows.append([label, report.number(small_rss, 0), report.number(large_rss, 0), f"{large_rss / small_rss:.2f}"])
    small_count = next(iter(small.values()))[0]
    return "\n".join([
        "## Memory",
        "",
        f"Peak RSS of one process embedding the first {small_count} and all {count} images with mobilenet "
        "(real weights, float32). The features stage keeps a fixed window of decoded batches and appends "
        "each finished batch to a journal on disk; the naive approach holds every decoded image in memory "
        "as float32.",
        "",
        report.table(["side", f"peak RSS MiB, {small_count} images", f"peak RSS MiB, {count} images", "ratio"], rows),
    ])


def quality_section(args, data: Path, work: Path, findings: dict) -> str:
    weights = str(Path(args.mobilenet_weights).resolve())
    runs = features_bench.compute_quality_features(data, weights, work)
    scores = train_bench.score_feature_sets(data, runs)
    findings["quality"] = {**scores, "images": runs[0].images}

    reference = scores[("float32", "none")]
    rows = []
    for run in runs:
        score = scores[(run.precision, run.tta)]
        rows.append([
            run.precision,
            run.tta,
            f"{score['log_loss']:.4f}",
            f"{score['log_loss'] / reference['log_loss']:.3f}",
            f"{score['accuracy']:.3f}",
            score.get("cosine", "1 (reference)"),
            report.number(run.images / run.seconds, 0),
        ])
    return "\n".join([
        "## Feature quality: bfloat16 and flip TTA",
        "",
        f"mobilenet (alpha 0.25, real ImageNet weights) features of the {runs[0].images} labelled photos in "
        f"`{args.data}/train`, computed by the features stage in each setting (one run each), then the train "
        "stage's `logreg` with its defaults, 5-fold stratified CV (seed 0). Log loss is over all out-of-fold "
        "predictions. Cosine: mean (minimum) per image against float32 without TTA. Images/s is end to end, "
        "start-up included, one run.",
        "",
        report.table(["precision", "TTA", "CV log loss", "ratio to float32", "CV accuracy", "cosine to float32", "images/s"], rows),
    ])


def _rate_ratio(variants: dict, numerator: tuple, denominator: tuple) -> str:
    if numerator not in variants or denominator not in variants:
        return "n/a"
    return f"{variants[numerator] / variants[denominator]:.2f}×"


def speed_notes(findings: dict) -> str:
    """List the speed settings that were measured, with the ratio each gave."""
    lines = ["## Speed work: what was tried", ""]
    variants = findings.get("variants")
    if variants:
        base = "defaults"
        lines += [
            "Ratios are model-only images/s against the same precision at batch 16 with the defaults "
            "(the table above).",
            "",
            f"- XLA (`jit_compile=True`): float32 {_rate_ratio(variants, (base, 'float32, batch 16, XLA'), (base, 'float32, batch 16'))}, "
            f"bfloat16 {_rate_ratio(variants, (base, 'bfloat16, batch 16, XLA'), (base, 'bfloat16, batch 16'))}, "
            "and a much longer first call. The stage does not compile with XLA on a CPU.",
            f"- Folding batch normalization into the convolutions (the stage does): float32 "
            f"{_rate_ratio(variants, (base, 'float32, batch 16'), (base, 'float32, batch 16, batch norm not folded'))}, "
            f"bfloat16 {_rate_ratio(variants, (base, 'bfloat16, batch 16'), (base, 'bfloat16, batch 16, batch norm not folded'))} "
            "the rate without folding.",
            f"- Batch size, bfloat16: 8 gives {_rate_ratio(variants, (base, 'bfloat16, batch 8'), (base, 'bfloat16, batch 16'))}, "
            f"32 gives {_rate_ratio(variants, (base, 'bfloat16, batch 32'), (base, 'bfloat16, batch 16'))}.",
        ]
        for settings in features_bench.ENVIRONMENT_VARIANTS:
            lines.append(
                f"- {settings}: float32 {_rate_ratio(variants, (settings, 'float32, batch 16'), (base, 'float32, batch 16'))}, "
                f"bfloat16 {_rate_ratio(variants, (settings, 'bfloat16, batch 16'), (base, 'bfloat16, batch 16'))} "
                "(separate processes)."
            )
    irv2 = findings.get("irv2")
    if irv2:
        lines.append(
            f"- bfloat16 (`PRECISION=bfloat16`, Keras `mixed_bfloat16`, oneDNN with AVX512_BF16/AMX): "
            f"{irv2['ours bfloat16']['steady'] / irv2['ours float32']['steady']:.2f}× float32 for the whole stage."
        )
    decode = findings.get("decode")
    if decode and irv2:
        decode_rate = max(decode.values())
        model_rate = max(entry["steady"] for entry in irv2.values())
        lines.append(
            f"- Input pipeline: decoding alone ran at {decode_rate:.0f} images/s at 299 px, "
            f"{decode_rate / model_rate:.0f}× the fastest inception_resnet_v2 rate above. The stage decodes in "
            "a thread pool up to a few batches ahead of the model, so a deeper prefetch has nothing to gain "
            "there. For mobilenet the two rates are closer, and the decoding threads share the cores with "
            "the model."
        )
    lines.append(
        "- Keras backend: JAX is not installed in the CPU environment, so only TensorFlow was measured here; "
        "`bench/gpu.sh` uses JAX on a GPU."
    )
    return "\n".join(lines)


def gpu_section() -> str:
    return "\n".join([
        "## GPU",
        "",
        "`bench/gpu.sh` runs the features comparison on one GPU under `KERAS_BACKEND=jax` with bfloat16, "
        "batches of 256 and parallel decoding, on a machine with JAX and CUDA but no TensorFlow. "
        "**It has not been run**: no GPU machine was available for this report, so there is no GPU "
        "images/s figure and the target (4,000 images/s for inception_resnet_v2 on one H200) is unverified. "
        "`bash bench/gpu.sh --dry-run` prints what it would do.",
    ])


def targets_section(findings: dict) -> str:
    rows = []
    irv2 = findings.get("irv2")
    if irv2:
        float32_ratio = irv2["ours float32"]["ratio"]
        bf16_ratio = irv2["ours bfloat16"]["ratio"]
        rows.append(["inception_resnet_v2 float32, steady, vs naive", "≥ 1.0×", f"{float32_ratio:.2f}×", report.verdict(float32_ratio >= 1.0)])
        rows.append(["inception_resnet_v2 bfloat16, steady, vs naive float32", "≥ 1.6×", f"{bf16_ratio:.2f}×", report.verdict(bf16_ratio >= 1.6)])
    decode = findings.get("decode")
    if decode and irv2:
        decode_rate = max(decode.values())
        fastest = max(entry["steady"] for entry in irv2.values())
        rows.append([
            "decoding is not the bottleneck (299 px)",
            "decode rate ≫ model rate",
            f"{decode_rate:.0f} vs {fastest:.1f} images/s",
            report.verdict(decode_rate > 3 * fastest),
        ])
    if "memory_large" in findings and "memory_small" in findings:
        small_count, small_rss = findings["memory_small"]["ours float32"]
        large_count, large_rss = findings["memory_large"]["ours float32"]
        growth = large_rss / small_rss
        rows.append([f"peak RSS flat, {small_count} → {large_count} images", "grows < 10%", f"{growth:.2f}×", report.verdict(growth < 1.10)])
    rows += train_bench.target_rows(findings)
    rows.append(["GPU, inception_resnet_v2, one H200", "≥ 4,000 images/s", "not run", report.verdict(None)])
    return "\n".join([
        "## Targets",
        "",
        report.table(["target", "goal", "measured (median)", "verdict"], rows),
    ])


def cpu_features(host: machine.Machine) -> str:
    names = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX")) if host.has(flag)]
    if not names:
        return "neither AVX-512 nor AMX"
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def memory_sentence(findings: dict) -> str:
    if "memory_large" not in findings or "memory_small" not in findings:
        return ""
    small_count, small_rss = findings["memory_small"]["ours float32"]
    large_count, large_rss = findings["memory_large"]["ours float32"]
    naive_count, naive_rss = findings["memory_large"]["naive float32"]
    return (
        f"Its peak memory was {small_rss:,.0f} MiB for {small_count} images and {large_rss:,.0f} MiB for "
        f"{large_count}, against {naive_rss:,.0f} MiB for the naive approach on {naive_count}. "
    )


def readme_draft(findings: dict, host: machine.Machine) -> str:
    lines = [f"## {README_DRAFT_HEADING}", ""]
    irv2 = findings.get("irv2")
    quality = findings.get("quality")
    if irv2:
        lines.append(
            f"**Speed.** On a {host.cores}-core CPU with {cpu_features(host)}, the "
            "features stage embeds real photos with "
            f"`inception_resnet_v2` at {report.number(irv2['ours float32']['steady'])} images/s in float32 "
            f"({report.number(irv2['ours float32']['ratio'], 2)}× the approach of the Keras documentation, "
            "`image_dataset_from_directory` then `model.predict`) and "
            f"{report.number(irv2['ours bfloat16']['steady'])} images/s with `PRECISION=bfloat16` "
            f"({report.number(irv2['ours bfloat16']['ratio'], 2)}×, both measured in the same run), decoding "
            "included. " + memory_sentence(findings) + "See [docs/benchmarks.md](docs/benchmarks.md); `make bench` measures it on your machine."
        )
        lines.append("")
    if quality:
        reference = quality[("float32", "none")]["log_loss"]
        bf16 = quality[("bfloat16", "none")]["log_loss"]
        flip = quality[("float32", "flip")]["log_loss"]
        lines.append(
            "**Precision and TTA.** `PRECISION=auto` uses bfloat16 on a GPU and float32 on a CPU; "
            "`PRECISION=bfloat16` on a CPU with AVX512_BF16 or AMX is faster, and changed the 5-fold CV "
            f"log loss of logistic regression on mobilenet features of {quality['images']:,} photos from "
            f"{reference:.4f} to "
            f"{bf16:.4f} ({(bf16 / reference - 1) * 100:+.1f}%). `TTA=flip` averages each image's embedding "
            f"with its mirror's: it costs a second model pass per image and moved the same log loss to "
            f"{flip:.4f} ({(flip / reference - 1) * 100:+.1f}%). Both settings are recorded in each feature "
            "file, and submit rejects test features whose precision or TTA differs from the model's "
            "training features."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
