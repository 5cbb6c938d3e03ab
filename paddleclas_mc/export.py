"""Export PaddleClas models for Paddle Inference, with MC Dropout inside the graph.

The work behind ``tools/export_model.py``, which takes PaddleClas's export
flags (``-c``, ``-o Global.save_inference_dir=...``, ``Global.image_shape``).

With ``MCDropout.enable`` false or absent, the export takes PaddleClas's own
steps (a deep copy of the model, eval mode, the softmax wrapper,
``paddle.jit.to_static`` with ``InputSpec([None] + Global.image_shape)`` and
``paddle.jit.save``), so the files are byte for byte those of PaddleClas's
``tools/export_model.py``.

With ``MCDropout.enable`` true, ``MCExportModel`` wraps the network so that
one predictor run draws the T stochastic passes and returns, in this order:

- ``probs``: the mean softmax probabilities ``[B, C]``;
- ``log_probs``: their natural log ``[B, C]``, floored at the smallest normal
  float32 so that no value is ``-inf``;
- ``predictive_entropy``, ``expected_entropy``, ``mutual_information``,
  ``variation_ratio`` and ``std``, each ``[B]``, defined as in
  ``uncertainty.py``.

The T passes are tiled along the batch axis: row ``t * B + b`` is pass t of
image b, as in dygraph sampling. Under the ``prefix`` strategy a forward
pre-hook tiles the input of the first stochastic layer, so the layers before
it run once on B rows. Under ``tiled`` the input images are tiled. The graph
has no ``loop`` strategy.

``paddle.jit.save`` (Paddle 3.3) sets ``is_test`` on every ``dropout`` op, so
a dropout layer in training mode would still be deterministic in the
exported model. During the export, each sampled dropout layer therefore
draws its mask with ``paddle.rand``, whose ``uniform`` op ``jit.save``
keeps and which draws new numbers at every predictor run, and calls of
``paddle.nn.functional.dropout`` take Paddle's own ``uniform``-mask path.
PaddleClas's ``DropPath`` already draws its mask with ``paddle.rand``.
"""

import contextlib
import copy
import inspect
import json
import os
import re

import numpy as np
import paddle
import paddle.nn.functional as F

from . import __version__, integration
from .config import parse_mc_section, path_value
from .dropout import DROPOUT_TYPES, eval_mode, find_stochastic_layers, mc_dropout
from .engine import build_inference_model, checkpoint_file, set_device
from .predictor import (METADATA_FILE, METADATA_FORMAT, MODEL_PREFIX, OUTPUT_NAMES,
                        InferenceModel)
from .prefix import PROBE_ATOL, PROBE_RTOL, probe_prefix
from .sampling import extract_logits, single_pass

__all__ = [
    "EXPORT_STRATEGIES",
    "MCExportModel",
    "SinglePassExportModel",
    "export_mc_model",
    "export_single_pass_model",
    "mc_outputs",
    "run_export",
]

# Strategies an exported graph can run. MCDropout.strategy loop is exported as tiled.
EXPORT_STRATEGIES = ("prefix", "tiled")

# log_probs floor: the smallest normal float32, so a class with probability 0
# gets a finite log and softmax(log_probs) still returns probs.
LOG_PROB_FLOOR = float(np.finfo(np.float32).tiny)

# PaddleClas configs name this folder; PaddleClas itself has no default.
DEFAULT_SAVE_DIR = "./inference"

# A dropout op in a PIR program (inference.json). jit.save marks every such
# op is_test, so one left in an MC export runs deterministically.
_DROPOUT_OP_PATTERN = re.compile(r'"#"\s*:\s*"1\.dropout_?"')

# Constants of SELU that alpha dropout uses; the same as paddle.nn.functional.alpha_dropout.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _entropy(probs, log_probs):
    """Entropy in nats over the last axis; ``log_probs`` is the floored log of ``probs``.

    A probability of 0 times its floored log is exactly 0, which gives
    ``0 log 0 = 0`` without ``paddle.where``.
    """
    # NOTE: with log(where(p > 0, p, 1)) in its place, Paddle Inference 3.3.1
    # returned log(p) for an output p, so where() is kept off the outputs.
    return -(probs * log_probs).sum(axis=-1)


