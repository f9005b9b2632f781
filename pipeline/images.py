"""Find images and decode them into fixed-size RGB arrays.

Decoding uses Pillow, which reads JPEG, PNG, BMP, GIF, TIFF and WebP
by their content, whatever the file extension, and releases the GIL while it decodes
and resizes, so a thread pool decodes in parallel with the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

#: File extensions listed as images (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Pillow reads LOAD_TRUNCATED_IMAGES as a module global, so the lenient
# retry for truncated files switches it under this lock.
_TRUNCATED_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image to process: its id (file name without extension) and location.

    ``location`` is a local path, or any URI that the Ray engine's file
    systems read.
    """

    id: str
    location: str


class DecodeError(Exception):
    """An image whose bytes cannot be decoded; the message is the reason."""


def list_images(folder: str | Path) -> list[ImageRef]:
    """List the images of a folder, sorted by id.

    Raises
    ------
    PipelineError
        If the folder is missing, contains no images, or two files share an id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"Image folder not found: {folder}. Check the DATA (--data) or --images path.")
    refs = {}
    for path in folder.iterdir():
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in refs:
            raise PipelineError(
                f"Two files in {folder} have the id {path.stem!r}: "
                f"{Path(refs[path.stem].location).name} and {path.name}. "
                f"Keep one of them."
            )
        refs[path.stem] = ImageRef(id=path.stem, location=str(path))
    if not refs:
        raise PipelineError(
            f"No images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})."
        )
    return [refs[key] for key in sorted(refs)]


def image_list_digest(ids: list[str]) -> str:
    """Return the sha256 of the sorted ids, one per line: the identity of an image set."""
    digest = hashlib.sha256()
    for image_id in sorted(ids):
        digest.update(image_id.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def decode_image(data: bytes, size: int, flip: bool = False) -> tuple[np.ndarray, str | None]:
    """Decode image bytes into a (size, size, 3) uint8 RGB array.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB,
    and the EXIF orientation is applied. A truncated file is decoded as far
    as its bytes allow.

    Returns
    -------
    pixels : ndarray of uint8, shape (size, size, 3)
        Resized with bilinear interpolation (mirrored left-right when
        ``flip`` is set).
    note : str or None
        Why the image is suspect though decoded (for example "truncated"),
        or None.

    Raises
    ------
    DecodeError
        If no pixels can be recovered from the bytes.
    """
    if not data:
        raise DecodeError("empty file")
    note = None
    try:
        image = _open_image(data, size)
    except _TruncatedError:
        with _TRUNCATED_LOCK:
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                image = _open_image(data, size)
            except _TruncatedError:
                raise DecodeError("truncated and undecodable") from None
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise DecodeError(f"truncated and undecodable ({error})") from None
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
        note = "truncated file, decoded partially"
    except UnidentifiedImageError:
        raise DecodeError("cannot decode (not an image format that Pillow reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DecodeError(f"cannot decode ({error})") from None

    image = _to_rgb(image)
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8), note


class _TruncatedError(Exception):
    pass


def _open_image(data: bytes, size: int) -> Image.Image:
    import io

    with warnings.catch_warnings():
        # Pillow warns about odd EXIF or ICC chunks that it can read anyway.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
            # JPEG only: decode at a reduced DCT scale that is still at least
            # the target size, which is several times faster for large photos.
            image.draft("RGB", (size, size))
            image.load()
        except (OSError, SyntaxError) as error:
            if "truncated" in str(error).lower() or "broken data stream" in str(error):
                raise _TruncatedError() from None
            raise
        image = ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit, 32-bit integer or float grayscale: map 16-bit values to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max() > 255:
            array = array / 257.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white, as image viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_bytes(location: str) -> bytes:
    """Read a local file (the local engine reads only local paths)."""
    with open(location, "rb") as handle:
        return handle.read()


def decode_file(ref: ImageRef, size: int, flip: bool = False) -> tuple[np.ndarray, str | None]:
    """Read and decode one image; raises DecodeError with the reason if it fails."""
    try:
        data = read_bytes(ref.location)
    except OSError as error:
        raise DecodeError(f"cannot read ({error.strerror or error})") from None
    return decode_image(data, size, flip=flip)
