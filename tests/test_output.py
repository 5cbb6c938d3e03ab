import json
import os

import numpy as np
import pytest

from paddleclas_mc.output import (PredictionWriter, RecordFileError, build_records,
                                  encode_json_line, error_record, load_class_id_map,
                                  parse_record_lines, parse_records, write_bytes_atomic,
                                  write_json_atomic)


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


def test_write_bytes_atomic_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(str(tmp_path / "predictions.jsonl"), b'{"file_name": "a.png"}\n')
    finally:
        os.umask(umask)
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]
    assert (tmp_path / "predictions.jsonl").stat().st_mode & 0o777 == 0o644


def test_write_bytes_atomic_replaces_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(b"old\n")
    write_bytes_atomic(str(path), b"new\n")
    assert path.read_bytes() == b"new\n"


def test_parse_record_lines_keeps_bytes():
    data = b'{"file_name": "a.png",  "scores": [0.5]}\n\n{"file_name": "b.png"}\n{"file'
    lines, complete_size = parse_record_lines(data, "p.jsonl")

    assert lines == [({"file_name": "a.png", "scores": [0.5]},
                      b'{"file_name": "a.png",  "scores": [0.5]}'),
                     ({"file_name": "b.png"}, b'{"file_name": "b.png"}')]
    assert complete_size == data.rindex(b"\n") + 1


def test_writer_write_bytes_appends(tmp_path):
    with PredictionWriter(str(tmp_path)) as writer:
        writer.write([{"file_name": "a.png"}])
        writer.write_bytes(b'{"file_name": "b.png"}\n')
        records, _ = parse_records(writer.read(), writer.path)

    assert [record["file_name"] for record in records] == ["a.png", "b.png"]


def test_writer_one_os_write_per_batch(tmp_path, monkeypatch):
    calls = []
    real_write = os.write

    def counting_write(fd, data):
        calls.append(bytes(data))
        return real_write(fd, data)

    writer = PredictionWriter(str(tmp_path))
    monkeypatch.setattr(os, "write", counting_write)
    writer.write([{"file_name": f"{i}.png", "class_ids": [i]} for i in range(50)])
    writer.close()

    assert len(calls) == 1
    assert calls[0].count(b"\n") == 50
    assert calls[0].endswith(b"\n")


def test_writer_append_keeps_records(tmp_path):
    with PredictionWriter(str(tmp_path)) as writer:
        writer.write([{"file_name": "a.png"}])
    with PredictionWriter(str(tmp_path), append=True) as writer:
        writer.write([{"file_name": "b.png"}])
        records, _ = parse_records(writer.read(), writer.path)

    assert [record["file_name"] for record in records] == ["a.png", "b.png"]


def test_encode_json_line_non_utf8_name():
    name = os.fsdecode(b"caf\xe9.png")
    line = encode_json_line({"file_name": name})

    assert line.endswith(b"\n")
    line.decode("ascii")
    assert json.loads(line)["file_name"] == name


def test_parse_records_sets_apart_cut_short_line():
    data = b'{"file_name": "a.png"}\n{"file_name": "b.png"}\n{"file_na'
    records, complete_size = parse_records(data, "p.jsonl")

    assert [record["file_name"] for record in records] == ["a.png", "b.png"]
    assert data[:complete_size].endswith(b'"b.png"}\n')


@pytest.mark.parametrize("data, message", [
    (b'{"file_name": "a.png"}\nnot json\n', "p.jsonl:2: not a JSON record"),
    (b'{"file_name": "a.png"}\n[1, 2]\n', "p.jsonl:2: not a record with a file_name"),
])
def test_parse_records_malformed_line(data, message):
    with pytest.raises(RecordFileError, match=message):
        parse_records(data, "p.jsonl")


def test_class_id_map_extra_ids_rejected(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("0 zero\n1 one\n2 two\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"names class ids \[2\].*0 to 1"):
        load_class_id_map(str(path), num_classes=2)


def test_class_id_map_config_key_named(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("x y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="^DataLoader.Eval.dataset.class_id_map_file: "):
        load_class_id_map(str(path), config_key="DataLoader.Eval.dataset.class_id_map_file")
