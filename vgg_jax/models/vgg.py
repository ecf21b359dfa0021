"""The six ConvNet configurations of the paper's Table 1 (A, A-LRN, B, C, D, E).

One module, `VGG`, builds every configuration. The classifier head is written as
convolutions: FC6 is a convolution whose window covers the whole final feature map
(7x7 for a 224x224 input) and FC7/FC8 are 1x1 convolutions. On an input of the training
size this is exactly the paper's flatten + fully-connected head (the NHWC flatten of a
7x7x512 map times a 25088x4096 matrix is a VALID 7x7 convolution), with the same number
of parameters. On a larger input the very same parameters slide over the image and give
the class score map of the paper's dense evaluation (section 3.2), with no second copy
of the weights to keep in sync.

Beyond the paper, for the uses VGG has today:
- `batch_norm=True` builds torchvision's vgg*_bn layout for any configuration: a
  BatchNorm after every convolution, before its ReLU, with torchvision's epsilon and
  momentum. Its running statistics live in the `batch_stats` collection.
- `outputs=(...)` returns intermediate activations by name (`feature_names`), computing
  no layer after the last one asked for; `include_head=False` is the convolutional trunk
  alone, for any input size, optionally pooled globally (`pooling="avg"` or `"max"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_jax.config_values import require

# A layer is (output channels, kernel size); a block is the layers before one max-pool.
LayerSpec = tuple[int, int]
BlockSpec = tuple[LayerSpec, ...]


def _convs(channels: int, count: int, kernel: int = 3) -> BlockSpec:
    return tuple((channels, kernel) for _ in range(count))


# Table 1 of the paper. Every block ends with a 2x2 max-pool of stride 2.
ARCHITECTURES: dict[str, tuple[BlockSpec, ...]] = {
    "A": (_convs(64, 1), _convs(128, 1), _convs(256, 2), _convs(512, 2), _convs(512, 2)),
    "A_LRN": (_convs(64, 1), _convs(128, 1), _convs(256, 2), _convs(512, 2), _convs(512, 2)),
    "B": (_convs(64, 2), _convs(128, 2), _convs(256, 2), _convs(512, 2), _convs(512, 2)),
    "C": (
        _convs(64, 2),
        _convs(128, 2),
        _convs(256, 2) + _convs(256, 1, kernel=1),
        _convs(512, 2) + _convs(512, 1, kernel=1),
        _convs(512, 2) + _convs(512, 1, kernel=1),
    ),
    "D": (_convs(64, 2), _convs(128, 2), _convs(256, 3), _convs(512, 3), _convs(512, 3)),
    "E": (_convs(64, 2), _convs(128, 2), _convs(256, 4), _convs(512, 4), _convs(512, 4)),
}
VERSIONS = tuple(ARCHITECTURES)
# Configurations whose first convolution is followed by local response normalisation.
LRN_VERSIONS = frozenset({"A_LRN"})

# Five 2x2 pools of stride 2 divide the spatial size by 2**5.
TOTAL_STRIDE = 32

# torchvision's BatchNorm2d defaults, which its vgg*_bn weights were trained with. PyTorch
# updates running = (1 - momentum) * running + momentum * batch; flax keeps
# momentum * running + (1 - momentum) * batch, so flax's momentum is 1 - PyTorch's.
TORCH_BN_MOMENTUM = 0.1
TORCH_BN_EPSILON = 1e-5
# A conv layer's BatchNorm is named after it: "conv4_3" -> "conv4_3_bn".
BN_SUFFIX = "_bn"
# The classifier head's layers, in order; fc6 and fc7 outputs are taken after their ReLU.
HEAD_LAYERS = ("fc6", "fc7", "fc8")
# Global pooling of the trunk's output when the head is left out.
POOLINGS = ("avg", "max")
# config.model.initializer: the weight initialisers `_initializer` makes.
INITIALIZERS = ("glorot_uniform", "normal")
# config.model.compute_dtype: what `compute_dtype` resolves ("auto": by backend).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def canonical_version(version: str) -> str:
    """Normalises a configuration name ("a-lrn", "A_LRN", "d", ...) to a key of ARCHITECTURES.

    Args:
      version: the configuration name, case-insensitive; "-" and "_" are interchangeable.

    Returns:
      One of VERSIONS.

    Raises:
      ValueError: if the name is not one of the paper's configurations.
    """
    key = str(version).strip().upper().replace("-", "_")
    if key not in ARCHITECTURES:
        raise ValueError(
            f"Unknown VGG version {version!r}; valid versions are {', '.join(VERSIONS)} "
            "(case-insensitive, 'A-LRN' also accepted)."
        )
    return key


def local_response_norm(
    x: jax.Array, size: int, alpha: float, beta: float, k: float
) -> jax.Array:
    """AlexNet's cross-channel local response normalisation (Krizhevsky et al., 2012).

    b_c = a_c / (k + alpha * sum_{c' in window(c)} a_{c'}^2) ** beta, where the window holds
    `size` neighbouring channels centred on c, clipped at the first and last channel. Alpha
    multiplies the plain sum, as in the AlexNet paper that VGG cites.

    Args:
      x: activations, channels last.
      size: number of channels in the window (odd).
      alpha: scale of the sum of squares.
      beta: exponent.
      k: additive constant.

    Returns:
      The normalised activations, same shape and dtype as `x`.
    """
    squares = jnp.square(x.astype(jnp.float32))
    half = size // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, size - 1 - half)]
    window_sums = jax.lax.reduce_window(
        squares, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (size,), (1,) * x.ndim, pad
    )
    return (x.astype(jnp.float32) / (k + alpha * window_sums) ** beta).astype(x.dtype)


def kernel_initializer(name: str, normal_stddev: float, in_axis=-2, out_axis=-1):
    """Returns the weight initialiser named in the config.

    Args:
      name: "glorot_uniform" (Glorot & Bengio 2010, the paper's footnote) or "normal"
        (the paper's zero-mean normal).
      normal_stddev: standard deviation of "normal" (the paper's variance 1e-2 is 0.1).
      in_axis: kernel axes that make up the fan-in.
      out_axis: kernel axis that makes up the fan-out.

    Returns:
      A jax.nn.initializers function.

    Raises:
      ValueError: for an unknown name.
    """
    if name == "glorot_uniform":
        return jax.nn.initializers.glorot_uniform(in_axis=in_axis, out_axis=out_axis)
    if name == "normal":
        return jax.nn.initializers.normal(stddev=normal_stddev)
    raise ValueError(f"Unknown init {name!r}; use one of {INITIALIZERS}.")


def layer_names(architecture: Sequence[BlockSpec], use_lrn: bool = False,
                include_head: bool = True) -> tuple[str, ...]:
    """The names of a net's activations in forward order, as `VGG(outputs=...)` takes them.

    Args:
      architecture: the conv blocks (a value of ARCHITECTURES).
      use_lrn: the net has A-LRN's normalisation after conv1_1 (named "lrn").
      include_head: add fc6, fc7 (after their ReLU) and fc8 (the logits).

    Returns:
      ("conv1_1", ["lrn",] ..., "pool1", "conv2_1", ..., "pool5"[, "fc6", "fc7", "fc8"]):
      every conv's output after its ReLU and every max-pool's output.
    """
    names = []
    for block_index, block in enumerate(architecture, start=1):
        for layer_index in range(1, len(block) + 1):
            names.append(f"conv{block_index}_{layer_index}")
            if use_lrn and block_index == 1 and layer_index == 1:
                names.append("lrn")
        names.append(f"pool{block_index}")
    return tuple(names) + (HEAD_LAYERS if include_head else ())


class VGG(nn.Module):
    """A VGG network (paper Table 1), optionally narrowed for small data and tests.

    Attributes:
      architecture: the conv blocks, one tuple of (channels, kernel size) per block.
      num_classes: width of the last layer.
      image_size: the training input size (a multiple of 32); FC6 covers its final
        feature map of image_size/32 x image_size/32.
      width_divisor: every conv's channel count is divided by this (1 = the paper).
      fc_features: width of FC6 and FC7 (4096 in the paper).
      dropout_rate: dropout after FC6 and FC7, in training only.
      use_lrn: local response normalisation after the first convolution (A-LRN).
      lrn_size, lrn_alpha, lrn_beta, lrn_k: AlexNet's LRN constants, as used by the paper.
      initializer: "glorot_uniform" or "normal"; biases always start at zero.
      normal_init_stddev: standard deviation of the "normal" initialiser.
      batch_norm: a BatchNorm after every convolution, before its ReLU (torchvision's
        vgg*_bn; not in the paper). Training updates the `batch_stats` collection
        (`apply(..., train=True, mutable=["batch_stats"])`) from the statistics of the
        whole batch, which under jit is the global batch however it is sharded;
        evaluation uses the running averages.
      frozen: layers (conv or FC names) that fine-tuning does not train; a frozen conv's
        BatchNorm normalises by its running averages in training too and leaves them
        unchanged, so the layer computes exactly what it did in the source net (the
        optimiser, not the module, keeps frozen parameters fixed: `frozen_parameters`).
      bn_momentum: flax's momentum of the running averages (1 - PyTorch's momentum).
      bn_epsilon: added to the variance before its square root.
      include_head: False leaves out FC6-FC8: the net is the convolutional trunk, for
        any input size, and returns pool5 (pooled globally with `pooling`).
      pooling: without the head, "avg" or "max" pools pool5 over space to [N, channels];
        None returns the map.
      dtype: the compute dtype (bfloat16 on accelerators); parameters stay `param_dtype`.
      param_dtype: the parameter dtype.
    """

    architecture: Sequence[BlockSpec]
    num_classes: int = 1000
    image_size: int = 224
    width_divisor: int = 1
    fc_features: int = 4096
    dropout_rate: float = 0.5
    use_lrn: bool = False
    lrn_size: int = 5
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    initializer: str = "glorot_uniform"
    normal_init_stddev: float = 0.01
    batch_norm: bool = False
    frozen: tuple[str, ...] = ()
    bn_momentum: float = 1.0 - TORCH_BN_MOMENTUM
    bn_epsilon: float = TORCH_BN_EPSILON
    include_head: bool = True
    pooling: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def head_window(self) -> int:
        """Side of the final feature map for a training-size input, FC6's window.

        Returns:
          image_size // TOTAL_STRIDE (7 for 224x224).
        """
        return self.image_size // TOTAL_STRIDE

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The activation names `outputs=` accepts, in forward order (see `layer_names`).

        Returns:
          "conv1_1", ..., "pool5", and "fc6", "fc7", "fc8" when the head is included.
        """
        return layer_names(self.architecture, self.use_lrn, self.include_head)

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        """The parameter groups of the frozen layers: each layer and its batch norm.

        Returns:
          Top-level keys of `params` that fine-tuning keeps fixed.
        """
        with_bn = tuple(name + BN_SUFFIX for name in self.frozen
                        if self.batch_norm and name not in HEAD_LAYERS)
        return tuple(self.frozen) + with_bn

    def _conv(self, features, kernel, name, *, padding="SAME", fc=False):
        # A fully-connected layer written as a convolution keeps the fan-in/fan-out of the
        # dense layer it stands for: all of the window is fan-in, only outputs are fan-out.
        in_axis = (0, 1, 2) if fc else -2
        return nn.Conv(
            features,
            (kernel, kernel),
            padding=padding,
            kernel_init=kernel_initializer(
                self.initializer, self.normal_init_stddev, in_axis=in_axis, out_axis=-1
            ),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _batch_norm(self, x, name, train, mask):
        # Two-pass variance (as PyTorch computes it): E[x^2] - E[x]^2 loses precision when
        # a channel's mean is large against its spread. Statistics are kept in float32.
        # A frozen layer's statistics stay those of the data it was trained on.
        return nn.BatchNorm(
            use_running_average=not train or name in self.frozen, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, use_fast_variance=False, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name + BN_SUFFIX,
        )(x, mask=None if mask is None else mask[:, None, None, None])

    def _trunk(self, x, train, mask):
        """Yields (name, activation) for every conv (after its ReLU) and every pool.

        A generator, so that a caller who stops iterating computes nothing further.
        """
        for block_index, block in enumerate(self.architecture, start=1):
            for layer_index, (channels, kernel) in enumerate(block, start=1):
                name = f"conv{block_index}_{layer_index}"
                x = self._conv(max(channels // self.width_divisor, 1), kernel, name)(x)
                if self.batch_norm:
                    x = self._batch_norm(x, name, train, mask)
                x = nn.relu(x)
                yield name, x
                if self.use_lrn and block_index == 1 and layer_index == 1:
                    x = local_response_norm(
                        x, self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k)
                    yield "lrn", x
            if min(x.shape[1:3]) < 2:
                raise ValueError(
                    f"The input is too small: pool{block_index} needs at least 2x2, got "
                    f"{x.shape[1]}x{x.shape[2]}; VGG needs images of at least "
                    f"{TOTAL_STRIDE}x{TOTAL_STRIDE}.")
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            yield f"pool{block_index}", x

    def _head(self, x, train):
        """Yields ("fc6", ...), ("fc7", ...) after their ReLU and ("fc8", logits map)."""
        x = self._conv(self.fc_features, self.head_window, "fc6", padding="VALID", fc=True)(x)
        x = nn.relu(x)
        yield "fc6", x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = self._conv(self.fc_features, 1, "fc7", fc=True)(x)
        x = nn.relu(x)
        yield "fc7", x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = self._conv(self.num_classes, 1, "fc8", fc=True)(x)
        yield "fc8", x.astype(jnp.float32)

    def _activations(self, images, train, mask, with_head):
        x = None
        for name, x in self._trunk(images.astype(self.dtype), train, mask):
            yield name, x
        if with_head:
            yield from self._head(x, train)

    def _check_outputs(self, outputs: Sequence[str]) -> tuple[str, ...]:
        if isinstance(outputs, str):
            outputs = (outputs,)
        valid = self.feature_names
        unknown = [name for name in outputs if name not in valid]
        if unknown or not outputs:
            raise ValueError(
                f"Unknown feature name(s) {unknown or list(outputs)}; this net's are: "
                f"{', '.join(valid)}.")
        return tuple(outputs)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, dense: bool = False, *,
                 outputs: Sequence[str] | None = None, mask: jax.Array | None = None):
        """Computes class logits, the trunk's output, or the named activations.

        Args:
          images: float images, NHWC. With the head and without `dense` they must be
            image_size x image_size; with `dense` any size whose sides are at least
            image_size; without the head (or asking only for trunk outputs) any size of
            at least 32x32.
          train: enables dropout and, with batch_norm, normalises by the batch's own
            statistics and updates the running ones (pass mutable=["batch_stats"]).
          dense: the paper's dense evaluation: return the class score map of the
            fully-convolutional net, (H/32 - head_window + 1) x (W/32 - head_window + 1).
          outputs: names from `feature_names` (e.g. ("conv4_3", "pool5")); the layers
            after the last one named are not computed.
          mask: [N] bool, the examples that count in the batch-norm statistics of
            training (padding and undecodable images do not); None = all.

        Returns:
          With `outputs`: {name: activation} in the order asked, maps [N, h, w, C] in the
          compute dtype (fc6/fc7/fc8 as [N, C] unless `dense`; fc8 in float32).
          Otherwise, with the head: logits in float32, [N, num_classes], or
          [N, h, w, num_classes] when `dense`. Without the head: pool5, [N, h, w, C], or
          [N, C] when pooled.

        Raises:
          ValueError: for an unknown output name (listing the valid ones) or an input of
            the wrong size.
        """
        wanted = None if outputs is None else self._check_outputs(outputs)
        with_head = self.include_head and (
            wanted is None or any(name in HEAD_LAYERS for name in wanted))
        if with_head and not dense and images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"Expected {self.image_size}x{self.image_size} images, got "
                f"{images.shape[1]}x{images.shape[2]}; pass dense=True for whole images.")
        flat = lambda x: x if dense else x.reshape(x.shape[0], x.shape[-1])
        captured = {}
        for name, x in self._activations(images, train, mask, with_head):
            if wanted is not None and name in wanted:
                captured[name] = flat(x) if name in HEAD_LAYERS else x
                if len(captured) == len(set(wanted)):
                    return {name: captured[name] for name in wanted}
        if self.include_head:
            return flat(x)
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        if self.pooling == "max":
            return jnp.max(x, axis=(1, 2))
        return x


def create_model(version: str, num_classes: int = 1000, **variant: Any) -> VGG:
    """Builds one of the paper's configurations.

    Args:
      version: "A", "A_LRN" (or "A-LRN"), "B", "C", "D" or "E", case-insensitive.
      num_classes: number of output classes.
      **variant: any other VGG attribute: image_size, width_divisor, fc_features,
        dropout_rate, initializer, normal_init_stddev, batch_norm, include_head,
        pooling, dtype, param_dtype, LRN and batch-norm constants.

    Returns:
      The flax module; `model.apply(variables, images, train=False)` gives logits.

    Raises:
      ValueError: for an unknown version, an unknown attribute, an image size that is
        not a positive multiple of 32, or a pooling other than None, "avg" and "max"
        (pooling needs include_head=False).
    """
    key = canonical_version(version)
    known = {field.name for field in dataclasses.fields(VGG)} - {
        "architecture", "num_classes", "use_lrn", "parent", "name"}
    unknown = sorted(set(variant) - known)
    if unknown:
        raise ValueError(f"Unknown VGG option(s) {unknown}; valid options are {sorted(known)}.")
    check_image_size(variant.get("image_size", VGG.image_size), "image_size")
    pooling = variant.get("pooling")
    if pooling is not None and (pooling not in POOLINGS or variant.get("include_head", True)):
        raise ValueError(
            f"pooling={pooling!r}: global pooling is 'avg' or 'max', and replaces the "
            "classifier head: pass include_head=False with it.")
    return VGG(
        architecture=ARCHITECTURES[key],
        num_classes=num_classes,
        use_lrn=key in LRN_VERSIONS,
        **variant,
    )


def check_image_size(image_size: int, field: str) -> None:
    """Raises ConfigError unless `image_size` (named `field` in the message) is a positive
    multiple of the total stride."""
    require(image_size > 0 and image_size % TOTAL_STRIDE == 0,
            f"{field}={image_size} must be a positive multiple of {TOTAL_STRIDE} (five 2x2 "
            "max-pools), e.g. 224.")


def count_parameters(model: VGG, batch_size: int = 1) -> int:
    """Counts parameters without allocating them (through jax.eval_shape).

    Args:
      model: the module.
      batch_size: batch of the dummy input used to trace the shapes.

    Returns:
      The number of scalar parameters.
    """
    images = jax.ShapeDtypeStruct(
        (batch_size, model.image_size, model.image_size, 3), jnp.float32
    )
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
