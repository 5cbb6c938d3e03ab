"""End-to-end inference on a folder of hostile files: one record per image-named file."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from paddleclas_mc.config import load_config
from paddleclas_mc.engine import run_infer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")
DIGIT = os.path.join(ROOT, "demo", "digits", "images", "test", "3")

# Width and height claimed by the hand-made decompression-bomb headers.
BOMB_SIDE = 100_000


def encode(image, image_format, **save_args):
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_args)
    return buffer.getvalue()


def digit_image(index=0):
    """Return a demo digit as an RGB Pillow image, so predictions are meaningful."""
    name = sorted(os.listdir(DIGIT))[index]
    with Image.open(os.path.join(DIGIT, name)) as image:
        return image.convert("RGB")


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png():
    """Return a 70-byte PNG whose header claims BOMB_SIDE x BOMB_SIDE RGB pixels."""
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def bomb_jpeg():
    """Return a small JPEG whose SOF0 header is patched to claim 65500 x 65500 pixels."""
    data = bytearray(encode(digit_image(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def rgba_png():
    pixels = np.array(digit_image(1).convert("RGBA"))
    pixels[..., 3] = 0
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def palette_png():
    image = digit_image(2).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def gray16_png():
    values = np.array(digit_image(3).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(values), "PNG")


def large_jpeg():
    """Return a 3000 x 2000 JPEG, far larger than the 32 x 32 input, small on disk."""
    gradient = np.linspace(0, 255, 3000, dtype=np.uint8)[np.newaxis, :, np.newaxis]
    return encode(Image.fromarray(np.broadcast_to(gradient, (2000, 3000, 3)).copy()), "JPEG")


def hostile_files():
    """Return ``{relative path: bytes}`` of every regular file in the hostile folder."""
    jpeg = encode(digit_image(4), "JPEG", quality=95)
    png = encode(digit_image(5), "PNG")
    gif = encode(digit_image(6), "GIF", save_all=True, append_images=[digit_image(7)])
    return {
        "upper.JPG": jpeg,
        "Mixed.JpEg": jpeg,
        "mixed.Png": png,
        "photo.webp": encode(digit_image(8), "WEBP"),
        "scan.tif": encode(digit_image(9), "TIFF"),
        "scan2.TIFF": encode(digit_image(10), "TIFF"),
        "anim.gif": gif,
        "gif saved as.jpg": gif,
        "empty.jpg": b"",
        "empty.png": b"",
        "truncated.jpg": jpeg[:len(jpeg) // 2],
        "truncated.png": png[:len(png) // 2],
        "notes.png": b"a text file named like an image\n",
        "._upper.JPG": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 60,
        "__MACOSX/._mixed.Png": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 60,
        "palette transparent.png": palette_png(),
        "rgba.png": rgba_png(),
        "gray alpha.png": encode(digit_image(11).convert("LA"), "PNG"),
        "gray16.png": gray16_png(),
        "cmyk.jpg": encode(digit_image(12).convert("CMYK"), "JPEG"),
        "large 3000x2000.jpg": large_jpeg(),
        "bomb.png": bomb_png(),
        "bomb.jpg": bomb_jpeg(),
        "a/same.jpg": jpeg,
        "b/same.jpg": png,
        "a/b/same.jpg": jpeg,
        "sub dir/фото café 1.jpg": jpeg,
        "日本語/画像 2.png": png,
        "  leading and trailing spaces  .png": png,
        "line\nbreak.png": png,
        "readme.md": b"# not an image\n",
        "Thumbs.db": b"\x00" * 16,
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "a/labels.txt": b"0 zero\n",
        "archive.zip": b"PK\x05\x06" + b"\x00" * 18,
    }


# Image-named entries that cannot be decoded, with a word their error must contain.
EXPECTED_ERRORS = {
    "empty.jpg": "0 bytes",
    "empty.png": "0 bytes",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "notes.png": "not an image file",
    "._upper.JPG": "not an image file",
    "__MACOSX/._mixed.Png": "not an image file",
    "bomb.png": "decompression-bomb",
    "bomb.jpg": "decompression-bomb",
    "dangling.jpg": "file not found",
    "self loop.jpg": "read failed",
    "pipe.jpg": "not a regular file (a FIFO)",
}
NON_UTF8_NAME = b"latin-1 \xe9t\xe9.png"
IGNORED_FILES = 5


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    """Build the folder and return ``(root, image_names)``: every image-named path in it."""
    root = tmp_path_factory.mktemp("hostile") / "images"
    files = hostile_files()
    for relative_path, data in files.items():
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with open(os.path.join(os.fsencode(root), NON_UTF8_NAME), "wb") as file:
        file.write(files["mixed.Png"])

    os.symlink("..", root / "a" / "loop")
    os.symlink("self loop.jpg", root / "self loop.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    os.symlink(root / "upper.JPG", root / "link to upper.jpg")
    os.mkfifo(root / "pipe.jpg")

    image_names = [name for name in files if name not in
                   ("readme.md", "Thumbs.db", ".DS_Store", "a/labels.txt", "archive.zip")]
    image_names += ["self loop.jpg", "dangling.jpg", "link to upper.jpg", "pipe.jpg",
                    os.fsdecode(NON_UTF8_NAME)]
    return str(root), image_names


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def read_jsonl(path):
    with open(path, "rb") as file:
        return [json.loads(line.decode("utf-8")) for line in file.read().split(b"\n") if line]


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def hostile_run(request, hostile_folder, tmp_path_factory):
    """Run MC inference once per worker count; return ``(root, names, summary, records)``."""
    root, image_names = hostile_folder
    save_dir = tmp_path_factory.mktemp(f"out{request.param}")
    config = load_config(MC_CONFIG, [f"Infer.infer_imgs={root}", f"Infer.save_dir={save_dir}",
                                     f"Infer.num_workers={request.param}",
                                     "Infer.batch_size=4", "MCDropout.samples=3"])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        summary = run_infer(config)
    finally:
        os.chdir(cwd)
    return root, image_names, summary, read_jsonl(save_dir / "predictions.jsonl")


def test_one_record_per_image_named_file(hostile_run):
    root, image_names, _, records = hostile_run
    names = [record["file_name"] for record in records]

    assert len(names) == len(set(names)), "a file has more than one record"
    assert sorted(names) == sorted(os.path.join(root, name) for name in image_names)


def test_names_round_trip_exactly(hostile_run):
    root, image_names, _, records = hostile_run
    names = {record["file_name"] for record in records}

    for name in ("sub dir/фото café 1.jpg", "日本語/画像 2.png", "line\nbreak.png",
                 "  leading and trailing spaces  .png", os.fsdecode(NON_UTF8_NAME)):
        assert os.path.join(root, name) in names, repr(name)


def test_broken_files_get_error_records(hostile_run):
    root, _, _, records = hostile_run
    errors = {os.path.relpath(record["file_name"], root): record["error"]
              for record in records if "error" in record}

    assert sorted(errors) == sorted(EXPECTED_ERRORS)
    for name, cause in EXPECTED_ERRORS.items():
        assert cause in errors[name], (name, errors[name])
        assert errors[name].startswith(os.path.join(root, name)), (name, errors[name])


def test_bomb_error_names_pixel_count(hostile_run):
    root, _, _, records = hostile_run
    error = next(record["error"] for record in records
                 if record["file_name"] == os.path.join(root, "bomb.png"))

    assert f"image of {BOMB_SIDE * BOMB_SIDE} pixels" in error


def test_odd_formats_are_predicted(hostile_run):
    root, _, _, records = hostile_run
    predicted = {os.path.relpath(record["file_name"], root): record
                 for record in records if "error" not in record}

    for name in ("upper.JPG", "photo.webp", "scan2.TIFF", "gif saved as.jpg",
                 "palette transparent.png", "rgba.png", "gray alpha.png", "gray16.png",
                 "cmyk.jpg", "large 3000x2000.jpg", "link to upper.jpg"):
        assert name in predicted, name
        assert len(predicted[name]["class_ids"]) == 3, name
        assert "mutual_information" in predicted[name], name


def test_summary_counts(hostile_run):
    _, image_names, summary, records = hostile_run

    assert summary["images"] == len(image_names)
    assert summary["failed"] == len(EXPECTED_ERRORS)
    assert summary["predicted"] == len(image_names) - len(EXPECTED_ERRORS)
    assert summary["ignored_files"] == IGNORED_FILES
    assert summary["finished"] is True
    assert len(records) == summary["images"]


def test_tools_infer_on_hostile_folder(hostile_folder, tmp_path):
    root, image_names = hostile_folder
    command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "-c", MC_CONFIG,
               "-o", f"Infer.infer_imgs={root}", "-o", f"Infer.save_dir={tmp_path}",
               "-o", "MCDropout.samples=2", "-o", "Infer.batch_size=8"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300)
    stderr = result.stderr.decode("utf-8", "replace")

    assert result.returncode == 0, stderr[-2000:]
    assert "Logging error" not in stderr
    assert len(read_jsonl(tmp_path / "predictions.jsonl")) == len(image_names)
    with open(tmp_path / "summary.json", "rb") as file:
        summary = json.loads(file.read().decode("utf-8"))
    assert summary["ignored_files"] == IGNORED_FILES
