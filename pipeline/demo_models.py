"""The train and submit part of ``make demo``: both classifiers on the demo's features."""

from __future__ import annotations

from pathlib import Path

#: LightGBM settings for the demo's few dozen images: the defaults need at
#: least 20 images per leaf and keep 64 PCA dimensions, sized for thousands.
DEMO_LIGHTGBM_OPTIONS = ["--min-data-in-leaf", "2", "--pca-components", "8"]


def run_train_and_submit(
    data: str | Path,
    features: str | Path,
    models: str | Path,
    workdir: str | Path,
    backbone: str = "inception_resnet_v2",
    folds: int = 2,
) -> int:
    """Train logreg and LightGBM with ``folds``-fold CV, write and validate a submission of each.

    Writes ``workdir/submission-<classifier>.csv``. Returns the exit status
    of the first command that fails, or 0.
    """
    from pipeline import cli
    from pipeline.submit import validate_submission_file

    for classifier in ("logreg", "lightgbm"):
        run = f"demo-{classifier}"
        options = DEMO_LIGHTGBM_OPTIONS if classifier == "lightgbm" else []
        status = cli.main(
            [
                "train",
                "--data", str(data),
                "--features", str(features),
                "--backbone", backbone,
                "--classifier", classifier,
                "--models", str(models),
                "--run", run,
                "--folds", str(folds),
                *options,
            ]
        )  # fmt: skip
        if status != 0:
            return status

        submission = Path(workdir) / f"submission-{classifier}.csv"
        status = cli.main(
            [
                "submit",
                "--data", str(data),
                "--features", str(features),
                "--models", str(models),
                "--run", run,
                "--output", str(submission),
            ]
        )  # fmt: skip
        if status != 0:
            return status
        frame = validate_submission_file(submission, data)
        print(f"{submission} is a valid submission: {len(frame)} rows, {frame.shape[1] - 1} breeds")
    return 0
