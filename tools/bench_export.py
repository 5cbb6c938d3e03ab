"""Compare the throughput of an exported MC Dropout model with dygraph MC Dropout.

    python tools/bench_export.py                      # the demo, T=30, batches of 32
    python tools/bench_export.py --samples 10 --repeats 5 --output /tmp/bench.json

Both sides get the same preprocessed images (the demo's held-out digits, read
once before timing), the same T and the same batch size, and both return the
mean probabilities and the five uncertainty measures per image:

- dygraph: ``MCSampler.sample`` with the config's ``MCDropout.strategy`` and
  ``max_batch``, then ``summarize_samples`` (NumPy);
- exported: one ``paddle.inference`` predictor run per batch of a model
  exported by ``tools/export_model.py``, measures computed in the graph.

The single pass of each side is timed as well. Each configuration runs once
untimed, then ``--repeats`` times; the report gives the median images per
second. Both sides run in this process, one after the other.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from paddleclas_mc.config import load_config, parse_mc_section  # noqa: E402
from paddleclas_mc.dataset import ImageFolderDataset, list_images  # noqa: E402
from paddleclas_mc.engine import build_inference_model  # noqa: E402
from paddleclas_mc.export import run_export  # noqa: E402
from paddleclas_mc.predictor import InferenceModel  # noqa: E402
from paddleclas_mc.sampling import MCSampler, single_pass  # noqa: E402
from paddleclas_mc.uncertainty import summarize_samples  # noqa: E402


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo/mc_digits.yaml",
                        help="PaddleClas config with an MCDropout section (default: the demo)")
    parser.add_argument("--image-shape", default="3,32,32",
                        help="Global.image_shape of the export, comma-separated (default 3,32,32)")
    parser.add_argument("--samples", type=int, default=30, help="T (default 30)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per configuration; the median is reported (default 3)")
    parser.add_argument("--output", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _load_images(config):
    infer = config["Infer"]
    paths = list_images(infer["infer_imgs"]).paths
    dataset = ImageFolderDataset(paths, infer["transforms"])
    return np.stack([dataset[index]["image"] for index in range(len(paths))])


def _images_per_second(run_batch, images, batch_size, repeats):
    """Return the median images per second of ``run_batch`` over all batches, after one warm-up."""
    batches = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
    for batch in batches:
        run_batch(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            run_batch(batch)
        times.append(time.perf_counter() - started)
    return len(images) / statistics.median(times)


def main(argv=None):
    """Run the comparison, print one line per configuration and return the results."""
    args = _parse_args(argv)
    os.chdir(ROOT)
    overrides = [f"MCDropout.samples={args.samples}", "MCDropout.enable=True",
                 f"Global.image_shape=[{args.image_shape}]"]
    config = load_config(args.config, overrides)
    mc = parse_mc_section(config)
    images = _load_images(config)

    model = build_inference_model(config)
    sampler = MCSampler(model, args.samples, mc.strategy, mc.max_batch, mc.drop_path,
                        mc.functional_dropout)
    strategy, _ = sampler.describe_strategy(args.batch_size, paddle.to_tensor(images[:1]))

    with tempfile.TemporaryDirectory() as folder:
        mc_dir, plain_dir = os.path.join(folder, "mc"), os.path.join(folder, "plain")
        run_export(load_config(args.config, overrides + [f"Global.save_inference_dir={mc_dir}"]))
        run_export(load_config(args.config, overrides + [
            "MCDropout.enable=False", f"Global.save_inference_dir={plain_dir}"]))
        exported_mc = InferenceModel(mc_dir)
        exported_plain = InferenceModel(plain_dir)

        def dygraph_mc(batch):
            summarize_samples(sampler.sample(paddle.to_tensor(batch)))

        configurations = {
            "dygraph single pass": lambda batch: single_pass(model, paddle.to_tensor(batch)),
            "exported single pass": exported_plain.predict,
            f"dygraph MC ({strategy})": dygraph_mc,
            f"exported MC ({exported_mc.metadata['strategy']})": exported_mc.predict,
        }
        results = {name: _images_per_second(run, images, args.batch_size, args.repeats)
                   for name, run in configurations.items()}

    report = {
        "config": args.config, "images": len(images), "samples": args.samples,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "paddle_version": paddle.__version__, "device": paddle.get_device(),
        "load_average_1min": os.getloadavg()[0],
        "images_per_second": {name: round(value, 1) for name, value in results.items()},
    }
    for name, value in report["images_per_second"].items():
        print(f"{name:32s} {value:10.1f} images/s")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
