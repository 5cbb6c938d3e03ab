"""Benchmark MC Dropout sampling strategies against the single pass.

    python tools/bench.py                               # full run, writes docs/benchmarks.md
    python tools/bench.py --smoke --output /tmp/b.md    # a few seconds, for CI

For each model this measures the wall time and peak memory of the single
pass and of ``loop``, ``tiled`` and ``prefix`` sampling at each T, and the
peak memory of MC inference through ``paddleclas_mc.engine.run_infer`` over
two image counts. The report gives every number as a ratio to the single
pass of the same run.

How it measures:

- Each configuration runs in a fresh subprocess, so its peak resident set
  size (``ru_maxrss``) is its own. On a GPU, ``max_memory_allocated`` is
  reported too. ``--smoke`` runs everything in one subprocess, so its memory
  ratios are not per configuration.
- Models have random weights and images are random: the cost of a forward
  does not depend on the values.
- Each configuration first runs once untimed, so kernel set-up is not timed.
  The prefix probe (once per input shape) is timed separately.
- A strategy's time is divided by the time of single passes run right after
  it in the same subprocess, so load from other processes that changes
  during the benchmark affects both about equally.
- ``tiled`` runs only at the T values of ``--tiled-samples``, and loop or
  tiled configurations whose estimated time (T single passes) exceeds
  ``--max-config-seconds`` are skipped. The report lists what was skipped.
- Every job records the 1-minute load average before and after it, so the
  report shows whether other processes shared the CPU.
- The memory check runs with the engine's own heap settings
  (``paddleclas_mc.memory``: glibc's mmap threshold fixed at 32 MiB, free
  heap returned after each batch). ``--memory-mmap-threshold`` adds a run
  with ``MALLOC_MMAP_THRESHOLD_`` set, which the engine then keeps.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_MODELS = [
    "PPLCNet_x1_0",
    "MobileNetV3_large_x1_0",
    "AlexNet",
    "EfficientNetB0",
    "SwinTransformer_tiny_patch4_window7_224",
]
SMOKE_MODEL = "PPLCNet_x0_25"
STRATEGIES = ("loop", "tiled", "prefix")
RESULT_MARKER = "BENCH_RESULT "
# The report ends with this line. Whatever follows it in an existing output
# file is kept when the tool rewrites the file, so sections written by hand
# go below it.
HAND_WRITTEN_MARKER = ("<!-- Sections below this line are written by hand; tools/bench.py "
                       "keeps them when it rewrites this page. -->")
# Timed single passes after each strategy run, the reference of its time ratio.
REFERENCE_REPEATS = 2


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Measure wall time and peak memory of MC Dropout strategies "
                    "as ratios to the single pass.")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="PaddleClas model names (Arch.name)")
    parser.add_argument("--samples", nargs="+", type=int, default=[10, 30, 100],
                        help="values of T to measure")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--image-size", type=int, default=224,
                        help="input height and width in pixels")

    parser.add_argument("--max-batch", type=int, default=64,
                        help="MCDropout.max_batch: max images (tiled) or rows (prefix) per forward")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the single pass and of prefix, of which the "
                             "median is reported; loop and tiled run once, since one run "
                             "already averages T forwards")
    parser.add_argument("--tiled-samples", nargs="*", type=int, default=[10, 30, 100],
                        help="values of T at which tiled is measured; its cost grows with "
                             "T like loop's")
    parser.add_argument("--max-config-seconds", type=float, default=300.0,
                        help="skip loop and tiled configurations whose estimated time "
                             "(T single passes) exceeds this many seconds, except at the "
                             "smallest T; 0 for no limit")

    parser.add_argument("--memory-model", default="PPLCNet_x1_0",
                        help="model of the image-count memory check through run_infer")
    parser.add_argument("--memory-images", nargs="+", type=int, default=[200, 2000],
                        help="image counts of the memory check; the target compares the "
                             "smallest and the largest")
    parser.add_argument("--memory-mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ in bytes for a second memory check over "
                             "the smallest and largest counts; 0 (the default) skips it")
    parser.add_argument("--memory-samples", type=int, default=30, help="T of the memory check")
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="fresh subprocesses per image count in the memory check; the "
                             "report compares their medians, since one process's peak "
                             "varies by a few percent from run to run")
    parser.add_argument("--memory-workers", type=int, default=0,
                        help="Infer.num_workers of the memory check; with more than 0 the "
                             "worker processes' peak RSS is reported as well")
    parser.add_argument("--memory-only", action="store_true",
                        help="run only the memory check and print its section")

    parser.add_argument("--target-models", nargs="+",
                        default=["PPLCNet_x1_0", "MobileNetV3_large_x1_0"],
                        help="models whose MC cost the report checks against --target-ratio")
    parser.add_argument("--target-samples", type=int, default=30,
                        help="T at which the report checks --target-ratio")
    parser.add_argument("--target-ratio", type=float, default=1.3,
                        help="the max MC time, as a multiple of the single pass, that the "
                             "report accepts for --target-models")
    parser.add_argument("--memory-tolerance", type=float, default=0.05,
                        help="the max relative change of peak memory from the few to the "
                             "many images that the report accepts")

    parser.add_argument("--device", default="cpu", help="Paddle device, e.g. cpu or gpu:0")
    parser.add_argument("--job-timeout", type=float, default=3600.0,
                        help="seconds after which one subprocess is stopped")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny run for CI: {SMOKE_MODEL}, T=2, 32x32, batch 4, memory "
                             "check over 8 vs 16 images with glibc defaults, all in one "
                             "subprocess")
    parser.add_argument("--output", default=None,
                        help="Markdown report path (default docs/benchmarks.md, or only "
                             "stdout with --smoke)")
    parser.add_argument("--json", default=None, help="also write the raw results to this path")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="write the report from raw results saved with --json, "
                             "without measuring again; with several files, a configuration "
                             "measured again in a later file replaces the earlier result")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def apply_smoke(args):
    args.models = [SMOKE_MODEL]
    args.samples = [2]
    args.batch_size = 4
    args.image_size = 32
    args.max_batch = 8
    args.repeats = 1
    args.max_config_seconds = 0
    args.memory_model = SMOKE_MODEL
    args.memory_images = [8, 16]
    args.tiled_samples = [2]
    # One subprocess cannot change its malloc settings between jobs.
    args.memory_mmap_threshold = 0
    args.memory_samples = 2
    args.target_models = [SMOKE_MODEL]
    args.target_samples = 2


# ---------------------------------------------------------------- worker side

_MODELS = {}


def _peak_rss_kib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _build_model(name):
    """Build a PaddleClas model with random weights, once per process.

    Some PaddleClas models give their parameters fixed names, and Paddle
    rejects a second model with the same names in one process.
    """
    from paddleclas_mc import integration

    if name not in _MODELS:
        model = integration.build_model({"Arch": {"name": name, "class_num": 1000}})
        model.eval()
        _MODELS[name] = model
    return _MODELS[name]


def _timed(function):
    import paddle

    start = time.perf_counter()
    function()
    if paddle.device.get_device().startswith("gpu"):
        paddle.device.synchronize()
    return time.perf_counter() - start


def _memory_fields():
    import paddle

    fields = {"peak_rss_kib": _peak_rss_kib()}
    if paddle.device.get_device().startswith("gpu"):
        fields["gpu_peak_bytes"] = int(paddle.device.cuda.max_memory_allocated())
    return fields


def run_time_job(job):
    """Time the single pass (and the auto choice) or one strategy at one T."""
    import numpy as np
    import paddle
    from paddleclas_mc.sampling import MCSampler, single_pass

    paddle.set_device(job["device"])
    paddle.seed(0)
    model = _build_model(job["model"])
    size = job["image_size"]
    images = paddle.to_tensor(np.random.RandomState(0).standard_normal(
        [job["batch_size"], 3, size, size]).astype("float32"))
    # drop_path=True samples Swin's DropPath layers; the CNNs here have none.
    sampler_args = {"max_batch": job["max_batch"], "drop_path": True}
    strategy = job["strategy"]

    if strategy == "single":
        single_pass(model, images)
        times = [_timed(lambda: single_pass(model, images)) for _ in range(job["repeats"])]
        result = {"time_s": statistics.median(times), **_memory_fields()}
        sampler = MCSampler(model, job["samples"], "auto", **sampler_args)
        choice = {}
        result["probe_s"] = _timed(lambda: choice.update(
            zip(("strategy", "reason"), sampler.describe_strategy(job["batch_size"], images))))
        result["auto_strategy"] = choice["strategy"]
        result["auto_reason"] = choice["reason"]
        return result

    sampler = MCSampler(model, job["samples"], strategy, **sampler_args)
    if strategy == "prefix":
        plan = sampler.prefix_plan(images)
        if not plan.usable:
            return {"unusable": plan.reason}
        sampler.sample(images, seed=0)
    elif strategy == "tiled":
        MCSampler(model, 2, "tiled", **sampler_args).sample(images, seed=0)
    else:
        single_pass(model, images)
    times = [_timed(lambda: sampler.sample(images, seed=index))
             for index in range(job["repeats"])]
    # Peak memory is read before the reference passes, so their B-image
    # forwards do not count towards the strategy's peak.
    result = {"time_s": statistics.median(times), **_memory_fields()}

    # The reference single pass runs right after, in this process, so that
    # other load on the machine slows both about equally.
    single_pass(model, images)
    references = [_timed(lambda: single_pass(model, images))
                  for _ in range(REFERENCE_REPEATS)]
    result["reference_time_s"] = statistics.median(references)
    return result


def _infer_transforms(size):
    """PaddleClas's usual inference preprocessing, scaled to ``size``."""
    return [
        {"DecodeImage": {"to_rgb": True, "channel_first": False}},
        {"ResizeImage": {"resize_short": round(size * 256 / 224)}},
        {"CropImage": {"size": size}},
        {"NormalizeImage": {"scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406],
                            "std": [0.229, 0.224, 0.225], "order": ""}},
        {"ToCHWImage": None},
    ]


