"""Command-line entry points shared by ``tools/*.py``."""

import sys

from . import integration
from .config import build_arg_parser, load_config

__all__ = ["main"]

_DESCRIPTIONS = {
    "infer": "Monte Carlo Dropout inference for a PaddleClas model",
    "eval": "single-pass and Monte Carlo Dropout evaluation of a PaddleClas model",
}


def _run(command, args):
    config = load_config(args.config, args.override)
    logger = integration.init_logger()
    integration.print_config(config)
    if command == "infer":
        from .engine import run_infer
        run_infer(config, config_path=args.config)
    elif command == "eval":
        from .evaluation import run_eval
        run_eval(config, config_path=args.config)
    return logger


def main(argv=None):
    """Run ``infer`` or ``eval`` with PaddleClas's ``-c`` and ``-o`` flags.

    Configuration errors are printed as one line naming the key and the fix,
    with exit status 2, instead of a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _DESCRIPTIONS:
        print(f"usage: paddleclas-mc {{{','.join(_DESCRIPTIONS)}}} -c CONFIG [-o KEY=VALUE ...]",
              file=sys.stderr)
        return 2

    command = argv[0]
    parser = build_arg_parser(_DESCRIPTIONS[command])
    args = parser.parse_args(argv[1:])
    try:
        _run(command, args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
