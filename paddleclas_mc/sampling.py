"""Stochastic forward passes: T softmax outputs per image.

``MCSampler`` runs a network T times over a batch with only its stochastic
layers in training mode (see ``dropout.mc_dropout``), always under
``paddle.no_grad()``. Softmax is taken in float32 even when the forward runs
under AMP.

Strategies:

- ``loop``: T forwards of the batch as it is.
- ``tiled``: the batch repeated T times, cut into forwards of at most
  ``max_batch`` images. Each row gets its own dropout mask, so row ``t * B + b``
  is pass t of image b. The repeated batch is never built whole, so memory is
  bounded by ``max_batch`` whatever T is.
- ``prefix``: the layers before the first stochastic layer run once per
  batch, and only the rest runs on T * B rows, in forwards of at most
  ``max_batch`` rows (see ``prefix.py``). A probe checks once per input shape
  that this reproduces the single pass.
- ``auto``: ``prefix`` when the probe passes. Otherwise ``loop`` on CPU,
  where a larger forward does not cost less per image (docs/benchmarks.md);
  on other devices ``tiled`` when the batch is smaller than ``max_batch`` (so a
  tiled forward carries more images than a loop forward would), else ``loop``.
"""

import contextlib
from typing import Optional, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from .dropout import eval_mode, find_stochastic_layers, mc_dropout
from .prefix import PrefixPlan, probe_prefix, sample_prefix

__all__ = ["MCSampler", "STRATEGIES", "extract_logits", "resolve_strategy", "seeded",
           "single_pass"]

STRATEGIES = ("auto", "loop", "tiled", "prefix")

# Output keys PaddleClas models use, in the order PaddleClas's Engine checks them.
_OUTPUT_KEYS = ("Student", "logits", "output")


def extract_logits(output):
    """Return the ``[batch_size, num_classes]`` logits from a model's output.

    A list or tuple gives its first item, and a dict its ``Student``,
    ``logits`` or ``output`` entry, the way PaddleClas's infer loop reads
    distillation and recognition models.

    Raises:
        ValueError: when no logits tensor can be found or it is not 2-D.
    """
    if isinstance(output, (list, tuple)):
        output = output[0]
    for key in _OUTPUT_KEYS:
        if isinstance(output, dict) and key in output:
            output = output[key]
    if not isinstance(output, paddle.Tensor):
        keys = list(output) if isinstance(output, dict) else type(output).__name__
        raise ValueError(f"cannot find logits in the model output ({keys}); expected a "
                         f"tensor or a dict with one of {', '.join(_OUTPUT_KEYS)}.")
    if output.ndim != 2:
        raise ValueError(f"expected logits of shape [batch_size, num_classes], got "
                         f"shape {list(output.shape)}.")
    return output


def resolve_strategy(strategy, batch_size, max_batch, on_cpu=False):
    """Pick ``tiled`` or ``loop`` for ``auto``, with the reason.

    This is ``auto``'s rule when the prefix strategy cannot run. Whether it
    can depends on the model and the input shape, so the full choice is
    ``MCSampler.describe_strategy``.

    Args:
        strategy: the configured strategy; anything but ``auto`` is kept.
        batch_size: the number of images per batch.
        max_batch: the max rows one tiled forward may carry.
        on_cpu: whether the forwards run on CPU. A CPU gains nothing from
            larger forwards, so ``auto`` loops there whatever the batch size.

    Returns:
        A tuple ``(strategy, reason)``.
    """
    if strategy != "auto":
        return strategy, "set in the config"
    if on_cpu:
        return "loop", ("on CPU a larger forward does not cost less per image, so the "
                        "batch runs T times as it is")
    if batch_size < max_batch:
        return "tiled", (f"batch_size {batch_size} < max_batch {max_batch}, so each "
                         "forward carries more images when the T copies are tiled")
    return "loop", (f"batch_size {batch_size} >= max_batch {max_batch}, so tiling "
                    "would not make forwards larger")


@contextlib.contextmanager
def seeded(seed):
    """Seed Paddle's CPU and device generators for the block, then restore their state.

    With ``seed`` None the block runs unseeded.
    """
    if seed is None:
        yield
        return
    cpu_state = paddle.get_rng_state("cpu")
    device_state = paddle.get_rng_state()
    paddle.seed(seed)
    try:
        yield
    finally:
        paddle.set_rng_state(device_state)
        paddle.set_rng_state(cpu_state, "cpu")