def _floored_log(probs):
    return paddle.log(paddle.clip(probs, min=LOG_PROB_FLOOR))


def mc_outputs(probs):
    """Compute the outputs of an MC Dropout export from the T softmax outputs.

    Runs on tensors, in dygraph or inside a traced program, in the dtype of
    ``probs`` (float32 in an export). The measures are those of
    ``uncertainty.summarize_samples``.

    Args:
        probs: softmax outputs ``[T, B, C]``.

    Returns:
        A tuple in ``OUTPUT_NAMES`` order: ``probs`` ``[B, C]``, ``log_probs``
        ``[B, C]``, then ``predictive_entropy``, ``expected_entropy``,
        ``mutual_information``, ``variation_ratio`` and ``std``, each ``[B]``.
    """
    samples, num_classes = probs.shape[0], probs.shape[2]
    mean = probs.mean(axis=0)
    log_mean = _floored_log(mean)

    predictive = _entropy(mean, log_mean)
    expected = _entropy(probs, _floored_log(probs)).mean(axis=0)
    mutual = paddle.clip(predictive - expected, min=0.0)

    # Votes per class over the passes; argmax gives ties to the lowest class id.
    votes = F.one_hot(paddle.argmax(probs, axis=2), num_classes).astype(probs.dtype)
    variation = 1.0 - votes.sum(axis=0).max(axis=1) / samples

    predicted = F.one_hot(paddle.argmax(mean, axis=1), num_classes).astype(probs.dtype)
    per_pass = (probs * predicted.unsqueeze(0)).sum(axis=2)
    std = paddle.sqrt(((per_pass - per_pass.mean(axis=0)) ** 2).mean(axis=0))
    return mean, log_mean, predictive, expected, mutual, variation, std


def _graph_logits(output):
    """Pick the logits from a model output as ``sampling.extract_logits`` does.

    ``extract_logits`` checks for ``paddle.Tensor``, but inside a traced
    program the output is a ``paddle.pir.Value``, so the selection is repeated
    here without the type check.
    """
    if isinstance(output, (list, tuple)):
        output = output[0]
    for key in ("Student", "logits", "output"):
        if isinstance(output, dict) and key in output:
            output = output[key]
    if isinstance(output, dict):
        raise ValueError(f"cannot find logits in the model output (keys {list(output)}); "
                         "expected a tensor or a dict with Student, logits or output.")
    return output


def _tile_rows(tensor, samples):
    """Repeat ``[B, ...]`` as ``[T * B, ...]``, row ``t * B + b`` being a copy of row b."""
    return paddle.tile(tensor, [samples] + [1] * (tensor.ndim - 1))


class _SplitInputTiler:
    """Forward pre-hook (with kwargs) that tiles the split layer's input T times.

    ``MCExportModel`` arms it before each forward, and only the first call
    of the split layer in that forward is tiled, because later calls get
    activations that already have T * B rows.
    """

    def __init__(self, samples, input_key):
        self.samples = samples
        self.input_key = input_key
        self.armed = False

    def __call__(self, layer, args, kwargs):
        if not self.armed:
            return None
        self.armed = False
        if isinstance(self.input_key, str):
            kwargs = dict(kwargs)
            kwargs[self.input_key] = _tile_rows(kwargs[self.input_key], self.samples)
        else:
            tiled = _tile_rows(args[self.input_key], self.samples)
            args = args[:self.input_key] + (tiled,) + args[self.input_key + 1:]
        return args, kwargs


