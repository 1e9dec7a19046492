"""Plain Flax models of the convolutional and Transformer benchmarks, chosen by name from
:data:`ZOO`.

The convolutional models use only ``nn.Conv``, ``nn.Dense``, ``nn.BatchNorm`` and pooling,
as any Flax user would write them, so ``bioflax.convert`` can give every Conv and Dense a
learning rule; the Transformers (:class:`VisionTransformer`, :class:`TransformerLM`) are
written the same way, with ``nn.MultiHeadDotProductAttention``, ``nn.LayerNorm``,
``nn.Embed`` and ``nn.Dropout`` (the ``'dropout'`` stream, on when ``train=True``). Each
model is called as ``model.apply(variables, x, train=...)``, the image models on NHWC
images, the language model on int32 tokens ``(N, T)``; the ResNets keep BatchNorm
statistics in the ``'batch_stats'`` collection (pass ``mutable=['batch_stats']`` when
``train=True``). The convolutional architectures follow biotorch (jsalbert/biotorch, commit
74fad0dd32529e754e4bba8298d4e0fd0a06a886), whose benchmark re-creates every Conv2d and
Linear with its ``init: "xavier"`` option: Xavier-uniform weights, zero biases. That is the
default ``kernel_init`` here; BatchNorm starts at scale 1, bias 0 and uses PyTorch's
running-average momentum 0.1 (Flax ``momentum=0.9``) and epsilon 1e-5. One difference
remains: PyTorch's running variance averages the unbiased batch variance, Flax's the biased
one (a factor (m − 1)/m, m = batch × height × width; it only affects eval-mode outputs).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]
xavier_uniform: Initializer = nn.initializers.xavier_uniform()


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """``nn.max_pool(x, (size, size), strides=(size, size))`` (VALID, NHWC), values and
    gradient: the gradient goes to the first maximum of each window in row-major order, as
    ``reduce_window``'s select-and-scatter (and PyTorch's ``max_pool2d``) sends it. Values
    are elementwise maxima of the window's rows, then of its columns; the gradient is one
    select against the index of each window's first maximum (an ``argmax``, which XLA
    computes once per window and fuses into the loop that consumes the gradient)."""
    return _pool_values(_windows(x, size), size)


def _windows(x: jax.Array, size: int) -> jax.Array:
    """``x`` cropped to whole windows, as ``(n, rows, size, cols, size · c)``."""
    n, h, w, c = x.shape
    rows, cols = h // size, w // size
    return x[:, :rows * size, :cols * size].reshape(n, rows, size, cols, size * c)


def _pool_values(windows: jax.Array, size: int) -> jax.Array:
    c = windows.shape[-1] // size
    maxima = functools.reduce(jnp.maximum, [windows[:, :, i] for i in range(size)])
    return functools.reduce(jnp.maximum, [maxima[..., j * c:(j + 1) * c] for j in range(size)])


def _max_pool_fwd(x, size):
    return max_pool(x, size), x


def _max_pool_bwd(size, x, dy):
    """``dx[window position p] = dy`` where ``p`` is the window's first maximum, else 0."""
    n, h, w, c = x.shape
    rows, cols = dy.shape[1:3]
    windows = _windows(x, size).reshape(n, rows, size, cols, size, c)
    first = jnp.argmax(windows.transpose(0, 1, 3, 5, 2, 4).reshape(*dy.shape, size * size),
                       axis=-1)  # p = row · size + column; argmax returns the first maximum
    position = jnp.arange(size * size).reshape(1, 1, size, 1, size, 1)
    dx = jnp.where(position == first[:, :, None, :, None], dy[:, :, None, :, None], 0)
    dx = dx.reshape(n, rows * size, cols * size, c)
    return (jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0))),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


class LeNet5(nn.Module):
    """biotorch's ``LeNetMNIST`` (``biotorch/models/le_net.py``) on 32×32×1 inputs.

    conv1 5×5, 1→6, stride 1, no padding, bias → ReLU → max-pool 2×2 (28→14);
    conv2 5×5, 6→16, no padding, bias → ReLU → max-pool 2×2 (10→5);
    conv3 5×5, 16→120, no padding, bias → ReLU (5→1) → flatten (120);
    fc1 Dense 120→84, bias → ReLU; fc2 Dense 84→``num_classes``, bias (logits).
    biotorch resizes MNIST's 28×28 digits to 32×32 (bilinear) before this network and fixes
    10 outputs; ``train`` is accepted for a uniform interface and changes nothing.
    """

    num_classes: int = 10
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding="VALID",
                                 kernel_init=self.kernel_init)
        x = max_pool(nn.relu(conv(6, name="conv1")(x)))
        x = max_pool(nn.relu(conv(16, name="conv2")(x)))
        x = nn.relu(conv(120, name="conv3")(x)).reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(84, kernel_init=self.kernel_init, name="fc1")(x))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="fc2")(x)


