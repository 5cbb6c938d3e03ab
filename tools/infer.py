"""Monte Carlo Dropout inference with a PaddleClas config.

    python tools/infer.py -c configs/demo/mc_digits.yaml
    python tools/infer.py -c your_config.yaml -o MCDropout.enable=True -o MCDropout.samples=50

Without an ``MCDropout`` section, or with ``MCDropout.enable=False``, this is
PaddleClas's single-pass infer.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from paddleclas_mc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["infer"] + sys.argv[1:]))
