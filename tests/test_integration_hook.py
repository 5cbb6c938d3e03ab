"""The start-up hook that makes a checkout's tools/infer.py and tools/eval.py run MC Dropout.

The unit tests patch stand-in Engine classes and need no checkout. The tests
of the installed ``.pth`` file start fresh interpreters, so they need
paddleclas-mc installed (``pip install -e .`` or ``pip install .``). The
tests at the end run a real checkout's tools and skip unless
``PADDLECLAS_ROOT`` names one (see docs/paddleclas_checkout.md).
"""

import json
import logging
import os
import site
import subprocess
import sys
import textwrap

import pytest

from conftest import require_paddleclas_checkout

from paddleclas_mc.integration import hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_CONFIG = os.path.join("configs", "demo", "mc_digits.yaml")
PLAIN_CONFIG = os.path.join("configs", "demo", "digits.yaml")
PTH_NAME = "paddleclas_mc_hook.pth"

# Keys that PaddleClas's own Engine needs and the demo configs leave out.
PADDLECLAS_ENGINE_OVERRIDES = [
    "-o", "Global.epochs=1", "-o", "Global.use_visualdl=False",
    "-o", "Global.eval_during_train=False", "-o", "Global.print_batch_step=10",
]


def _checkout_root():
    return require_paddleclas_checkout("tools/infer.py", "tools/eval.py")


def _require_installed_pth():
    """Fail with the fix when the .pth file is missing from site-packages."""
    directories = site.getsitepackages() + [site.getusersitepackages()]
    if not any(os.path.isfile(os.path.join(directory, PTH_NAME)) for directory in directories):
        pytest.fail(f"{PTH_NAME} is not installed in {directories}. Reinstall "
                    "paddleclas-mc (pip install -e . or pip install .) so that its "
                    "build backend adds it.")