class MCSampler:
    """Draw T stochastic forward passes of a network.

    The network is checked for stochastic layers when the sampler is built,
    so a network with nothing to sample is rejected before any image is read.

    Args:
        model: any ``paddle.nn.Layer`` returning logits (or a list or dict
            holding them, see ``extract_logits``).
        samples: T, the number of stochastic passes (>= 2).
        strategy: ``auto``, ``loop``, ``tiled`` or ``prefix``.
        max_batch: the max images one forward may carry when tiling, and the
            max rows the layers after the split get with ``prefix``.
        drop_path: also sample DropPath layers.
        functional_dropout: names of sublayers that own a functional dropout.
        amp_level: run forwards under ``paddle.amp.auto_cast`` at this level
            (``O1`` or ``O2``), or None for full precision.

    Example:
        >>> sampler = MCSampler(model, samples=30, seed=None)
        >>> probs = sampler.sample(images)   # [30, batch_size, num_classes]
    """

    def __init__(self,
                 model: paddle.nn.Layer,
                 samples: int = 30,
                 strategy: str = "auto",
                 max_batch: int = 64,
                 drop_path: bool = False,
                 functional_dropout: Sequence[str] = (),
                 amp_level: Optional[str] = None):
        if samples < 2:
            raise ValueError(f"samples must be >= 2, got {samples}.")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {strategy!r}.")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")

        self.model = model
        self.samples = samples
        self.strategy = strategy
        self.max_batch = max_batch
        self.drop_path = drop_path
        self.functional_dropout = tuple(functional_dropout)
        self.amp_level = amp_level
        self.stochastic_layers = find_stochastic_layers(model, drop_path, self.functional_dropout)
        # Probe results per (input shape without the batch axis, dtype).
        self._prefix_plans = {}

    def _forward(self, images):
        return _forward_probs(self.model, images, self.amp_level)

    def _sample_loop(self, images):
        return [self._forward(images).numpy() for _ in range(self.samples)]

    def _sample_tiled(self, images):
        batch_size = images.shape[0]
        total = batch_size * self.samples
        chunks = []
        for start in range(0, total, self.max_batch):
            rows = paddle.arange(start, min(start + self.max_batch, total)) % batch_size
            chunks.append(self._forward(paddle.gather(images, rows)).numpy())
        return np.concatenate(chunks).reshape(self.samples, batch_size, -1)

    def prefix_plan(self, images: paddle.Tensor) -> PrefixPlan:
        """Return the prefix probe's result for the input shape of ``images``.

        The probe runs once per input shape and dtype (a few forwards of 2
        images, see ``prefix.probe_prefix``), and its result is cached.
        """
        key = (tuple(images.shape[1:]), str(images.dtype))
        if key not in self._prefix_plans:
            self._prefix_plans[key] = probe_prefix(self._forward, self.model,
                                                   self.stochastic_layers, images,
                                                   amp=self.amp_level is not None)
        return self._prefix_plans[key]

    def describe_strategy(self, batch_size: int,
                          sample_images: Optional[paddle.Tensor] = None):
        """Pick the strategy that ``sample`` runs for such batches, with the reason.

        Args:
            batch_size: the number of images per batch.
            sample_images: a batch of the input shape, at least one image.
                Required for ``auto`` and ``prefix``, whose choice runs the
                prefix probe on it.

        Returns:
            A tuple ``(strategy, reason)``, strategy being ``loop``, ``tiled``
            or ``prefix``.

        Raises:
            ValueError: when the strategy is ``prefix`` and the probe shows it
                cannot run on this model, with the reason; or when
                ``sample_images`` is missing for ``auto`` or ``prefix``.
        """
        if self.strategy in ("loop", "tiled"):
            return resolve_strategy(self.strategy, batch_size, self.max_batch)
        if sample_images is None:
            raise ValueError(f"strategy {self.strategy} needs sample_images to probe "
                             "the prefix strategy.")

        plan = self.prefix_plan(sample_images)
        if plan.usable:
            source = "set in the config" if self.strategy == "prefix" else "auto"
            return "prefix", f"{source}: {plan.reason}"
        if self.strategy == "prefix":
            raise ValueError(
                f"strategy prefix cannot run on {type(self.model).__name__} with input "
                f"shape {list(sample_images.shape[1:])}: {plan.reason}. Use strategy "
                "tiled or loop (MCDropout.strategy in a config), or auto, which falls "
                "back to them.")
        strategy, reason = resolve_strategy("auto", batch_size, self.max_batch,
                                            sample_images.place.is_cpu_place())
        return strategy, f"{reason}; prefix ruled out: {plan.reason}"

    def sample(self, images: paddle.Tensor, seed: Optional[int] = None) -> np.ndarray:
        """Run T stochastic passes over a batch.

        Args:
            images: input tensor of shape ``[batch_size, ...]``.
            seed: seed for this batch's dropout masks, or None. Paddle's
                generator state is put back afterwards.

        Returns:
            float32 softmax outputs of shape ``[T, batch_size, num_classes]``.

        Raises:
            ValueError: when the strategy is ``prefix`` and it cannot run on
                this model (see ``describe_strategy``).
        """
        strategy, _ = self.describe_strategy(images.shape[0], images)
        with paddle.no_grad(), seeded(seed), \
                mc_dropout(self.model, self.drop_path, self.functional_dropout):
            if strategy == "loop":
                probs = np.stack(self._sample_loop(images))
            elif strategy == "tiled":
                probs = self._sample_tiled(images)
            else:
                probs = sample_prefix(self._forward, self.prefix_plan(images), images,
                                      self.samples, self.max_batch)
        return probs.astype(np.float32, copy=False)

    def single_pass(self, images: paddle.Tensor) -> np.ndarray:
        """Run one deterministic pass with every layer in eval.

        Returns:
            float32 softmax outputs of shape ``[batch_size, num_classes]``.
        """
        return single_pass(self.model, images, self.amp_level)


def _forward_probs(model, images, amp_level):
    """Run one forward and return float32 softmax outputs as a tensor."""
    autocast = (paddle.amp.auto_cast(level=amp_level) if amp_level
                else contextlib.nullcontext())
    with autocast:
        logits = extract_logits(model(images))
    return F.softmax(logits.astype("float32"), axis=-1)


def single_pass(model, images, amp_level=None):
    """Run one deterministic forward pass and return float32 softmax outputs.

    Every sublayer is in eval for the pass, and each gets its previous
    training flag back afterwards.

    Returns:
        An array of shape ``[batch_size, num_classes]``.
    """
    with paddle.no_grad(), eval_mode(model):
        return _forward_probs(model, images, amp_level).numpy()
