"""Start measurement children and alternate the sides of a comparison."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from bench.child import RESULT_PREFIX

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class ChildFailed(RuntimeError):
    """A measurement child exited with an error; the message has its log's tail."""


@dataclasses.dataclass
class ChildResult:
    """One child's measurement.

    Attributes
    ----------
    wall_seconds : float
        From starting the interpreter to its exit, timed by the parent.
    peak_rss_mib : float
        The child's peak resident set size, in MiB.
    values : dict
        What the child measured inside.
    """

    wall_seconds: float
    peak_rss_mib: float
    values: dict


def run_child(kind: str, args: dict, log_dir: Path, label: str, env: dict | None = None) -> ChildResult:
    """Run ``python -m bench.child KIND JSON`` and return its result.

    The child's stderr goes to ``log_dir/label.log``.

    Raises
    ------
    ChildFailed
        If the child exits with a non-zero status or prints no result.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{label.replace(' ', '-')}.log"
    child_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    # The repository root goes first so the children import this checkout's
    # pipeline and bench packages.
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bench.child", kind, json.dumps(args)]

    logger.info("running %s", label)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT, env=child_env)
    wall = time.perf_counter() - started

    result_lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not result_lines:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise ChildFailed(
            f"{label} failed with exit status {completed.returncode}; the end of {log_path}:\n{tail}"
        )
    values = json.loads(result_lines[-1][len(RESULT_PREFIX):])
    return ChildResult(wall_seconds=wall, peak_rss_mib=values.pop("peak_rss_mib"), values=values)


def alternate(sides: list[str], repeats: int, measure: Callable[[str, int], object]) -> dict[str, list]:
    """Call ``measure(side, repeat)`` for every side, ``repeats`` times.

    The order of the sides rotates by one each repeat, so no side always
    runs first (on a cold disk cache) or last.
    """
    results = {side: [] for side in sides}
    for repeat in range(repeats):
        shift = repeat % len(sides)
        for side in sides[shift:] + sides[:shift]:
            results[side].append(measure(side, repeat))
    return results


def median(values) -> float:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else float("nan")
