import io

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.errors import PipelineError


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def half_red_image(size=(40, 20)) -> Image.Image:
    """Red on the left half, blue on the right half."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = (255, 0, 0)
    pixels[:, size[0] // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    "mode",
    ["L", "P", "CMYK", "RGBA", "LA", "1"],
)
def test_decode_converts_modes_to_rgb(mode):
    source = half_red_image().convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"

    pixels, note = images.decode_image(encode(source, fmt), 16)

    assert pixels.shape == (16, 16, 3)
    assert pixels.dtype == np.uint8
    assert note is None


def test_decode_cmyk_jpeg_colours():
    pixels, _ = images.decode_image(encode(half_red_image().convert("CMYK"), "JPEG"), 16)

    assert pixels[8, 2, 0] > 200  # left stays red
    assert pixels[8, 13, 2] > 200  # right stays blue


def test_decode_16_bit_grayscale_png():
    array = np.full((20, 20), 65535, dtype=np.uint16)
    array[:, :10] = 0
    data = encode(Image.fromarray(array), "PNG")

    pixels, _ = images.decode_image(data, 20)

    assert pixels[5, 2].tolist() == [0, 0, 0]
    assert pixels[5, 17].tolist() == [255, 255, 255]


def test_decode_palette_with_transparency_on_white():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0

    pixels, _ = images.decode_image(encode(image, "PNG", transparency=0), 10)

    assert pixels.min() == 255


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "WEBP"])
def test_decode_reads_format_whatever_the_name(fmt):
    pixels, note = images.decode_image(encode(half_red_image(), fmt), 16)

    assert pixels.shape == (16, 16, 3)
    assert note is None


def test_decode_applies_exif_orientation():
    image = half_red_image(size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(image, "JPEG", exif=exif, quality=95)

    pixels, _ = images.decode_image(data, 20)

    # After the rotation the red half is on top.
    assert pixels[2, 10, 0] > 200
    assert pixels[2, 10, 2] < 60
    assert pixels[17, 10, 2] > 200


def test_decode_truncated_jpeg_partially():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")

    pixels, note = images.decode_image(data[: len(data) // 2], 16)

    assert pixels.shape == (16, 16, 3)
    assert note == "truncated file, decoded partially"


def test_decode_truncated_leaves_strict_mode_on():
    from PIL import ImageFile

    data = encode(half_red_image(), "JPEG")
    with pytest.raises(images.DecodeError, match="truncated and undecodable"):
        images.decode_image(data[: len(data) // 2], 16)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image", "cannot decode"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated and undecodable"),
    ],
)
def test_decode_rejects_undecodable(data, reason):
    with pytest.raises(images.DecodeError, match=reason):
        images.decode_image(data, 16)


def test_list_images_sorted_by_id(tmp_path):
    for name in ["b.jpg", "a.JPG", "c.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")

    refs = images.list_images(tmp_path)

    assert [ref.id for ref in refs] == ["a", "b", "c"]


def test_list_images_duplicate_id(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")

    with pytest.raises(PipelineError, match=r"Two files in .* have the id 'a': a\.(jpg|png) and a\.(jpg|png)\. Keep one of them\."):
        images.list_images(tmp_path)


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(PipelineError, match=r"Image folder not found: .*nope\. Check the DATA \(--data\) or --images path\."):
        images.list_images(tmp_path / "nope")


def test_list_images_empty_folder(tmp_path):
    with pytest.raises(PipelineError, match=r"No images found in "):
        images.list_images(tmp_path)


def test_image_list_digest_ignores_order():
    assert images.image_list_digest(["b", "a"]) == images.image_list_digest(["a", "b"])
    assert images.image_list_digest(["a"]) != images.image_list_digest(["a", "b"])
