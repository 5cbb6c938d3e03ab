"""The ``prefix`` strategy: run the deterministic part of a network once per batch.

In most PaddleClas backbones with dropout, every layer that runs before the
first stochastic layer of a forward (the split layer) is deterministic, so
loop and tiled sampling compute it T times for nothing. This strategy
computes the split layer's input activation ``a`` of shape ``[B, ...]`` once
and runs only the split layer and the layers after it on T * B rows of it.
Row ``t * B + b`` is pass t of image b, the same order as ``tiled``.

The network is not cut apart, so any ``paddle.nn.Layer`` works. A forward
pre-hook on the split layer does the work:

1. Capture: the batch is run in forwards of at most ``max_batch`` images.
   The hook stores ``a`` and ends each forward by raising ``_StopForward``,
   so the layers after the split do not run at all.

2. Sample: for each chunk of at most ``max_batch`` rows, the model is called
   on an empty batch (``images[:0]``), which costs only the per-op overhead
   of the layers before the split. The hook replaces the split layer's input
   by the chunk's rows of ``a``, gathered by index, so the T * B rows are
   never built whole. The layers after the split run at the chunk size and
   the output rows are samples. Where the layers before the split fail on
   an empty batch, each chunk calls the model on one image instead.

This is only right when the split layer's input is the only way the layers
before it reach the output. A stochastic layer in a residual branch
(``x + dropout(f(x))``) breaks that, and so does a batch size read before the
split and used after it. So ``probe_prefix`` runs the strategy once on a probe
batch with every layer in eval, and accepts it only when the output equals
the single pass.
"""

import dataclasses
import logging
from typing import Callable, List, Optional, Sequence

import numpy as np
import paddle

from .dropout import StochasticLayer, eval_mode

__all__ = ["PrefixPlan", "probe_prefix", "sample_prefix"]

logger = logging.getLogger(__name__)

# The probe batch has 2 images, so a residual add of a B-row shortcut to the
# tiled rows fails to broadcast. Its 3 passes in chunks of at most 4 rows give
# chunks of 4 and 2 rows. Neither equals the 2 images captured or the size of
# the batch the model is called on, so a batch size read before the split and
# used after it gives a wrong shape.
PROBE_SAMPLES = 3
PROBE_MAX_BATCH = 4

# The probe compares probabilities elementwise against the single pass.
# Only float rounding from different batch sizes is expected, which is far
# below these tolerances. A wrong path mixes up images and moves
# probabilities by much more.
# NOTE: the AMP tolerance is an estimate; it has not been run on a GPU.
PROBE_RTOL = 1e-3
PROBE_RTOL_AMP = 5e-2
PROBE_ATOL = 1e-7


class _StopForward(Exception):
    """Raised by the split hook to end a forward once ``a`` is captured."""


@dataclasses.dataclass(frozen=True)
class PrefixPlan:
    """Whether the prefix strategy can run for one input shape, and how.

    Attributes:
        usable: True when the probe output equalled the single pass.
        reason: why the strategy can or cannot run, for logs and errors.
        split_name: the split layer's name in ``model.named_sublayers()``
            (its type name for the model itself), or None when no stochastic
            layer was called.
        split_layer: the split layer, or None.
        input_key: where the split layer's tensor input is: a position in
            its positional inputs, or a keyword name.
        feed_size: images the model is called on in each sampling forward,
            0, or 1 where the layers before the split fail on an empty batch.
    """

    usable: bool
    reason: str
    split_name: Optional[str] = None
    split_layer: Optional[paddle.nn.Layer] = None
    input_key: object = None
    feed_size: int = 0


class _SplitHook:
    """Forward pre-hook (with kwargs) that captures or replaces the split input.

    Only the first call in each forward is touched, because later calls of
    the same layer get activations that already derive from the replaced rows.
    """

    def __init__(self, name, input_key):
        self.name = name
        self.input_key = input_key
        self.mode = None
        self.captured = None
        self.rows = None
        self.feed_size = 0
        self.calls = 0

    def start(self, mode, rows=None, feed_size=0):
        self.mode = mode
        self.rows = rows
        self.feed_size = feed_size
        self.captured = None
        self.calls = 0

    def __call__(self, layer, args, kwargs):
        self.calls += 1
        if self.calls > 1:
            return None
        activation = (kwargs[self.input_key] if isinstance(self.input_key, str)
                      else args[self.input_key])

        if self.mode == "capture":
            self.captured = activation
            raise _StopForward

        expected = [self.feed_size] + list(self.rows.shape[1:])
        if list(activation.shape) != expected:
            raise RuntimeError(
                f"prefix strategy: the input of {self.name} has shape "
                f"{list(activation.shape)} in a forward of {self.feed_size} image(s), "
                f"expected {expected}.")
        if isinstance(self.input_key, str):
            kwargs = dict(kwargs)
            kwargs[self.input_key] = self.rows
        else:
            args = args[:self.input_key] + (self.rows,) + args[self.input_key + 1:]
        return args, kwargs


