"""The backbone table, weights resolution and model construction.

Keras is imported inside the functions that need it, so the command line can
validate its arguments (an unknown backbone, a missing weights file) before
paying for importing TensorFlow or JAX.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

#: Seed of the random weights, so that ``random`` features are reproducible
#: and a resumed run continues with the same model.
RANDOM_WEIGHTS_SEED = 0


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One row of the backbone table.

    Attributes
    ----------
    name : str
        Name used on the command line and in the output path.
    module : str
        ``keras.applications`` submodule holding the constructor and its
        ``preprocess_input``.
    constructor : str
        Name of the constructor in that module.
    input_size : int
        Default side of the square input, in pixels.
    min_input_size : int
        Smallest side the architecture accepts.
    n_features : int
        Width of the globally average-pooled output.
    preprocessing : str
        What ``preprocess_input`` does to pixel values in [0, 255].
    weights_file : str
        File name Keras downloads for ``weights="imagenet"`` without the top.
    weights_md5 : str
        Hash Keras checks after the download ('' where Keras checks none).
    kwargs : tuple of (str, object)
        Extra constructor arguments.
    """

    name: str
    module: str
    constructor: str
    input_size: int
    min_input_size: int
    n_features: int
    preprocessing: str
    weights_file: str
    weights_md5: str
    kwargs: tuple = ()

    @property
    def weights_url(self) -> str:
        return f"{_KERAS_WEIGHTS_URL}{self.module}/{self.weights_file}"


BACKBONES = {
    backbone.name: backbone
    for backbone in [
        Backbone(
            name="inception_resnet_v2",
            module="inception_resnet_v2",
            constructor="InceptionResNetV2",
            input_size=299,
            min_input_size=75,
            n_features=1536,
            preprocessing="scale [0, 255] to [-1, 1]",
            weights_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_md5="d19885ff4a710c122648d3b5c3b684e4",
        ),
        Backbone(
            name="mobilenet",
            module="mobilenet",
            constructor="MobileNet",
            input_size=224,
            min_input_size=32,
            n_features=256,
            preprocessing="scale [0, 255] to [-1, 1]",
            weights_file="mobilenet_2_5_224_tf_no_top.h5",
            weights_md5="",
            kwargs=(("alpha", 0.25),),
        ),
    ]
}

DEFAULT_BACKBONE = "inception_resnet_v2"


@dataclasses.dataclass(frozen=True)
class Weights:
    """Resolved weights of a backbone.

    Attributes
    ----------
    name : str
        File name of the weights, or ``"random"``.
    path : Path or None
        Local file to load, or None for random weights.
    sha256 : str
        Digest of the file ('' for random weights).
    """

    name: str
    path: Path | None
    sha256: str

    @property
    def is_random(self) -> bool:
        return self.path is None


def get_backbone(name: str) -> Backbone:
    """Return the table row for ``name``, or raise a PipelineError listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise PipelineError(
            f"Unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}."
        ) from None


def check_input_size(backbone: Backbone, image_size: int | None) -> int:
    """Return the input side to use, checking it against the architecture's minimum."""
    if image_size is None:
        return backbone.input_size
    if image_size < backbone.min_input_size:
        raise PipelineError(
            f"--image-size must be at least {backbone.min_input_size} for "
            f"{backbone.name}; got {image_size}."
        )
    return image_size


def keras_cache_dir() -> Path:
    """Return the folder where Keras caches downloaded weights (honours KERAS_HOME)."""
    keras_home = os.environ.get("KERAS_HOME")
    if keras_home:
        return Path(keras_home).expanduser() / "models"
    return Path("~/.keras/models").expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_failed_message(backbone: Backbone, reason: str) -> str:
    cache = keras_cache_dir()
    return (
        f"Could not download the ImageNet weights of {backbone.name} ({reason}). "
        f"Keras expects the file {backbone.weights_file} from {backbone.weights_url}. "
        f"Download it on a machine with internet access and put it in {cache} "
        f"(set KERAS_HOME to use another cache folder), or pass the file directly "
        f"with WEIGHTS=path/to/{backbone.weights_file} (--weights on the command "
        f"line). No features were written."
    )


