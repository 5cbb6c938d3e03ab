"""tools/bench.py in its smoke mode; the full benchmark is never run by the tests."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench.py")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run ``tools/bench.py --smoke`` once; return (exit code, stderr, report, raw path)."""
    folder = tmp_path_factory.mktemp("bench")
    report, raw = folder / "bench.md", folder / "bench.json"
    completed = subprocess.run(
        [sys.executable, BENCH, "--smoke", "--output", str(report), "--json", str(raw)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    return completed.returncode, completed.stderr, report, raw


def test_smoke_writes_report(smoke_run):
    returncode, stderr, report, _ = smoke_run
    assert returncode == 0, stderr[-3000:]
    text = report.read_text(encoding="utf-8")
    assert "| Model | T | loop | tiled | prefix | auto runs | auto / loop |" in text
    assert "| PPLCNet_x0_25 | 2 |" in text
    assert "python tools/bench.py --smoke" in text
    assert "## Peak memory over the image count" in text
    assert "## Errors" not in text


def test_smoke_measures_every_strategy(smoke_run):
    returncode, stderr, _, raw = smoke_run
    assert returncode == 0, stderr[-3000:]
    results = json.loads(raw.read_text(encoding="utf-8"))["results"]
    strategies = {result["job"].get("strategy") for result in results}
    assert {"single", "loop", "tiled", "prefix"} <= strategies
    assert all("error" not in result for result in results)
    assert sum(result["job"]["kind"] == "memory" for result in results) == 2
    single = next(result for result in results if result["job"].get("strategy") == "single")
    assert single["auto_strategy"] == "prefix"


def test_report_from_saved_results(smoke_run, tmp_path):
    _, _, report, raw = smoke_run
    rendered = tmp_path / "again.md"
    completed = subprocess.run(
        [sys.executable, BENCH, "--from-json", str(raw), "--output", str(rendered)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert rendered.read_text(encoding="utf-8") == report.read_text(encoding="utf-8")


def test_rewrite_keeps_hand_written_part(smoke_run, tmp_path):
    _, _, _, raw = smoke_run
    spec = importlib.util.spec_from_file_location("bench_tool", BENCH)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    marker = tool.HAND_WRITTEN_MARKER
    page = tmp_path / "page.md"
    page.write_text(f"old numbers\n{marker}\n\n## Notes\n\nKept.\n", encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, BENCH, "--from-json", str(raw), "--output", str(page)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = page.read_text(encoding="utf-8")
    assert "old numbers" not in text
    assert text.startswith("# Benchmarks: MC Dropout sampling strategies")
    assert text.endswith("\n## Notes\n\nKept.\n")


def test_memory_only_prints_memory_section():
    completed = subprocess.run(
        [sys.executable, BENCH, "--smoke", "--memory-only", "--memory-workers", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = completed.stdout
    assert text.startswith("# Benchmarks: peak memory over the image count")
    assert "`Infer.num_workers: 1`" in text
    assert "worker processes' peak RSS" in text
    assert "- Peak memory over 16 images differs by" in text
    assert "## Wall time" not in text
