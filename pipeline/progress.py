"""Progress display for the command line: a bar on a terminal, log lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

logger = logging.getLogger("pipeline")

#: Seconds between progress log lines when stderr is not a terminal.
LOG_INTERVAL = 30.0


@contextlib.contextmanager
def reporter(description: str):
    """Yield a callable ``update(done, total)`` that shows progress in images."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = None

        def update(done, total):
            nonlocal bar
            if bar is None:
                # Images done by an earlier, interrupted run are the bar's
                # initial value, so they do not count in images/s.
                bar = tqdm(total=total, initial=done, desc=description, unit="img", dynamic_ncols=True)
                return
            bar.update(done - bar.n)

        try:
            yield update
        finally:
            if bar is not None:
                bar.close()
        return

    state = {"last": 0.0, "first": None}

    def update(done, total):
        now = time.perf_counter()
        if state["first"] is None:
            state["first"] = (now, done)
            state["last"] = now
            return
        if now - state["last"] < LOG_INTERVAL and done < total:
            return
        state["last"] = now
        start_time, start_done = state["first"]
        rate = (done - start_done) / max(now - start_time, 1e-9)
        left = (total - done) / rate if rate > 0 else float("inf")
        logger.info("%s: %d/%d images, %.1f images/s, %.0f s left", description, done, total, rate, left)

    yield update
