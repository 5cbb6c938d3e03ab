"""Infer and eval split across processes: the batch split, the store exchanges, the record merge,
and two CPU processes under ``python -m paddle.distributed.launch`` against one process."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from paddleclas_mc import distributed
from paddleclas_mc.config import load_config
from paddleclas_mc.dataset import ImageFolderDataset
from paddleclas_mc.distributed import Ranks, assign_batches, current_ranks
from paddleclas_mc.engine import run_infer, set_device
from paddleclas_mc.evaluation import run_eval
from paddleclas_mc.output import encode_json_line
from paddleclas_mc.resume import merge_record_lines, shard_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join(ROOT, "configs", "demo", "mc_digits.yaml")
DIGITS = os.path.join(ROOT, "demo", "digits")

# Test digits that the demo model misclassifies, so that AUROC and AURC have
# errors to rank.
MISCLASSIFIED = ["images/test/1/test_1264.png 1", "images/test/3/test_1632.png 3",
                 "images/test/8/test_1197.png 8", "images/test/9/test_1146.png 9"]

BATCH_SIZE = 8
SAMPLES = 8


# The batch split.


def test_assign_batches_round_robin():
    batches = [f"batch {index}" for index in range(7)]
    assert assign_batches(batches, 0, 3) == ["batch 0", "batch 3", "batch 6"]
    assert assign_batches(batches, 1, 3) == ["batch 1", "batch 4"]
    assert assign_batches(batches, 2, 3) == ["batch 2", "batch 5"]


@pytest.mark.parametrize("count, world_size", [(0, 2), (1, 4), (5, 2), (12, 3), (13, 8)])
def test_assign_batches_covers_each_once(count, world_size):
    batches = list(range(count))
    shares = [assign_batches(batches, rank, world_size) for rank in range(world_size)]
    assert sorted(sum(shares, [])) == batches
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


# The launcher's environment.


def test_current_ranks_without_launcher():
    ranks = current_ranks({})
    assert (ranks.rank, ranks.world_size) == (0, 1)
    assert ranks.timeout_s == distributed.DEFAULT_TIMEOUT_S


def test_current_ranks_from_launcher_variables():
    ranks = current_ranks({"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "4",
                           "PADDLE_MASTER": "127.0.0.1:6070",
                           "PADDLECLAS_MC_WAIT_TIMEOUT": "12.5"})
    assert (ranks.rank, ranks.world_size, ranks.timeout_s) == (1, 4, 12.5)


@pytest.mark.parametrize("environ, message", [
    ({"PADDLE_TRAINERS_NUM": "two"}, "PADDLE_TRAINERS_NUM: invalid value 'two'"),
    ({"PADDLE_TRAINER_ID": "2", "PADDLE_TRAINERS_NUM": "2", "PADDLE_MASTER": "h:1"},
     "the rank must be in"),
    ({"PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "2"}, "PADDLE_MASTER is not set"),
    ({"PADDLECLAS_MC_WAIT_TIMEOUT": "0"}, "PADDLECLAS_MC_WAIT_TIMEOUT: invalid value '0'"),
    ({"PADDLECLAS_MC_WAIT_TIMEOUT": "nan"}, "PADDLECLAS_MC_WAIT_TIMEOUT: invalid value"),
])
def test_current_ranks_invalid_environment(environ, message):
    with pytest.raises(ValueError, match=message):
        current_ranks(environ)


def test_device_id_rejected_with_several_processes():
    config = {"Global": {"device": "gpu:1"}}
    with pytest.raises(ValueError, match="puts all 2 processes on one device"):
        set_device(config, Ranks(rank=0, world_size=2))


# The exchanges, with threads standing in for processes and a dict for the store.


class FakeStore:
    """The part of Paddle's TCPStore that ``Ranks`` uses, kept in a dict."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values = {}
        self.counters = {}

    def set(self, key, value):
        with self.lock:
            self.values[key] = bytes(value)

    def get(self, key):
        with self.lock:
            return self.values[key]

    def add(self, key, amount):
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + amount
            return self.counters[key]


