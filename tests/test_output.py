import json

import numpy as np
import pytest

from paddleclas_mc.output import (PredictionWriter, build_records, error_record,
                                  load_class_id_map, write_json_atomic)


class TestLoadClassIdMap:
    def test_names_with_spaces(self, tmp_path):
        path = tmp_path / "labels.txt"
        path.write_text("0 tench fish\n1 goldfish\n\n", encoding="utf-8")
        assert load_class_id_map(str(path)) == {0: "tench fish", 1: "goldfish"}

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="class_id_map_file"):
            load_class_id_map(str(tmp_path / "none.txt"))

    def test_malformed_line_named(self, tmp_path):
        path = tmp_path / "labels.txt"
        path.write_text("0 zero\none 1\n")
        with pytest.raises(ValueError, match=r"labels.txt:2"):
            load_class_id_map(str(path))

    def test_duplicate_id(self, tmp_path):
        path = tmp_path / "labels.txt"
        path.write_text("0 zero\n0 nought\n")
        with pytest.raises(ValueError, match="listed twice"):
            load_class_id_map(str(path))

    def test_missing_class_ids(self, tmp_path):
        path = tmp_path / "labels.txt"
        path.write_text("0 zero\n1 one\n")
        with pytest.raises(ValueError, match=r"ids without a name: \[2\]"):
            load_class_id_map(str(path), num_classes=3)


class TestBuildRecords:
    def test_topk_fields_and_measures(self):
        probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
        records = build_records(probs, ["a.png", "b.png"], topk=2,
                                class_id_map={0: "zero", 1: "one", 2: "two"},
                                measures={"mutual_information": np.array([0.1234567, 0.0])})
        assert records[0]["class_ids"] == [1, 2]
        assert records[0]["scores"] == [0.7, 0.2]
        assert records[0]["label_names"] == ["one", "two"]
        assert records[0]["file_name"] == "a.png"
        assert records[0]["mutual_information"] == 0.123457
        assert records[1]["class_ids"] == [0, 2]

    def test_without_label_map(self):
        records = build_records(np.array([[0.4, 0.6]]), ["a.png"], topk=1)
        assert records[0]["label_names"] == []


def test_writer_streams_whole_lines(tmp_path):
    writer = PredictionWriter(str(tmp_path))
    writer.write([{"file_name": "ä b.png", "class_ids": [1]}])
    lines = (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["file_name"] == "ä b.png"
    writer.write([error_record("c.png", "c.png: file is empty (0 bytes)")])
    writer.close()
    lines = (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1])["error"].endswith("(0 bytes)")


def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    write_json_atomic(str(tmp_path / "summary.json"), {"images": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["images"] == 3


def test_write_json_atomic_nan_as_null(tmp_path):
    write_json_atomic(str(tmp_path / "m.json"), {"auroc": float("nan"), "runs": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"auroc": None, "runs": [None, 1.0]}
