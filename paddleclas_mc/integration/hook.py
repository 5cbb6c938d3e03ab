"""Run MC Dropout from a PaddleClas source checkout's own ``tools/infer.py`` and ``tools/eval.py``.

Those scripts read the config with ``ppcls.utils.config.get_config``, build
``ppcls.engine.engine.Engine(config, mode=...)`` and call ``engine.infer()``
or ``engine.eval()``. ``install`` puts a finder on ``sys.meta_path`` that
does nothing until ``ppcls.engine.engine`` is imported. It then patches
``Engine`` right after the module runs:

- ``Engine(config, mode="infer" or "eval")`` with ``MCDropout.enable`` set
  skips PaddleClas's set-up (its data loader, metrics, model and checkpoint)
  and only sets up PaddleClas's logger, writing ``<Global.output_dir>/<mode>.log``
  as PaddleClas does, and logs the config. ``infer()`` then runs
  ``paddleclas_mc.engine.run_infer`` and ``eval()`` runs
  ``paddleclas_mc.evaluation.run_eval``, the code behind this project's
  ``tools/infer.py`` and ``tools/eval.py``, so the outputs are the same.
- Every other Engine is PaddleClas's own: no ``MCDropout`` section,
  ``MCDropout.enable: False``, ``mode="train"`` (also its evaluation during
  training) and ``mode="export"``.

An Engine that paddleclas-mc runs has ``config``, ``mode``, ``eval_mode`` and
``output_dir`` but none of PaddleClas's ``model``, data loader or metric
attributes, because it never builds them.

Under ``python -m paddle.distributed.launch``, ``run_infer`` and
``run_eval`` split the batches across the processes, and rank 0 merges the
records or metric states and writes the files (see ``docs/distributed.md``).
They read the launcher's environment variables and need no process group,
so nothing is lost by skipping PaddleClas's ``Engine.__init__``, which
would call ``paddle.distributed.init_parallel_env`` (or ``fleet.init``,
depending on the PaddleClas version).

The installed ``paddleclas_mc_hook.pth`` calls ``install_if_enabled`` at
start-up. Until ``ppcls.engine.engine`` is imported, only this module and the
two package ``__init__`` files are loaded, and they import nothing beyond the
standard library modules that Python has already loaded. Set
``PADDLECLAS_MC_HOOK=0`` to turn the automatic install off, or call
``install()`` yourself where no ``.pth`` file is installed.

Example:
    >>> from paddleclas_mc.integration import hook
    >>> hook.install()                 # where the .pth file is not installed
    >>> from ppcls.engine.engine import Engine
    >>> hook.is_patched(Engine)
    True
"""

import os
import sys

__all__ = [
    "DISABLE_VARIABLE",
    "ENGINE_MODULE",
    "install",
    "install_if_enabled",
    "is_installed",
    "is_patched",
    "mc_dropout_requested",
    "patch_engine",
    "uninstall",
]

# The module whose Engine class PaddleClas's tools/infer.py and tools/eval.py use.
ENGINE_MODULE = "ppcls.engine.engine"

# The module whose get_config those tools call to read the config file.
CONFIG_MODULE = "ppcls.utils.config"

# Environment variable that turns the start-up install off when set to one of
# _DISABLE_VALUES.
DISABLE_VARIABLE = "PADDLECLAS_MC_HOOK"
_DISABLE_VALUES = ("0", "false", "no", "off")

# Engine modes that paddleclas-mc runs when MCDropout.enable is set.
_MC_MODES = ("infer", "eval")

# Class attribute that marks a patched Engine, so patching twice is a no-op.
_PATCHED_ATTRIBUTE = "__paddleclas_mc_patched__"

# Instance attribute of an Engine that paddleclas-mc runs.
_MC_ENGINE_ATTRIBUTE = "paddleclas_mc_enabled"

# The config that the patched get_config returned last and the file it read,
# so that summary.json and metrics.json name the config file as this
# project's tools do. PaddleClas's Engine only receives the parsed config.
_last_config = {"config": None, "path": None}


def mc_dropout_requested(config):
    """Return whether ``config`` requests MC Dropout.

    The section is absent, empty or has ``enable: False`` (or no ``enable``)
    when MC Dropout is off. Any other ``enable`` value, also an invalid one
    such as the string ``"yes"``, counts as a request, so that
    ``paddleclas_mc.config.parse_mc_section`` rejects it with a clear message
    instead of PaddleClas silently running its single pass.

    Args:
        config: a PaddleClas config (``dict`` or PaddleClas's ``AttrDict``).
    """
    if not isinstance(config, dict):
        return False
    section = config.get("MCDropout")
    if not section:
        return False
    if not isinstance(section, dict):
        return True
    return section.get("enable", False) is not False


def _init_mc_engine(engine, config, mode):
    """Set up an Engine that paddleclas-mc runs, in place of PaddleClas's ``__init__``."""
    from paddleclas_mc import integration

    global_section = config.get("Global") or {}
    eval_mode = global_section.get("eval_mode", "classification")
    if eval_mode != "classification":
        raise ValueError(
            f"Global.eval_mode: MC Dropout supports 'classification' only, got "
            f"{eval_mode!r}. Set -o MCDropout.enable=False to run PaddleClas's own "
            f"{mode}.")

    engine.mode = mode
    engine.config = config
    engine.eval_mode = eval_mode
    engine.output_dir = global_section.get("output_dir") or "./output/"
    setattr(engine, _MC_ENGINE_ATTRIBUTE, True)

    logger = integration.init_logger(log_file=os.path.join(engine.output_dir, f"{mode}.log"))
    integration.print_config(config)
    logger.info(f"paddleclas-mc: MCDropout.enable is set, so Engine.{mode}() runs "
                "paddleclas-mc's MC Dropout " + ("inference" if mode == "infer" else
                                                  "evaluation"))


