"""PaddleClas glue: the only package that imports PaddleClas.

The ``paddleclas`` wheel (2.6.0) ships ``ppcls.arch``, ``ppcls.utils`` and
``deploy/python`` under the ``paddleclas`` package. A PaddleClas source
checkout puts ``ppcls`` on ``sys.path`` as a top-level package instead, so the
checkout's copy is used when it is importable and the wheel's otherwise.
Everything else in ``paddleclas_mc`` works on any ``paddle.nn.Layer``.

``hook`` makes a checkout's own ``tools/infer.py`` and ``tools/eval.py`` run
MC Dropout when the config enables it. A ``.pth`` file imports it at Python
start-up, so this package imports only ``os`` and ``sys`` at module level,
which Python has loaded by then. Everything else, Paddle and PaddleClas
included, is imported inside the functions that need it.
"""

import os
import sys

__all__ = [
    "build_model",
    "create_preprocess_ops",
    "dump_infer_config",
    "get_logger",
    "load_pretrained",
    "parse_config_file",
    "Topk",
]


def _import_module(name):
    import importlib

    return importlib.import_module(name)


def _import_ppcls(submodule):
    """Import ``ppcls.<submodule>`` from a source checkout, else from the wheel."""
    try:
        return _import_module("ppcls." + submodule)
    except ImportError:
        return _import_wheel_module("paddleclas.ppcls." + submodule)


def _import_wheel_module(name):
    """Import a module of the ``paddleclas`` wheel without doubling the log output.

    Importing the wheel's top-level package runs the wheel's own
    ``init_logger``, which adds a second stdout handler to the shared
    ``ppcls`` logger when a checkout's ``ppcls.utils.logger`` has already
    added one (PaddleClas 2.6), so every record would be printed twice.
    Handlers that the import adds under a name already present are removed.
    """
    import logging

    if name in sys.modules:
        return sys.modules[name]
    ppcls_logger = logging.getLogger("ppcls")
    before = list(ppcls_logger.handlers)
    module = _import_module(name)
    names_before = {handler.get_name() for handler in before}
    for handler in list(ppcls_logger.handlers):
        if handler not in before and handler.get_name() in names_before:
            ppcls_logger.removeHandler(handler)
    return module


def get_logger():
    """Return PaddleClas's logger module (``info``, ``warning``, ``error``).

    The logger is set up on first use, so library calls log even when no
    tool called ``init_logger``.
    """
    logger = _import_ppcls("utils.logger")
    if logger._logger is None:
        logger.init_logger()
    return logger


def init_logger(log_file=None):
    """Set up PaddleClas's logger; ``log_file`` also receives every record."""
    logger = get_logger()
    logger.init_logger(log_file=log_file)
    return logger


def parse_config_file(path):
    """Read a PaddleClas YAML config into PaddleClas's ``AttrDict``."""
    return _import_ppcls("utils.config").parse_config(path)


def print_config(config):
    """Log the resolved config the way PaddleClas's tools do at start-up."""
    _import_ppcls("utils.config").print_config(config)


def dump_infer_config(config, path):
    """Write PaddleClas's ``inference.yml`` (preprocessing and postprocessing) for an export.

    PaddleClas's export writes it when ``Global.export_for_fd`` is set.
    """
    _import_ppcls("utils.config").dump_infer_config(config, path)


def build_model(config):
    """Build the network described by ``config["Arch"]`` with PaddleClas's builder."""
    arch = _import_ppcls("arch")
    return arch.build_model(config, mode="eval")


def load_pretrained(model, path):
    """Load a PaddleClas checkpoint (``<path>.pdparams``) into ``model``.

    PaddleClas's own loader only warns when a parameter is missing or has the
    wrong shape and leaves it randomly initialised. That would give confident
    nonsense, so every mismatch is raised here instead.

    Raises:
        FileNotFoundError: when ``<path>.pdparams`` does not exist.
        ValueError: when the checkpoint does not fit the model.
    """
    import paddle

    file_path = path if path.endswith(".pdparams") else path + ".pdparams"
    if not os.path.isfile(file_path):
        raise FileNotFoundError(
            f"Global.pretrained_model: checkpoint {file_path!r} not found. "
            "Set it to the checkpoint prefix that PaddleClas saved, without "
            "the .pdparams suffix.")

    state = paddle.load(file_path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong_shape = [(key, list(state[key].shape), list(value.shape))
                   for key, value in expected.items()
                   if key in state and list(state[key].shape) != list(value.shape)]
    if missing or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} parameters missing, e.g. {missing[:3]}")
        if wrong_shape:
            key, got, want = wrong_shape[0]
            details.append(f"{len(wrong_shape)} with the wrong shape, e.g. {key}: "
                           f"checkpoint {got}, model {want}")
        raise ValueError(
            f"Global.pretrained_model: checkpoint {file_path!r} does not fit "
            f"Arch ({'; '.join(details)}). Check Arch.name and Arch.class_num "
            "against the config the checkpoint was trained with.")

    model.set_state_dict(state)
    return file_path


def create_preprocess_ops(op_configs):
    """Build PaddleClas's inference preprocessing ops from an op list.

    Args:
        op_configs: list of one-key dicts, as in ``Infer.transforms``,
            for example ``[{"ResizeImage": {"resize_short": 256}}]``.

    Returns:
        A list of callables, each taking and returning an image array.
    """
    preprocess = _import_wheel_module("paddleclas.deploy.python.preprocess")
    return preprocess.create_operators(op_configs)


def preprocess_op_names():
    """Return the names of the image preprocessing ops the wheel provides.

    Exception classes, the ``UnifiedResize`` helper inside ``ResizeImage`` and
    the detection ops (``Det*``, which take an ``(image, info)`` pair) are left
    out, since none of them works as an ``Infer.transforms`` entry.
    """
    preprocess = _import_wheel_module("paddleclas.deploy.python.preprocess")
    names = []
    for name, value in vars(preprocess).items():
        if not isinstance(value, type) or not name[0].isupper():
            continue
        if issubclass(value, Exception) or name == "UnifiedResize" or name.startswith("Det"):
            continue
        names.append(name)
    return sorted(names)


def Topk(topk=1, label_list=None):  # noqa: N802 - named after PaddleClas's class
    """Return PaddleClas's deploy ``Topk`` postprocess, which takes probabilities.

    ``label_list`` maps a class id to its name. PaddleClas's training-side
    ``Topk`` applies softmax to logits first, so feeding softmax probabilities
    to this one gives the same ``class_ids``, ``scores`` and ``label_names``.
    """
    postprocess = _import_wheel_module("paddleclas.deploy.python.postprocess")
    return postprocess.Topk(topk=topk, label_list=label_list)
