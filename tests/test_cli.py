"""The paddleclas-mc command: infer, eval and bench, equivalent to tools/*.py."""

import json
import os
import subprocess
import sys
import types

import pytest

from paddleclas_mc import __version__
from paddleclas_mc.cli import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join("configs", "demo", "mc_digits.yaml")
# The 46 demo images of the digit 3, enough to compare outputs quickly.
DIGIT_FOLDER = os.path.join("demo", "digits", "images", "test", "3")


@pytest.fixture(autouse=True)
def repository_root(monkeypatch):
    # The demo configs use paths relative to the repository root.
    monkeypatch.chdir(ROOT)


def _console_script():
    """Return the installed paddleclas-mc script next to this Python, or fail with the fix."""
    name = "paddleclas-mc.exe" if os.name == "nt" else "paddleclas-mc"
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} not found. Reinstall paddleclas-mc (pip install -e .) so that "
                    "pip creates the console script.")
    return path


class TestUsage:
    def test_help_lists_commands(self, capsys):
        assert main(["--help"]) == 0
        output = capsys.readouterr().out
        for command in COMMANDS:
            assert f"  {command} " in output

    def test_version(self, capsys):
        assert main(["--version"]) == 0
        assert capsys.readouterr().out.strip() == f"paddleclas-mc {__version__}"

    def test_missing_command_exits_2(self, capsys):
        assert main([]) == 2
        assert "error: missing command" in capsys.readouterr().err

    def test_unknown_command_exits_2(self, capsys):
        assert main(["train"]) == 2
        assert "error: unknown command 'train'" in capsys.readouterr().err

    def test_command_help_shows_flags(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main(["infer", "--help"])
        assert exit_info.value.code == 0
        output = capsys.readouterr().out
        assert "-c CONFIG" in output
        assert "-o OVERRIDE" in output

    def test_config_error_is_one_line(self, capsys):
        assert main(["infer", "-c", MC_CONFIG, "-o", "MCDropout.samples=1"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: MCDropout.samples: invalid value 1")
        assert len(error.strip().splitlines()) == 1

    def test_missing_config_exits_2(self, capsys):
        assert main(["eval", "-c", "no/such/config.yaml"]) == 2
        assert "not found" in capsys.readouterr().err


class TestBench:
    def test_missing_module_exits_2(self, monkeypatch, capsys):
        # None in sys.modules makes the import fail as for a missing module.
        monkeypatch.setitem(sys.modules, "paddleclas_mc.bench", None)
        assert main(["bench", "-c", MC_CONFIG]) == 2
        assert "paddleclas_mc.bench is missing" in capsys.readouterr().err

    def test_arguments_passed_to_main(self, monkeypatch):
        received = []
        module = types.ModuleType("paddleclas_mc.bench")
        module.main = lambda argv: received.append(argv) or 3
        monkeypatch.setitem(sys.modules, "paddleclas_mc.bench", module)
        assert main(["bench", "-c", MC_CONFIG, "-o", "MCDropout.samples=4"]) == 3
        assert received == [["-c", MC_CONFIG, "-o", "MCDropout.samples=4"]]

    def test_none_status_is_success(self, monkeypatch):
        module = types.ModuleType("paddleclas_mc.bench")
        module.main = lambda argv: None
        monkeypatch.setitem(sys.modules, "paddleclas_mc.bench", module)
        assert main(["bench"]) == 0

    def test_module_without_main_exits_2(self, monkeypatch, capsys):
        monkeypatch.setitem(sys.modules, "paddleclas_mc.bench",
                            types.ModuleType("paddleclas_mc.bench"))
        assert main(["bench"]) == 2
        assert "has no main(argv)" in capsys.readouterr().err


def _run(command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"stdout:\n{result.stdout[-3000:]}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")
    return result


def test_console_infer_matches_tools(tmp_path):
    overrides = ["-o", f"Infer.infer_imgs={DIGIT_FOLDER}", "-o", "MCDropout.samples=10"]
    _run([_console_script(), "infer", "-c", MC_CONFIG, *overrides,
          "-o", f"Infer.save_dir={tmp_path / 'console'}"])
    _run([sys.executable, os.path.join("tools", "infer.py"), "-c", MC_CONFIG, *overrides,
          "-o", f"Infer.save_dir={tmp_path / 'tools'}"])

    console = (tmp_path / "console" / "predictions.jsonl").read_bytes()
    assert console == (tmp_path / "tools" / "predictions.jsonl").read_bytes()
    records = [json.loads(line) for line in console.splitlines()]
    assert len(records) == len(os.listdir(DIGIT_FOLDER))
    assert sum(record["class_ids"][0] == 3 for record in records) >= 0.9 * len(records)


def test_console_infer_config_error_exits_2():
    result = subprocess.run([_console_script(), "infer", "-c", MC_CONFIG,
                             "-o", "MCDropout.strategy=fast"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "error: MCDropout.strategy: invalid value 'fast'" in result.stderr
    assert "Traceback" not in result.stderr


def test_module_entry_point_version():
    result = _run([sys.executable, "-m", "paddleclas_mc", "--version"])
    assert result.stdout.strip() == f"paddleclas-mc {__version__}"


def test_eval_writes_metrics(tmp_path):
    status = main(["eval", "-c", MC_CONFIG, "-o", "MCDropout.samples=4",
                   "-o", f"Global.output_dir={tmp_path}"])
    assert status == 0
    with open(tmp_path / "metrics.json", encoding="utf-8") as file:
        metrics = json.load(file)
    assert metrics["config"] == MC_CONFIG
    assert metrics["samples"] == 4
    assert metrics["mc_dropout"]["top1"] > 0.9
    assert metrics["single_pass"]["top1"] > 0.9


def test_bench_command_runs_smoke(tmp_path):
    command = [sys.executable, "-m", "paddleclas_mc", "bench", "--smoke",
               "--output", str(tmp_path / "bench.md")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "bench.md").read_text(encoding="utf-8").count("|") > 10