def _python(code, env=None, cwd=None):
    """Run ``code`` in a fresh interpreter and return the completed process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=120)


# mc_dropout_requested


@pytest.mark.parametrize("config, expected", [
    ({}, False),
    ({"MCDropout": None}, False),
    ({"MCDropout": {}}, False),
    ({"MCDropout": {"samples": 10}}, False),
    ({"MCDropout": {"enable": False}}, False),
    ({"MCDropout": {"enable": True}}, True),
    # Invalid values go to paddleclas-mc, whose validation names the key.
    ({"MCDropout": {"enable": "yes"}}, True),
    ({"MCDropout": {"enable": None}}, True),
    ({"MCDropout": True}, True),
    ("not a config", False),
])
def test_mc_dropout_requested(config, expected):
    assert hook.mc_dropout_requested(config) is expected


# patch_engine on a stand-in for PaddleClas's Engine.


def _fake_engine_class():
    class Engine:
        calls = []

        def __init__(self, config, mode="train"):
            self.config = config
            self.mode = mode
            self.model = "paddleclas model"
            Engine.calls.append(("init", mode))

        def infer(self):
            Engine.calls.append(("infer",))
            return "paddleclas infer"

        def eval(self, epoch_id=0):
            Engine.calls.append(("eval", epoch_id))
            return "paddleclas eval"

    return Engine


@pytest.fixture
def recorded_runs(monkeypatch):
    """Replace run_infer and run_eval with recorders; return the list of calls.

    An MC Engine adds a file handler to PaddleClas's logger, which is
    removed again afterwards.
    """
    import paddleclas_mc.engine
    import paddleclas_mc.evaluation

    calls = []
    monkeypatch.setattr(paddleclas_mc.engine, "run_infer",
                        lambda config, config_path=None: calls.append(("run_infer", config,
                                                                        config_path)))
    monkeypatch.setattr(paddleclas_mc.evaluation, "run_eval",
                        lambda config, config_path=None: calls.append(("run_eval", config,
                                                                       config_path)))
    ppcls_logger = logging.getLogger("ppcls")
    handlers = list(ppcls_logger.handlers)
    yield calls
    for handler in list(ppcls_logger.handlers):
        if handler not in handlers:
            ppcls_logger.removeHandler(handler)
            handler.close()


def _mc_config(tmp_path, enable=True):
    return {"Global": {"output_dir": str(tmp_path / "output")},
            "MCDropout": {"enable": enable}}


class TestPatchEngine:
    def test_without_mc_section_paddleclas_runs(self, recorded_runs):
        engine_class = hook.patch_engine(_fake_engine_class())
        engine = engine_class({"Global": {}}, mode="infer")
        assert engine.infer() == "paddleclas infer"
        assert engine_class.calls == [("init", "infer"), ("infer",)]
        assert recorded_runs == []

    def test_disabled_mc_paddleclas_runs(self, recorded_runs, tmp_path):
        engine_class = hook.patch_engine(_fake_engine_class())
        engine = engine_class(_mc_config(tmp_path, enable=False), mode="eval")
        assert engine.eval() == "paddleclas eval"
        assert engine_class.calls == [("init", "eval"), ("eval", 0)]
        assert recorded_runs == []

    def test_mc_infer_runs_paddleclas_mc(self, recorded_runs, tmp_path):
        engine_class = hook.patch_engine(_fake_engine_class())
        config = _mc_config(tmp_path)
        engine = engine_class(config, mode="infer")
        engine.infer()
        assert engine_class.calls == []
        assert recorded_runs == [("run_infer", config, None)]
        assert engine.mode == "infer"
        assert engine.config is config
        assert not hasattr(engine, "model")

    def test_mc_eval_runs_paddleclas_mc(self, recorded_runs, tmp_path):
        engine_class = hook.patch_engine(_fake_engine_class())
        config = _mc_config(tmp_path)
        engine_class(config, mode="eval").eval()
        assert engine_class.calls == []
        assert recorded_runs == [("run_eval", config, None)]

    def test_mc_engine_writes_paddleclas_log(self, recorded_runs, tmp_path):
        engine_class = hook.patch_engine(_fake_engine_class())
        engine_class(_mc_config(tmp_path), mode="infer")
        assert (tmp_path / "output" / "infer.log").is_file()

    def test_training_keeps_paddleclas_eval(self, recorded_runs, tmp_path):
        # Evaluation during training must stay PaddleClas's, whose result
        # picks the best checkpoint.
        engine_class = hook.patch_engine(_fake_engine_class())
        engine = engine_class(_mc_config(tmp_path), mode="train")
        assert engine.eval(3) == "paddleclas eval"
        assert engine_class.calls == [("init", "train"), ("eval", 3)]
        assert recorded_runs == []

    def test_export_keeps_paddleclas_init(self, recorded_runs, tmp_path):
        engine_class = hook.patch_engine(_fake_engine_class())
        engine_class(_mc_config(tmp_path), mode="export")
        assert engine_class.calls == [("init", "export")]

    def test_retrieval_eval_mode_rejected(self, recorded_runs, tmp_path):
        engine_class = hook.patch_engine(_fake_engine_class())
        config = _mc_config(tmp_path)
        config["Global"]["eval_mode"] = "retrieval"
        with pytest.raises(ValueError, match="Global.eval_mode"):
            engine_class(config, mode="eval")

    def test_patching_twice_wraps_once(self):
        engine_class = hook.patch_engine(_fake_engine_class())
        patched_init = engine_class.__init__
        assert hook.patch_engine(engine_class) is engine_class
        assert engine_class.__init__ is patched_init
        assert hook.is_patched(engine_class)

    def test_wrappers_keep_names(self):
        engine_class = hook.patch_engine(_fake_engine_class())
        assert engine_class.infer.__name__ == "infer"
        assert engine_class.eval.__name__ == "eval"


# The import finder, on a stand-in ppcls package in a fresh interpreter.


@pytest.fixture
def fake_ppcls(tmp_path):
    """Write a minimal ``ppcls`` package with ``engine.engine`` and ``utils.config``."""
    package = tmp_path / "fake" / "ppcls"
    (package / "engine").mkdir(parents=True)
    (package / "utils").mkdir()
    for folder in (package, package / "engine", package / "utils"):
        (folder / "__init__.py").write_text("")
    # Like PaddleClas's, the engine module imports ppcls.utils.config.
    (package / "engine" / "engine.py").write_text(textwrap.dedent('''\
        from ppcls.utils import config

        class Engine:
            def __init__(self, config, mode="train"):
                self.mode = mode

            def infer(self):
                return "paddleclas infer"

            def eval(self, epoch_id=0):
                return "paddleclas eval"
        '''))
    (package / "utils" / "config.py").write_text(
        "def get_config(fname, overrides=None, show=False):\n    return {'file': fname}\n")
    return str(tmp_path / "fake")


PATCH_CHECK = """
    import sys
    sys.path.insert(0, {path!r})
    from ppcls.engine.engine import Engine
    from ppcls.utils import config
    from paddleclas_mc.integration import hook
    print(hook.is_patched(Engine), getattr(config.get_config, hook._PATCHED_ATTRIBUTE, False))
