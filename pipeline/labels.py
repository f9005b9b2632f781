"""Read and check ``labels.csv`` (columns ``id`` and ``breed``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

#: How many offending ids or files an error message lists before "...".
MAX_LISTED = 5


def format_examples(values, limit: int = MAX_LISTED) -> str:
    """Join the first ``limit`` values for a message, noting how many more there are."""
    values = [str(value) for value in values]
    text = ", ".join(values[:limit])
    if len(values) > limit:
        text += f", ... ({len(values) - limit} more)"
    return text


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``labels.csv`` and check it.

    Returns
    -------
    DataFrame with string columns ``id`` and ``breed``, one row per image,
    in file order.

    Raises
    ------
    PipelineError
        If the file is missing, lacks the columns, repeats an id or has an
        empty id or breed.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"Labels file not found: {path}. Set DATA (--data) to the folder "
            f"that contains labels.csv with columns id,breed."
        )
    try:
        labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is not a readable CSV file: {error}") from None

    missing = [column for column in ("id", "breed") if column not in labels.columns]
    if missing:
        raise PipelineError(
            f"{path} has no column {' or '.join(repr(column) for column in missing)}; "
            f"found {list(labels.columns)}. labels.csv needs the header id,breed."
        )
    labels = labels[["id", "breed"]].copy()
    labels["id"] = labels["id"].str.strip()
    labels["breed"] = labels["breed"].str.strip()

    empty_ids = (labels.index[labels["id"] == ""] + 2).tolist()
    if empty_ids:
        raise PipelineError(
            f"{path} has {len(empty_ids)} rows with an empty id: lines "
            f"{format_examples(empty_ids)}. Fill in the image id or delete those rows."
        )

    duplicated = labels["id"][labels["id"].duplicated(keep="first")].unique()
    if len(duplicated):
        raise PipelineError(
            f"{path} lists {len(duplicated)} ids more than once: "
            f"{format_examples(duplicated)}. Keep one row per image id."
        )

    empty = labels["id"][labels["breed"] == ""].tolist()
    if empty:
        raise PipelineError(
            f"{path} has {len(empty)} rows with an empty breed: ids "
            f"{format_examples(empty)}. Fill in the breed or delete those rows."
        )

    logger.debug("read %d labels of %d breeds from %s", len(labels), labels["breed"].nunique(), path)
    return labels