def run_memory_job(job):
    """Run MC inference through the engine over a folder of images."""
    from paddleclas_mc.engine import run_infer

    config = {
        "Global": {"device": job["device"], "pretrained_model": None},
        "Arch": {"name": job["model"], "class_num": 1000},
        "Infer": {
            "infer_imgs": job["images_dir"],
            "batch_size": job["batch_size"],
            # Worker processes are children, which ru_maxrss of this process
            # leaves out, so their peak is read apart.
            "num_workers": job.get("num_workers", 0),
            "transforms": _infer_transforms(job["image_size"]),
            "PostProcess": {"name": "Topk", "topk": 5},
            "save_dir": job["save_dir"],
        },
        "MCDropout": {"enable": True, "samples": job["samples"], "seed": 0,
                      "strategy": "auto", "max_batch": job["max_batch"]},
    }
    start = time.perf_counter()
    summary = run_infer(config)
    result = {"time_s": time.perf_counter() - start, "images": summary["images"],
              "predicted": summary["predicted"], **_memory_fields()}
    if job.get("num_workers"):
        result["children_peak_rss_kib"] = resource.getrusage(
            resource.RUSAGE_CHILDREN).ru_maxrss
    return result


def run_worker(jobs):
    """Run jobs in this process and print one result line per job."""
    for job in jobs:
        runner = run_time_job if job["kind"] == "time" else run_memory_job
        load_before = os.getloadavg()[0]
        result = {"job": job, **runner(job), "load_before": load_before,
                  "load_after": os.getloadavg()[0]}
        print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- parent side