def run_ranks(world_size, function, timeout_s=30.0):
    """Run ``function(ranks)`` in one thread per rank; return each rank's result or exception."""
    store = FakeStore()
    outcomes = [None] * world_size

    def target(rank):
        ranks = Ranks(rank=rank, world_size=world_size, timeout_s=timeout_s, _store=store)
        try:
            outcomes[rank] = function(ranks)
        except Exception as error:  # noqa: BLE001 - returned for the test to check
            outcomes[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank is still waiting"
    return outcomes, store


def test_gather_scatter_broadcast(monkeypatch):
    # Small chunks, so that the payloads travel in several.
    monkeypatch.setattr(distributed, "CHUNK_BYTES", 7)

    def exchange(ranks):
        gathered = ranks.gather({"rank": ranks.rank, "data": b"x" * (10 * ranks.rank)}, "gather")
        mine = ranks.scatter([f"for rank {rank}" for rank in range(3)], "scatter")
        shared = ranks.broadcast(list(range(20)) if ranks.is_main else None, "broadcast")
        ranks.finish()
        return gathered, mine, shared

    outcomes, store = run_ranks(3, exchange)

    gathered, mine, shared = outcomes[0]
    assert gathered == [{"rank": rank, "data": b"x" * (10 * rank)} for rank in range(3)]
    for rank in (1, 2):
        assert outcomes[rank][0] is None
    assert [outcome[1] for outcome in outcomes] == ["for rank 0", "for rank 1", "for rank 2"]
    for outcome in outcomes:
        assert outcome[2] == list(range(20))
    assert all(value == b"" for value in store.values.values()), "the store kept a payload"


def test_check_raises_on_every_rank():
    def step(ranks):
        error = ValueError("Infer.save_dir: locked") if ranks.rank == 1 else None
        ranks.check(error, "open shard")

    outcomes, _ = run_ranks(3, step)

    assert str(outcomes[1]) == "Infer.save_dir: locked"
    for rank in (0, 2):
        assert isinstance(outcomes[rank], ValueError)
        assert str(outcomes[rank]) == ("rank 1 of 3 failed in step 'open shard' with "
                                       "ValueError: Infer.save_dir: locked")


def test_check_passes_when_no_rank_failed():
    outcomes, _ = run_ranks(2, lambda ranks: ranks.check(None, "step"))
    assert outcomes == [None, None]


def test_run_on_main_shares_result_and_error():
    def succeed(ranks):
        return ranks.run_on_main(lambda: {"predicted": 38}, "merge")

    outcomes, _ = run_ranks(2, succeed)
    assert outcomes == [{"predicted": 38}, {"predicted": 38}]

    def fail(ranks):
        def merge():
            raise KeyError("file_name")
        return ranks.run_on_main(merge, "merge")

    outcomes, _ = run_ranks(2, fail)
    assert isinstance(outcomes[0], KeyError)
    assert isinstance(outcomes[1], RuntimeError)
    assert "rank 0 of 2 failed in step 'merge' with KeyError" in str(outcomes[1])


def test_wait_timeout_names_missing_rank():
    def step(ranks):
        if ranks.rank == 2:
            return None  # never sends
        return ranks.gather(ranks.rank, "records")

    outcomes, _ = run_ranks(3, step, timeout_s=0.3)

    assert isinstance(outcomes[0], TimeoutError)
    assert "rank 0 of 3 waited 0.3 s in step 'records' for rank(s) 2" in str(outcomes[0])
    assert "PADDLECLAS_MC_WAIT_TIMEOUT" in str(outcomes[0])
    assert outcomes[1] is None


@pytest.mark.parametrize("listing, problem", [
    (["a.png"], "rank 1 lists 1 images and rank 0 lists 2"),
    (["b.png", "a.png"], "rank 1 lists other images than rank 0, or the same 2 images in "
                         "another order"),
])
def test_check_same_images_differing_list(listing, problem):
    def step(ranks):
        entries = ["a.png", "b.png"] if ranks.rank != 1 else listing
        distributed.check_same_images(ranks, entries, "Infer.infer_imgs")

    outcomes, _ = run_ranks(3, step)

    assert str(outcomes[0]).startswith(f"Infer.infer_imgs: {problem}. Every process must see")
    for rank in (1, 2):
        assert isinstance(outcomes[rank], ValueError)
        assert problem in str(outcomes[rank])


def test_check_same_images_equal_lists():
    outcomes, _ = run_ranks(2, lambda ranks: distributed.check_same_images(
        ranks, ["a.png", "b.png"], "Infer.infer_imgs"))
    assert outcomes == [None, None]


def test_one_process_needs_no_store():
    ranks = Ranks()
    assert ranks.gather("a", "gather") == ["a"]
    assert ranks.scatter(["b"], "scatter") == "b"
    assert ranks.broadcast("c", "broadcast") == "c"
    ranks.finish()
    with pytest.raises(ValueError, match="own"):
        ranks.check(ValueError("own"), "step")


# The merge of records.


def _lines(*records):
    return b"".join(encode_json_line(record) for record in records)


def test_merge_orders_by_image_list():
    paths = ["a.png", "b.png", "c.png", "d.png"]
    rank_0 = _lines({"file_name": "a.png", "class_ids": [0]}, {"file_name": "c.png", "class_ids": [2]})
    rank_1 = _lines({"file_name": "b.png", "class_ids": [1]},
                    {"file_name": "d.png", "error": "truncated"})

    merged = merge_record_lines([("rank 0", rank_0), ("rank 1", rank_1)], paths)

    assert [record["file_name"] for record, _ in merged] == paths
    assert b"".join(line + b"\n" for _, line in merged) == _lines(
        {"file_name": "a.png", "class_ids": [0]}, {"file_name": "b.png", "class_ids": [1]},
        {"file_name": "c.png", "class_ids": [2]}, {"file_name": "d.png", "error": "truncated"})


def test_merge_keeps_first_duplicate():
    merged = merge_record_lines([("earlier", _lines({"file_name": "a.png", "run": 1})),
                                 ("rank 0", _lines({"file_name": "a.png", "run": 2}))],
                                ["a.png"])
    assert [record for record, _ in merged] == [{"file_name": "a.png", "run": 1}]


def test_merge_rejects_missing_record():
    with pytest.raises(ValueError, match=r"1 of 2 images have no record .*\['b.png'\]"):
        merge_record_lines([("rank 0", _lines({"file_name": "a.png"}))], ["a.png", "b.png"])


def test_merge_rejects_unknown_file():
    with pytest.raises(ValueError, match="rank 1 has a record for 'z.png'"):
        merge_record_lines([("rank 1", _lines({"file_name": "z.png"}))], ["a.png"])


# Two CPU processes under paddle.distributed.launch against one process.


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    """36 test digits, 4 misclassified ones and one unreadable file, as an ImageNetDataset list.

    The same file serves as ``Infer.infer_list`` with ``Infer.infer_imgs``
    set to ``demo/digits``. With batches of 8, the 41 images make 6 batches,
    the last with one image.
    """
    folder = tmp_path_factory.mktemp("subset")
    with open(os.path.join(DIGITS, "test_list.txt"), encoding="utf-8") as file:
        lines = file.read().splitlines()[:36]
    for position, line in zip((3, 13, 22, 30), MISCLASSIFIED):
        lines.insert(position, line)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    lines.insert(17, f"{os.path.relpath(broken, DIGITS)} 5")
    path = folder / "list.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def infer_overrides(label_file, save_dir, *extra):
    return [f"Infer.infer_imgs={DIGITS}", f"Infer.infer_list={label_file}",
            f"Infer.save_dir={save_dir}", f"Infer.batch_size={BATCH_SIZE}",
            "Infer.num_workers=0", f"MCDropout.samples={SAMPLES}", *extra]


def eval_overrides(label_file, output_dir):
    return [f"DataLoader.Eval.dataset.cls_label_path={label_file}",
            f"DataLoader.Eval.sampler.batch_size={BATCH_SIZE}", f"Global.output_dir={output_dir}",
            f"MCDropout.samples={SAMPLES}"]


def launch(tool, overrides, log_dir):
    """Run ``tools/<tool>`` in two CPU processes with paddle.distributed.launch."""
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--host", "127.0.0.1", "--log_dir", str(log_dir),
               os.path.join(ROOT, "tools", tool), "-c", MC_CONFIG]
    for override in overrides:
        command += ["-o", override]
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PADDLE_")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=environ)
    logs = ""
    for rank in range(2):
        log_path = os.path.join(log_dir, f"workerlog.{rank}")
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8", errors="replace") as file:
                logs += f"\n--- workerlog.{rank}\n" + file.read()[-3000:]
    assert result.returncode == 0, result.stdout[-2000:] + logs


