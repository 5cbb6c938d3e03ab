"""Image-folder test dataset for ``tools/infer.py``.

``list_images`` turns ``Infer.infer_imgs`` (and optionally ``Infer.infer_list``)
into an ordered list of image paths. ``ImageFolderDataset`` reads, decodes and
preprocesses one image per item with the ops in ``Infer.transforms``.
``build_loader`` batches the items. A file that cannot be read, decoded or
preprocessed becomes an error record in its batch instead of an exception.

Decoding policy. Every image is decoded to 8-bit, 3-channel RGB (or BGR when
``DecodeImage.to_rgb`` is False), so images of any format can share a batch:

* Every image is checked with Pillow first. An empty file, a file Pillow
  cannot identify, truncated image data, or an image larger than Pillow's
  decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) is an
  error. Images between one and two times ``MAX_IMAGE_PIXELS`` are decoded
  without a warning.
* The EXIF orientation tag is applied, so a photo taken in portrait comes out
  upright.
* Plain 8-bit RGB and grayscale files are decoded with OpenCV's
  ``cv2.imdecode(..., cv2.IMREAD_COLOR)``, the decoder of PaddleClas's own
  ``DecodeImage``, so JPEG pixels are bit-identical to PaddleClas's with the
  same OpenCV build. Pillow's pixels are used where OpenCV cannot read the file,
  returns another size, or might not apply the EXIF rotation (a rotated file
  that is not a JPEG).
* Grayscale (``L``, ``1``) is replicated to 3 channels.
* An alpha channel (``RGBA``, ``LA``, ``PA``, palette with transparency) is
  dropped and the stored colour under it is kept, without blending onto a
  background. OpenCV's ``IMREAD_COLOR`` does the same in PaddleClas.
* Palette images are expanded to RGB. CMYK uses Pillow's CMYK-to-RGB
  conversion.
* 16-bit and 32-bit integer images (``I;16`` variants, ``I``) are clipped to
  [0, 65535] and shifted right by 8 bits, as OpenCV reduces 16-bit PNGs to
  8 bits. Float images (``F``) are clipped to [0, 255] and rounded, NaN
  becomes 0.
* Only the first frame of a GIF or other multi-frame file is used.
"""

import ctypes
import dataclasses
import io
import os
import re
import signal
import stat
import sys
import warnings

import cv2
import numpy as np
import paddle
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from paddleclas_mc import integration

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageFolderDataset",
    "ImageList",
    "InProcessLoader",
    "build_loader",
    "collate_records",
    "decode_image",
    "list_images",
]

# File name extensions treated as images, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Extension of a path list given as ``Infer.infer_imgs``.
PATH_LIST_EXTENSION = ".txt"

# Keys of the ``DecodeImage`` entry in ``Infer.transforms``. ``to_np`` is
# accepted for PaddleClas configs but has no effect, because the decoded image
# is always a numpy array.
DECODE_IMAGE_KEYS = ("to_rgb", "channel_first", "to_np", "backend")

DECODE_BACKENDS = ("cv2", "pil")

# A PaddleClas label column: one class id, or comma-separated multi-label ids.
_LABEL_PATTERN = re.compile(r"-?\d+(,-?\d+)*")

# Pillow's DecompressionBombError text: "Image size (N pixels) exceeds limit of M pixels, ...".
_BOMB_MESSAGE_PATTERN = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")

_EXIF_ORIENTATION = ExifTags.Base.Orientation


@dataclasses.dataclass
class ImageList:
    """Image paths found for ``Infer.infer_imgs``.

    Attributes:
        paths: image paths in reading order, each listed once.
        ignored: files without an image extension found while walking a folder.
        unreadable_dirs: folders under ``Infer.infer_imgs`` that could not be
            listed (for example permission denied), so their images are missing.
    """

    paths: list
    ignored: list = dataclasses.field(default_factory=list)
    unreadable_dirs: list = dataclasses.field(default_factory=list)