def _capture(forward, hook, images, max_batch):
    """Return the split input for ``images``, computed in forwards of at most ``max_batch``."""
    pieces = []
    for start in range(0, images.shape[0], max_batch):
        hook.start("capture")
        try:
            forward(images[start:start + max_batch])
        except _StopForward:
            pieces.append(hook.captured)
        else:
            raise RuntimeError(f"prefix strategy: {hook.name} was not called in a forward.")
    return pieces[0] if len(pieces) == 1 else paddle.concat(pieces)


def sample_prefix(forward: Callable[[paddle.Tensor], paddle.Tensor],
                  plan: PrefixPlan,
                  images: paddle.Tensor,
                  samples: int,
                  max_batch: int) -> np.ndarray:
    """Draw T passes, running the layers before the split layer once.

    The caller sets the training flags (``mc_dropout`` to sample, or
    ``eval_mode`` to probe) and ``paddle.no_grad()``.

    Args:
        forward: maps images ``[n, ...]`` to probabilities ``[n, num_classes]``.
        plan: a usable plan from ``probe_prefix`` for this input shape.
        images: input tensor of shape ``[B, ...]``.
        samples: T.
        max_batch: the max images a capture forward carries and the max
            rows a sampling forward gives the split layer.

    Returns:
        Softmax outputs of shape ``[T, B, num_classes]``.

    Raises:
        RuntimeError: when a forward does not call the split layer, gives it
            an input of an unexpected shape or returns the wrong number of rows.
    """
    batch_size = images.shape[0]
    total = batch_size * samples
    hook = _SplitHook(plan.split_name, plan.input_key)
    handle = plan.split_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        activation = _capture(forward, hook, images, max_batch)
        feed = images[:plan.feed_size]
        chunks = []
        for start in range(0, total, max_batch):
            end = min(start + max_batch, total)
            rows = paddle.gather(activation, paddle.arange(start, end) % batch_size)
            hook.start("substitute", rows, plan.feed_size)
            probs = forward(feed)
            if hook.calls == 0:
                raise RuntimeError(f"prefix strategy: {plan.split_name} was not called "
                                   "in a forward.")
            if probs.shape[0] != end - start:
                raise RuntimeError(
                    f"prefix strategy: a forward with {end - start} rows at "
                    f"{plan.split_name} returned {probs.shape[0]} rows.")
            chunks.append(probs.numpy())
    finally:
        handle.remove()
    return np.concatenate(chunks).reshape(samples, batch_size, -1)


def _probe_batch(images):
    """Return 2 different images shaped like ``images[:1]``.

    The second is a flipped, rescaled copy of the first rather than
    ``images[1]``, so the images differ even when a batch repeats an image.
    """
    first = images[:1]
    return paddle.concat([first, paddle.flip(first, axis=[-1]) * 0.5 + 0.25])


def _record_calls(forward, stochastic_layers, images):
    """Run a forward and list ``(item, args, kwargs)`` per stochastic layer call, in order."""
    calls = []
    handles = []
    for item in stochastic_layers:
        def record(layer, args, kwargs, item=item):
            calls.append((item, args, kwargs))
        handles.append(item.layer.register_forward_pre_hook(record, with_kwargs=True))
    try:
        reference = forward(images).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return calls, reference


def _tensor_inputs(args, kwargs):
    keys = [index for index, value in enumerate(args) if isinstance(value, paddle.Tensor)]
    keys += [key for key, value in kwargs.items() if isinstance(value, paddle.Tensor)]
    return keys


