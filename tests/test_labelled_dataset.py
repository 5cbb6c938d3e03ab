import numpy as np
import pytest
from PIL import Image

from paddleclas_mc.labelled_dataset import build_eval_loader, read_label_file

TRANSFORMS = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
              {"ResizeImage": {"size": 8}},
              {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.5] * 3, "std": [0.5] * 3,
                                  "order": ""}}]


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _config(dataset, batch_size=2):
    return {"DataLoader": {"Eval": {"dataset": dataset,
                                    "sampler": {"batch_size": batch_size},
                                    "loader": {"num_workers": 0}}}}


@pytest.fixture
def imagenet_layout(tmp_path):
    _image(tmp_path / "val" / "a.png", 10)
    _image(tmp_path / "val" / "b c.png", 20)
    _image(tmp_path / "val" / "d.png", 30)
    (tmp_path / "val" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "val_list.txt").write_text(
        "val/a.png 0\nval/b c.png 1\nval/broken.png 1\nval/missing.png 0\nval/d.png 2\n")
    return tmp_path


class TestReadLabelFile:
    def test_paths_with_spaces(self, imagenet_layout):
        paths, labels = read_label_file(str(imagenet_layout / "val_list.txt"), "root")
        assert paths[1] == "root/val/b c.png"
        assert labels == [0, 1, 1, 0, 2]

    def test_malformed_line_named(self, tmp_path):
        path = tmp_path / "list.txt"
        path.write_text("a.png 0\nb.png\n")
        with pytest.raises(ValueError, match=r"list.txt:2"):
            read_label_file(str(path), "root")


class TestImageNetDataset:
    def test_every_listed_file_accounted(self, imagenet_layout):
        loader, dataset = build_eval_loader(_config({
            "name": "ImageNetDataset", "image_root": str(imagenet_layout),
            "cls_label_path": str(imagenet_layout / "val_list.txt"),
            "transform_ops": TRANSFORMS}))
        labels, errors = [], []
        for batch in loader:
            labels += batch["labels"].numpy().tolist()
            errors += [dataset.paths[int(index)] for index, _ in batch["errors"]]
            if len(batch["indices"]):
                assert batch["images"].shape[1:] == [3, 8, 8]
        assert labels == [0, 1, 2]
        assert sorted(errors) == sorted([str(imagenet_layout / "val" / "broken.png"),
                                         str(imagenet_layout / "val" / "missing.png")])

    def test_missing_label_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="cls_label_path"):
            build_eval_loader(_config({"name": "ImageNetDataset", "image_root": str(tmp_path),
                                       "cls_label_path": str(tmp_path / "none.txt"),
                                       "transform_ops": TRANSFORMS}))

    def test_unknown_dataset_name(self, tmp_path):
        with pytest.raises(ValueError, match="DataLoader.Eval.dataset.name"):
            build_eval_loader(_config({"name": "CustomLabelDataset", "image_root": str(tmp_path)}))

    def test_unknown_transform_names_key(self, imagenet_layout):
        with pytest.raises(ValueError, match="DataLoader.Eval.dataset.transform_ops"):
            build_eval_loader(_config({
                "name": "ImageNetDataset", "image_root": str(imagenet_layout),
                "cls_label_path": str(imagenet_layout / "val_list.txt"),
                "transform_ops": [{"RandomErasing": None}]}))


class TestImageFolder:
    def test_classes_from_sorted_folders(self, tmp_path):
        _image(tmp_path / "cat" / "1.png", 1)
        _image(tmp_path / "dog" / "2.JPG", 2)
        _image(tmp_path / "dog" / "nested" / "3.png", 3)
        (tmp_path / "dog" / "notes.txt").write_text("x")
        loader, dataset = build_eval_loader(_config({
            "name": "ImageFolder", "image_root": str(tmp_path), "transform_ops": TRANSFORMS}, 5))
        assert dataset.labels == [0, 1, 1]
        batch = next(iter(loader))
        assert batch["labels"].numpy().tolist() == [0, 1, 1]

    def test_classes_from_label_map(self, tmp_path):
        _image(tmp_path / "cat" / "1.png", 1)
        _image(tmp_path / "dog" / "2.png", 2)
        (tmp_path / "labels.txt").write_text("0 dog\n1 cat\n")
        _, dataset = build_eval_loader(_config({
            "name": "ImageFolder", "image_root": str(tmp_path),
            "class_id_map_file": str(tmp_path / "labels.txt"), "transform_ops": TRANSFORMS}))
        assert dict(zip(dataset.paths, dataset.labels)) == {
            str(tmp_path / "dog" / "2.png"): 0, str(tmp_path / "cat" / "1.png"): 1}

    def test_empty_root(self, tmp_path):
        with pytest.raises(ValueError, match="no images"):
            build_eval_loader(_config({"name": "ImageFolder", "image_root": str(tmp_path),
                                       "transform_ops": TRANSFORMS}))