class MCExportModel(paddle.nn.Layer):
    """A network wrapped so that one forward draws T passes and returns ``mc_outputs``.

    Args:
        base_model: the network, returning logits ``[B, C]`` (or a list or
            dict holding them, see ``sampling.extract_logits``).
        samples: T.
        plan: a usable ``prefix.PrefixPlan`` to tile at the split layer, or
            None to tile the input images.

    Call ``remove_hook`` when done, because the pre-hook stays on the split layer.
    """

    def __init__(self, base_model, samples, plan=None):
        super().__init__()
        self.base_model = base_model
        self.samples = samples
        self._tiler = None
        self._hook = None
        if plan is not None:
            self._tiler = _SplitInputTiler(samples, plan.input_key)
            self._hook = plan.split_layer.register_forward_pre_hook(self._tiler,
                                                                    with_kwargs=True)

    def remove_hook(self):
        """Remove the split layer's pre-hook, if any."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def forward(self, x):
        """Map images ``[B, ...]`` to the ``mc_outputs`` tuple."""
        if self._tiler is None:
            x = _tile_rows(x, self.samples)
        else:
            self._tiler.armed = True
        logits = _graph_logits(self.base_model(x))
        probs = F.softmax(logits.astype("float32"), axis=-1)
        return mc_outputs(probs.reshape([self.samples, -1, probs.shape[-1]]))


class SinglePassExportModel(paddle.nn.Layer):
    """The output head PaddleClas's ``ExportModel`` puts on a network.

    Args:
        base_model: the network.
        activation: ``paddle.nn.Softmax(axis=-1)``, ``paddle.nn.Sigmoid()``
            for multi-label models, or None for raw logits
            (``Arch.infer_add_softmax: False``).
        infer_model_name: the sub-model of a distillation model to export.
        infer_output_key: the key of the output dict to export.
    """

    def __init__(self, base_model, activation, infer_model_name=None, infer_output_key=None):
        super().__init__()
        self.base_model = base_model
        self.infer_model_name = infer_model_name
        self.infer_output_key = infer_output_key
        self.out_act = activation

    def forward(self, x):
        """Map images ``[B, ...]`` to probabilities (or logits) ``[B, C]``."""
        output = self.base_model(x)
        if isinstance(output, list):
            output = output[0]
        for key in (self.infer_model_name, self.infer_output_key):
            if key is not None:
                output = output[key]
        if self.out_act is None:
            return output
        if isinstance(output, dict):
            output = output["logits"]
        return self.out_act(output)


# Sampling forwards that survive paddle.jit.save.


def _keep_mask(x, p, mask_axes):
    """Return a 0/1 mask in ``x``'s dtype that keeps each entry with probability ``1 - p``.

    The mask has ``x``'s shape on ``mask_axes`` and size 1 on the other axes.
    Its shape is read at run time, so a dynamic batch axis works.
    """
    others = [axis for axis in range(x.ndim) if axis not in mask_axes]
    reference = x
    if others:
        reference = paddle.slice(x, axes=others, starts=[0] * len(others),
                                 ends=[1] * len(others))
    uniform = paddle.rand(paddle.shape(reference), dtype="float32")
    # Paddle's own dropout keeps an entry when its uniform draw is >= p.
    return (uniform >= p).astype(x.dtype)


def _mask_axes(layer, ndim):
    """Return the axes along which ``layer`` draws separate mask entries."""
    if isinstance(layer, paddle.nn.Dropout):
        if layer.axis is None:
            return list(range(ndim))
        return [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    if isinstance(layer, (paddle.nn.Dropout2D, paddle.nn.Dropout3D)):
        channel_last = layer.data_format in ("NHWC", "NDHWC")
        return [0, ndim - 1] if channel_last else [0, 1]
    if isinstance(layer, paddle.nn.FeatureAlphaDropout):
        return [0, 1]
    return list(range(ndim))


def _sampling_forward(layer):
    """Return a forward for a ``DROPOUT_TYPES`` layer that samples with ``paddle.rand``.

    It follows the layer's ``training`` flag and its ``mode`` like the
    layer's own forward, with the same distribution of outputs.
    """
    p = float(layer.p)
    alpha = isinstance(layer, (paddle.nn.AlphaDropout, paddle.nn.FeatureAlphaDropout))
    mode = getattr(layer, "mode", "upscale_in_train")

    def forward(x):
        if not layer.training or p == 0:
            return x * (1.0 - p) if mode == "downscale_in_infer" and not alpha else x
        if p == 1:
            return x * 0.0
        keep = _keep_mask(x, p, _mask_axes(layer, x.ndim))
        if alpha:
            alpha_p = -_SELU_ALPHA * _SELU_SCALE
            a = ((1 - p) * (1 + p * alpha_p ** 2)) ** -0.5
            b = -a * alpha_p * p
            return (x * keep + alpha_p * (1.0 - keep)) * a + b
        if mode == "downscale_in_infer":
            return x * keep
        return x * keep / (1.0 - p)

    return forward


@contextlib.contextmanager
def _sampling_forwards(layers):
    """Give each ``DROPOUT_TYPES`` layer in ``layers`` a ``paddle.rand`` forward for the block."""
    patched = [layer for layer in layers if isinstance(layer, DROPOUT_TYPES)]
    # A forward set on the instance (paddle.jit.to_static sets one) is put back.
    previous = [layer.__dict__.get("forward") for layer in patched]
    try:
        for layer in patched:
            layer.forward = _sampling_forward(layer)
        yield
    finally:
        for layer, forward in zip(patched, previous):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward


@contextlib.contextmanager
def _functional_dropout_with_uniform_masks():
    """Route ``paddle.nn.functional.dropout`` calls to its ``axis`` path for the block.

    With ``axis`` set to every axis, Paddle's dropout draws its mask with a
    ``uniform`` op instead of emitting a ``dropout`` op, with the same
    distribution. That keeps the functional dropout of the layers in
    ``MCDropout.functional_dropout`` stochastic in the exported model. Calls
    that import the function under another name are not affected.
    """
    original = F.dropout
    signature = inspect.signature(original)

    def dropout(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        arguments = bound.arguments
        if arguments.get("axis") is None and not arguments.get("inplace", False):
            arguments["axis"] = list(range(arguments["x"].ndim))
        return original(*bound.args, **bound.kwargs)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


# MC Dropout export.


def _probe_images(image_shape):
    """Return 2 different fixed images ``[2] + image_shape`` for the structure checks."""
    values = np.random.RandomState(0).standard_normal([2] + list(image_shape))
    return paddle.to_tensor(values.astype(np.float32))


def _probabilities(model):
    def forward(images):
        return F.softmax(extract_logits(model(images)).astype("float32"), axis=-1)
    return forward


def _choose_plan(model, stochastic, strategy, images):
    """Return ``(plan or None, strategy, reason)`` for the graph.

    Raises:
        ValueError: when ``strategy`` is ``prefix`` and the probe rules it out.
    """
    if strategy in ("tiled", "loop"):
        reason = "set in the config"
        if strategy == "loop":
            reason = "MCDropout.strategy is loop, which a graph cannot run, so the images are tiled"
        return None, "tiled", reason

    plan = probe_prefix(_probabilities(model), model, stochastic, images)
    if plan.usable:
        return plan, "prefix", plan.reason
    if strategy == "prefix":
        raise ValueError(f"MCDropout.strategy: prefix cannot be exported for "
                         f"{type(model).__name__}: {plan.reason}. Use strategy tiled or auto.")
    return None, "tiled", f"prefix ruled out: {plan.reason}"


def _check_prefix_graph(wrapper, model, images, strategy):
    """Return None when the wrapper in eval reproduces the single pass, else the problem.

    The probe in ``prefix.py`` checks the network's structure with its own
    hook. This runs the export's hook the way the graph will, in dygraph.
    """
    reference = single_pass(model, images)
    try:
        with paddle.no_grad(), eval_mode(wrapper):
            outputs = wrapper(images)
    # The network's own code runs on tiled rows here, so any exception only
    # means that the prefix split does not work for it.
    except Exception as error:  # noqa: BLE001
        problem = f"the forward with the tiled split input failed ({type(error).__name__})"
    else:
        mean = outputs[0].numpy()
        if mean.shape == reference.shape and np.allclose(mean, reference, rtol=PROBE_RTOL,
                                                         atol=PROBE_ATOL):
            return None
        problem = "the tiled split input does not reproduce the single pass"
    if strategy == "prefix":
        raise ValueError(f"MCDropout.strategy: prefix cannot be exported: {problem}. Use "
                         "strategy tiled or auto.")
    return problem


def _count_dropout_ops(program_file):
    """Return the number of ``dropout`` ops in a PIR program, or None for other formats."""
    if not program_file.endswith(".json"):
        return None
    with open(program_file, encoding="utf-8") as file:
        return len(_DROPOUT_OP_PATTERN.findall(file.read()))


def _check_stochastic(save_dir, image_shape):
    """Raise unless two predictor runs of the export give different probabilities."""
    model = InferenceModel(save_dir, "cpu")
    images = _probe_images(image_shape).numpy()
    first = model.run(images)[0]
    second = model.run(images)[0]
    if np.array_equal(first, second):
        raise RuntimeError(
            f"the model exported to {save_dir} is deterministic: two predictor runs gave "
            "the same probabilities, so its dropout is not sampled. This happens when a "
            "stochastic layer draws its mask with an op that paddle.jit.save turns off. "
            "The files were removed.")


def _remove_export(save_dir):
    for name in (MODEL_PREFIX + ".json", MODEL_PREFIX + ".pdmodel",
                 MODEL_PREFIX + ".pdiparams", METADATA_FILE):
        path = os.path.join(save_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _output_specs():
    shapes = {"probs": ["batch_size", "num_classes"],
              "log_probs": ["batch_size", "num_classes"]}
    return [{"index": index, "name": name, "shape": shapes.get(name, ["batch_size"]),
             "dtype": "float32"} for index, name in enumerate(OUTPUT_NAMES)]


def _build_metadata(samples, strategy, reason, plan, stochastic, num_classes, image_shape):
    """Return the contents of ``inference_mc.json`` without the caller's extra fields."""
    return {
        "format": METADATA_FORMAT,
        "samples": samples,
        "strategy": strategy,
        "strategy_reason": reason,
        "split_layer": plan.split_name if strategy == "prefix" else None,
        "seed_policy": "fresh_masks_each_run",
        "seed_note": ("The graph holds no seed: every predictor run draws new masks from "
                      "the random generator of the process that runs it. tools/predict.py "
                      "seeds that generator per batch when MCDropout.seed is set."),
        "stochastic_layers": [{"name": item.name or type(item.layer).__name__,
                               "kind": item.kind, "rate": item.rate} for item in stochastic],
        "num_classes": num_classes,
        "image_shape": list(image_shape),
        "outputs": _output_specs(),
        "rows_per_run": "samples x batch_size rows run after the split (all layers when tiled)",
        "paddle_version": paddle.__version__,
        "paddleclas_mc_version": __version__,
    }


