"""Run an exported inference model over ``Infer.infer_imgs`` with Paddle Inference.

    python tools/predict.py -c configs/demo/mc_digits.yaml \
        -o Global.inference_model_dir=./inference/mc_digits

Writes the records that ``tools/infer.py`` writes (``predictions.jsonl`` and
``summary.json`` in ``Infer.save_dir``), from one predictor run per batch.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from paddleclas_mc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict"] + sys.argv[1:]))