def _config_path(config):
    """Return the file that ``get_config`` read ``config`` from, or None."""
    return _last_config["path"] if _last_config["config"] is config else None


def _patch_get_config(config_module):
    """Wrap ``get_config`` so that the config file of the last call is known."""
    import functools

    original = getattr(config_module, "get_config", None)
    if original is None or getattr(original, _PATCHED_ATTRIBUTE, False):
        return

    @functools.wraps(original)
    def get_config(fname, *args, **kwargs):
        config = original(fname, *args, **kwargs)
        _last_config.update(config=config, path=fname)
        return config

    setattr(get_config, _PATCHED_ATTRIBUTE, True)
    config_module.get_config = get_config


def patch_engine(engine_class):
    """Patch PaddleClas's ``Engine`` class in place so that MC configs run paddleclas-mc.

    Patching an already patched class changes nothing.

    Args:
        engine_class: ``ppcls.engine.engine.Engine``.

    Returns:
        ``engine_class``.
    """
    import functools

    if engine_class.__dict__.get(_PATCHED_ATTRIBUTE):
        return engine_class

    original_init = engine_class.__init__
    original_infer = engine_class.infer
    original_eval = engine_class.eval

    @functools.wraps(original_init)
    def __init__(self, config, mode="train"):
        if mode in _MC_MODES and mc_dropout_requested(config):
            _init_mc_engine(self, config, mode)
        else:
            original_init(self, config, mode)

    @functools.wraps(original_infer)
    def infer(self):
        if not getattr(self, _MC_ENGINE_ATTRIBUTE, False):
            return original_infer(self)
        from paddleclas_mc.engine import run_infer
        return run_infer(self.config, config_path=_config_path(self.config))

    @functools.wraps(original_eval)
    def eval(self, epoch_id=0):
        if not getattr(self, _MC_ENGINE_ATTRIBUTE, False):
            return original_eval(self, epoch_id)
        from paddleclas_mc.evaluation import run_eval
        return run_eval(self.config, config_path=_config_path(self.config))

    engine_class.__init__ = __init__
    engine_class.infer = infer
    engine_class.eval = eval
    setattr(engine_class, _PATCHED_ATTRIBUTE, True)
    return engine_class


def is_patched(engine_class):
    """Return whether ``patch_engine`` has patched ``engine_class``."""
    return bool(engine_class.__dict__.get(_PATCHED_ATTRIBUTE))


def _patch_module(module):
    """Patch the ``Engine`` of a freshly run engine module, and ``get_config``.

    The engine module imports ``ppcls.utils.config`` itself, and the tools
    call ``get_config`` only after importing ``Engine``, so both are patched
    in time.
    """
    engine_class = getattr(module, "Engine", None)
    if isinstance(engine_class, type):
        patch_engine(engine_class)
    config_module = sys.modules.get(CONFIG_MODULE)
    if config_module is not None:
        _patch_get_config(config_module)


class _PatchingLoader:
    """Run the real loader of ``ppcls.engine.engine``, then patch its ``Engine``.

    Every other attribute (``get_source``, ``get_filename`` and so on) is the
    real loader's, so tracebacks and ``inspect`` still find the source.
    """

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class EngineModuleFinder:
    """A ``sys.meta_path`` finder that only acts on ``ppcls.engine.engine``.

    For every other module ``find_spec`` returns None at the cost of one
    string comparison. For the engine module it gets the spec from the finders
    after it on ``sys.meta_path`` and wraps the loader with one that patches
    ``Engine`` once the module has run.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ENGINE_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, EngineModuleFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
            return spec
        return None


def is_installed():
    """Return whether an ``EngineModuleFinder`` is on ``sys.meta_path``."""
    return any(isinstance(finder, EngineModuleFinder) for finder in sys.meta_path)


def install():
    """Make PaddleClas's ``Engine`` run paddleclas-mc for configs with MC Dropout enabled.

    Patches ``Engine`` now when ``ppcls.engine.engine`` is already imported,
    and otherwise when it is imported. Calling it again changes nothing.
    """
    module = sys.modules.get(ENGINE_MODULE)
    if module is not None:
        _patch_module(module)
    if not is_installed():
        sys.meta_path.insert(0, EngineModuleFinder())


def uninstall():
    """Remove the finder from ``sys.meta_path``.

    An ``Engine`` class that was already patched stays patched, since
    instances of it may exist.
    """
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not isinstance(finder, EngineModuleFinder)]


def install_if_enabled():
    """Call ``install`` unless ``PADDLECLAS_MC_HOOK`` is 0, false, no or off.

    This is what the installed ``paddleclas_mc_hook.pth`` runs at start-up.

    Returns:
        Whether the finder was installed.
    """
    if os.environ.get(DISABLE_VARIABLE, "").strip().lower() in _DISABLE_VALUES:
        return False
    install()
    return True