class LeNetCIFAR(nn.Module):
    """biotorch's ``LeNetCIFAR`` (``biotorch/models/le_net.py``) on 32×32×3 inputs.

    conv1 3×3, 3→32, no padding, bias → ReLU → max-pool 2×2 (30→15);
    conv2 3×3, 32→64 → ReLU → max-pool 2×2 (13→6); conv3 3×3, 64→128 → ReLU (6→4);
    average pool over the whole 4×4 map → 128; fc1 Dense 128→256 → ReLU;
    fc2 Dense 256→``num_classes``. Every layer has a bias; ``train`` changes nothing.
    """

    num_classes: int = 10
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="VALID",
                                 kernel_init=self.kernel_init)
        x = max_pool(nn.relu(conv(32, name="conv1")(x)))
        x = max_pool(nn.relu(conv(64, name="conv2")(x)))
        x = nn.relu(conv(128, name="conv3")(x))
        x = nn.avg_pool(x, x.shape[1:3]).reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(256, kernel_init=self.kernel_init, name="fc1")(x))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="fc2")(x)


def shortcut_a(x: jax.Array, planes: int) -> jax.Array:
    """He et al.'s option-A shortcut as biotorch's ``IdentityPadding``: keep every second
    row and column, then add ``planes // 4`` zero channels on each side."""
    pad = planes // 4
    return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """conv 3×3 (stride ``strides``) → BN → ReLU → conv 3×3 → BN, plus the shortcut, → ReLU.

    Convolutions have no bias and pad one pixel on every side, as PyTorch's ``padding=1``:
    a stride-2 window is then centred on the pixel that :func:`shortcut_a` keeps (Flax's
    ``'SAME'`` would pad only after, shifting it by one). The shortcut is the identity,
    or option A when the block changes the size (biotorch's ``BasicBlock``).
    """

    planes: int
    strides: int = 1
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = functools.partial(nn.Conv, self.planes, (3, 3), padding=((1, 1), (1, 1)),
                                 use_bias=False, kernel_init=self.kernel_init)
        out = conv(strides=self.strides, name="conv1")(x)
        out = nn.relu(_batch_norm(train, "bn1")(out))
        out = _batch_norm(train, "bn2")(conv(name="conv2")(out))
        if self.strides != 1 or x.shape[-1] != self.planes:
            x = shortcut_a(x, self.planes)
        return nn.relu(out + x)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 §4.2 as biotorch's ``small_resnet.ResNet``.

    conv 3×3, 3→16, no bias → BN → ReLU; three stages of n = (depth − 2) / 6
    :class:`BasicBlock` with 16, 32 and 64 channels, the first block of stages 2 and 3 at
    stride 2 (32→16→8); global average pooling; Dense 64→``num_classes`` with bias.
    Submodules are named as biotorch's: ``conv1``, ``bn1``, ``layer{s}_{b}``, ``fc``.
    """

    depth: int = 20
    num_classes: int = 10
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {self.depth}")
        blocks = (self.depth - 2) // 6
        x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=self.kernel_init, name="conv1")(x)
        x = nn.relu(_batch_norm(train, "bn1")(x))
        for stage, planes in enumerate((16, 32, 64), start=1):
            for block in range(blocks):
                strides = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(planes, strides, self.kernel_init,
                               name=f"layer{stage}_{block}")(x, train)
        x = nn.avg_pool(x, x.shape[1:3]).reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="fc")(x)


class EncoderBlock(nn.Module):
    """A pre-LayerNorm Transformer block: ``x + Dropout(MHA(LN(x)))``, then
    ``x + Dropout(Dense(gelu(Dense(LN(x)))))`` with hidden width ``mlp_ratio · width``.
    ``causal``: each position attends only to itself and earlier positions."""

    num_heads: int
    mlp_ratio: int = 2
    dropout_rate: float = 0.0
    causal: bool = False
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        width = x.shape[-1]
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if self.causal else None
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=self.kernel_init, name="attention")(
                y, y, mask=mask)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp_ratio * width, kernel_init=self.kernel_init,
                             name="mlp1")(y))
        y = nn.Dense(width, kernel_init=self.kernel_init, name="mlp2")(y)
        return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


# What a VisionTransformer's head reads from the last block's tokens: whether a class
# token is prepended to the patches, and the readout: that token's output or the tokens'
# mean.
VIT_POOLINGS: dict[str, tuple[bool, Callable[[jax.Array], jax.Array]]] = {
    "cls": (True, lambda tokens: tokens[:, 0]),
    "mean": (False, lambda tokens: tokens.mean(axis=1)),
}


class VisionTransformer(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021) for 28×28×1 images
    (``vit_mnist``).

    Patch embedding: ``nn.Conv`` ``patch_size``×``patch_size``, stride ``patch_size``,
    1→``width`` (7: a 4×4 grid of 16 patches); with ``pooling='cls'`` a learned class token
    is prepended; learned position embeddings (normal, std 0.02) added, then dropout;
    ``depth`` pre-LN :class:`EncoderBlock` s (``num_heads`` heads of ``width / num_heads``,
    MLP hidden ``mlp_ratio · width``, gelu); a final LayerNorm of the class token
    (``'cls'``) or of the mean over the tokens (``'mean'``, no class token); a Dense head
    ``width``→``num_classes``.

    Defaults: patch 7, depth 3, width 64, 4 heads, MLP ratio 2, dropout 0.1: 105,546
    parameters for 10 classes (patch conv 3,200; class token 64; positions 17·64 = 1,088;
    per block 33,472 = two LayerNorms 256 + q, k, v, out 4·(64·64 + 64) + MLP
    64·128 + 128 + 128·64 + 64; final LayerNorm 128; head 650; with mean pooling 128
    fewer: no class token and 16 positions), about 2 M multiply-adds per image in the
    forward pass. The sizes are this project's choice, not a reproduction
    of Nakajima et al. 2022's "ViT-3", whose sizes were not found.
    """

    num_classes: int = 10
    patch_size: int = 7
    width: int = 64
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout_rate: float = 0.1
    kernel_init: Initializer = xavier_uniform
    pooling: str = "cls"  # one of VIT_POOLINGS

    def __post_init__(self):
        if self.pooling not in VIT_POOLINGS:
            raise ValueError(f"Unknown pooling {self.pooling!r}; choose one of "
                             f"{list(VIT_POOLINGS)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        class_token, readout = VIT_POOLINGS[self.pooling]
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=self.kernel_init, name="patch_embed")(x)
        x = x.reshape((x.shape[0], -1, self.width))
        if class_token:
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x],
                                axis=1)
        x = x + self.param("position_embedding", nn.initializers.normal(0.02),
                           (1, x.shape[1], self.width))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout_rate,
                             kernel_init=self.kernel_init, name=f"block{i}")(x, train)
        x = nn.LayerNorm(name="ln")(readout(x))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="head")(x)


