"""Find the stochastic layers of a network and keep only them in training mode.

MC Dropout needs dropout active at inference time, but ``model.train()`` also
switches BatchNorm to batch statistics and updates its running averages. The
context manager here sets every sublayer to eval, then sets the training flag
of the stochastic layers alone, and restores every previous flag on exit, also
when the forward pass raises. Flags are set on each layer directly, so
Paddle's global dygraph train/eval mode is left as it was.

Example:
    >>> with mc_dropout(model) as found:
    ...     probs = [paddle.nn.functional.softmax(model(x)) for _ in range(10)]
"""

import contextlib
import dataclasses
import fnmatch
from typing import List, Optional, Sequence

import paddle

__all__ = [
    "NoStochasticLayerError",
    "eval_mode",
    "StochasticLayer",
    "find_stochastic_layers",
    "mc_dropout",
]

# paddle.nn layers whose training flag turns random masking on. Their own
# ``mode`` (``upscale_in_train`` or ``downscale_in_infer``) is left untouched,
# so the mean over samples matches the deterministic output in expectation.
DROPOUT_TYPES = (
    paddle.nn.Dropout,
    paddle.nn.Dropout2D,
    paddle.nn.Dropout3D,
    paddle.nn.AlphaDropout,
    paddle.nn.FeatureAlphaDropout,
)

# Stochastic depth layers have no common base class in PaddleClas: every
# backbone family defines its own ``DropPath`` with a ``drop_prob`` attribute.
DROP_PATH_TYPE_NAMES = ("DropPath", "StochasticDepth")

class NoStochasticLayerError(ValueError):
    """Raised when a network has nothing that MC sampling could make random."""


@dataclasses.dataclass(frozen=True)
class StochasticLayer:
    """One sublayer that MC sampling puts into training mode.

    Attributes:
        name: the sublayer's name in ``model.named_sublayers()``.
        layer: the sublayer itself.
        kind: ``"dropout"``, ``"drop_path"`` or ``"functional_dropout"``.
        rate: the drop probability, or None where the layer does not expose one.
    """

    name: str
    layer: paddle.nn.Layer
    kind: str
    rate: Optional[float]


def _drop_rate(layer):
    rate = getattr(layer, "p", None)
    if rate is None:
        rate = getattr(layer, "drop_prob", None)
    return None if rate is None else float(rate)


def _is_drop_path(layer):
    return type(layer).__name__ in DROP_PATH_TYPE_NAMES


def _named_sublayers(model):
    yield "", model
    yield from model.named_sublayers()


def _match_functional_owners(model, patterns):
    owners = []
    names = [name for name, _ in model.named_sublayers()]
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            examples = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"MCDropout.functional_dropout: no sublayer is named {pattern!r}. "
                f"Use names from model.named_sublayers() (glob patterns such as "
                f"'blocks.*.attn' work), e.g. {examples}.")
        owners.extend(matched)
    return owners


def _describe(found_dropout_off, found_drop_path, drop_path):
    lines = []
    if found_dropout_off:
        names = ", ".join(found_dropout_off[:5])
        lines.append(f"{len(found_dropout_off)} dropout layer(s) with p = 0 ({names})")
    if found_drop_path and not drop_path:
        lines.append(f"{len(found_drop_path)} DropPath layer(s) with rate > 0, "
                     "not sampled because MCDropout.drop_path is False")
    elif found_drop_path:
        lines.append(f"{len(found_drop_path)} DropPath layer(s), all with rate 0")
    return "; ".join(lines) if lines else "no dropout or DropPath layer at all"


def find_stochastic_layers(model: paddle.nn.Layer,
                           drop_path: bool = False,
                           functional_dropout: Sequence[str] = ()) -> List[StochasticLayer]:
    """List the sublayers that MC sampling will put into training mode.

    Args:
        model: any ``paddle.nn.Layer``.
        drop_path: also sample DropPath (stochastic depth) layers with a rate > 0.
        functional_dropout: names (or glob patterns) of sublayers whose own
            ``training`` flag drives a functional dropout or drop-connect in
            their forward. Only their own flag is set: BatchNorm and every
            other sublayer inside them stay in eval.

    Returns:
        The stochastic layers, in ``named_sublayers`` order.

    Raises:
        NoStochasticLayerError: when nothing stochastic would be sampled. The
            message lists what was found and the ways out.
        ValueError: when a ``functional_dropout`` name matches no sublayer.
    """
    owners = set(_match_functional_owners(model, functional_dropout))
    found = []
    dropout_off = []
    drop_path_layers = []

    for name, layer in _named_sublayers(model):
        if isinstance(layer, DROPOUT_TYPES):
            if _drop_rate(layer) > 0:
                found.append(StochasticLayer(name, layer, "dropout", _drop_rate(layer)))
            else:
                dropout_off.append(name)
        elif _is_drop_path(layer):
            rate = _drop_rate(layer) or 0.0
            if rate > 0:
                drop_path_layers.append(name)
                if drop_path:
                    found.append(StochasticLayer(name, layer, "drop_path", rate))
        elif name in owners:
            found.append(StochasticLayer(name, layer, "functional_dropout", _drop_rate(layer)))

    if not found:
        raise NoStochasticLayerError(
            f"{type(model).__name__} has nothing stochastic to sample: "
            f"{_describe(dropout_off, drop_path_layers, drop_path)}. "
            "MC Dropout would report zero uncertainty, so it is refused. Ways out: "
            "set MCDropout.drop_path=True for a model with DropPath rates > 0; "
            "name the sublayers that call a functional dropout in "
            "MCDropout.functional_dropout; or use a model trained with dropout "
            "(for example Arch.dropout_prob or Arch.class_expand with dropout "
            "in PPLCNet and MobileNetV3).")
    return found


@contextlib.contextmanager
def eval_mode(model: paddle.nn.Layer):
    """Run the block with every sublayer of ``model`` in eval.

    Unlike ``model.eval()``, this leaves Paddle's global dygraph mode alone
    and gives every sublayer its previous training flag back on exit, also
    when the block raises.
    """
    layers = [layer for _, layer in _named_sublayers(model)]
    previous = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.training = False
        yield
    finally:
        for layer, flag in zip(layers, previous):
            layer.training = flag


@contextlib.contextmanager
def mc_dropout(model: paddle.nn.Layer,
               drop_path: bool = False,
               functional_dropout: Sequence[str] = ()):
    """Run the block with only the stochastic layers of ``model`` in training mode.

    Every sublayer is set to eval first, so BatchNorm keeps its running
    statistics. On exit, including on an exception, every sublayer gets back
    the training flag it had before.

    Args:
        model: any ``paddle.nn.Layer``.
        drop_path: also sample DropPath layers, see ``find_stochastic_layers``.
        functional_dropout: names of functional-dropout owners, see
            ``find_stochastic_layers``.

    Yields:
        The list of ``StochasticLayer`` put into training mode.

    Raises:
        NoStochasticLayerError: when the model has nothing to sample.
    """
    stochastic = find_stochastic_layers(model, drop_path, functional_dropout)
    with eval_mode(model):
        for item in stochastic:
            item.layer.training = True
        yield stochastic
