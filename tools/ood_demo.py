"""Out-of-distribution check for the digits demo: do uncertain images stand out?

Scores the held-out digits (in-distribution) and four sets of real
non-digit images with the demo model, then reports how well each
uncertainty score tells them apart (AUROC, out-of-distribution = positive):

- ``photo_crops``: crops of the two photos scikit-learn ships
  (``load_sample_images``), in grayscale, shrunk to 8x8;
- ``inverted``: held-out digits with dark ink on a light background;
- ``noised``: held-out digits under heavy Gaussian noise (sigma 96 of 255);
- ``letters``: capital letters drawn with Pillow's default font, shrunk to
  8x8, leaving out B, G, I, O, S and Z, which look like 8, 6, 1, 0, 5 and 2.

Scores: for the single pass, one minus the top-1 probability (the maximum
softmax probability baseline); for MC Dropout, predictive entropy, mutual
information and one minus the mean top-1 probability.

    python tools/ood_demo.py -c configs/demo/mc_digits.yaml

Writes the images and ``ood_metrics.json`` under ``<Global.output_dir>/ood/``.
"""

import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from paddleclas_mc import integration  # noqa: E402
from paddleclas_mc.config import build_arg_parser, load_config  # noqa: E402
from paddleclas_mc.engine import run_infer  # noqa: E402
from paddleclas_mc.metrics import binary_auroc  # noqa: E402
from paddleclas_mc.output import write_json_atomic  # noqa: E402

IMAGES_PER_SET = 120
NOISE_SIGMA = 96
LETTERS = "ACDEFHJKLMNPQRTUVWXY"
SCORES = {
    "single pass: 1 - max probability": ("single_pass", "least_confidence"),
    "MC: 1 - mean max probability": ("mc_dropout", "least_confidence"),
    "MC: predictive entropy": ("mc_dropout", "predictive_entropy"),
    "MC: mutual information": ("mc_dropout", "mutual_information"),
}


def _digit_images(folder):
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.endswith(".png"))
    return [np.asarray(Image.open(path).convert("L")) for path in paths]


def _photo_crops(rng):
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(Image.fromarray(photo).convert("L")) for photo in
              load_sample_images().images]
    crops = []
    for index in range(IMAGES_PER_SET):
        photo = photos[index % len(photos)]
        size = int(rng.integers(24, 160))
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        crop = Image.fromarray(photo[top:top + size, left:left + size])
        crops.append(np.asarray(crop.resize((8, 8), Image.BILINEAR)))
    return crops


def _letters(rng):
    font = ImageFont.load_default()
    images = []
    for index in range(IMAGES_PER_SET):
        canvas = Image.new("L", (16, 16), 0)
        offset = (int(rng.integers(1, 6)), int(rng.integers(0, 4)))
        ImageDraw.Draw(canvas).text(offset, LETTERS[index % len(LETTERS)], fill=255, font=font)
        letter = np.asarray(canvas.resize((8, 8), Image.BILINEAR), dtype=np.float64)
        # Shrinking thins the strokes, so stretch the ink back to full brightness.
        images.append(np.round(letter * 255.0 / max(letter.max(), 1.0)).astype(np.uint8))
    return images


def build_ood_sets(digits, seed=0):
    """Return a dict from set name to a list of 8x8 uint8 grayscale images."""
    rng = np.random.default_rng(seed)
    chosen = [digits[i] for i in rng.choice(len(digits), IMAGES_PER_SET, replace=False)]
    noised = [np.clip(image + rng.normal(0, NOISE_SIGMA, image.shape), 0, 255) for image in chosen]
    return {
        "photo_crops": _photo_crops(rng),
        "inverted": [255 - image for image in chosen],
        "noised": [image.astype(np.uint8) for image in noised],
        "letters": _letters(rng),
    }


def _write_sets(sets, folder):
    for name, images in sets.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
                os.path.join(folder, name, f"{name}_{index:03d}.png"))


def _score(config_path, overrides, infer_imgs, save_dir, mc_enable):
    config = load_config(config_path, overrides + [
        f"Infer.infer_imgs={infer_imgs}", f"Infer.save_dir={save_dir}",
        f"MCDropout.enable={mc_enable}", "Infer.PostProcess.topk=1", "Infer.resume=False"])
    run_infer(config)
    scores = {}
    with open(os.path.join(save_dir, "predictions.jsonl"), encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            measures = {key: record[key] for key in ("predictive_entropy", "mutual_information")
                        if key in record}
            measures["least_confidence"] = 1.0 - record["scores"][0]
            scores[record["file_name"]] = measures
    return scores


def main():
    parser = build_arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    integration.init_logger()
    logger = integration.get_logger()
    config = load_config(args.config, args.override)
    output_dir = os.path.join(config["Global"].get("output_dir") or "./output/", "ood")
    id_folder = config["Infer"]["infer_imgs"]
    mc = config.get("MCDropout") or {}

    sets = build_ood_sets(_digit_images(id_folder))
    _write_sets(sets, os.path.join(output_dir, "images"))
    folders = {"in_distribution": id_folder}
    folders.update({name: os.path.join(output_dir, "images", name) for name in sets})

    scores = {}
    for run, enable in (("single_pass", False), ("mc_dropout", True)):
        for name, folder in folders.items():
            logger.info(f"OOD demo: scoring {name} ({run})")
            scores[(run, name)] = _score(args.config, args.override, folder,
                                         os.path.join(output_dir, run, name), enable)

    results = {}
    for label, (run, measure) in SCORES.items():
        in_values = [s[measure] for s in scores[(run, "in_distribution")].values()]
        row = {}
        for name in sets:
            out_values = [s[measure] for s in scores[(run, name)].values()]
            row[name] = binary_auroc(np.array(in_values + out_values),
                                     np.array([False] * len(in_values) + [True] * len(out_values)))
        all_out = [s[measure] for name in sets for s in scores[(run, name)].values()]
        row["all"] = binary_auroc(np.array(in_values + all_out),
                                  np.array([False] * len(in_values) + [True] * len(all_out)))
        results[label] = row

    header = f"{'score':36s}" + "".join(f"{name:>13s}" for name in list(sets) + ["all"])
    lines = [header] + [f"{label:36s}" + "".join(f"{value:13.4f}" for value in row.values())
                        for label, row in results.items()]
    logger.info("OOD AUROC, held-out digits vs each set (%d in-distribution images, %d per "
                "set, T=%s, seed=%s):\n%s", len(scores[("mc_dropout", "in_distribution")]),
                IMAGES_PER_SET, mc.get("samples"), mc.get("seed"), "\n".join(lines))
    write_json_atomic(os.path.join(output_dir, "ood_metrics.json"), {
        "config": args.config, "samples": mc.get("samples"), "seed": mc.get("seed"),
        "in_distribution_images": len(scores[("mc_dropout", "in_distribution")]),
        "images_per_set": IMAGES_PER_SET, "auroc": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