def resolve_weights(backbone: Backbone, weights: str) -> Weights:
    """Find the weights file for ``weights`` ('imagenet', a path or 'random').

    For 'imagenet' the file is taken from the Keras cache, downloading it
    there first if needed. Random weights are used only when asked for by
    name; a failed download raises instead.

    Raises
    ------
    PipelineError
        If the weights file is missing, or the download fails.
    """
    if weights == "random":
        return Weights(name="random", path=None, sha256="")

    if weights == "imagenet":
        cached = keras_cache_dir() / backbone.weights_file
        if not cached.is_file():
            cached = _download_weights(backbone)
        return Weights(name=backbone.weights_file, path=cached, sha256=sha256_of(cached))

    path = Path(weights).expanduser()
    if not path.is_file():
        raise PipelineError(
            f"Weights file not found: {path}. Pass 'imagenet', 'random' or the "
            f"path of an existing .h5 file for {backbone.name}."
        )
    return Weights(name=path.name, path=path.resolve(), sha256=sha256_of(path))


def _download_weights(backbone: Backbone) -> Path:
    """Download the ImageNet weights into the Keras cache through Keras."""
    from keras.utils import get_file

    cache = keras_cache_dir()
    logger.info("downloading %s into %s", backbone.weights_url, cache)
    try:
        path = get_file(
            backbone.weights_file,
            backbone.weights_url,
            cache_subdir="models",
            cache_dir=str(cache.parent),
            file_hash=backbone.weights_md5 or None,
        )
    except Exception as error:  # Keras raises bare Exception for network and hash failures.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(_download_failed_message(backbone, reason)) from None
    return Path(path)


