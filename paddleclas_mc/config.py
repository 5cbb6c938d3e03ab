"""PaddleClas config loading, ``-o`` overrides and the ``MCDropout`` section.

A config is read with PaddleClas's own parser, so every PaddleClas config
works unchanged. Overrides are applied here rather than with PaddleClas's
``override_config``, which runs each value through ``eval`` (``-o a=open``
would be a function) and splits on every ``=``. Here a value is split at the
first ``=`` and parsed as YAML with a narrower set of implicit types:
``True``/``False``, ``null``, decimal integers and floats, flow lists such as
``[1, 5]`` and mappings. Everything else stays a string, so YAML 1.1's dates
(``2024-01-01``), octal (``010``), hexadecimal (``0x10``), sexagesimal
(``1:30``) and ``yes``/``no``/``on``/``off`` booleans are not converted.
"""

import argparse
import dataclasses
import datetime
import difflib
import re
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
    "path_value",
]

# The same names as ``sampling.STRATEGIES``.
STRATEGIES = ("auto", "loop", "tiled", "prefix")


@dataclasses.dataclass(frozen=True)
class MCDropoutConfig:
    """The validated ``MCDropout`` section.

    Attributes:
        enable: run MC sampling instead of the single pass.
        samples: T, the number of stochastic forward passes per image (>= 2).
        seed: the seed of the dropout masks, or None for a fresh draw each run.
            The same seed, images and device give identical output.
        strategy: how the T passes are batched. ``loop`` runs T forwards of
            the batch. ``tiled`` repeats the batch T times, in forwards of at
            most ``max_batch`` images. ``prefix`` runs the layers before the
            first stochastic layer once per batch and only the rest T times,
            in forwards of at most ``max_batch`` rows. ``auto`` picks
            ``prefix`` where a probe shows that it reproduces the single
            pass, else ``tiled`` or ``loop``.
        max_batch: the max images one forward may carry when tiling, and the
            max rows the layers after the split get with ``prefix``.
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
    "samples": "a decimal integer >= 2",
    "seed": "a non-negative decimal integer or null",
    "strategy": "one of " + ", ".join(STRATEGIES),
    "max_batch": "a decimal integer >= 1",
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
        save_dir: the folder for ``predictions.jsonl``, ``summary.json`` and
            ``run.json``, or None to log the results instead.
        resume: ``Infer.resume``. When True, a run whose ``predictions.jsonl``
            already contains records continues it. The images with a record
            are skipped and the rest are appended. The settings that shape the
            records must equal those in ``run.json``, else the run is rejected.
            A run whose ``summary.json`` says it finished is not redone. When
            False, an existing ``predictions.jsonl`` is overwritten.
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
    resume: Optional[bool] = None


def _require(condition, key, value, expected):
    if not condition:
        raise ValueError(f"{key}: invalid value {value!r}; expected {expected}.")


def path_value(value, key, required=False):
    """Return a config value that names a file or folder as a string.

    PaddleClas's config loader passes every quoted string through
    ``ast.literal_eval``, and YAML reads an unquoted ``2024-01-01`` as a date,
    so a folder named ``2024`` or ``2024-01-01`` arrives as an int or a date.
    Both are turned back into the name they were written as.

    Args:
        value: the config value.
        key: the config key, named in errors.
        required: raise when the value is missing or empty.

    Returns:
        The path, or None when the key is unset and not required.

    Raises:
        ValueError: when the value is missing but required, or is not a path.
    """
    if value is None or value == "":
        _require(not required, key, value, "a path")
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, datetime.date)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{key}: invalid value {value!r}; expected a path. Write the path "
                     "as plain text, for example -o " + key + "=./images.")


# Keys of the Infer section that this package reads: PaddleClas's own keys
# plus num_workers, save_dir and resume.
INFER_KEYS = ("infer_imgs", "infer_list", "batch_size", "num_workers", "transforms",
              "PostProcess", "save_dir", "resume")


def _warn_unknown_infer_keys(section):
    """Log each ``Infer`` key that is not read, with the nearest known key.

    Unknown keys only warn, since PaddleClas configs may carry keys for other tools.
    """
    for key in section:
        if key in INFER_KEYS:
            continue
        close = difflib.get_close_matches(key, INFER_KEYS, n=1)
        hint = f"; did you mean Infer.{close[0]}?" if close else ""
        integration.get_logger().warning(
            f"Infer.{key} is not read by paddleclas-mc and has no effect{hint}")


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
    _warn_unknown_infer_keys(section)

    infer_imgs = path_value(section.get("infer_imgs"), "Infer.infer_imgs", required=True)
    infer_list = path_value(section.get("infer_list"), "Infer.infer_list")
    save_dir = path_value(section.get("save_dir"), "Infer.save_dir")
    batch_size = section.get("batch_size", 1)
    _require(_is_int(batch_size) and batch_size >= 1, "Infer.batch_size", batch_size,
             "an integer >= 1")
    num_workers = section.get("num_workers", 2)
    _require(_is_int(num_workers) and num_workers >= 0, "Infer.num_workers", num_workers,
             "an integer >= 0 (0 reads images in the main process)")
    transforms = section.get("transforms")
    _require(isinstance(transforms, list) and transforms, "Infer.transforms", transforms,
             "PaddleClas's list of preprocessing ops, starting with DecodeImage")
    resume = section.get("resume")
    _require(resume is None or isinstance(resume, bool), "Infer.resume", resume,
             "True or False")
    _require(save_dir is not None or not resume, "Infer.save_dir", save_dir,
             "a folder when Infer.resume is True, because resuming reads the "
             "records of the earlier run from <save_dir>/predictions.jsonl")

    postprocess = section.get("PostProcess") or {"name": "Topk"}
    _require(isinstance(postprocess, dict), "Infer.PostProcess", postprocess,
             "a mapping such as {name: Topk, topk: 5}")
    postprocess = dict(postprocess)
    name = postprocess.pop("name", None)
    _require(name == "Topk", "Infer.PostProcess.name", name,
             "Topk (MC Dropout ranks classes by their mean probability)")
    topk = postprocess.pop("topk", 1)
    _require(_is_int(topk) and topk >= 1, "Infer.PostProcess.topk", topk, "an integer >= 1")
    class_id_map_file = path_value(postprocess.pop("class_id_map_file", None),
                                   "Infer.PostProcess.class_id_map_file")
    delimiter = postprocess.pop("delimiter", None) or " "
    _require(isinstance(delimiter, str), "Infer.PostProcess.delimiter", delimiter,
             "the separator between class id and name, e.g. ' '")
    _require(not postprocess, "Infer.PostProcess", sorted(postprocess),
             "only the keys name, topk, class_id_map_file and delimiter")

    return InferConfig(
        infer_imgs=infer_imgs,
        infer_list=infer_list,
        batch_size=batch_size,
        num_workers=num_workers,
        transforms=tuple(transforms),
        topk=topk,
        class_id_map_file=class_id_map_file,
        delimiter=delimiter,
        save_dir=save_dir,
        resume=resume,
    )


# Implicit YAML types an override value may take. YAML 1.1's other forms
# (dates, octal, hexadecimal, sexagesimal, yes/no/on/off) stay strings.
# ``None`` is read as null too, because PaddleClas's own -o parser needs
# ``None`` and users carry that habit over.
_IMPLICIT_TYPES = (
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|None)$", list("~nN")),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^[-+]?(?:0|[1-9][0-9]*)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?[0-9]+[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+0123456789.")),
)


class _OverrideLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that resolves only the types in ``_IMPLICIT_TYPES``."""


_OverrideLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in _IMPLICIT_TYPES:
    _OverrideLoader.add_implicit_resolver(_tag, re.compile(_pattern), _first)


def _parse_override_value(raw_value):
    """Parse the text after ``=`` of one ``-o`` option.

    A flow list or mapping (``[1, 5]``, ``{size: 64}``) and a quoted string
    are parsed as YAML. A null, boolean, decimal integer or float becomes
    that type. Any other text is returned unchanged, so a path keeps its
    ``#``, ``:``, spaces and date-like names.
    """
    text = raw_value.strip()
    if not text:
        return None
    if text[0] in "[{'\"":
        return yaml.load(text, Loader=_OverrideLoader)  # noqa: S506 - a SafeLoader subclass
    for _, pattern, _ in _IMPLICIT_TYPES:
        if re.match(pattern, text):
            return yaml.load(text, Loader=_OverrideLoader)  # noqa: S506
    return raw_value


def _parse_override(option):
    key, sep, raw_value = option.partition("=")
    if not sep or not key.strip():
        raise ValueError(
            f"-o {option!r}: expected Section.key=value, for example "
            "-o MCDropout.samples=50.")
    try:
        value = _parse_override_value(raw_value)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"-o {option!r}: the value is not valid YAML ({reason}). Quote "
                         "a string that starts with [, {, ' or \".") from None
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
        reason = " ".join(str(error).split())
        raise ValueError(f"-c: config file {path!r} is not valid YAML: {reason}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"-c: config file {path!r} is not UTF-8 text ({error}). Save it "
                         "as UTF-8.") from None
    except OSError as error:
        raise ValueError(f"-c: cannot read config file {path!r} ({error.strerror}).") from None
    except (TypeError, AttributeError):
        # PaddleClas's AttrDict(...) fails on an empty file or a top-level list.
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"-c: config file {path!r} must hold a mapping of sections such "
                         "as Global, Arch and Infer.")
    return apply_overrides(config, overrides)


def build_arg_parser(description):
    """Return an argument parser with PaddleClas's ``-c`` and ``-o`` flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=True, help="path to the YAML config file")
    parser.add_argument(
        "-o", "--override", action="append", default=[],
        help="override a config value, e.g. -o MCDropout.samples=50 (repeatable)")
    return parser
