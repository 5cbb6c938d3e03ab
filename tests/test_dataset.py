"""Tests for paddleclas_mc.dataset: listing, decoding, preprocessing and batching."""

import io
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import paddle
import pytest
from PIL import Image

from paddleclas_mc import dataset
from paddleclas_mc.dataset import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageFolderDataset,
    InProcessLoader,
    build_loader,
    collate_records,
    decode_image,
    list_images,
)

# Transforms that give every decodable image the same [3, 8, 8] shape.
FIXED_SIZE_TRANSFORMS = [
    {"DecodeImage": {"to_rgb": True, "channel_first": False}},
    {"ResizeImage": {"size": 8}},
    {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.0, 0.0, 0.0],
                        "std": [1.0, 1.0, 1.0], "order": ""}},
    {"ToCHWImage": None},
]

# Files in the mixed folder that must become error records.
BROKEN_NAMES = ("empty.jpg", "truncated.jpg", "truncated.png", "notes.png",
                "._photo.jpg", "dangling.jpg")


def random_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image, image_format, **save_args):
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_args)
    return buffer.getvalue()


def jpeg_bytes(height=24, width=32, seed=0):
    return encode(Image.fromarray(random_rgb(height, width, seed)), "JPEG", quality=90)


def png_bytes(height=24, width=32, seed=0):
    return encode(Image.fromarray(random_rgb(height, width, seed)), "PNG")


