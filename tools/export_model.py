"""Export a PaddleClas model for Paddle Inference, with MC Dropout inside the graph.

    python tools/export_model.py -c configs/demo/mc_digits.yaml \
        -o Global.image_shape=[3,32,32] -o Global.save_inference_dir=./inference/mc_digits

With ``MCDropout.enable`` true, one predictor run of the exported model draws
the T passes and returns the mean probabilities and the uncertainty measures
(see docs/export.md). Without it, the files are those of PaddleClas's own
``tools/export_model.py``.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from paddleclas_mc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export"] + sys.argv[1:]))
