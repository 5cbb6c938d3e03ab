"""Single-pass and Monte Carlo Dropout evaluation with a PaddleClas config.

    python tools/eval.py -c configs/demo/mc_digits.yaml
    python tools/eval.py -c your_config.yaml -o MCDropout.enable=True -o MCDropout.samples=50

The single pass is always evaluated. With ``MCDropout.enable=True`` the same
images also go through T stochastic passes, and the report puts both side by
side.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from paddleclas_mc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