"""


class TestStartupHook:
    def test_pth_patches_engine_on_import(self, fake_ppcls):
        _require_installed_pth()
        result = _python(PATCH_CHECK.format(path=fake_ppcls))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "True"]

    @pytest.mark.parametrize("value", ["0", "false", "OFF"])
    def test_variable_disables_pth(self, fake_ppcls, value):
        _require_installed_pth()
        result = _python(PATCH_CHECK.format(path=fake_ppcls), env={hook.DISABLE_VARIABLE: value})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False", "False"]

    def test_install_after_import_patches(self, fake_ppcls):
        code = f"""
            import sys
            sys.path.insert(0, {fake_ppcls!r})
            from ppcls.engine.engine import Engine
            from paddleclas_mc.integration import hook
            hook.install()
            print(hook.is_patched(Engine), hook.is_installed())
        """
        result = _python(code, env={hook.DISABLE_VARIABLE: "0"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "True"]

    def test_uninstall_removes_finder(self):
        code = """
            from paddleclas_mc.integration import hook
            hook.install()
            hook.install()
            import sys
            finders = sum(isinstance(finder, hook.EngineModuleFinder) for finder in sys.meta_path)
            hook.uninstall()
            print(finders, hook.is_installed())
        """
        result = _python(code, env={hook.DISABLE_VARIABLE: "0"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["1", "False"]

    def test_patched_module_keeps_source(self, fake_ppcls):
        # Tracebacks and inspect read the source through the module's loader.
        code = f"""
            import inspect, sys
            sys.path.insert(0, {fake_ppcls!r})
            from paddleclas_mc.integration import hook
            hook.install()
            import ppcls.engine.engine as module
            print("class Engine" in inspect.getsource(module),
                  module.__file__.endswith("engine.py"))
        """
        result = _python(code, env={hook.DISABLE_VARIABLE: "0"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "True"]

    def test_startup_imports_no_paddle(self):
        _require_installed_pth()
        code = """
            import sys
            from paddleclas_mc.integration import hook
            heavy = sorted(name for name in ("paddle", "numpy", "ppcls", "paddleclas", "yaml",
                                             "logging")
                           if name in sys.modules)
            print(hook.is_installed(), heavy)
        """
        result = _python(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "True []"

    def test_package_import_is_lazy(self):
        result = _python("import sys, paddleclas_mc; print('paddle' in sys.modules)",
                         env={hook.DISABLE_VARIABLE: "0"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "False"


def test_wheel_gets_pth_in_record(tmp_path):
    """The build backend adds the .pth file and its RECORD line to a wheel."""
    import base64
    import hashlib
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location(
        "paddleclas_mc_build", os.path.join(ROOT, "build_backend", "paddleclas_mc_build.py"))
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo/__init__.py", "")
        archive.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
        archive.writestr("demo-1.0.dist-info/RECORD",
                         "demo/__init__.py,,0\ndemo-1.0.dist-info/RECORD,,\n")

    backend.add_file_to_wheel(str(wheel), backend.PTH_NAME, backend.PTH_LINE.encode())
    backend.add_file_to_wheel(str(wheel), backend.PTH_NAME, backend.PTH_LINE.encode())

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        data = archive.read(backend.PTH_NAME)
        record = archive.read("demo-1.0.dist-info/RECORD").decode().splitlines()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert names.count(backend.PTH_NAME) == 1
    assert names[-1] == "demo-1.0.dist-info/RECORD"
    assert names.index(backend.PTH_NAME) < names.index("demo-1.0.dist-info/METADATA")
    assert f"{backend.PTH_NAME},sha256={digest},{len(data)}" in record
    assert len(record) == 3
    assert data.decode().startswith("import paddleclas_mc.integration.hook;")


# A real PaddleClas checkout's tools, gated by PADDLECLAS_ROOT.


def _run_script(script, *arguments, env=None):
    """Run a Python script from the repository root; fail with its output when it fails."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run([sys.executable, script, *arguments], cwd=ROOT, capture_output=True,
                            text=True, env=full_env, timeout=600)
    return result


def _assert_ok(result):
    assert result.returncode == 0, (f"stdout:\n{result.stdout[-3000:]}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")


