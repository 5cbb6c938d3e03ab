"""Labelled evaluation data from PaddleClas's ``DataLoader.Eval`` section.

The ``paddleclas`` wheel has no ``ppcls.data``, so the two layouts that
classification configs use are read here:

- ``ImageNetDataset``: ``image_root`` plus ``cls_label_path``, a text file
  with one ``<relative path><delimiter><class id>`` per line.
- ``ImageFolder``: ``image_root`` with one sub-folder per class. Classes are
  the sub-folder names in sorted order, or the ids of ``class_id_map_file``
  when given (one ``<class id> <folder name>`` per line).

As in PaddleClas's dataset classes, the output of ``transform_ops`` is
transposed from HWC to CHW. A listed file that is missing or cannot be
decoded becomes an error entry of its batch, so it is counted and listed,
never dropped.
"""

import os

from . import integration
from .config import path_value
from .dataset import IMAGE_EXTENSIONS, ImageFolderDataset, build_loader
from .output import load_class_id_map

__all__ = ["LabelledImageDataset", "build_eval_loader", "read_label_file"]

DATASET_NAMES = ("ImageNetDataset", "ImageFolder")


class LabelledImageDataset(ImageFolderDataset):
    """``ImageFolderDataset`` whose items also carry a ``"label"`` (class id).

    Args:
        paths: image paths.
        labels: one class id per path.
        transform_ops: PaddleClas's ``transform_ops`` list for the images.
        config_key: the config key of ``transform_ops``, named in errors.
    """

    def __init__(self, paths, labels, transform_ops, config_key):
        super().__init__(paths, transform_ops, config_key=config_key)
        self.labels = [int(label) for label in labels]

    def probe(self, height=224, width=224):
        """Preprocess a black test image and transpose it to CHW, as items are."""
        image = super().probe(height, width)
        return image.transpose((2, 0, 1)).copy() if image.ndim == 3 else image

    def __getitem__(self, index):
        item = super().__getitem__(index)
        item["label"] = self.labels[index]
        if item["image"] is not None and item["image"].ndim == 3:
            item["image"] = item["image"].transpose((2, 0, 1)).copy()
        return item

    def probe(self, height=224, width=224):
        """Preprocess a black test image as ``__getitem__`` does, CHW transpose included."""
        image = super().probe(height, width)
        return image.transpose((2, 0, 1)).copy() if image.ndim == 3 else image


def read_label_file(path, image_root, delimiter=" ", config_key="cls_label_path"):
    """Read an ImageNetDataset label file.

    Returns:
        A tuple ``(paths, labels)``, paths joined to ``image_root``.

    Raises:
        FileNotFoundError: when the label file does not exist.
        ValueError: on a malformed line or an empty file, naming the line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_key}: label file {path!r} not found.")

    paths, labels = [], []
    with open(path, "r", encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, sep, label = line.rpartition(delimiter)
            if not sep or not name or not label.strip().lstrip("-").isdigit():
                raise ValueError(
                    f"{config_key}: {path}:{line_number}: expected "
                    f"'<image path>{delimiter!r}<class id>', got {line!r}.")
            paths.append(os.path.join(image_root, name))
            labels.append(int(label))

    if not paths:
        raise ValueError(f"{config_key}: label file {path!r} lists no images.")
    return paths, labels


def _read_class_folders(image_root, class_id_map_file, config_key):
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{config_key}.image_root: folder {image_root!r} not found.")

    if class_id_map_file:
        class_ids = {name: class_id for class_id, name in
                     load_class_id_map(class_id_map_file,
                                       config_key=f"{config_key}.class_id_map_file").items()}
    else:
        folders = sorted(entry.name for entry in os.scandir(image_root) if entry.is_dir())
        class_ids = {name: class_id for class_id, name in enumerate(folders)}

    paths, labels = [], []
    for name, class_id in sorted(class_ids.items(), key=lambda item: item[1]):
        folder = os.path.join(image_root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{config_key}.class_id_map_file: class {class_id} names folder "
                f"{folder!r}, which does not exist.")
        for root, _, files in sorted(os.walk(folder)):
            for file_name in sorted(files):
                if os.path.splitext(file_name)[1].lower() in IMAGE_EXTENSIONS:
                    paths.append(os.path.join(root, file_name))
                    labels.append(class_id)

    if not paths:
        raise ValueError(f"{config_key}.image_root: no images with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)} under {image_root!r}.")
    return paths, labels


def build_eval_loader(config):
    """Build the labelled loader described by ``config["DataLoader"]["Eval"]``.

    Returns:
        A tuple ``(loader, dataset)``. Each batch is the dict of
        ``dataset.collate_records``, with ``"labels"``.

    Raises:
        ValueError: on a missing or invalid key, naming it.
        FileNotFoundError: when the label file or image root does not exist.
    """
    section = ((config.get("DataLoader") or {}).get("Eval")) or {}
    dataset_config = dict(section.get("dataset") or {})
    key = "DataLoader.Eval.dataset"
    name = dataset_config.pop("name", None)
    if name not in DATASET_NAMES:
        raise ValueError(f"{key}.name: invalid value {name!r}; supported: "
                         f"{', '.join(DATASET_NAMES)}.")

    image_root = path_value(dataset_config.get("image_root"), f"{key}.image_root")
    if image_root is None:
        raise ValueError(f"{key}.image_root: missing; set it to the folder of the images.")
    if name == "ImageNetDataset":
        label_path = path_value(dataset_config.get("cls_label_path"), f"{key}.cls_label_path")
        if label_path is None:
            raise ValueError(f"{key}.cls_label_path: missing; set it to the label file.")
        paths, labels = read_label_file(label_path, image_root,
                                        dataset_config.get("delimiter") or " ",
                                        f"{key}.cls_label_path")
    else:
        class_id_map_file = path_value(dataset_config.get("class_id_map_file"),
                                       f"{key}.class_id_map_file")
        paths, labels = _read_class_folders(image_root, class_id_map_file, key)

    dataset = LabelledImageDataset(paths, labels, dataset_config.get("transform_ops"),
                                   f"{key}.transform_ops")
    batch_size, num_workers = _loader_settings(section)
    loader = build_loader(dataset, batch_size, num_workers)
    return loader, dataset


def _loader_settings(section):
    """Validate ``DataLoader.Eval``'s batch size and workers; return ``(batch_size, num_workers)``.

    PaddleClas's ``drop_last`` and ``shuffle`` are not applied: every image
    is scored, in file order, so that MC Dropout seeds fall on the same
    images in every run.
    """
    logger = integration.get_logger()
    sampler = section.get("sampler") or {}
    loader_config = section.get("loader") or {}
    batch_size = sampler.get("batch_size", 64)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"DataLoader.Eval.sampler.batch_size: invalid value {batch_size!r}; "
                         "expected an integer >= 1.")
    num_workers = loader_config.get("num_workers", 0)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"DataLoader.Eval.loader.num_workers: invalid value {num_workers!r}; "
                         "expected an integer >= 0 (0 reads images in the main process).")
    if sampler.get("drop_last"):
        logger.warning("DataLoader.Eval.sampler.drop_last is True, but eval scores every "
                       "image, the last smaller batch included; drop_last is ignored.")
    if sampler.get("shuffle"):
        logger.warning("DataLoader.Eval.sampler.shuffle is True, but eval reads images in "
                       "file order so that results repeat; shuffle is ignored.")
    return batch_size, num_workers