def _describe_failure(error):
    message = str(error).strip().splitlines()
    first = next((line for line in message if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}"


def _try_feed(forward, plan, probe_images, reference, rtol):
    """Run the plan on the probe batch.

    Returns:
        ``(raised, problem)``: whether the forward raised, and a description
        of the mismatch, or None when the output matches ``reference``.
    """
    try:
        probs = sample_prefix(forward, plan, probe_images, PROBE_SAMPLES, PROBE_MAX_BATCH)
    # The model's own code runs here with an input it was not written for,
    # so any exception it raises only means that the strategy cannot run.
    except Exception as error:  # noqa: BLE001
        return True, f"the forward failed ({_describe_failure(error)})"
    expected = np.broadcast_to(reference, probs.shape)
    if not np.allclose(probs, expected, rtol=rtol, atol=PROBE_ATOL):
        difference = float(np.abs(probs - expected).max())
        return False, (f"its probabilities differ from the single pass by up to "
                       f"{difference:.3g}")
    return False, None


def probe_prefix(forward: Callable[[paddle.Tensor], paddle.Tensor],
                 model: paddle.nn.Layer,
                 stochastic_layers: Sequence[StochasticLayer],
                 images: paddle.Tensor,
                 amp: bool = False) -> PrefixPlan:
    """Check whether the prefix strategy gives the single pass for one input shape.

    Every layer runs in eval, so dropout is deterministic and a right split
    must reproduce the single pass exactly, up to float rounding. In eval,
    the stochastic layers draw no random numbers, so the probe leaves Paddle's
    generator state as it was.

    Args:
        forward: maps images ``[n, ...]`` to probabilities ``[n, num_classes]``.
        model: the network ``forward`` runs.
        stochastic_layers: from ``find_stochastic_layers``.
        images: a batch ``[B, ...]`` of the input shape to check. Only its
            first image is used.
        amp: the forward runs under AMP, so the comparison is looser.

    Returns:
        A ``PrefixPlan``, usable or not, with the reason.
    """
    probe_images = _probe_batch(images)
    with paddle.no_grad(), eval_mode(model):
        calls, reference = _record_calls(forward, stochastic_layers, probe_images)
        plan = _plan_from_calls(calls)
        if plan.usable:
            plan = _check_plan(forward, plan, probe_images, reference,
                               PROBE_RTOL_AMP if amp else PROBE_RTOL)
    logger.info("prefix strategy for input shape %s: %s", list(images.shape[1:]), plan.reason)
    return plan


def _layer_name(item):
    return item.name or type(item.layer).__name__


def _plan_from_calls(calls: List) -> PrefixPlan:
    """Find the split layer from the recorded calls and check its input."""
    if not calls:
        return PrefixPlan(False, "no stochastic layer was called in a forward")
    item, args, kwargs = calls[0]
    name = _layer_name(item)
    keys = _tensor_inputs(args, kwargs)
    if len(keys) != 1:
        return PrefixPlan(
            False, f"{name}, the first stochastic layer called, gets {len(keys)} tensor "
                   "inputs, and the prefix strategy can tile only one", name, item.layer)
    activation = kwargs[keys[0]] if isinstance(keys[0], str) else args[keys[0]]
    if activation.ndim == 0 or activation.shape[0] != 2:
        return PrefixPlan(
            False, f"the input of {name}, the first stochastic layer called, has shape "
                   f"{list(activation.shape)}, which is not a batch of the 2 probe images",
            name, item.layer)
    repeated = sum(1 for call in calls if call[0] is item)
    reason = (f"{name} is the first stochastic layer called, so the layers before it "
              "run once per batch and only the rest runs T times")
    if repeated > 1:
        reason += f" ({name} is called {repeated} times; its first call is the split)"
    return PrefixPlan(True, reason, name, item.layer, keys[0], 0)


def _check_plan(forward, plan, probe_images, reference, rtol):
    """Run the plan on the probe batch with an empty feed, then with one image."""
    raised, problem = _try_feed(forward, plan, probe_images, reference, rtol)
    if problem is None:
        return plan
    problems = [f"with an empty batch before {plan.split_name}, {problem}"]

    # Only an exception can come from the empty batch itself, so one image is
    # tried only then. Wrong values would come from the structure.
    if raised:
        one_image = dataclasses.replace(plan, feed_size=1)
        _, problem = _try_feed(forward, one_image, probe_images, reference, rtol)
        if problem is None:
            return dataclasses.replace(
                one_image, reason=f"{plan.reason}; {problems[0]}, so each sampling "
                                  "forward also runs them on one image")
        problems.append(f"with one image, {problem}")

    return PrefixPlan(
        False, f"a probe with the input of {plan.split_name} tiled does not reproduce "
               f"the single pass: {'; '.join(problems)}. This happens when the layers "
               f"after {plan.split_name} also read an activation or a batch size from "
               "before it, as a stochastic layer in a residual branch does",
        plan.split_name, plan.split_layer, plan.input_key)