def _read_json(path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class TestCheckoutTools:
    def test_infer_matches_ours(self, tmp_path):
        root = _checkout_root()
        _require_installed_pth()
        theirs = _run_script(os.path.join(root, "tools", "infer.py"), "-c", MC_CONFIG,
                             "-o", f"Infer.save_dir={tmp_path / 'theirs'}",
                             "-o", f"Global.output_dir={tmp_path / 'theirs_log'}")
        _assert_ok(theirs)
        ours = _run_script(os.path.join("tools", "infer.py"), "-c", MC_CONFIG,
                           "-o", f"Infer.save_dir={tmp_path / 'ours'}")
        _assert_ok(ours)

        predictions = (tmp_path / "theirs" / "predictions.jsonl").read_bytes()
        assert predictions == (tmp_path / "ours" / "predictions.jsonl").read_bytes()
        assert len(predictions.splitlines()) == 450

        summary_theirs = _read_json(tmp_path / "theirs" / "summary.json")
        summary_ours = _read_json(tmp_path / "ours" / "summary.json")
        for summary in (summary_theirs, summary_ours):
            summary.pop("wall_time_s")
        assert summary_theirs == summary_ours
        assert summary_theirs["config"] == MC_CONFIG
        assert (tmp_path / "theirs_log" / "infer.log").is_file()

    def test_eval_matches_ours(self, tmp_path):
        root = _checkout_root()
        _require_installed_pth()
        theirs = _run_script(os.path.join(root, "tools", "eval.py"), "-c", MC_CONFIG,
                             "-o", f"Global.output_dir={tmp_path / 'theirs'}")
        _assert_ok(theirs)
        ours = _run_script(os.path.join("tools", "eval.py"), "-c", MC_CONFIG,
                           "-o", f"Global.output_dir={tmp_path / 'ours'}")
        _assert_ok(ours)

        metrics_theirs = _read_json(tmp_path / "theirs" / "metrics.json")
        metrics_ours = _read_json(tmp_path / "ours" / "metrics.json")
        for metrics in (metrics_theirs, metrics_ours):
            metrics.pop("wall_time_s")
        assert metrics_theirs == metrics_ours
        assert metrics_theirs["mc_dropout"]["top1"] > 0.9
        for name in ("reliability_diagram.png", "risk_coverage.png",
                     "uncertainty_histograms.png", "eval.log"):
            assert (tmp_path / "theirs" / name).is_file(), name

    def test_plain_config_runs_paddleclas_eval(self, tmp_path):
        root = _checkout_root()
        result = _run_script(os.path.join(root, "tools", "eval.py"), "-c", PLAIN_CONFIG,
                             *PADDLECLAS_ENGINE_OVERRIDES,
                             "-o", f"Global.output_dir={tmp_path}")
        _assert_ok(result)
        assert "[Eval][Epoch 0][Avg], top1: 0.97778" in result.stdout
        assert "paddleclas-mc" not in result.stdout
        assert not (tmp_path / "metrics.json").exists()

    def test_disabled_mc_runs_paddleclas_infer(self, tmp_path):
        root = _checkout_root()
        result = _run_script(os.path.join(root, "tools", "infer.py"), "-c", MC_CONFIG,
                             *PADDLECLAS_ENGINE_OVERRIDES, "-o", "MCDropout.enable=False",
                             "-o", "Infer.save_dir=None",
                             "-o", "Infer.infer_imgs=demo/digits/images/test/7",
                             "-o", f"Global.output_dir={tmp_path}")
        _assert_ok(result)
        assert "'class_ids': [7" in result.stdout
        assert "paddleclas-mc" not in result.stdout

    def test_hook_variable_off_runs_paddleclas(self, tmp_path):
        root = _checkout_root()
        result = _run_script(os.path.join(root, "tools", "infer.py"), "-c", MC_CONFIG,
                             *PADDLECLAS_ENGINE_OVERRIDES, "-o", "Infer.save_dir=None",
                             "-o", "Infer.infer_imgs=demo/digits/images/test/7",
                             "-o", f"Global.output_dir={tmp_path}",
                             env={hook.DISABLE_VARIABLE: "0"})
        _assert_ok(result)
        assert "'class_ids': [7" in result.stdout
        assert "paddleclas-mc" not in result.stdout
        assert "predictive_entropy" not in result.stdout

    def test_invalid_enable_rejected(self, tmp_path):
        root = _checkout_root()
        _require_installed_pth()
        # PaddleClas's -o parser keeps "yes" as a string.
        result = _run_script(os.path.join(root, "tools", "infer.py"), "-c", MC_CONFIG,
                             "-o", "MCDropout.enable=yes",
                             "-o", f"Global.output_dir={tmp_path}")
        assert result.returncode != 0
        assert "MCDropout.enable: invalid value 'yes'" in result.stderr