def export_mc_model(model, save_dir, image_shape, samples=30, strategy="auto",
                    drop_path=False, functional_dropout=(), extra_metadata=None):
    """Export ``model`` so that each predictor run draws ``samples`` MC Dropout passes.

    ``model`` is left as it was: training flags, forwards and hooks are put
    back. The export is checked before returning: two predictor runs on the
    same images must differ, else the files are removed and RuntimeError is raised.

    Args:
        model: any ``paddle.nn.Layer`` returning logits ``[B, C]``.
        save_dir: the folder for ``inference.*`` and ``inference_mc.json``.
        image_shape: ``[C, H, W]`` of one input image.
        samples: T.
        strategy: ``auto``, ``prefix``, ``tiled`` or ``loop`` (exported as ``tiled``).
        drop_path: also sample DropPath layers.
        functional_dropout: names of sublayers that call a functional dropout.
        extra_metadata: more fields for ``inference_mc.json``.

    Returns:
        The metadata written to ``inference_mc.json``.

    Raises:
        NoStochasticLayerError: when the model has nothing to sample.
        ValueError: when ``strategy`` is ``prefix`` and it cannot be exported.
        RuntimeError: when the exported model is deterministic.
    """
    logger = integration.get_logger()
    stochastic = find_stochastic_layers(model, drop_path, functional_dropout)
    images = _probe_images(image_shape)
    plan, chosen, reason = _choose_plan(model, stochastic, strategy, images)
    wrapper = MCExportModel(model, samples, plan)
    try:
        if plan is not None:
            problem = _check_prefix_graph(wrapper, model, images, strategy)
            if problem is not None:
                wrapper.remove_hook()
                wrapper = MCExportModel(model, samples)
                chosen, reason = "tiled", f"prefix ruled out: {problem}"
        logger.info(f"MC Dropout export: T={samples}, strategy={chosen} ({reason})")

        # mc_dropout sets the flags of the network's layers and puts them back.
        wrapper.training = False
        spec = paddle.static.InputSpec(shape=[None] + list(image_shape), dtype="float32")
        with mc_dropout(model, drop_path, functional_dropout), \
                _sampling_forwards([item.layer for item in stochastic]), \
                _functional_dropout_with_uniform_masks():
            static_model = paddle.jit.to_static(wrapper, input_spec=[spec])
            paddle.jit.save(static_model, os.path.join(save_dir, MODEL_PREFIX))
        num_classes = int(single_pass(model, images[:1]).shape[1])
    finally:
        wrapper.remove_hook()

    program_file = next(os.path.join(save_dir, MODEL_PREFIX + suffix)
                        for suffix in (".json", ".pdmodel")
                        if os.path.isfile(os.path.join(save_dir, MODEL_PREFIX + suffix)))
    left_over = _count_dropout_ops(program_file)
    if left_over:
        # NOTE: such an op may also come from a dropout that is off at
        # inference anyway; the program does not tell the two apart.
        logger.warning(f"{program_file} has {left_over} dropout op(s) that do not come from "
                       "the sampled layers and run deterministically in Paddle Inference. "
                       "A functional dropout imported under another name than "
                       "paddle.nn.functional.dropout is not sampled in the export.")

    metadata = _build_metadata(samples, chosen, reason, plan, stochastic, num_classes,
                               image_shape)
    metadata.update(extra_metadata or {})
    with open(os.path.join(save_dir, METADATA_FILE), "w", encoding="utf-8") as file:
        json.dump(metadata, file, indent=2)

    try:
        _check_stochastic(save_dir, image_shape)
    except RuntimeError:
        _remove_export(save_dir)
        raise
    return metadata