def resolve_precision(precision: str) -> str:
    """Turn 'auto' into 'bfloat16' on a GPU and 'float32' otherwise."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise PipelineError(f"--precision must be auto, float32 or bfloat16; got {precision!r}.")
    if precision != "auto":
        return precision
    return "bfloat16" if gpu_available() else "float32"


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null unless debug logging is on.

    TensorFlow 2.21 writes start-up notices (oneDNN, missing CUDA drivers)
    from C++ before its logging honours TF_CPP_MIN_LOG_LEVEL, so that
    variable alone does not hide them. Only the import and the device
    listing run inside this block.
    """
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@functools.cache
def gpu_available() -> bool:
    """Return whether the Keras backend finds a GPU (imports Keras on first call)."""
    with _native_stderr_silenced():
        import keras

        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(device.platform == "gpu" for device in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def build_model(backbone: Backbone, weights: Weights, image_size: int, precision: str):
    """Build the backbone as a Keras model from uint8 pixels to pooled features.

    The model takes a batch of shape (n, image_size, image_size, 3), dtype
    uint8, applies the backbone's ``preprocess_input`` and returns float32
    features of shape (n, n_features). Under ``precision="bfloat16"`` the
    layers compute in bfloat16 with float32 variables. Batch normalization
    is folded into the convolutions before it (see :func:`_fold_batch_norm`),
    so the model is for inference only.
    """
    import importlib

    import keras

    policy = "mixed_bfloat16" if precision == "bfloat16" else "float32"
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        if weights.is_random:
            keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        application = importlib.import_module(f"keras.applications.{backbone.module}")
        constructor = getattr(application, backbone.constructor)
        network = constructor(
            include_top=False,
            weights=None,
            input_shape=(image_size, image_size, 3),
            pooling="avg",
            **dict(backbone.kwargs),
        )
        if weights.path is not None:
            _load_weights(network, weights, backbone)
        network = _fold_batch_norm(network)

        pixels = keras.Input((image_size, image_size, 3), dtype="uint8", name="pixels")
        # Scaling runs in float32 because bfloat16 cannot represent every pixel value.
        scaled = _preprocess_layer()(application.preprocess_input, dtype="float32")(pixels)
        pooled = network(scaled)
        outputs = keras.layers.Activation("linear", dtype="float32", name="features")(pooled)
        return keras.Model(pixels, outputs, name=f"{backbone.name}_features")
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _fold_batch_norm(network):
    """Return a copy of ``network`` with batch normalization folded into the convolutions.

    A BatchNormalization layer folds when its only input is a Conv2D or
    DepthwiseConv2D with a linear activation and channels last, whose output
    feeds nothing else. In inference mode it computes (x - mean) * scale +
    beta with scale = gamma / sqrt(variance + epsilon), so the convolution's
    kernel is multiplied by scale per output channel, its bias becomes
    (bias - mean) * scale + beta, and the layer becomes a pass-through. The
    output is unchanged up to rounding, and each folded layer saves a
    memory-bound pass (and, under mixed bfloat16, two casts to float32 and
    back). Under bfloat16 the rounding grows, because the bias is added in
    bfloat16. For real MobileNet features of 2,400 dog photos the mean cosine
    to float32 went from 0.997 to 0.995, and the CV log loss of logistic
    regression stayed within 0.3%. Returns ``network`` itself when nothing
    folds.
    """
    import keras
    import numpy as np

    entries = network.get_config()["layers"]
    sources = {entry["name"]: _inbound_layer_names(entry.get("inbound_nodes", [])) for entry in entries}
    calls = {entry["name"]: len(entry.get("inbound_nodes", [])) for entry in entries}
    consumers = collections.Counter(name for names in sources.values() for name in names)
    # "output_layers" is one [name, node, tensor] triple or a list of them.
    output_spec = network.get_config()["output_layers"]
    outputs = {output_spec[0]} if output_spec and isinstance(output_spec[0], str) else {item[0] for item in output_spec}
    layers = {layer.name: layer for layer in network.layers}

    folded = {}  # BatchNormalization name to the convolution it folds into
    for layer in network.layers:
        if type(layer) is not keras.layers.BatchNormalization or calls[layer.name] != 1:
            continue
        if len(sources[layer.name]) != 1:
            continue
        conv = layers[sources[layer.name][0]]
        if (
            type(conv) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
            and calls[conv.name] == 1
            and consumers[conv.name] == 1
            and conv.name not in outputs
            and conv.data_format == "channels_last"
            and conv.get_config()["activation"] == "linear"
            and layer.axis in (-1, 3)
        ):
            folded[layer.name] = conv
    if not folded:
        return network

    batch_norm_of = {conv.name: layers[name] for name, conv in folded.items()}
    passthrough = _passthrough_layer()

    def clone_layer(layer):
        if layer.name in folded:
            return passthrough(name=layer.name)
        config = layer.get_config()
        if layer.name in batch_norm_of:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(network, clone_function=clone_layer)
    # Cloning renames the input layer, so only the other layers are compared.
    names = [[layer.name for layer in model.layers[1:]] for model in (network, clone)]
    if names[0] != names[1] or len(network.layers) != len(clone.layers):
        raise RuntimeError(f"folding batch normalization changed the layers of {network.name}; this is a bug")

    for layer, target in zip(network.layers, clone.layers):
        if layer.name in folded:
            continue
        if layer.name not in batch_norm_of:
            target.set_weights(layer.get_weights())
            continue
        batch_norm = batch_norm_of[layer.name]
        gamma = batch_norm.gamma.numpy() if batch_norm.scale else 1.0
        beta = batch_norm.beta.numpy() if batch_norm.center else 0.0
        scale = gamma / np.sqrt(batch_norm.moving_variance.numpy() + batch_norm.epsilon)
        kernel = layer.kernel.numpy()
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            # Kernel (h, w, in, multiplier): output channel c * multiplier + m.
            kernel = kernel * scale.reshape(1, 1, kernel.shape[2], kernel.shape[3])
        else:
            kernel = kernel * scale
        bias = layer.bias.numpy() if layer.use_bias else 0.0
        target.set_weights([kernel, (bias - batch_norm.moving_mean.numpy()) * scale + beta])
    logger.debug("folded %d batch normalization layers of %s", len(folded), network.name)
    return clone


def _inbound_layer_names(nodes) -> list[str]:
    """List the layers whose outputs a layer's serialized inbound nodes read."""
    names = []
    if isinstance(nodes, dict):
        if nodes.get("class_name") == "__keras_tensor__":
            names.append(nodes["config"]["keras_history"][0])
        else:
            for value in nodes.values():
                names += _inbound_layer_names(value)
    elif isinstance(nodes, (list, tuple)):
        for value in nodes:
            names += _inbound_layer_names(value)
    return names


@functools.cache
def _passthrough_layer():
    """Return a layer class that returns its input, in place of a folded BatchNormalization."""
    import keras

    class FoldedBatchNormalization(keras.layers.Layer):
        def call(self, inputs, training=None, mask=None):
            return inputs

    return FoldedBatchNormalization


def _load_weights(network, weights: Weights, backbone: Backbone) -> None:
    try:
        network.load_weights(str(weights.path))
    except Exception as error:  # Keras raises ValueError, KeyError or OSError by format.
        raise PipelineError(
            f"Could not load weights {weights.path} into {backbone.name}: {error}. "
            f"The file must be Keras weights for {backbone.constructor} without "
            f"its top (include_top=False), such as {backbone.weights_file}."
        ) from None


@functools.cache
def _preprocess_layer():
    """Return a layer class that casts uint8 pixels and applies ``preprocess_input``."""
    import keras

    class Preprocess(keras.layers.Layer):
        def __init__(self, function, **kwargs):
            super().__init__(**kwargs)
            self.function = function

        def call(self, inputs):
            return self.function(keras.ops.cast(inputs, self.compute_dtype))

    return Preprocess