class TransformerLM(nn.Module):
    """A small causal (GPT-style) Transformer language model (``transformer_lm``).

    Input: int32 tokens ``(batch, T)``; output: next-token logits
    ``(batch, T, num_classes)`` (``num_classes`` = the vocabulary: 256 for bytes). Token
    ``nn.Embed`` (``num_classes``→``width``) plus learned position embeddings (one per
    position up to ``max_length``; None: the length of the input the model is initialised
    with), dropout, ``depth`` pre-LN :class:`EncoderBlock` s with a causal mask
    (``nn.make_causal_mask``: position t attends to positions ≤ t only), a final LayerNorm,
    and the output projection: a Dense ``width``→``num_classes`` with bias, or with
    ``tie_embeddings`` the token embedding's transpose (``Embed.attend``, no bias).

    Defaults: depth 2, width 64, 4 heads, MLP ratio 4, dropout 0.1; with 256 tokens and
    T = 64, 2·49,984 (blocks) + 16,384 (tokens) + 4,096 (positions) + 128 (final LN)
    + 16,640 (untied head) = 137,216 parameters.
    """

    num_classes: int = 256
    max_length: Optional[int] = None
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout_rate: float = 0.1
    tie_embeddings: bool = False
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
        length = tokens.shape[1]
        max_length = self.max_length or length
        if length > max_length:
            raise ValueError(f"{length} tokens exceed max_length={max_length}.")
        embed = nn.Embed(self.num_classes, self.width,
                         embedding_init=nn.initializers.normal(0.02), name="token_embed")
        x = embed(tokens)
        positions = self.param("position_embedding", nn.initializers.normal(0.02),
                               (max_length, self.width))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + positions[:length])
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout_rate, causal=True,
                             kernel_init=self.kernel_init, name=f"block{i}")(x, train)
        x = nn.LayerNorm(name="ln")(x)
        if self.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="head")(x)