def export_single_pass_model(model, save_dir, image_shape, activation="softmax",
                             infer_model_name=None, infer_output_key=None):
    """Export ``model`` the way PaddleClas's ``Engine.export`` does.

    Args:
        model: the network, already in eval and with its checkpoint loaded.
        save_dir: the folder for ``inference.*``.
        image_shape: ``[C, H, W]``; the batch axis is dynamic.
        activation: ``softmax``, ``sigmoid`` or None, as in PaddleClas's ``ExportModel``.
        infer_model_name: the sub-model of a distillation model to export.
        infer_output_key: the key of the output dict to export.
    """
    layers = {"softmax": lambda: paddle.nn.Softmax(axis=-1), "sigmoid": paddle.nn.Sigmoid,
              None: lambda: None}
    wrapper = SinglePassExportModel(model, layers[activation](), infer_model_name,
                                    infer_output_key)
    for layer in [wrapper] + wrapper.sublayers():
        layer.training = False
    spec = paddle.static.InputSpec(shape=[None] + list(image_shape), dtype="float32")
    static_model = paddle.jit.to_static(wrapper, input_spec=[spec])
    paddle.jit.save(static_model, os.path.join(save_dir, MODEL_PREFIX))


# From a PaddleClas config.


def _image_shape(config):
    shape = (config.get("Global") or {}).get("image_shape")
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0
                       for size in shape)):
        raise ValueError(f"Global.image_shape: invalid value {shape!r}; expected the input "
                         "shape of one image as positive integers [C, H, W], e.g. -o "
                         "Global.image_shape=[3,224,224].")
    return list(shape)


