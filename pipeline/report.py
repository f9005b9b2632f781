"""Write a run's report: ``report.md`` and the confusion-matrix figure ``confusion.png``.

Everything in the report comes from the out-of-fold probabilities, so each
image is judged by a model that did not train on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.model_bundle import write_text_atomic

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
FIGURE_NAME = "confusion.png"
#: How many confused breed pairs the report lists.
TOP_CONFUSED = 15


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Return counts of shape (n_classes, n_classes): rows true, columns predicted."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def most_confused_pairs(matrix: np.ndarray, classes: list, top: int = TOP_CONFUSED) -> list[tuple]:
    """Return (true breed, predicted breed, count, share of the true breed) for the largest off-diagonal counts."""
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(off_diagonal, axis=None, kind="stable")[::-1]
    pairs = []
    totals = matrix.sum(axis=1)
    for flat in order[:top]:
        true, predicted = np.unravel_index(flat, matrix.shape)
        count = int(off_diagonal[true, predicted])
        if count == 0:
            break
        pairs.append((classes[true], classes[predicted], count, count / max(totals[true], 1)))
    return pairs


def plot_confusion(matrix: np.ndarray, classes: list, path: Path, title: str) -> None:
    """Save the row-normalized confusion matrix as a PNG image."""
    from matplotlib.figure import Figure

    totals = matrix.sum(axis=1, keepdims=True)
    shares = matrix / np.maximum(totals, 1)
    n_classes = len(classes)
    side = min(max(6.0, 0.12 * n_classes + 3.0), 24.0)
    figure = Figure(figsize=(side, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    font_size = max(3.0, min(9.0, 600.0 / max(n_classes, 1)))
    axes.set_xticks(range(n_classes), classes, rotation=90, fontsize=font_size)
    axes.set_yticks(range(n_classes), classes, fontsize=font_size)
    axes.set_xlabel("predicted breed")
    axes.set_ylabel("true breed")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.6, label="share of the true breed's images")
    tmp_path = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(tmp_path, dpi=100)
    tmp_path.replace(path)


def write_report(
    run_dir: Path,
    *,
    run: str,
    classes: list,
    labels: np.ndarray,
    probabilities: np.ndarray,
    table: str,
    config: dict,
    sources: list,
    fit_seconds: float,
) -> Path:
    """Write ``report.md`` and ``confusion.png`` into ``run_dir``.

    Parameters
    ----------
    labels : ndarray of int, shape (n_images,)
    probabilities : ndarray of float, shape (n_images, n_classes)
        Out-of-fold probabilities in ``classes`` order.
    table : str
        The per-fold metrics table as plain text.
    """
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, len(classes))
    plot_confusion(matrix, classes, run_dir / FIGURE_NAME, f"{run}: out-of-fold confusion matrix")

    lines = [f"# Run {run}", ""]
    lines += [
        f"- classifier: {config['classifier']}",
        f"- parameters: {', '.join(f'{key}={value}' for key, value in config['params'].items())}",
        f"- features: {', '.join(_describe_source(source) for source in sources)}",
        f"- training images: {len(labels)}, breeds: {len(classes)}",
        f"- {config['folds']}-fold stratified cross-validation, seed {config['seed']}",
        f"- fit time (cross-validation and final model): {fit_seconds:.1f} s",
        "",
        "## Cross-validation",
        "",
        "```",
        table,
        "```",
        "",
        "## Confusion matrix",
        "",
        "Rows are true breeds and columns predicted breeds; each row is scaled to its breed's image count.",
        "",
        f"![confusion matrix]({FIGURE_NAME})",
        "",
        "## Most confused breed pairs",
        "",
    ]
    pairs = most_confused_pairs(matrix, classes)
    if pairs:
        lines += ["| true breed | predicted as | images | share of true breed |", "|---|---|---:|---:|"]
        lines += [f"| {true} | {wrong} | {count} | {share:.0%} |" for true, wrong, count, share in pairs]
    else:
        lines.append("No image was misclassified.")

    lines += ["", "## Per-breed accuracy", "", "Worst first.", ""]
    lines += ["| breed | images | accuracy | mean log loss |", "|---|---:|---:|---:|"]
    totals = matrix.sum(axis=1)
    correct = np.diag(matrix)
    rows = np.arange(len(labels))
    true_probability = np.clip(probabilities[rows, labels], 1e-15, 1.0)
    for k in np.lexsort((np.arange(len(classes)), correct / np.maximum(totals, 1))):
        mask = labels == k
        mean_loss = float(-np.log(true_probability[mask]).mean()) if mask.any() else float("nan")
        lines.append(f"| {classes[k]} | {totals[k]} | {correct[k] / max(totals[k], 1):.2f} | {mean_loss:.3f} |")

    path = run_dir / REPORT_NAME
    write_text_atomic(path, "\n".join(lines) + "\n")
    logger.info("wrote %s", path)
    return path


def _describe_source(source: dict) -> str:
    details = [f"{source['width']}-d"]
    for key in ("weights", "input_size", "precision", "tta"):
        if key in source:
            details.append(f"{key} {source[key]}")
    return f"{source['backbone']} ({', '.join(details)})"