def in_repository_root(function, *args):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return function(*args)
    finally:
        os.chdir(cwd)


def read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def file_names(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line)["file_name"] for line in file]


@pytest.fixture(scope="module")
def infer_runs(label_file, tmp_path_factory):
    """``(one process, two processes)`` save_dirs of the same MC Dropout infer run."""
    folder = tmp_path_factory.mktemp("infer")
    single, double = folder / "one", folder / "two"
    in_repository_root(run_infer, load_config(MC_CONFIG, infer_overrides(label_file, single)))
    launch("infer.py", infer_overrides(label_file, double), folder / "log")
    return single, double


@pytest.fixture(scope="module")
def eval_runs(label_file, tmp_path_factory):
    """``(one process, two processes)`` metrics.json contents of the same eval run."""
    folder = tmp_path_factory.mktemp("eval")
    single, double = folder / "one", folder / "two"
    in_repository_root(run_eval, load_config(MC_CONFIG, eval_overrides(label_file, single)))
    launch("eval.py", eval_overrides(label_file, double), folder / "log")
    return read_json(single / "metrics.json"), read_json(double / "metrics.json")


def test_launched_infer_covers_same_files(infer_runs):
    single, double = infer_runs
    names = file_names(double / "predictions.jsonl")
    assert len(names) == len(set(names)) == 41
    assert names == file_names(single / "predictions.jsonl")