def _single_pass_head(config, model):
    """Return the ``export_single_pass_model`` keywords that PaddleClas's ExportModel uses."""
    arch = config.get("Arch") or {}
    metric = (config.get("Metric") or {}).get("Eval") or [{}]
    multilabel = bool((config.get("Global") or {}).get("use_multilabel")) or (
        isinstance(metric[0], dict) and "ATTRMetric" in metric[0])
    if arch.get("infer_output_key") == "features" and type(model).__name__ == "RecModel":
        raise ValueError("Arch.infer_output_key: features of a recognition model is not "
                         "supported by this export; use PaddleClas's tools/export_model.py.")
    activation = "sigmoid" if multilabel else (
        "softmax" if arch.get("infer_add_softmax", True) else None)
    infer_model_name = (arch.get("infer_model_name")
                        if type(model).__name__ == "DistillationModel" else None)
    return {"activation": activation, "infer_model_name": infer_model_name,
            "infer_output_key": arch.get("infer_output_key")}


def _re_parameterize(model):
    """Fold re-parameterizable branches (RepVGG-style) as PaddleClas's export does."""
    for layer in model.sublayers():
        if hasattr(layer, "re_parameterize") and not getattr(layer, "is_repped", False):
            layer.re_parameterize()


def _copy_for_export(config):
    """Build the model as PaddleClas's export does and return a deep copy in eval.

    PaddleClas's ``Engine.export`` deep-copies the model, which renames every
    parameter ``<name>_deepcopy_<n>``. Those names are stored in the program
    file, so the copy is what makes the files identical to PaddleClas's.
    """
    arch = dict(config.get("Arch") or {})
    if arch.get("use_sync_bn"):
        # PaddleClas's tools/export_model.py turns SyncBatchNorm off the same way.
        config = dict(config, Arch=dict(arch, use_sync_bn=False))
    model = build_inference_model(config)
    with paddle.utils.unique_name.guard():
        model = copy.deepcopy(model)
    for layer in [model] + model.sublayers():
        layer.training = False
    _re_parameterize(model)
    return model


