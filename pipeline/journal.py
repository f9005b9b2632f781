"""Crash-safe progress of a features run, kept beside its output file.

While a run computes ``features/<backbone>/train.h5`` it appends results to a
hidden folder ``features/<backbone>/.train.h5.partial/``:

``manifest.json``
    What is being computed (backbone, weights, image list digest, batch
    size, feature width). Written once, atomically.
``features.bin``
    float32 rows of width n_features, one per image in sorted id order;
    skipped images have a row of zeros.
``status.bin``
    One byte per image: 0 decoded, 1 skipped.
``skipped.tsv``
    ``index<TAB>id<TAB>reason`` for each skipped image.

Appends to regular files survive ``kill -9`` up to the last completed
``write``. On resume both files are cut back to the last whole batch. The
resumed run then computes the same batches as an uninterrupted run would, so
it ends with identical features. A machine crash (power loss)
may lose more, because the files are not fsynced after every batch.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

OK = 0
SKIPPED = 1


def partial_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


class OutputLock:
    """An exclusive lock on an output file, released when the process dies.

    Uses ``flock`` on a hidden file beside the output, so a second run on
    the same output fails at once instead of corrupting it.
    """

    def __init__(self, output: Path):
        self.path = output.with_name(f".{output.name}.lock")
        self._handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            output = self.path.with_name(self.path.name[1:-len(".lock")])
            raise PipelineError(
                f"Another run (process {owner}) is writing {output}. Wait for it "
                f"to finish or stop it; two runs cannot write the same file."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info):
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


class Journal:
    """Append-only record of the rows computed so far for one output file."""

    def __init__(self, output: Path, manifest: dict, n_images: int):
        self.folder = partial_dir(output)
        self.manifest = manifest
        self.n_images = n_images
        self.n_features = int(manifest["n_features"])
        self.batch_size = int(manifest["batch_size"])
        self._row_bytes = 4 * self.n_features
        self._features = None
        self._status = None
        self._skipped = None

    # --- opening -----------------------------------------------------------

    @staticmethod
    def read_manifest(output: Path) -> dict | None:
        """Return the manifest of an interrupted run, or None if there is none."""
        path = partial_dir(output) / "manifest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            # A manifest is written atomically, so a damaged one means the
            # folder was not written by this pipeline; the run starts over.
            logger.warning("ignoring the unreadable partial run in %s (%s)", path.parent, error)
            return None

    @staticmethod
    def has_rows(output: Path) -> bool:
        """Return whether an interrupted run for ``output`` finished at least one batch."""
        try:
            return (partial_dir(output) / "features.bin").stat().st_size > 0
        except FileNotFoundError:
            return False

    def start(self, resume: bool) -> int:
        """Open the journal for appending and return the number of images done.

        With ``resume`` the existing rows are kept, cut back to the last
        whole batch; otherwise the folder is cleared first.
        """
        if not resume and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.exists():
            tmp = manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))
            os.replace(tmp, manifest_path)

        features_path = self.folder / "features.bin"
        status_path = self.folder / "status.bin"
        skipped_path = self.folder / "skipped.tsv"
        for path in (features_path, status_path, skipped_path):
            path.touch()

        rows = features_path.stat().st_size // self._row_bytes
        done = min(rows, status_path.stat().st_size, self.n_images)
        if done < self.n_images:
            done -= done % self.batch_size
        os.truncate(features_path, done * self._row_bytes)
        os.truncate(status_path, done)
        self._rewrite_skipped(skipped_path, done)

        self._features = open(features_path, "ab")
        self._status = open(status_path, "ab")
        self._skipped = open(skipped_path, "a", encoding="utf-8")
        return done

    def _rewrite_skipped(self, path: Path, done: int) -> None:
        kept_lines = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            parts = line.rstrip("\n").split("\t", 2)
            if line.endswith("\n") and len(parts) == 3 and parts[0].isdigit() and int(parts[0]) < done:
                kept_lines.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept_lines), encoding="utf-8")
        os.replace(tmp, path)

    # --- appending ---------------------------------------------------------

    def append(self, start: int, rows: np.ndarray, status: np.ndarray, skipped: list) -> None:
        """Append a batch: rows (n, n_features), status (n,) and (index, id, reason) tuples.

        The skipped reasons and the status bytes are written before the rows,
        because the row count decides how many images are done.
        """
        for index, image_id, reason in skipped:
            self._skipped.write(f"{index}\t{image_id}\t{reason}\n")
        self._skipped.flush()
        self._status.write(np.asarray(status, dtype=np.uint8).tobytes())
        self._status.flush()
        self._features.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        self._features.flush()

    def close(self) -> None:
        for handle in (self._features, self._status, self._skipped):
            if handle is not None:
                handle.close()
        self._features = self._status = self._skipped = None

    # --- reading back ------------------------------------------------------

    def status(self) -> np.ndarray:
        return np.fromfile(self.folder / "status.bin", dtype=np.uint8)

    def skipped(self) -> list[tuple[str, str]]:
        """Return (id, reason) of each skipped image, in id order."""
        result = []
        for line in (self.folder / "skipped.tsv").read_text(encoding="utf-8").splitlines():
            _, image_id, reason = line.split("\t", 2)
            result.append((image_id, reason))
        return result

    def row_blocks(self, block_rows: int = 4096):
        """Yield the rows of decoded images in order, ``block_rows`` at a time."""
        matrix = np.memmap(self.folder / "features.bin", dtype=np.float32, mode="r").reshape(-1, self.n_features)
        status = self.status()
        for start in range(0, len(matrix), block_rows):
            stop = start + block_rows
            keep = status[start:stop] == OK
            yield np.asarray(matrix[start:stop][keep])
        del matrix

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