def has_image_extension(path):
    """Return whether ``path`` ends with one of ``IMAGE_EXTENSIONS``, ignoring case."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(infer_imgs, infer_list=None):
    """List the images to run inference on.

    Args:
        infer_imgs: ``Infer.infer_imgs``. One image file, a folder searched
            recursively, or a ``.txt`` file with one image path per line. A
            relative path in the ``.txt`` file is relative to the file's folder.
        infer_list: ``Infer.infer_list``, optional. A text file whose lines are
            ``relative/path [label]``. Each path is joined to ``infer_imgs``,
            which must then be a folder.

    Returns:
        An ``ImageList``. Paths found by walking a folder are sorted. Paths
        from a text file keep the file's order. A path that occurs twice
        (after ``os.path.normpath``) is kept at its first occurrence. Paths
        listed in a text file are kept even when they do not exist, so each
        one gets an error record later.

    Raises:
        FileNotFoundError: when ``infer_imgs`` or ``infer_list`` does not exist.
        ValueError: when ``infer_imgs`` is a file that is neither an image nor
            a ``.txt`` list, or when no image paths are found.
    """
    if not os.path.exists(infer_imgs):
        raise FileNotFoundError(
            f"Infer.infer_imgs: {infer_imgs!r} does not exist. Set it to an image "
            "file, a folder of images, or a .txt file with one image path per line.")

    if infer_list is not None:
        paths = _read_infer_list(infer_list, infer_imgs)
        return ImageList(paths=_deduplicate(paths))

    if os.path.isdir(infer_imgs):
        return _walk_folder(infer_imgs)

    if infer_imgs.lower().endswith(PATH_LIST_EXTENSION):
        paths = _read_path_list(infer_imgs)
        return ImageList(paths=_deduplicate(paths))

    if not has_image_extension(infer_imgs):
        raise ValueError(
            f"Infer.infer_imgs: {infer_imgs!r} is not an image file. Accepted "
            f"extensions: {', '.join(IMAGE_EXTENSIONS)} (any case), or "
            f"{PATH_LIST_EXTENSION} for a list of image paths.")
    return ImageList(paths=[infer_imgs])


def _walk_folder(folder):
    """List the image files under ``folder``, following folder symlinks once.

    A linked folder is walked like a real one, so a dataset made of links to
    class folders works. A folder whose real path was already walked (a link
    loop, or two links to one folder) is skipped, so the walk always ends.
    Symlinks to files are listed, so a dangling one gets an error record later.
    """
    paths = []
    ignored = []
    unreadable_dirs = []
    visited = set()

    def record_unreadable(error):
        unreadable_dirs.append(error.filename)

    for root, dirnames, filenames in os.walk(folder, onerror=record_unreadable,
                                             followlinks=True):
        real_root = os.path.realpath(root)
        if real_root in visited:
            dirnames[:] = []
            continue
        visited.add(real_root)

        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(root, filename)
            if has_image_extension(filename):
                paths.append(path)
            else:
                ignored.append(path)

    if not paths:
        raise ValueError(
            f"Infer.infer_imgs: folder {folder!r} contains no image files. "
            f"Accepted extensions: {', '.join(IMAGE_EXTENSIONS)} (any case).")

    return ImageList(paths=_deduplicate(sorted(paths)), ignored=sorted(ignored),
                     unreadable_dirs=sorted(unreadable_dirs))


def _read_lines(path, config_key):
    """Return the stripped lines of a UTF-8 text file, without blanks and ``#`` comments."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            raw_lines = file.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{config_key}: {path!r} is not a UTF-8 text file ({exc}). Save the "
            "path list as UTF-8.") from exc

    lines = []
    for raw_line in raw_lines:
        line = raw_line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _read_path_list(list_path):
    """Read a ``.txt`` file with one image path per line.

    The whole stripped line is the path, so names with spaces work.
    """
    base_dir = os.path.dirname(list_path)
    paths = [os.path.join(base_dir, line) for line in _read_lines(list_path, "Infer.infer_imgs")]

    if not paths:
        raise ValueError(
            f"Infer.infer_imgs: path list {list_path!r} contains no image paths. "
            "Write one image path per line; lines starting with '#' are skipped.")

    # A PaddleClas label list ("<path> <class id>") read as a path list would
    # give one "file not found" record per line, so point to Infer.infer_list.
    first = paths[0]
    name, _, label = first.rpartition(" ")
    if not os.path.exists(first) and name and _LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"Infer.infer_imgs: {list_path!r} looks like a PaddleClas label list "
            f"('<path> <class id>' lines, e.g. {os.path.basename(first)!r}). Set "
            "Infer.infer_list to this file and Infer.infer_imgs to the folder its "
            "paths are relative to.")
    return paths