def rgba_png_bytes():
    pixels = np.zeros((4, 5, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 1] = 100
    pixels[..., 2] = 50
    pixels[..., 3] = 0
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def la_png_bytes():
    pixels = np.zeros((4, 5, 2), dtype=np.uint8)
    pixels[..., 0] = 77
    pixels[..., 1] = 10
    return encode(Image.fromarray(pixels, "LA"), "PNG")


def palette_png_bytes():
    """Return a palette PNG whose index 0 (red) is fully transparent."""
    image = Image.new("P", (4, 3), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    return encode(image, "PNG", transparency=0)


def gray16_png_bytes():
    values = np.array([[0, 255, 256, 65535], [1000, 30000, 40000, 65280]], dtype=np.uint16)
    return encode(Image.fromarray(values), "PNG"), values


def cmyk_jpeg_bytes():
    return encode(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG")


def exif_rotated_jpeg_bytes():
    """Return a 20x40 (H x W) JPEG with EXIF orientation 6 and a white top-left block."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)


def two_frame_gif_bytes():
    first = Image.new("RGB", (6, 4), (255, 0, 0))
    second = Image.new("RGB", (6, 4), (0, 0, 255))
    return encode(first, "GIF", save_all=True, append_images=[second])


def write_bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def mixed_folder(tmp_path):
    """Build a folder of valid, broken and non-image files.

    Returns:
        A tuple ``(root, image_names)`` of the folder path and the image-named
        paths relative to it.
    """
    root = tmp_path / "images"
    files = {
        "upper.JPG": jpeg_bytes(seed=1),
        "mixed.Png": png_bytes(seed=2),
        "photo.webp": encode(Image.fromarray(random_rgb(10, 12, 3)), "WEBP"),
        "scan.tif": encode(Image.fromarray(random_rgb(10, 12, 4)), "TIFF"),
        "anim.gif": two_frame_gif_bytes(),
        "gif_named.jpg": two_frame_gif_bytes(),
        "empty.jpg": b"",
        "truncated.jpg": jpeg_bytes(seed=5)[:300],
        "truncated.png": png_bytes(seed=6)[:200],
        "notes.png": b"this is a text file, not a PNG\n",
        # An AppleDouble header, as macOS writes next to copied files.
        "._photo.jpg": b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\x00" * 74,
        "palette.png": palette_png_bytes(),
        "rgba.png": rgba_png_bytes(),
        "la.png": la_png_bytes(),
        "gray16.png": gray16_png_bytes()[0],
        "cmyk.jpg": cmyk_jpeg_bytes(),
        "rotated.jpg": exif_rotated_jpeg_bytes(),
        "a/same.jpg": jpeg_bytes(seed=7),
        "b/same.jpg": jpeg_bytes(seed=8),
        "sub dir/фото café 1.jpg": jpeg_bytes(seed=9),
        "readme.md": b"# not an image\n",
    }
    for relative_path, data in files.items():
        write_bytes(root / relative_path, data)

    # A directory symlink to its own parent, a file symlink and a dangling one.
    os.symlink("..", root / "a" / "loop")
    os.symlink(root / "upper.JPG", root / "link.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")

    image_names = [name for name in files if dataset.has_image_extension(name)]
    image_names += ["link.jpg", "dangling.jpg"]
    return str(root), image_names


def relative_paths(paths, root):
    return [os.path.relpath(path, root) for path in paths]


# list_images


def test_list_images_folder_finds_all(mixed_folder):
    root, image_names = mixed_folder
    listed = relative_paths(list_images(root).paths, root)

    assert sorted(listed) == sorted(image_names)
    assert len(listed) == len(set(listed))


def test_list_images_folder_sorted(mixed_folder):
    root, _ = mixed_folder
    paths = list_images(root).paths

    assert paths == sorted(paths)


def test_list_images_case_insensitive(mixed_folder):
    root, _ = mixed_folder
    listed = relative_paths(list_images(root).paths, root)

    assert "upper.JPG" in listed
    assert "mixed.Png" in listed


def test_list_images_nested_same_name(mixed_folder):
    root, _ = mixed_folder
    listed = relative_paths(list_images(root).paths, root)

    assert os.path.join("a", "same.jpg") in listed
    assert os.path.join("b", "same.jpg") in listed


def test_list_images_non_image_ignored(mixed_folder):
    root, _ = mixed_folder
    result = list_images(root)

    assert relative_paths(result.ignored, root) == ["readme.md"]
    assert os.path.join(root, "readme.md") not in result.paths


def test_list_images_symlink_loop_not_followed(mixed_folder):
    root, _ = mixed_folder
    listed = relative_paths(list_images(root).paths, root)

    assert not any(path.startswith(os.path.join("a", "loop")) for path in listed)


def test_list_images_symlinked_file_kept(mixed_folder):
    root, _ = mixed_folder
    paths = list_images(root).paths

    assert os.path.join(root, "link.jpg") in paths
    assert os.path.join(root, "dangling.jpg") in paths


def test_list_images_single_file(tmp_path):
    path = write_bytes(tmp_path / "one.jpeg", jpeg_bytes())
    result = list_images(path)

    assert result.paths == [path]
    assert result.ignored == []


def test_list_images_single_non_image_rejected(tmp_path):
    path = write_bytes(tmp_path / "notes.md", b"text")

    with pytest.raises(ValueError, match="is not an image file") as error:
        list_images(path)
    assert "notes.md" in str(error.value)


def test_list_images_text_list(tmp_path):
    write_bytes(tmp_path / "data" / "with space.jpg", jpeg_bytes())
    absolute = write_bytes(tmp_path / "elsewhere" / "abs.png", png_bytes())
    list_path = tmp_path / "data" / "list.txt"
    list_path.write_text(
        "# comment line\n"
        "\n"
        "  with space.jpg  \n"
        f"{absolute}\n"
        "missing/gone.jpg\n"
        "./with space.jpg\n",
        encoding="utf-8")

    paths = list_images(str(list_path)).paths

    assert paths[0] == os.path.join(str(tmp_path / "data"), "with space.jpg")
    assert paths[1] == absolute
    assert paths[2] == os.path.join(str(tmp_path / "data"), "missing/gone.jpg")
    assert len(paths) == 3


def test_list_images_infer_list_labels(tmp_path):
    root = tmp_path / "val"
    write_bytes(root / "cls0" / "a.jpg", jpeg_bytes())
    write_bytes(root / "cls1" / "b c.jpg", jpeg_bytes())
    infer_list = tmp_path / "val_list.txt"
    infer_list.write_text("cls0/a.jpg 0\ncls1/b c.jpg 1\ncls1/nolabel.jpg\n", encoding="utf-8")

    paths = list_images(str(root), infer_list=str(infer_list)).paths

    assert paths == [os.path.join(str(root), "cls0/a.jpg"),
                     os.path.join(str(root), "cls1/b c.jpg"),
                     os.path.join(str(root), "cls1/nolabel.jpg")]


def test_list_images_missing_path_message(tmp_path):
    missing = str(tmp_path / "nowhere")

    with pytest.raises(FileNotFoundError) as error:
        list_images(missing)
    message = str(error.value)
    assert "Infer.infer_imgs" in message
    assert missing in message
    assert "Set it to" in message


def test_list_images_empty_folder_message(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    write_bytes(folder / "readme.md", b"text")

    with pytest.raises(ValueError) as error:
        list_images(str(folder))
    message = str(error.value)
    assert str(folder) in message
    assert "contains no image files" in message
    assert ", ".join(IMAGE_EXTENSIONS) in message


# decode_image


def test_decode_jpeg_matches_cv2():
    data = jpeg_bytes()
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]

    decoded = decode_image(data)

    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, expected)


@pytest.fixture
def imdecode_calls(monkeypatch):
    """Record every cv2.imdecode call that decode_image makes."""
    calls = []
    real_imdecode = cv2.imdecode

    def recording_imdecode(buffer, flags):
        calls.append(flags)
        return real_imdecode(buffer, flags)

    monkeypatch.setattr(dataset.cv2, "imdecode", recording_imdecode)
    return calls


def test_decode_cv2_backend_calls_imdecode(imdecode_calls):
    decode_image(jpeg_bytes())

    assert imdecode_calls == [cv2.IMREAD_COLOR]


def test_decode_pil_backend_skips_cv2(imdecode_calls):
    decode_image(jpeg_bytes(), backend="pil")

    assert imdecode_calls == []


def test_decode_rotated_png_skips_cv2(imdecode_calls):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(random_rgb(4, 4)), "PNG", exif=exif)

    decoded = decode_image(data)

    assert imdecode_calls == []
    assert decoded.shape == (4, 4, 3)


@pytest.mark.parametrize("cv2_result", [None, np.zeros((2, 2, 3), np.uint8)],
                         ids=["none", "wrong_shape"])
def test_decode_cv2_failure_falls_back(monkeypatch, cv2_result):
    pixels = random_rgb(24, 32)
    monkeypatch.setattr(dataset.cv2, "imdecode", lambda buffer, flags: cv2_result)

    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"))

    assert np.array_equal(decoded, pixels)


def test_decode_bgr_and_channel_first():
    data = png_bytes()
    rgb = decode_image(data)

    bgr = decode_image(data, to_rgb=False)
    chw = decode_image(data, channel_first=True)

    assert np.array_equal(bgr, rgb[:, :, ::-1])
    assert chw.shape == (3, 24, 32)
    assert np.array_equal(chw, rgb.transpose(2, 0, 1))


def test_decode_pil_backend_png():
    pixels = random_rgb(24, 32)

    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), backend="pil")

    assert np.array_equal(decoded, pixels)


@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_decode_rgba_drops_alpha(backend):
    decoded = decode_image(rgba_png_bytes(), backend=backend)

    assert decoded.shape == (4, 5, 3)
    assert decoded[0, 0].tolist() == [200, 100, 50]


def test_decode_la_gray_replicated():
    decoded = decode_image(la_png_bytes())

    assert decoded.shape == (4, 5, 3)
    assert decoded[0, 0].tolist() == [77, 77, 77]


def test_decode_palette_transparency_keeps_colour():
    decoded = decode_image(palette_png_bytes())

    assert decoded.shape == (3, 4, 3)
    assert decoded[0, 0].tolist() == [255, 0, 0]
    assert decoded[0, 1].tolist() == [0, 255, 0]


def test_decode_gray16_shifted():
    data, values = gray16_png_bytes()

    decoded = decode_image(data)

    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded[..., 0], (values >> 8).astype(np.uint8))
    assert decoded[0, 3].tolist() == [255, 255, 255]
    assert decoded[0, 2].tolist() == [1, 1, 1]


def test_decode_cmyk_uses_pillow_conversion():
    data = cmyk_jpeg_bytes()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    decoded = decode_image(data)

    assert decoded.shape == (4, 6, 3)
    assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_decode_exif_orientation_applied(backend):
    decoded = decode_image(exif_rotated_jpeg_bytes(), backend=backend)

    # Orientation 6 rotates 90 degrees clockwise: the 20x40 image becomes
    # 40x20 and the white top-left block moves to the top-right corner.
    assert decoded.shape == (40, 20, 3)
    assert decoded[2, 17].min() > 200
    assert decoded[2, 2].max() < 50


def test_decode_gif_first_frame():
    decoded = decode_image(two_frame_gif_bytes())

    assert decoded.shape == (4, 6, 3)
    assert decoded[0, 0].tolist() == [255, 0, 0]


def test_decode_empty_message():
    with pytest.raises(ImageDecodeError, match=r"^x\.jpg: file is empty \(0 bytes\)$"):
        decode_image(b"", name="x.jpg")


@pytest.mark.parametrize("data", [jpeg_bytes()[:300], png_bytes()[:200]], ids=["jpeg", "png"])
def test_decode_truncated_message(data):
    with pytest.raises(ImageDecodeError, match=r"^cut: truncated image data$"):
        decode_image(data, name="cut")


def test_decode_text_message():
    with pytest.raises(ImageDecodeError, match=r"not an image file \(cannot identify format\)"):
        decode_image(b"plain text", name="notes.png")


def test_decode_bomb_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("L", (30, 10)), "PNG")

    with pytest.raises(ImageDecodeError) as error:
        decode_image(data, name="big.png")
    assert str(error.value) == (
        "big.png: image of 300 pixels exceeds the decompression-bomb limit of 200")


def test_decode_bomb_warning_range_accepted(monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("L", (15, 10)), "PNG")

    decoded = decode_image(data)

    assert decoded.shape == (10, 15, 3)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decode_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend"):
        decode_image(png_bytes(), backend="turbo")


# ImageFolderDataset


def test_dataset_one_entry_per_file(mixed_folder):
    root, image_names = mixed_folder
    paths = list_images(root).paths
    items = [ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)[i] for i in range(len(paths))]

    assert len(items) == len(image_names)
    for index, (path, item) in enumerate(zip(paths, items)):
        assert item["index"] == index
        assert item["path"] == path
        assert (item["image"] is None) == bool(item["error"]), path
        if item["image"] is None:
            assert item["error"].startswith(path + ": "), item["error"]


def test_dataset_broken_files_are_errors(mixed_folder):
    root, _ = mixed_folder
    paths = list_images(root).paths
    data = ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)

    failed = {os.path.basename(item["path"]) for item in data if item["image"] is None}

    assert failed == set(BROKEN_NAMES)


def test_dataset_good_images_float32(mixed_folder):
    root, _ = mixed_folder
    paths = list_images(root).paths
    data = ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)

    images = [item["image"] for item in data if item["image"] is not None]

    assert len(images) == len(paths) - len(BROKEN_NAMES)
    assert all(image.dtype == np.float32 for image in images)
    assert all(image.shape == (3, 8, 8) for image in images)


def test_dataset_error_causes(mixed_folder):
    root, _ = mixed_folder
    paths = [os.path.join(root, name) for name in ("empty.jpg", "notes.png", "dangling.jpg")]
    errors = [item["error"] for item in ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)]

    assert errors[0] == f"{paths[0]}: file is empty (0 bytes)"
    assert errors[1] == f"{paths[1]}: not an image file (cannot identify format)"
    assert errors[2] == f"{paths[2]}: file not found"


def test_dataset_transform_failure_is_error(tmp_path):
    path = write_bytes(tmp_path / "small.png", png_bytes(height=4, width=4))
    transforms = [{"DecodeImage": None}, {"CropImage": {"size": 16}}]

    item = ImageFolderDataset([path], transforms)[0]

    assert item["image"] is None
    assert item["error"].startswith(f"{path}: CropImage failed")


def test_dataset_without_decode_entry(tmp_path):
    pixels = random_rgb(4, 5)
    path = write_bytes(tmp_path / "x.png", encode(Image.fromarray(pixels), "PNG"))

    item = ImageFolderDataset([path], [])[0]

    assert item["image"].dtype == np.float32
    assert np.array_equal(item["image"], pixels.astype(np.float32))


def test_dataset_decode_params_used(tmp_path):
    pixels = random_rgb(4, 5)
    path = write_bytes(tmp_path / "x.png", encode(Image.fromarray(pixels), "PNG"))
    transforms = [{"DecodeImage": {"to_rgb": False, "channel_first": True,
                                   "to_np": True, "backend": "pil"}}]

    image = ImageFolderDataset([path], transforms)[0]["image"]

    assert np.array_equal(image, pixels[:, :, ::-1].transpose(2, 0, 1).astype(np.float32))


def test_dataset_unknown_op_message():
    transforms = [{"DecodeImage": None}, {"ResizeImage": {"size": 8}}, {"FancyAugment": {}}]

    with pytest.raises(ValueError) as error:
        ImageFolderDataset(["never_read.jpg"], transforms)
    message = str(error.value)
    assert "FancyAugment" in message
    assert "Infer.transforms" in message
    assert "ResizeImage" in message
    assert "NormalizeImage" in message


def test_dataset_decode_not_first_rejected():
    transforms = [{"ResizeImage": {"size": 8}}, {"DecodeImage": None}]

    with pytest.raises(ValueError, match="DecodeImage is at position 1"):
        ImageFolderDataset([], transforms)


def test_dataset_decode_unknown_key_rejected():
    with pytest.raises(ValueError, match=r"DecodeImage has unknown parameters \['mode'\]"):
        ImageFolderDataset([], [{"DecodeImage": {"mode": "rgb"}}])


def test_dataset_bad_op_params_rejected():
    with pytest.raises(ValueError, match="cannot build ResizeImage"):
        ImageFolderDataset([], [{"ResizeImage": {"sizes": 8}}])


def test_dataset_malformed_entry_rejected():
    with pytest.raises(ValueError, match=r"Infer.transforms\[0\] must be a one-key mapping"):
        ImageFolderDataset([], [{"ResizeImage": {"size": 8}, "CropImage": {"size": 4}}])


# collate_records and build_loader


def test_collate_mixed_batch():
    items = [
        {"index": 4, "path": "a.jpg", "image": np.ones((3, 2, 2), np.float32), "error": ""},
        {"index": 5, "path": "b.jpg", "image": None, "error": "b.jpg: file not found"},
        {"index": 6, "path": "c.jpg", "image": np.zeros((3, 2, 2), np.float32), "error": ""},
    ]

    batch = collate_records(items)

    assert batch["images"].shape == (2, 3, 2, 2)
    assert batch["images"].dtype == np.float32
    assert batch["indices"].tolist() == [4, 6]
    assert batch["indices"].dtype == np.int64
    assert batch["errors"] == [[5, "b.jpg: file not found"]]


def test_collate_all_failed():
    items = [{"index": 0, "path": "a.jpg", "image": None, "error": "a.jpg: bad"}]

    batch = collate_records(items)

    assert batch["images"].shape == (0,)
    assert batch["indices"].shape == (0,)
    assert batch["errors"] == [[0, "a.jpg: bad"]]


def test_collate_shape_mismatch_message():
    items = [
        {"index": 0, "path": "wide.jpg", "image": np.zeros((3, 4, 8), np.float32), "error": ""},
        {"index": 1, "path": "tall.jpg", "image": np.zeros((3, 8, 4), np.float32), "error": ""},
    ]

    with pytest.raises(ValueError) as error:
        collate_records(items)
    message = str(error.value)
    assert "wide.jpg" in message
    assert "tall.jpg" in message
    assert "CropImage" in message
    assert "ResizeImage" in message


@pytest.fixture
def loader_folder(tmp_path):
    """Build 8 image files, of which numbers 1, 3, 4 and 7 are broken.

    Returns:
        A tuple ``(paths, broken_numbers)``.
    """
    broken = {1: b"", 3: b"not an image", 4: jpeg_bytes(seed=40)[:300], 7: b""}
    paths = []
    for number in range(8):
        data = broken.get(number, png_bytes(height=6, width=7, seed=number))
        paths.append(write_bytes(tmp_path / f"img_{number}.png", data))
    return paths, sorted(broken)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_keeps_good_images(loader_folder, num_workers):
    paths, broken = loader_folder
    data = ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)

    batches = list(build_loader(data, batch_size=3, num_workers=num_workers))

    indices = [batch["indices"].numpy().tolist() for batch in batches]
    image_counts = [batch["images"].shape[0] for batch in batches]
    error_indices = [index for batch in batches for index, _ in batch["errors"]]
    assert indices == [[0, 2], [5], [6]]
    assert image_counts == [2, 1, 1]
    assert error_indices == broken


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_images_match_dataset(loader_folder, num_workers):
    paths, _ = loader_folder
    data = ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)

    for batch in build_loader(data, batch_size=3, num_workers=num_workers):
        images = batch["images"].numpy()
        for row, index in enumerate(batch["indices"].numpy().tolist()):
            assert np.array_equal(images[row], data[index]["image"]), paths[index]


def test_loader_all_failed_batch_workers(tmp_path):
    paths = [write_bytes(tmp_path / f"bad_{number}.jpg", b"") for number in range(2)]
    data = ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)

    batches = list(build_loader(data, batch_size=2, num_workers=2))

    assert len(batches) == 1
    assert batches[0]["images"].shape == [0]
    assert [index for index, _ in batches[0]["errors"]] == [0, 1]


def test_loader_bad_batch_size_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ImageFolderDataset([], None), batch_size=0)


def test_dataset_fifo_is_error(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    item = ImageFolderDataset([str(tmp_path / "pipe.jpg")], FIXED_SIZE_TRANSFORMS)[0]

    assert item["image"] is None
    assert item["error"] == f"{tmp_path / 'pipe.jpg'}: not a regular file (a FIFO)"


def test_dataset_probe_shape():
    image = ImageFolderDataset([], FIXED_SIZE_TRANSFORMS).probe()

    assert image.shape == (3, 8, 8)
    assert image.dtype == np.float32


def test_dataset_probe_failure_names_op():
    transforms = [{"DecodeImage": None}, {"CropImage": {"size": 4096}}]
    with pytest.raises(ValueError, match="Infer.transforms: .*CropImage failed"):
        ImageFolderDataset([], transforms).probe()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_given_batches(loader_folder, num_workers):
    paths, _ = loader_folder
    data = ImageFolderDataset(paths, FIXED_SIZE_TRANSFORMS)
    loader = build_loader(data, 2, num_workers, batches=[[2, 3], [len(paths) - 1]])
    batches = list(loader)

    assert len(loader) == 2
    assert len(batches) == 2
    first = sorted(batches[0]["indices"].numpy().tolist() + [i for i, _ in batches[0]["errors"]])
    assert first == [2, 3]
    last = batches[1]["indices"].numpy().tolist() + [i for i, _ in batches[1]["errors"]]
    assert last == [len(paths) - 1]


def test_list_images_follows_folder_links(tmp_path):
    target = tmp_path / "elsewhere" / "three"
    target.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(target / "a.png")
    root = tmp_path / "dataset"
    root.mkdir()
    os.symlink(target, root / "three")
    os.symlink(target, root / "three_again")
    os.symlink(root, root / "loop")

    listed = list_images(str(root)).paths

    assert listed == [str(root / "three" / "a.png")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux's parent-death signal")
def test_loader_workers_exit_with_killed_parent(tmp_path):
    script = tmp_path / "run_loader.py"
    script.write_text(
        "import os, sys, time\n"
        "import numpy as np\n"
        "from paddleclas_mc.dataset import build_loader\n"
        "class Slow:\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i):\n"
        "        print('worker', os.getpid(), flush=True); time.sleep(0.5)\n"
        "        return {'index': i, 'path': str(i), 'image': np.zeros(2, np.float32), 'error': ''}\n"
        "for batch in build_loader(Slow(), 2, num_workers=2):\n"
        "    pass\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = set()
    while len(workers) < 2:
        workers.add(int(process.stdout.readline().split()[1]))

    process.kill()
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.2)

    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def test_label_list_as_infer_imgs_points_to_infer_list(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "val_list.txt").write_text("a.png 0\n")
    with pytest.raises(ValueError, match="Infer.infer_list"):
        list_images(str(tmp_path / "val_list.txt"))


class TestInProcessLoader:
    def test_single_process_uses_it(self, loader_folder):
        data = ImageFolderDataset(loader_folder[0], FIXED_SIZE_TRANSFORMS)
        loader = build_loader(data, batch_size=3)

        assert isinstance(loader, InProcessLoader)
        assert (len(loader), loader.batch_size, loader.num_workers) == (3, 3, 0)

    def test_same_batches_as_worker_processes(self, loader_folder):
        data = ImageFolderDataset(loader_folder[0], FIXED_SIZE_TRANSFORMS)
        in_process = list(build_loader(data, batch_size=3))
        workers = list(build_loader(data, batch_size=3, num_workers=2))

        assert len(in_process) == len(workers)
        for ours, theirs in zip(in_process, workers):
            assert isinstance(ours["images"], paddle.Tensor)
            assert ours["images"].dtype == theirs["images"].dtype
            assert np.array_equal(ours["images"].numpy(), theirs["images"].numpy())
            assert ours["indices"].numpy().tolist() == theirs["indices"].numpy().tolist()
            assert ours["errors"] == theirs["errors"]

    def test_collate_error_reaches_caller(self, tmp_path):
        paths = [write_bytes(tmp_path / "small.png", png_bytes(height=6, width=7)),
                 write_bytes(tmp_path / "large.png", png_bytes(height=9, width=7))]
        # Without a fixed-size op the two images cannot be stacked.
        data = ImageFolderDataset(paths, [{"DecodeImage": None}])

        with pytest.raises(ValueError, match="differ in shape"):
            list(build_loader(data, batch_size=2))

    def test_reads_each_batch_when_needed(self, loader_folder):
        class CountingDataset(ImageFolderDataset):
            def __getitem__(self, index):
                read.append(index)
                return super().__getitem__(index)

        read = []
        data = CountingDataset(loader_folder[0], FIXED_SIZE_TRANSFORMS)
        iterator = iter(build_loader(data, batch_size=3))

        next(iterator)
        assert read == [0, 1, 2]
        next(iterator)
        assert read == [0, 1, 2, 3, 4, 5]
