"""The ``paddleclas-mc`` command, also behind ``tools/infer.py`` and ``tools/eval.py``.

    paddleclas-mc infer -c configs/demo/mc_digits.yaml
    paddleclas-mc eval -c configs/demo/mc_digits.yaml -o MCDropout.samples=50
    paddleclas-mc export -c configs/demo/mc_digits.yaml -o Global.image_shape=[3,32,32]
    paddleclas-mc predict -c configs/demo/mc_digits.yaml -o Global.inference_model_dir=./inference
    paddleclas-mc bench ...

``infer``, ``eval``, ``export`` and ``predict`` take PaddleClas's ``-c`` and
``-o`` flags and run exactly what ``tools/infer.py``, ``tools/eval.py``,
``tools/export_model.py`` and ``tools/predict.py`` run. ``bench`` passes
its arguments to ``paddleclas_mc.bench.main``.
"""

import importlib
import sys

from . import __version__

__all__ = ["COMMANDS", "main"]

# Subcommand -> one-line description, in the order the usage lists them.
COMMANDS = {
    "infer": "Monte Carlo Dropout inference for a PaddleClas model",
    "eval": "single-pass and Monte Carlo Dropout evaluation of a PaddleClas model",
    "export": "export an inference model, with Monte Carlo Dropout inside the graph",
    "predict": "run an exported inference model over Infer.infer_imgs",
    "bench": "benchmark MC Dropout sampling, with the options of paddleclas_mc.bench",
}

# Exit status for invalid arguments and configuration errors, as argparse uses.
USAGE_ERROR = 2


def _usage():
    lines = [f"usage: paddleclas-mc {{{','.join(COMMANDS)}}} [ARGS ...]", "",
             "commands:"]
    lines += [f"  {name:<8}{description}" for name, description in COMMANDS.items()]
    lines += ["", "Run 'paddleclas-mc COMMAND -h' for the options of a command.",
              "infer, eval, export and predict take PaddleClas's flags: "
              "-c CONFIG [-o KEY=VALUE ...]."]
    return "\n".join(lines)


def _run_config_command(command, argv):
    """Run ``infer``, ``eval``, ``export`` or ``predict`` on a config and return the exit status."""
    from . import integration
    from .config import build_arg_parser, load_config

    args = build_arg_parser(COMMANDS[command]).parse_args(argv)
    try:
        config = load_config(args.config, args.override)
        integration.init_logger()
        integration.print_config(config)
        if command == "infer":
            from .engine import run_infer
            run_infer(config, config_path=args.config)
        elif command == "eval":
            from .evaluation import run_eval
            run_eval(config, config_path=args.config)
        elif command == "export":
            from .export import run_export
            run_export(config, config_path=args.config)
        else:
            from .predictor import run_predict
            run_predict(config, config_path=args.config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _run_bench(argv):
    """Pass ``argv`` to ``paddleclas_mc.bench.main`` and return its exit status."""
    try:
        bench = importlib.import_module("paddleclas_mc.bench")
    except ModuleNotFoundError as error:
        if error.name != "paddleclas_mc.bench":
            raise
        print("error: paddleclas-mc bench is not available in this installation, "
              "because the module paddleclas_mc.bench is missing. Reinstall "
              "paddleclas-mc from a version that includes it.", file=sys.stderr)
        return USAGE_ERROR
    if not callable(getattr(bench, "main", None)):
        print("error: paddleclas_mc.bench has no main(argv) function, so "
              "paddleclas-mc bench cannot run it.", file=sys.stderr)
        return USAGE_ERROR
    status = bench.main(list(argv))
    return 0 if status is None else status


def main(argv=None):
    """Run a ``paddleclas-mc`` subcommand and return its exit status.

    Configuration errors of the config commands are printed as one line
    naming the key and the fix, with exit status 2, instead of a traceback.

    Args:
        argv: the arguments after the program name, starting with the
            subcommand, e.g. ``["infer", "-c", "config.yaml"]``. None reads
            ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on invalid arguments or config.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv and argv[0] == "--version":
        print(f"paddleclas-mc {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "missing command"
        print(f"{_usage()}\n\nerror: {problem}; expected one of {', '.join(COMMANDS)}.",
              file=sys.stderr)
        return USAGE_ERROR

    command, rest = argv[0], argv[1:]
    if command == "bench":
        return _run_bench(rest)
    return _run_config_command(command, rest)
