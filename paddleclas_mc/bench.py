"""``paddleclas-mc bench``: the sampling benchmark of ``tools/bench.py``.

The benchmark starts each configuration in a fresh ``python tools/bench.py
--worker`` process, so it runs from a source checkout of paddleclas-mc (the
README's ``pip install -e``), not from a wheel, which ships no ``tools/``.
"""

import importlib.util
import os
import sys

__all__ = ["main"]

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tools", "bench.py")


def main(argv=None):
    """Run ``tools/bench.py`` with ``argv`` and return its exit status."""
    if not os.path.isfile(_TOOL):
        print(f"error: paddleclas-mc bench needs a source checkout of paddleclas-mc: "
              f"{_TOOL} not found. Clone the repository and install it with "
              "pip install -e .", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("paddleclas_mc_bench_tool", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