def test_launched_infer_same_records(infer_runs):
    # Each batch's dropout seed comes from its global batch index, so MC
    # Dropout gives the same records on any number of CPU processes.
    single, double = infer_runs
    assert ((double / "predictions.jsonl").read_bytes()
            == (single / "predictions.jsonl").read_bytes())


def test_launched_infer_summary(infer_runs):
    single, double = infer_runs
    one, two = read_json(single / "summary.json"), read_json(double / "summary.json")
    assert two["world_size"] == 2
    assert two["devices"] == ["cpu", "cpu"]
    assert two["batches_per_rank"] == [3, 3]
    for key in ("images", "predicted", "failed", "failed_files", "fingerprint", "seed"):
        assert two[key] == one[key], key
    assert two["failed"] == 1


def test_launched_infer_deletes_shards(infer_runs):
    _, double = infer_runs
    assert sorted(os.listdir(double)) == ["predictions.jsonl", "run.json", "summary.json"]


def test_launched_eval_counts(eval_runs):
    one, two = eval_runs
    assert two["world_size"] == 2
    assert two["batches_per_rank"] == [3, 3]
    for key in ("images", "evaluated", "failed", "failed_files", "scored"):
        assert two[key] == one[key], key
    assert two["evaluated"] == 40


def test_launched_eval_single_pass_metrics_equal(eval_runs):
    one, two = eval_runs
    assert 0.85 < one["single_pass"]["top1"] < 1.0, "the subset should have some errors"
    # json.dumps compares NaN as equal; every value must match to the last bit.
    assert json.dumps(two["single_pass"]) == json.dumps(one["single_pass"])