def _read_infer_list(infer_list, image_root):
    """Read PaddleClas's ``relative/path [label]`` list and join each path to ``image_root``."""
    if not os.path.isfile(infer_list):
        raise FileNotFoundError(
            f"Infer.infer_list: {infer_list!r} does not exist. Set it to a text file "
            "of 'relative/path [label]' lines, or remove the key to read "
            "Infer.infer_imgs directly.")
    if not os.path.isdir(image_root):
        raise ValueError(
            f"Infer.infer_imgs: {image_root!r} must be a folder when Infer.infer_list "
            "is set, because the listed paths are relative to it.")

    paths = []
    for line in _read_lines(infer_list, "Infer.infer_list"):
        # The label column is optional. Only a trailing class id (or
        # comma-separated ids) counts as a label, so a path with spaces stays whole.
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and _LABEL_PATTERN.fullmatch(parts[1]):
            line = parts[0]
        paths.append(os.path.join(image_root, line))

    if not paths:
        raise ValueError(
            f"Infer.infer_list: {infer_list!r} contains no image paths. Write one "
            "'relative/path [label]' line per image.")
    return paths


def _deduplicate(paths):
    """Drop paths equal to an earlier one after ``os.path.normpath``, keeping order."""
    seen = set()
    unique = []
    for path in paths:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded.

    Attributes:
        name: the file name given to ``decode_image``, may be empty.
        cause: what is wrong with the data, for example "truncated image data".
    """

    def __init__(self, name, cause):
        self.name = name
        self.cause = cause
        super().__init__(f"{name}: {cause}" if name else cause)

    def __reduce__(self):
        return type(self), (self.name, self.cause)


def decode_image(data, to_rgb=True, channel_first=False, backend="cv2", name=""):
    """Decode an encoded image file to an 8-bit, 3-channel array.

    The module docstring describes how modes such as grayscale, alpha,
    palette and 16-bit are converted.

    Args:
        data: the encoded file contents.
        to_rgb: channel order RGB when True, BGR (OpenCV's order) when False.
        channel_first: return ``[3, H, W]`` instead of ``[H, W, 3]``.
        backend: ``"cv2"`` decodes plain 8-bit RGB and grayscale files with
            OpenCV, like PaddleClas's ``DecodeImage``. ``"pil"`` uses Pillow only.
        name: the file name used in error messages.

    Returns:
        A C-contiguous uint8 array of shape ``[H, W, 3]``, or ``[3, H, W]``
        when ``channel_first`` is True.

    Raises:
        ImageDecodeError: when the data is empty, not an image, truncated,
            corrupt, in a mode that cannot be converted, or over Pillow's
            decompression-bomb limit.
        ValueError: when ``backend`` is not ``"cv2"`` or ``"pil"``.
    """
    if backend not in DECODE_BACKENDS:
        raise ValueError(
            f"DecodeImage.backend must be one of {DECODE_BACKENDS}, got {backend!r}.")

    image, use_cv2 = _open_with_pillow(data, name)
    width, height = image.size

    rgb = None
    if backend == "cv2" and use_cv2:
        try:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            bgr = None
        if bgr is not None and bgr.shape == (height, width, 3):
            rgb = bgr[:, :, ::-1]
    if rgb is None:
        rgb = _pillow_to_rgb(image, name)

    pixels = rgb if to_rgb else rgb[:, :, ::-1]
    if channel_first:
        pixels = pixels.transpose((2, 0, 1))
    return np.ascontiguousarray(pixels)


def _open_with_pillow(data, name):
    """Open, fully load and EXIF-rotate an image with Pillow.

    Returns:
        A tuple ``(image, use_cv2)``. ``use_cv2`` is True for a plain 8-bit
        RGB or grayscale image that is not EXIF-rotated, or is a rotated JPEG.
        OpenCV 4.6 applies the EXIF orientation to JPEG, PNG and TIFF but not
        to WebP, so only a rotated JPEG, where pixel exactness matters most,
        is left to OpenCV.
    """
    if not data:
        raise ImageDecodeError(name, "file is empty (0 bytes)")

    try:
        # Images between one and two times MAX_IMAGE_PIXELS only warn, and are
        # accepted. Larger ones raise DecompressionBombError before any pixel
        # memory is allocated. The filter is restored on exit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_format = image.format
            # load() decodes every pixel, so truncated data raises here
            # (ImageFile.LOAD_TRUNCATED_IMAGES is left False).
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, _describe_bomb(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(name, "not an image file (cannot identify format)") from exc
    except Exception as exc:
        # Pillow's format plugins raise many exception types on malformed
        # data (OSError, SyntaxError, struct.error, EOFError, ...).
        if "truncated" in str(exc).lower():
            raise ImageDecodeError(name, "truncated image data") from exc
        raise ImageDecodeError(
            name, f"corrupt image data ({type(exc).__name__}: {exc})") from exc

    rotated_by_exif = orientation in range(2, 9)
    use_cv2 = image.mode in ("RGB", "L") and (source_format == "JPEG" or not rotated_by_exif)
    return image, use_cv2


def _describe_bomb(error):
    """Turn Pillow's DecompressionBombError into "image of N pixels exceeds ..."."""
    match = _BOMB_MESSAGE_PATTERN.search(str(error))
    if match is None:
        return f"image exceeds the decompression-bomb limit ({error})"
    pixels, limit = match.groups()
    return f"image of {pixels} pixels exceeds the decompression-bomb limit of {limit}"


def _pillow_to_rgb(image, name):
    """Convert a loaded Pillow image to a ``[H, W, 3]`` uint8 RGB array."""
    mode = image.mode
    try:
        if mode in ("1", "L", "LA"):
            # LA to L drops the alpha channel and keeps the stored gray level.
            gray = np.asarray(image.convert("L"))
        elif mode == "I" or mode.startswith("I;16"):
            values = np.asarray(image).astype(np.int64)
            gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        elif mode == "F":
            values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
            gray = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        else:
            # Pillow's RGBA, PA and palette-to-RGB conversions drop the alpha
            # channel without blending.
            return np.asarray(image.convert("RGB"))
    except (ValueError, OSError, TypeError) as exc:
        raise ImageDecodeError(name, f"cannot convert image mode {mode} to RGB ({exc})") from exc

    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def _error_message(path, cause):
    return f"{path}: {cause}"


class ImageFolderDataset(paddle.io.Dataset):
    """Images read from paths and preprocessed with ``Infer.transforms``.

    Each item is a dict ``{"index": int, "path": str, "image": np.ndarray or
    None, "error": str}``. ``image`` is the float32 output of the last op, for
    example ``[3, 224, 224]`` after ``ToCHWImage``. When the file cannot be
    read, decoded or preprocessed, ``image`` is None and ``error`` is
    ``"<path>: <cause>"``, so a bad file does not stop the loader.

    Args:
        paths: image paths, usually ``list_images(...).paths``.
        transform_ops: ``Infer.transforms``, a list of one-key dicts such as
            ``[{"DecodeImage": {"to_rgb": True}}, {"ResizeImage":
            {"resize_short": 256}}]``. A ``DecodeImage`` entry must come first
            and is handled by ``decode_image``. The other ops are PaddleClas's
            deploy preprocessing ops. None means decoding only.

    Raises:
        ValueError: when an entry is malformed, names an op that the installed
            PaddleClas lacks, or has parameters the op rejects.
    """

    def __init__(self, paths, transform_ops, config_key="Infer.transforms"):
        super().__init__()
        self.paths = list(paths)
        self.config_key = config_key

        entries = _parse_transform_entries(transform_ops, config_key)
        self.decode_params = {"to_rgb": True, "channel_first": False, "backend": "cv2"}
        if entries and entries[0][0] == "DecodeImage":
            self.decode_params.update(_parse_decode_params(entries[0][1], config_key))
            entries = entries[1:]

        self.op_names = [op_name for op_name, _ in entries]
        self.ops = _build_preprocess_ops(entries, config_key)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        record = {"index": index, "path": path, "image": None, "error": ""}

        try:
            record["image"] = self._load_image(path)
        except _RecordError as exc:
            record["error"] = str(exc)
        return record

    def _load_image(self, path):
        """Read, decode and preprocess one image, raising ``_RecordError`` on failure."""
        try:
            # A FIFO or a device named like an image (or a symlink to one, such
            # as /dev/zero) would block or never end, so only regular files are read.
            file_type = _describe_file_type(os.stat(path).st_mode)
            if file_type is not None:
                raise _RecordError(_error_message(path, f"not a regular file ({file_type})"))
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise _RecordError(_error_message(path, _describe_read_error(exc))) from exc

        try:
            image = decode_image(data, name=path, **self.decode_params)
        except ImageDecodeError as exc:
            raise _RecordError(str(exc)) from exc
        return self._preprocess(image, path)

    def _preprocess(self, image, path):
        """Run the ops after ``DecodeImage`` on decoded pixels and return float32."""
        for op_name, op in zip(self.op_names, self.ops):
            try:
                image = op(image)
            except Exception as exc:
                # PaddleClas's ops raise bare Exception and AssertionError as
                # well as ValueError, for example CropImage on a small image.
                # OpenCV's messages span several lines; records and logs keep one.
                reason = " ".join(str(exc).split())
                raise _RecordError(_error_message(
                    path, f"{op_name} failed ({type(exc).__name__}: {reason})")) from exc

        try:
            return np.ascontiguousarray(np.asarray(image), dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _RecordError(_error_message(
                path, f"{self.config_key} output is not a numeric array ({exc})")) from exc

    def probe(self, height=224, width=224):
        """Preprocess a black ``height`` x ``width`` image without reading a file.

        Returns:
            The float32 array an image of that size becomes, the same as an item's ``image``.

        Raises:
            ValueError: when an op fails on it, naming the op.
        """
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        if self.decode_params["channel_first"]:
            pixels = pixels.transpose((2, 0, 1))
        try:
            return self._preprocess(np.ascontiguousarray(pixels),
                                    f"a black {height}x{width} test image")
        except _RecordError as exc:
            raise ValueError(f"{self.config_key}: {exc}") from None


class _RecordError(Exception):
    """A per-image failure that becomes the ``error`` of a dataset item."""


def _describe_file_type(mode):
    """Return what a non-regular file is ("a FIFO", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _describe_read_error(error):
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image file"
    return f"read failed ({error})"


def _parse_transform_entries(transform_ops, config_key):
    """Check the shape of ``Infer.transforms`` and return ``[(op_name, params), ...]``."""
    if transform_ops is None:
        return []
    if not isinstance(transform_ops, (list, tuple)):
        raise ValueError(
            f"{config_key} must be a list of one-key mappings such as "
            f"[{{'ResizeImage': {{'resize_short': 256}}}}], got {transform_ops!r}.")

    entries = []
    for position, entry in enumerate(transform_ops):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(
                f"{config_key}[{position}] must be a one-key mapping such as "
                f"{{'ResizeImage': {{'resize_short': 256}}}}, got {entry!r}.")
        op_name, params = next(iter(entry.items()))
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(
                f"{config_key}[{position}]: the parameters of {op_name} must be "
                f"a mapping or empty, got {params!r}.")
        if op_name == "DecodeImage" and position != 0:
            raise ValueError(
                f"{config_key}: DecodeImage is at position {position}, but it "
                "must be the first op because every other op works on decoded pixels.")
        entries.append((op_name, dict(params)))
    return entries


def _parse_decode_params(params, config_key):
    """Check the ``DecodeImage`` parameters and return the ``decode_image`` keyword arguments."""
    unknown = sorted(set(params) - set(DECODE_IMAGE_KEYS))
    if unknown:
        raise ValueError(
            f"{config_key}: DecodeImage has unknown parameters {unknown}. "
            f"Accepted parameters: {', '.join(DECODE_IMAGE_KEYS)}.")

    decode_params = {}
    for key in ("to_rgb", "channel_first", "to_np"):
        if key in params and not isinstance(params[key], bool):
            raise ValueError(
                f"{config_key}: DecodeImage.{key} must be true or false, "
                f"got {params[key]!r}.")
        if key in params and key != "to_np":
            decode_params[key] = params[key]

    if "backend" in params:
        if params["backend"] not in DECODE_BACKENDS:
            raise ValueError(
                f"{config_key}: DecodeImage.backend must be one of "
                f"{', '.join(DECODE_BACKENDS)}, got {params['backend']!r}.")
        decode_params["backend"] = params["backend"]
    return decode_params


def supported_op_names():
    """Return the preprocessing op names usable in ``Infer.transforms``."""
    return integration.preprocess_op_names()


def _build_preprocess_ops(entries, config_key):
    """Build PaddleClas's preprocessing ops for ``[(op_name, params), ...]``."""
    supported = supported_op_names()
    for op_name, _ in entries:
        if op_name not in supported:
            raise ValueError(
                f"{config_key}: unknown op {op_name!r}, which the installed "
                f"PaddleClas does not provide. Supported ops: {', '.join(supported)}.")

    ops = []
    for op_name, params in entries:
        try:
            ops.extend(integration.create_preprocess_ops([{op_name: params}]))
        except Exception as exc:
            # The op constructors raise TypeError for unknown keywords and
            # AssertionError or ValueError for invalid values.
            raise ValueError(
                f"{config_key}: cannot build {op_name} with parameters {params} "
                f"({type(exc).__name__}: {exc}). Check the parameter names and values.") from exc
    return ops


def collate_records(items):
    """Batch dataset items, keeping failed items as error entries.

    Args:
        items: dicts returned by ``ImageFolderDataset.__getitem__``.

    Returns:
        A dict with ``"images"``: float32 array ``[n_good, ...]`` (shape
        ``[0]`` when no item has an image), ``"indices"``: int64 array
        ``[n_good]`` of the dataset indices of those images, and ``"errors"``:
        a list of ``[index, message]`` for the failed items. Items with a
        ``"label"`` add ``"labels"``: int64 ``[n_good]``.

    Raises:
        ValueError: when the images of the batch differ in shape, so they
            cannot be stacked.
    """
    good = [item for item in items if item["image"] is not None]
    errors = [[item["index"], item["error"]] for item in items if item["image"] is None]

    if good:
        _check_same_shape(good)
        images = np.stack([item["image"] for item in good]).astype(np.float32, copy=False)
    else:
        images = np.zeros((0,), dtype=np.float32)
    indices = np.array([item["index"] for item in good], dtype=np.int64)
    batch = {"images": images, "indices": indices, "errors": errors}

    # Labelled datasets add a class id to every item; it follows its image.
    if items and "label" in items[0]:
        batch["labels"] = np.array([item["label"] for item in good], dtype=np.int64)
    return batch


def _check_same_shape(items):
    first = items[0]
    for item in items[1:]:
        if item["image"].shape != first["image"].shape:
            raise ValueError(
                "Infer.transforms: preprocessed images differ in shape "
                f"({first['path']} is {list(first['image'].shape)}, {item['path']} is "
                f"{list(item['image'].shape)}), so they cannot be stacked into one "
                "batch. Add CropImage or a ResizeImage with a fixed size to "
                "Infer.transforms.")


class _IndexBatches(paddle.io.BatchSampler):
    """A batch sampler that yields given lists of dataset indices, in order."""

    def __init__(self, batches, batch_size):  # noqa: D107 - BatchSampler's own init is skipped
        self.batches = [list(batch) for batch in batches]
        self.batch_size = batch_size
        self.shuffle = False
        self.drop_last = False

    def __iter__(self):
        return iter([list(batch) for batch in self.batches])

    def __len__(self):
        return len(self.batches)


def build_loader(dataset, batch_size, num_workers=0, batches=None):
    """Build an in-order loader that batches with ``collate_records``.

    Args:
        dataset: an ``ImageFolderDataset``.
        batch_size: images per batch. The last batch may be smaller.
        num_workers: worker processes for reading and preprocessing. With 0,
            the main process reads each batch when it is needed.
        batches: lists of dataset indices, one list per batch, to load in
            place of every item in order. Resuming uses it to load only the
            batches that are not finished.

    Returns:
        An iterable with ``len``, ``batch_size`` and ``num_workers``: a
        ``paddle.io.DataLoader`` when ``num_workers`` > 0, else an
        ``InProcessLoader``. Each batch is the dict from ``collate_records``,
        with its arrays (``"images"``, ``"indices"``, ``"labels"``) converted
        to paddle Tensors.

    Raises:
        ValueError: when ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")

    if batches is None:
        batch_sampler = paddle.io.BatchSampler(dataset, batch_size=batch_size, shuffle=False,
                                               drop_last=False)
    else:
        batch_sampler = _IndexBatches(batches, batch_size)
    if num_workers == 0:
        return InProcessLoader(dataset, batch_sampler)
    return paddle.io.DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate_records,
        batch_sampler=batch_sampler,
        # With paddle 3.3.1, the shared-memory transfer from worker processes
        # fails on a zero-size array ("Tensor holds no memory") and the loader
        # hangs. A batch of only failed images has such arrays. Without shared
        # memory, batches are pickled through a queue, which is slower.
        use_shared_memory=False,
        worker_init_fn=_exit_with_parent,
    )


class InProcessLoader:
    """Batches read in this process, each right before the model needs it.

    This is the loader for ``num_workers`` 0: no thread and no queue, so
    only the batch in use is in memory, and arrays become paddle Tensors as
    each batch is handed over. Paddle's own single-process ``DataLoader``
    keeps several converted batches in flight on a reader thread, and with it
    the peak memory of a run rose with the image count (docs/benchmarks.md).
    Reading no longer overlaps the model; ``num_workers`` > 0 overlaps them.

    Args:
        dataset: an ``ImageFolderDataset``.
        batch_sampler: yields the lists of dataset indices of each batch and
            has ``batch_size``.
    """

    num_workers = 0

    def __init__(self, dataset, batch_sampler):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.batch_size = batch_sampler.batch_size

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            batch = collate_records([self.dataset[index] for index in indices])
            yield {key: paddle.to_tensor(value) if isinstance(value, np.ndarray) else value
                   for key, value in batch.items()}


def _exit_with_parent(worker_id):
    """Ask Linux to stop this worker when the main process dies.

    Paddle 3.3.1's workers stay blocked on their queue when the main process
    is killed (SIGKILL, or SIGTERM from a scheduler), so they would outlive
    the run. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    # The parent may have died before the call; then the signal never comes.
    if os.getppid() == 1:
        os._exit(0)
