"""PaddleClas config loading, ``-o`` overrides and the ``MCDropout`` section.

A config is read with PaddleClas's own parser, so every PaddleClas config
works unchanged. Overrides are applied here rather than with PaddleClas's
``override_config``, which runs each value through ``eval`` (``-o a=open``
would be a function) and splits on every ``=``. Here a value is parsed as
YAML: ``True``, ``null``, ``50``, ``[1, 5]`` and plain strings all work.
"""

import argparse
import dataclasses
from typing import Optional, Tuple

import yaml

from . import integration

__all__ = [
    "InferConfig",
    "MCDropoutConfig",
    "STRATEGIES",
    "apply_overrides",
    "build_arg_parser",
    "load_config",
    "parse_infer_section",
    "parse_mc_section",
]

STRATEGIES = ("auto", "loop", "tiled")


@dataclasses.dataclass(frozen=True)
class MCDropoutConfig:
    """The validated ``MCDropout`` section.

    Attributes:
        enable: run MC sampling instead of the single pass.
        samples: T, the number of stochastic forward passes per image (>= 2).
        seed: the seed of the dropout masks, or None for a fresh draw each run.
            The same seed, images and device give identical output.
        strategy: ``auto``, ``loop`` (T forwards of the batch) or ``tiled``
            (the batch repeated T times, in forwards of at most ``max_batch``).
        max_batch: the most images one forward may carry when tiling.
        drop_path: also sample DropPath (stochastic depth) layers.
        functional_dropout: names or glob patterns of sublayers whose own
            ``training`` flag drives a functional dropout in their forward.
    """

    enable: bool = False
    samples: int = 30
    seed: Optional[int] = None
    strategy: str = "auto"
    max_batch: int = 64
    drop_path: bool = False
    functional_dropout: Tuple[str, ...] = ()


_ALLOWED = {
    "enable": "a boolean (True or False)",
    "samples": "an integer >= 2",
    "seed": "a non-negative integer or null",
    "strategy": "one of " + ", ".join(STRATEGIES),
    "max_batch": "an integer >= 1",
    "drop_path": "a boolean (True or False)",
    "functional_dropout": "a list of sublayer names, e.g. ['blocks.*.attn']",
}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(key, value):
    if key in ("enable", "drop_path"):
        return isinstance(value, bool)
    if key == "samples":
        return _is_int(value) and value >= 2
    if key == "seed":
        return value is None or (_is_int(value) and value >= 0)
    if key == "strategy":
        return value in STRATEGIES
    if key == "max_batch":
        return _is_int(value) and value >= 1
    return isinstance(value, (list, tuple)) and all(
        isinstance(name, str) and name for name in value)


def parse_mc_section(config) -> MCDropoutConfig:
    """Validate ``config["MCDropout"]`` and return it with defaults filled in.

    An absent or empty section means MC Dropout is disabled.

    Raises:
        ValueError: on an unknown key or an invalid value, naming the key,
            the value and what is allowed.
    """
    section = config.get("MCDropout") or {}
    if not isinstance(section, dict):
        raise ValueError(f"MCDropout must be a mapping of keys to values, got {section!r}.")

    unknown = sorted(set(section) - set(_ALLOWED))
    if unknown:
        raise ValueError(
            f"MCDropout: unknown key(s) {', '.join(unknown)}. "
            f"Allowed keys: {', '.join(_ALLOWED)}.")

    values = {}
    for key, value in section.items():
        if not _check_value(key, value):
            raise ValueError(
                f"MCDropout.{key}: invalid value {value!r}; expected {_ALLOWED[key]}.")
        values[key] = tuple(value) if key == "functional_dropout" else value
    return MCDropoutConfig(**values)


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """The validated ``Infer`` section, PaddleClas's keys plus ``num_workers``.

    Attributes:
        infer_imgs: one image, a folder searched recursively, or a text file of paths.
        infer_list: PaddleClas's optional list of paths relative to ``infer_imgs``.
        batch_size: images per batch.
        num_workers: DataLoader worker processes that read and preprocess images.
        transforms: PaddleClas's preprocessing op list.
        topk: how many classes each record lists (``PostProcess.topk``).
        class_id_map_file: the label file, or None.
        delimiter: the separator in the label file.
        save_dir: the folder for ``predictions.jsonl`` and ``summary.json``,
            or None to log the results instead.
    """

    infer_imgs: str
    infer_list: Optional[str] = None
    batch_size: int = 1
    num_workers: int = 2
    transforms: Tuple = ()
    topk: int = 1
    class_id_map_file: Optional[str] = None
    delimiter: str = " "
    save_dir: Optional[str] = None