def test_launched_eval_mc_metrics_equal(eval_runs):
    # The merged metric states are exact and each batch keeps its seed, so
    # MC Dropout metrics agree exactly, which is within any Monte Carlo error.
    one, two = eval_runs
    assert json.dumps(two["mc_dropout"]) == json.dumps(one["mc_dropout"])


def _write_shard(folder, lines, run_json):
    os.makedirs(folder)
    with open(os.path.join(folder, "predictions.jsonl"), "wb") as file:
        file.write(b"".join(lines))
    shutil.copy(run_json, os.path.join(folder, "run.json"))


def _interrupted_run(reference, target):
    """Lay out what an interrupted run may leave, from a finished reference run.

    ``predictions.jsonl`` keeps records 0-9 (a run with one process),
    ``.rank1`` records 16-23 and ``.rank3`` records 35-40 (a run with four
    processes). Records 10-15 and 24-34 are missing.

    Returns:
        The number of images with a record.
    """
    with open(reference / "predictions.jsonl", "rb") as file:
        lines = file.readlines()
    os.makedirs(target)
    run_json = reference / "run.json"
    shutil.copy(run_json, target / "run.json")
    (target / "predictions.jsonl").write_bytes(b"".join(lines[:10]))
    _write_shard(shard_dir(str(target), 1), lines[16:24], run_json)
    _write_shard(shard_dir(str(target), 3), lines[35:], run_json)
    return 10 + 8 + 6


def test_launched_resume_gives_same_records(infer_runs, label_file, tmp_path):
    single, _ = infer_runs
    target = tmp_path / "resumed"
    done = _interrupted_run(single, target)

    launch("infer.py", infer_overrides(label_file, target, "Infer.resume=True"),
           tmp_path / "log")

    assert (target / "predictions.jsonl").read_bytes() == (single / "predictions.jsonl").read_bytes()
    summary = read_json(target / "summary.json")
    assert summary["resumed_records"] == done
    # Batches 1, 3 and 4 have images without a record.
    assert summary["batches_per_rank"] == [2, 1]
    assert summary["failed_files"] == read_json(single / "summary.json")["failed_files"]
    assert sorted(os.listdir(target)) == ["predictions.jsonl", "run.json", "summary.json"]


def test_one_process_resumes_shards(infer_runs, label_file, tmp_path, monkeypatch):
    single, _ = infer_runs
    target = tmp_path / "resumed"
    done = _interrupted_run(single, target)
    with open(single / "predictions.jsonl", encoding="utf-8") as file:
        names = [json.loads(line)["file_name"] for line in file]
    # Batches 2 (images 16-23) and 5 (image 40) are complete in the shards.
    # Batch 4 is not, so it is inferred again and only images 32-34 get records.
    complete_in_shards = set(names[16:24] + names[40:])
    loaded = []
    original = ImageFolderDataset._load_image

    def record_load(self, path):
        loaded.append(path)
        return original(self, path)

    monkeypatch.setattr(ImageFolderDataset, "_load_image", record_load)
    summary = in_repository_root(run_infer, load_config(
        MC_CONFIG, infer_overrides(label_file, target, "Infer.resume=True")))

    assert summary["resumed_records"] == done
    assert not complete_in_shards & set(loaded), "a complete batch was inferred again"
    assert sorted(file_names(target / "predictions.jsonl")) == sorted(names)
    assert sorted(os.listdir(target)) == ["predictions.jsonl", "run.json", "summary.json"]