class DrtpConvNet(nn.Module):
    """Frenkel, Lefebvre & Bol 2021's MNIST network (ChFrenkel/DirectRandomTargetProjection,
    topology ``CONV_32_5_1_2_FC_1000_FC_10``) on 28×28×1 inputs: conv 5×5, 1→32, stride 1,
    padding 2 → tanh → max-pool 2×2 (28→14) → flatten (6272) → fc1 Dense 1000 → tanh →
    fc2 Dense ``num_classes`` (logits; the reference's sigmoid is the loss's)."""

    num_classes: int = 10
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(32, (5, 5), padding=2, kernel_init=self.kernel_init, name="conv1")(x)
        x = max_pool(jnp.tanh(x)).reshape((x.shape[0], -1))
        x = jnp.tanh(nn.Dense(1000, kernel_init=self.kernel_init, name="fc1")(x))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init, name="fc2")(x)


class PepitaMLP(nn.Module):
    """Dellaferrera & Kreiman 2022's MNIST network (GiorgiaD/PEPITA): flatten → Dense 1024
    without bias → ReLU → dropout 0.1 (the trainer's ``'dropout'`` stream) → Dense
    ``num_classes`` without bias (logits)."""

    num_classes: int = 10
    kernel_init: Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(1024, use_bias=False, kernel_init=self.kernel_init,
                             name="fc1")(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.num_classes, use_bias=False, kernel_init=self.kernel_init,
                        name="fc2")(x)


def rms_normalize(z: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``z / (√mean(z²) + eps)`` over the last axis: Forward-Forward's parameter-free
    normalisation between layers (loeweX/Forward-Forward's ``_layer_norm``)."""
    return z / (jnp.sqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True)) + eps)


@jax.custom_vjp
def relu_full_grad(x: jax.Array) -> jax.Array:
    """ReLU whose gradient passes unchanged (straight through), as loeweX's
    ``ReLU_full_grad``."""
    return jnp.maximum(x, 0)


relu_full_grad.defvjp(lambda x: (jnp.maximum(x, 0), None), lambda _, g: (g,))


class ForwardForwardNet(nn.Module):
    """Hinton 2022's Forward-Forward network as loeweX/Forward-Forward builds it: the input
    flattened and :func:`rms_normalize`-d, then per layer ``z_l = relu(W_l ẑ_{l−1} + b_l)``
    (:func:`relu_full_grad`) with ``ẑ_l = rms_normalize(stop_gradient(z_l))`` passed on,
    and a bias-free linear ``classifier`` (zeros at init) on the normalised activities of
    every layer but the first, through ``stop_gradient``. Returns ``(logits, (z_1, ...))``
    for :class:`bioflax.procedures.ForwardForward`, which embeds the label in the input."""

    widths: tuple[int, ...] = (1000, 1000, 1000)
    num_classes: int = 10
    kernel_init: Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True):
        z = rms_normalize(x.reshape((x.shape[0], -1)))
        activities = []
        for i, width in enumerate(self.widths):
            activity = relu_full_grad(nn.Dense(width, kernel_init=self.kernel_init,
                                               name=f"layer{i}")(z))
            activities.append(activity)
            z = rms_normalize(jax.lax.stop_gradient(activity))
        features = jnp.concatenate([rms_normalize(jax.lax.stop_gradient(a))
                                    for a in activities[1:]], axis=-1)
        logits = nn.Dense(self.num_classes, use_bias=False, kernel_init=nn.initializers.zeros,
                          name="classifier")(features)
        return logits, tuple(activities)


# The zoo's models that take token sequences (int32 (N, T)) and predict the next token.
LANGUAGE_MODELS = ("transformer_lm",)

ZOO: dict[str, Callable[..., nn.Module]] = {
    "vit_mnist": VisionTransformer,
    "transformer_lm": TransformerLM,
    "lenet5": LeNet5,
    "drtp_conv": DrtpConvNet,
    "pepita_mlp": PepitaMLP,
    "forward_forward": ForwardForwardNet,
    "lenet_cifar": LeNetCIFAR,
    **{f"resnet{depth}": functools.partial(CifarResNet, depth=depth)
       for depth in (20, 32, 44, 56, 110)},
}


def get_model(name: str, **kwargs) -> nn.Module:
    """The model registered as ``name``; ``kwargs`` (``num_classes``, ``kernel_init``, for
    :class:`TransformerLM` ``tie_embeddings``, for :class:`VisionTransformer` ``pooling``)
    are its fields."""
    try:
        builder = ZOO[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(ZOO)}.") from None
    return builder(**kwargs)