def run_export(config, config_path=None):
    """Export the model of a PaddleClas config, with MC Dropout when ``MCDropout.enable`` is set.

    Reads ``Global.image_shape``, ``Global.save_inference_dir`` (default
    ``./inference``), ``Global.pretrained_model``, ``Global.device``,
    ``Global.export_for_fd`` (also write PaddleClas's ``inference.yml``),
    ``Arch`` and ``MCDropout``.

    Returns:
        A dict with ``save_dir``, ``files`` and, for an MC export, ``metadata``.

    Raises:
        ValueError: on an invalid config or a model that cannot be exported with MC Dropout.
    """
    logger = integration.get_logger()
    mc = parse_mc_section(config)
    image_shape = _image_shape(config)
    global_section = config.get("Global") or {}
    save_dir = path_value(global_section.get("save_inference_dir"),
                          "Global.save_inference_dir") or DEFAULT_SAVE_DIR
    set_device(config)
    model = _copy_for_export(config)
    os.makedirs(save_dir, exist_ok=True)
    stale_metadata = os.path.join(save_dir, METADATA_FILE)
    if os.path.exists(stale_metadata):
        # Left by an earlier MC export; beside a new export it would describe the wrong model.
        os.remove(stale_metadata)

    head = _single_pass_head(config, model)
    metadata = None
    if mc.enable and head["activation"] != "softmax":
        raise ValueError(
            "MCDropout.enable: an MC Dropout export averages softmax probabilities, but this "
            "config exports " + ("sigmoid outputs (multi-label)" if head["activation"]
                                 else "logits (Arch.infer_add_softmax: False)") +
            ". Export it with -o MCDropout.enable=False.")
    if mc.enable:
        if mc.seed is not None:
            logger.info(f"MCDropout.seed {mc.seed} is not stored in the export: its masks are "
                        "fresh at every predictor run (see seed_policy in "
                        f"{METADATA_FILE}).")
        extra = {"arch": (config.get("Arch") or {}).get("name"),
                 "checkpoint": checkpoint_file(config), "config": config_path}
        metadata = export_mc_model(model, save_dir, image_shape, mc.samples, mc.strategy,
                                   mc.drop_path, mc.functional_dropout, extra)
    else:
        export_single_pass_model(model, save_dir, image_shape, **head)

    if global_section.get("export_for_fd"):
        integration.dump_infer_config(config, os.path.join(save_dir, "inference.yml"))
    files = sorted(os.listdir(save_dir))
    logger.info(f"Exported {'MC Dropout' if mc.enable else 'single-pass'} inference model "
                f"to {save_dir}: {', '.join(files)}")
    return {"save_dir": save_dir, "files": files, "metadata": metadata}