def run_jobs(jobs, timeout, env=None):
    """Run ``jobs`` in one subprocess and return one result dict per job.

    ``env`` adds environment variables for the subprocess. A job that did not
    report gets ``{"job": ..., "error": ...}`` with the end of the
    subprocess's output.
    """
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(jobs)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   cwd=ROOT, env={**os.environ, **(env or {})})
        output, failure = completed.stdout, None
        if completed.returncode != 0:
            failure = f"exit code {completed.returncode}: {completed.stderr[-1500:]}"
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        failure = f"timed out after {timeout:.0f} s"

    results = [json.loads(line[len(RESULT_MARKER):]) for line in output.splitlines()
               if line.startswith(RESULT_MARKER)]
    for job in jobs[len(results):]:
        results.append({"job": job, "error": failure or "the worker reported no result"})
    return results


def _log(message, started):
    print(f"[bench {time.time() - started:7.1f} s] {message}", file=sys.stderr, flush=True)


def _describe_job(job):
    if job["kind"] == "memory":
        threshold = job.get("mmap_threshold")
        return f"memory check, {job['count']} images, run {job.get('repeat', 0) + 1}" + (
            f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")
    if job["strategy"] == "single":
        return f"{job['model']} single pass"
    return f"{job['model']} {job['strategy']} T={job['samples']}"


def _time_job(args, model, strategy, samples, repeats):
    return {"kind": "time", "model": model, "strategy": strategy, "samples": samples,
            "batch_size": args.batch_size, "image_size": args.image_size,
            "max_batch": args.max_batch, "repeats": repeats, "device": args.device}


def write_images(folder, count, size, seed=0):
    """Write ``count`` smooth random-colour JPEGs of about ``size`` pixels."""
    import cv2
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    random = np.random.RandomState(seed)
    height, width = size + size // 7, size + size // 3
    ramp_y = np.linspace(0, 1, height)[:, None, None]
    ramp_x = np.linspace(0, 1, width)[None, :, None]
    for index in range(count):
        start, slope_y, slope_x = random.uniform(0, 255, (3, 3))
        image = start + slope_y * ramp_y + slope_x * ramp_x - (slope_y + slope_x) / 2
        image = np.clip(image, 0, 255).astype("uint8")
        cv2.imwrite(os.path.join(folder, f"image_{index:05d}.jpg"), image)


def plan_jobs(args):
    """Return the single-pass jobs, the strategy jobs per model and the skipped jobs."""
    singles = [_time_job(args, model, "single", max(args.samples), args.repeats)
               for model in args.models]
    skipped = []
    strategy_jobs = {}
    for model in args.models:
        jobs = []
        for samples in args.samples:
            for strategy in STRATEGIES:
                repeats = args.repeats if strategy == "prefix" else 1
                job = _time_job(args, model, strategy, samples, repeats)
                if strategy == "tiled" and samples not in args.tiled_samples:
                    skipped.append({"job": job, "why": "T not in --tiled-samples"})
                    continue
                jobs.append(job)
        strategy_jobs[model] = jobs
    return singles, strategy_jobs, skipped


def _memory_jobs(args, workdir):
    jobs = []
    many = max(args.memory_images)
    write_images(os.path.join(workdir, "all"), many, args.image_size)
    names = sorted(os.listdir(os.path.join(workdir, "all")))
    for count in args.memory_images:
        folder = os.path.join(workdir, f"images_{count}")
        os.makedirs(folder)
        for name in names[:count]:
            os.link(os.path.join(workdir, "all", name), os.path.join(folder, name))
        job = {"kind": "memory", "model": args.memory_model, "count": count,
               "images_dir": folder, "samples": args.memory_samples,
               "batch_size": args.batch_size, "image_size": args.image_size,
               "max_batch": args.max_batch, "device": args.device, "mmap_threshold": None,
               "num_workers": args.memory_workers}
        for repeat in range(1 if args.smoke else args.memory_repeats):
            jobs.append({**job, "repeat": repeat})
            if args.memory_mmap_threshold and count in (min(args.memory_images), many):
                jobs.append({**job, "repeat": repeat,
                             "mmap_threshold": args.memory_mmap_threshold})
    for index, job in enumerate(jobs):
        job["save_dir"] = os.path.join(workdir, f"out_{index}")
    return jobs


def run_benchmark(args):
    """Run every job and return ``{"results": [...], "skipped": [...]}``."""
    started = time.time()
    singles, strategy_jobs, skipped = ([], {model: [] for model in args.models}, []) \
        if args.memory_only else plan_jobs(args)
    with tempfile.TemporaryDirectory(prefix="paddleclas_mc_bench_") as workdir:
        memory_jobs = _memory_jobs(args, workdir)

        if args.smoke:
            jobs = singles + [job for model in args.models for job in strategy_jobs[model]]
            _log(f"running {len(jobs) + len(memory_jobs)} jobs in one subprocess", started)
            results = run_jobs(jobs + memory_jobs, args.job_timeout)
            return {"results": results, "skipped": skipped,
                    "wall_time_s": time.time() - started}

        results = []
        single_results = {}
        for job in singles:
            _log(f"{_describe_job(job)}", started)
            result = run_jobs([job], args.job_timeout)[0]
            results.append(result)
            single_results[job["model"]] = result
        single_times = {model: result.get("time_s") for model, result in single_results.items()}

        for model in args.models:
            for job in strategy_jobs[model]:
                # The probe does not depend on T, so a model that auto did not
                # run with prefix is not probed again for every T.
                auto_strategy = single_results[model].get("auto_strategy")
                if job["strategy"] == "prefix" and auto_strategy not in (None, "prefix"):
                    results.append({"job": job,
                                    "unusable": single_results[model]["auto_reason"]})
                    continue
                estimate = (single_times[model] or 0) * job["samples"]
                # The smallest T always runs, so every model has a loop time.
                limited = (args.max_config_seconds > 0 and job["strategy"] != "prefix"
                           and job["samples"] != min(args.samples))
                if limited and estimate > args.max_config_seconds:
                    skipped.append({"job": job, "why": f"estimated {estimate:.0f} s > "
                                                       f"--max-config-seconds "
                                                       f"{args.max_config_seconds:g}"})
                    _log(f"skip {_describe_job(job)}: estimated {estimate:.0f} s", started)
                    continue
                _log(f"{_describe_job(job)}", started)
                results.append(run_jobs([job], args.job_timeout)[0])

        for job in memory_jobs:
            _log(f"{_describe_job(job)}", started)
            env = ({"MALLOC_MMAP_THRESHOLD_": str(job["mmap_threshold"])}
                   if job["mmap_threshold"] else None)
            results.append(run_jobs([job], args.job_timeout, env)[0])

    return {"results": results, "skipped": skipped, "wall_time_s": time.time() - started}


def _run_context(args, argv):
    """Return what the report states about the run besides the results."""
    cpu, cores, memory_gib = _machine()
    versions = {package: _version(package) for package in
                ("paddlepaddle", "paddlepaddle-gpu", "paddleclas", "numpy")}
    return {"args": vars(args), "command": "python tools/bench.py" +
            "".join(f" {shlex.quote(arg)}" for arg in argv),
            "date": datetime.date.today().isoformat(), "cpu": cpu, "cores": cores,
            "memory_gib": memory_gib, "python": platform.python_version(),
            "versions": versions}


# ---------------------------------------------------------------- report

def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    memory_gib = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return cpu, os.cpu_count(), memory_gib


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _ratio(value, reference):
    if value is None or not reference:
        return None
    return value / reference


def _format_ratio(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}x"


class Report:
    """Benchmark results indexed by model, strategy and T."""

    def __init__(self, data, args):
        self.args = args
        self.data = data
        self.single = {}
        self.measured = {}
        self.memory = {}
        self.errors = []
        for result in data["results"]:
            job = result["job"]
            if "error" in result:
                self.errors.append(result)
            elif job["kind"] == "memory":
                self.memory.setdefault((job["count"], job.get("mmap_threshold")), []).append(
                    result)
            elif job["strategy"] == "single":
                self.single[job["model"]] = result
            else:
                self.measured[(job["model"], job["strategy"], job["samples"])] = result
        self.memory = {key: _median_result(runs) for key, runs in self.memory.items()}
        self.skipped = {(item["job"]["model"], item["job"]["strategy"], item["job"]["samples"]):
                        item for item in data["skipped"]}

    def cell(self, model, strategy, samples, field):
        """Return the ratio of ``field`` to the single pass, or a note."""
        key = (model, strategy, samples)
        if key in self.skipped:
            return "not run"
        result = self.measured.get(key)
        if result is None:
            return "error"
        if "unusable" in result:
            return "unusable"
        if field == "time_s":
            return _format_ratio(_ratio(result["time_s"], result["reference_time_s"]))
        single = self.single.get(model, {})
        return _format_ratio(_ratio(result.get(field), single.get(field)))

    def auto_ratio(self, model, samples):
        """Return (strategy, time ratio) of what auto runs, ratio None if not measured."""
        single = self.single.get(model)
        if not single:
            return None, None
        strategy = single["auto_strategy"]
        result = self.measured.get((model, strategy, samples), {})
        return strategy, _ratio(result.get("time_s"), result.get("reference_time_s"))

    def loop_ratio(self, model, samples):
        result = self.measured.get((model, "loop", samples), {})
        return _ratio(result.get("time_s"), result.get("reference_time_s"))


def _table(report, field, with_auto):
    args = report.args
    header = ["Model", "T"] + list(STRATEGIES)
    if with_auto:
        header += ["auto runs", "auto / loop"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in args.models:
        for samples in args.samples:
            row = [model, str(samples)]
            row += [report.cell(model, strategy, samples, field) for strategy in STRATEGIES]
            if with_auto:
                strategy, ratio = report.auto_ratio(model, samples)
                loop = report.loop_ratio(model, samples)
                row.append(f"{strategy}" if strategy else "error")
                row.append(_format_ratio(_ratio(ratio, loop)) if ratio and loop else "n/a")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _auto_lines(report):
    lines = ["| Model | auto runs | probe time / single pass | reason |", "|---|---|---|---|"]
    for model in report.args.models:
        single = report.single.get(model)
        if not single:
            lines.append(f"| {model} | error | n/a | see Errors |")
            continue
        probe = _format_ratio(_ratio(single["probe_s"], single["time_s"]))
        reason = single["auto_reason"].replace("|", "/")
        lines.append(f"| {model} | {single['auto_strategy']} | {probe} | {reason} |")
    return lines


def _median_result(runs):
    """Return the medians of repeated memory runs, with every run's peak RSS in ``peaks``."""
    merged = {"images": runs[0]["images"], "peaks": [run["peak_rss_kib"] for run in runs]}
    for field in ("peak_rss_kib", "children_peak_rss_kib", "time_s"):
        if all(field in run for run in runs):
            merged[field] = statistics.median(run[field] for run in runs)
    return merged


def _memory_growth(report, threshold=None):
    """Return the relative change of peak RSS from the fewest to the most images, or None."""
    counts = report.args.memory_images
    few = report.memory.get((min(counts), threshold))
    many = report.memory.get((max(counts), threshold))
    if few is None or many is None:
        return None
    return many["peak_rss_kib"] / few["peak_rss_kib"] - 1


def _memory_lines(report):
    args = report.args
    counts = sorted(args.memory_images)
    threshold = args.memory_mmap_threshold
    workers = getattr(args, "memory_workers", 0)
    lines = [
        f"MC inference through `paddleclas_mc.engine.run_infer` with {args.memory_model}, "
        f"T={args.memory_samples}, `MCDropout.strategy: auto`, batch {args.batch_size}, "
        f"`Infer.num_workers: {workers}` and `Infer.save_dir` set, over generated JPEGs "
        f"preprocessed to {args.image_size}x{args.image_size}. "
        + ("With --smoke all counts run in one subprocess, smallest first."
           if args.smoke else "Each run is a fresh subprocess."),
        "",
        f"| Images | peak RSS / peak RSS with {counts[0]} images, engine's heap settings"
        + (f" | same, `MALLOC_MMAP_THRESHOLD_={threshold}`" if threshold else "")
        + " | peak RSS, MiB, each run"
        + (f" | worker processes' peak RSS / same with {counts[0]} images" if workers else "")
        + f" | images/s / images/s with {counts[0]} images |",
    ]
    column_count = 4 + bool(threshold) + bool(workers)
    lines.append("|" + "---|" * column_count)
    columns = [None] + ([threshold] if threshold else [])
    for count in counts:
        row = [str(count)]
        for column in columns:
            result = report.memory.get((count, column))
            reference = report.memory.get((counts[0], column))
            if result is None or reference is None:
                row.append("not run" if column and count not in (counts[0], counts[-1])
                           else "n/a")
                continue
            row.append(_format_ratio(result["peak_rss_kib"] / reference["peak_rss_kib"], 3))
        result, reference = report.memory.get((count, None)), report.memory.get((counts[0], None))
        row.append("n/a" if result is None else
                   f"{min(result['peaks']) / 1024:.0f} to {max(result['peaks']) / 1024:.0f} "
                   f"({len(result['peaks'])} runs)")
        if workers:
            row.append("n/a" if result is None or reference is None else _format_ratio(
                result["children_peak_rss_kib"] / reference["children_peak_rss_kib"], 3))
        if result is None or reference is None:
            row.append("n/a")
        else:
            row.append(_format_ratio((result["images"] / result["time_s"])
                                     / (reference["images"] / reference["time_s"])))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "The engine fixes glibc's mmap threshold at 32 MiB, the value glibc's own adaptive "
        "threshold reaches, and returns the free heap after each batch "
        "(`paddleclas_mc.memory`); a `MALLOC_MMAP_THRESHOLD_` in the environment is kept. "
        "Images/s includes start-up, model build and the probe, which weigh more in the "
        "shorter run. Ratios compare the medians of the runs.",
    ]
    return lines


def _skipped_lines(report):
    if not report.skipped:
        return ["Every configuration ran."]
    lines = ["These configurations were not run and are marked \"not run\" in the tables. "
             "No number is extrapolated for them.", ""]
    for (model, strategy, samples), item in sorted(report.skipped.items()):
        lines.append(f"- {model}, {strategy}, T={samples}: {item['why']}")
    return lines


def _check_lines(report):
    args = report.args
    lines = []
    for model in args.target_models:
        strategy, ratio = report.auto_ratio(model, args.target_samples)
        if ratio is None:
            lines.append(f"- {model}, T={args.target_samples}: not measured.")
            continue
        verdict = "met" if ratio <= args.target_ratio else "missed"
        lines.append(f"- MC (auto runs {strategy}) costs {ratio:.2f}x the single pass for "
                     f"{model} at T={args.target_samples}: target <= {args.target_ratio}x "
                     f"{verdict}.")
    for model in args.models:
        for samples in args.samples:
            strategy, ratio = report.auto_ratio(model, samples)
            loop = report.loop_ratio(model, samples)
            if ratio is None or loop is None:
                lines.append(f"- auto vs loop for {model} at T={samples}: not measured.")
                continue
            verdict = "met" if ratio <= loop else "missed"
            lines.append(f"- auto ({strategy}) / loop for {model} at T={samples}: "
                         f"{ratio / loop:.2f}: never slower than loop {verdict}.")

    tiled_over_loop = [report.measured[(model, "tiled", samples)]["time_s"]
                       / report.measured[(model, "loop", samples)]["time_s"]
                       for model in args.models for samples in args.samples
                       if (model, "tiled", samples) in report.measured
                       and (model, "loop", samples) in report.measured]
    if tiled_over_loop:
        lines.append(f"- tiled / loop, where both ran: {min(tiled_over_loop):.2f} to "
                     f"{max(tiled_over_loop):.2f}. Both run the same T x B image passes, "
                     f"tiled in forwards of {args.max_batch} images and loop in forwards of "
                     f"{args.batch_size}, so above 1 a forward of {args.max_batch} images "
                     "costs more per image on this machine.")
    return lines + _memory_check_lines(report)


def _memory_check_lines(report):
    args = report.args
    lines = []
    few, many = min(args.memory_images), max(args.memory_images)
    for threshold in [None] + ([args.memory_mmap_threshold] if args.memory_mmap_threshold else []):
        growth = _memory_growth(report, threshold)
        if growth is None:
            continue
        setting = (f"with MALLOC_MMAP_THRESHOLD_={threshold}" if threshold
                   else "with the engine's heap settings")
        verdict = "met" if abs(growth) <= args.memory_tolerance else "missed"
        lines.append(f"- Peak memory over {many} images differs by {growth * 100:+.1f} % from "
                     f"that over {few}, {setting}: target within "
                     f"{args.memory_tolerance * 100:g} % {verdict}.")
    return lines


def _load_line(data):
    loads = [value for result in data["results"]
             for value in (result.get("load_before"), result.get("load_after"))
             if value is not None]
    if not loads:
        return "The load average was not recorded."
    return (f"The 1-minute load average before and after each job ranged from "
            f"{min(loads):.2f} to {max(loads):.2f}. One benchmark job keeps it near 1, so "
            "values well above 1 mean other processes shared the CPU, which slows the "
            "jobs that ran then.")


def _origin_lines(context, data):
    commands = context.get("commands", [context["command"]])
    if len(commands) == 1:
        intro = (f"Generated by `tools/bench.py` on {context['date']}; the whole run took "
                 f"{data['wall_time_s'] / 60:.1f} min. Every number on this page comes from "
                 "this command:")
    else:
        intro = (f"Generated by `tools/bench.py` from {len(commands)} runs that took "
                 f"{data['wall_time_s'] / 60:.1f} min together, the first on "
                 f"{context['date']}. Every number on this page comes from these commands; "
                 "where a later run measured a configuration again, its result replaces "
                 "the earlier one (the single pass of each model is kept from the first "
                 "run):")
    return [intro, "", "```bash", *commands, "```"]


def render_markdown(data):
    """Return the report as Markdown."""
    context = data["context"]
    args = argparse.Namespace(**context["args"])
    report = Report(data, args)
    if getattr(args, "memory_only", False):
        return "\n".join([
            "# Benchmarks: peak memory over the image count", "",
            f"Generated by `tools/bench.py` on {context['date']} with this command:", "",
            "```bash", context["command"], "```", "",
            *_memory_lines(report), "", *_memory_check_lines(report)]) + "\n"
    versions = context["versions"]
    memory = f", {context['memory_gib']:.0f} GiB memory" if context["memory_gib"] else ""
    gpu_build = versions["paddlepaddle-gpu"]
    gpu_note = ""
    if args.device.startswith("gpu"):
        gpu_note = (" On a GPU, `gpu_peak_bytes` in the JSON output holds "
                    "`paddle.device.cuda.max_memory_allocated()`.")
    lines = [
        "# Benchmarks: MC Dropout sampling strategies",
        "",
        *_origin_lines(context, data),
        "",
        "## Machine and versions",
        "",
        f"- CPU: {context['cpu']}, {context['cores']} cores{memory}; device "
        f"`{args.device}`, Paddle's default thread settings.",
        f"- Python {context['python']}, paddlepaddle {versions['paddlepaddle']}"
        + ("" if gpu_build == "not installed" else f", paddlepaddle-gpu {gpu_build}")
        + f", paddleclas {versions['paddleclas']}, numpy {versions['numpy']}.",
        "",
        "## Method",
        "",
        f"Batch {args.batch_size} of random {args.image_size}x{args.image_size} images, "
        f"random weights, 1000 classes, `max_batch` {args.max_batch}, `drop_path: True` "
        "(it only adds Swin's DropPath layers; the CNNs have none). Each configuration "
        "runs once untimed first. The single pass and `prefix` report the median of "
        f"{args.repeats} timed runs; `loop` and `tiled` run once, as one run already "
        "averages T forwards. " + ("--smoke runs all configurations in one subprocess, "
                                   "so its memory ratios are not per configuration."
                                   if args.smoke else
                                   "Each configuration runs in a fresh subprocess, and peak "
                                   "memory is its `ru_maxrss`.") + gpu_note,
        "",
        "Time ratios divide a strategy's time by the median of "
        f"{REFERENCE_REPEATS} single passes that run right after it in the same "
        "subprocess, so load from other processes that changes during the run affects "
        "both about equally. Memory ratios and the probe's ratio are to the single-pass "
        "subprocess of the same model. \"unusable\" means the prefix probe rejected the "
        "model (see the auto table for why).",
        "",
        _load_line(data),
        "",
        "## Wall time, ratio to the single pass",
        "",
        *_table(report, "time_s", with_auto=True),
        "",
        "\"auto runs\" is what `MCSampler.describe_strategy` chose for this batch, and "
        "\"auto / loop\" compares that strategy's time with loop's. Both leave out the "
        "one-time probe, given below.",
        "",
        "## Peak memory (RSS), ratio to the single pass",
        "",
        *_table(report, "peak_rss_kib", with_auto=False),
        "",
        "## What auto chooses",
        "",
        *_auto_lines(report),
        "",
        "The probe runs once per input shape; its time is given as a ratio to one single "
        "pass of the full batch.",
        "",
        "## Peak memory over the image count",
        "",
        *_memory_lines(report),
        "",
        "## Not measured",
        "",
        *_skipped_lines(report),
        "",
        "## Checks",
        "",
        *_check_lines(report),
    ]
    if report.errors:
        lines += ["", "## Errors", ""]
        for result in report.errors:
            lines.append(f"- {_describe_job(result['job'])}: {result['error'][-500:]}")
    return "\n".join(lines) + "\n"


def _job_key(job):
    if job["kind"] == "memory":
        return ("memory", job["count"], job.get("mmap_threshold"), job.get("repeat", 0))
    return (job["model"], job["strategy"], job.get("samples"))


def merge_runs(runs):
    """Merge saved runs into one report's data, in the order given.

    A configuration measured again in a later run replaces the earlier result,
    except the single pass, whose first result stays the reference of its
    model. The page then lists every run's command.
    """
    if len(runs) == 1:
        return runs[0]
    merged = {}
    for run in runs:
        for result in run["results"]:
            key = _job_key(result["job"])
            if key in merged and result["job"].get("strategy") == "single":
                continue
            merged[key] = result
    skipped = {}
    for run in runs:
        for item in run["skipped"]:
            key = _job_key(item["job"])
            if key not in merged:
                skipped[key] = item
    context = dict(runs[0]["context"])
    context["commands"] = [run["context"]["command"] for run in runs]
    return {"results": list(merged.values()), "skipped": list(skipped.values()),
            "wall_time_s": sum(run["wall_time_s"] for run in runs), "context": context}


def write_report(path, markdown):
    """Write the report to ``path``, keeping the hand-written part of the file there."""
    hand_written = "\n"
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            previous = file.read()
        if HAND_WRITTEN_MARKER in previous:
            hand_written = previous.split(HAND_WRITTEN_MARKER, 1)[1]
    with open(path, "w", encoding="utf-8") as file:
        file.write(markdown + "\n" + HAND_WRITTEN_MARKER + hand_written)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_arg_parser().parse_args(argv)
    if args.worker:
        return run_worker(json.loads(args.worker))
    if args.smoke:
        apply_smoke(args)
    output = args.output or (None if args.smoke or args.memory_only
                             else os.path.join(ROOT, "docs", "benchmarks.md"))

    if args.from_json:
        runs = []
        for path in args.from_json:
            with open(path, encoding="utf-8") as file:
                runs.append(json.load(file))
        data = merge_runs(runs)
    else:
        data = run_benchmark(args)
        data["context"] = _run_context(args, argv)
    markdown = render_markdown(data)
    if output:
        write_report(output, markdown)
        print(f"Wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(markdown)
    if args.json and not args.from_json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
    failed = [result for result in data["results"] if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