def _require(condition, key, value, expected):
    if not condition:
        raise ValueError(f"{key}: invalid value {value!r}; expected {expected}.")


def parse_infer_section(config) -> InferConfig:
    """Validate PaddleClas's ``Infer`` section.

    Only the ``Topk`` postprocess is supported, since MC Dropout ranks
    classes by mean probability.

    Raises:
        ValueError: on a missing or invalid key, naming it.
    """
    section = config.get("Infer")
    _require(isinstance(section, dict), "Infer", section,
             "a section with infer_imgs, batch_size, transforms and PostProcess")
    infer_imgs = section.get("infer_imgs")
    _require(isinstance(infer_imgs, str) and infer_imgs, "Infer.infer_imgs", infer_imgs,
             "the path of an image, a folder or a text file of paths")
    batch_size = section.get("batch_size", 1)
    _require(_is_int(batch_size) and batch_size >= 1, "Infer.batch_size", batch_size,
             "an integer >= 1")
    num_workers = section.get("num_workers", 2)
    _require(_is_int(num_workers) and num_workers >= 0, "Infer.num_workers", num_workers,
             "an integer >= 0 (0 reads images in the main process)")
    transforms = section.get("transforms")
    _require(isinstance(transforms, list) and transforms, "Infer.transforms", transforms,
             "PaddleClas's list of preprocessing ops, starting with DecodeImage")

    postprocess = dict(section.get("PostProcess") or {"name": "Topk"})
    name = postprocess.pop("name", None)
    _require(name == "Topk", "Infer.PostProcess.name", name,
             "Topk (MC Dropout ranks classes by their mean probability)")
    topk = postprocess.pop("topk", 1)
    _require(_is_int(topk) and topk >= 1, "Infer.PostProcess.topk", topk, "an integer >= 1")
    class_id_map_file = postprocess.pop("class_id_map_file", None)
    delimiter = postprocess.pop("delimiter", None) or " "
    _require(not postprocess, "Infer.PostProcess", sorted(postprocess),
             "only the keys name, topk, class_id_map_file and delimiter")

    return InferConfig(
        infer_imgs=infer_imgs,
        infer_list=section.get("infer_list"),
        batch_size=batch_size,
        num_workers=num_workers,
        transforms=tuple(transforms),
        topk=topk,
        class_id_map_file=class_id_map_file,
        delimiter=delimiter,
        save_dir=section.get("save_dir"),
    )


def _parse_override(option):
    key, sep, raw_value = option.partition("=")
    if not sep or not key.strip():
        raise ValueError(
            f"-o {option!r}: expected Section.key=value, for example "
            "-o MCDropout.samples=50.")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"-o {option!r}: the value is not valid YAML ({error}).") from None
    return key.strip().split("."), value


def _set_path(node, keys, value, option):
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise ValueError(
                    f"-o {option!r}: {'.'.join(keys[:depth + 1])} must index a list "
                    f"of {len(node)} items.")
            key = int(key)
        elif not isinstance(node, dict):
            raise ValueError(
                f"-o {option!r}: {'.'.join(keys[:depth])} is {node!r}, not a section.")
        elif not last and node.get(key) is None:
            node[key] = {}

        if last:
            node[key] = value
        else:
            node = node[key]


def apply_overrides(config, options):
    """Apply ``-o Section.key=value`` options to ``config`` in place.

    A key path may index a list by number (``Infer.transforms.1.ResizeImage.size=64``)
    and may create a new section (``MCDropout.enable=True`` on a plain
    PaddleClas config).

    Raises:
        ValueError: on a malformed option, naming it.
    """
    for option in options or []:
        keys, value = _parse_override(option)
        _set_path(config, keys, value, option)
    return config


def load_config(path, overrides=None):
    """Read a PaddleClas YAML config and apply ``-o`` overrides.

    Raises:
        FileNotFoundError: when the config file does not exist.
        ValueError: on an unreadable config or a malformed override.
    """
    try:
        config = integration.parse_config_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"-c: config file {path!r} not found.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"-c: config file {path!r} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"-c: config file {path!r} must hold a mapping of sections.")
    return apply_overrides(config, overrides)


def build_arg_parser(description):
    """Return an argument parser with PaddleClas's ``-c`` and ``-o`` flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=True, help="path to the YAML config file")
    parser.add_argument(
        "-o", "--override", action="append", default=[],
        help="override a config value, e.g. -o MCDropout.samples=50 (repeatable)")
    return parser
