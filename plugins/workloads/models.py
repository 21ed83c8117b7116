"""The seeds' models as factories: sam_edge's MLP and CNN, LeNet, CIFAR ResNets, a char Transformer."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from lscape.errors import UsageError
from lscape.options import Option

__all__ = [
    "sam_mlp",
    "cnn",
    "lenet",
    "resnet",
    "resnet14",
    "resnet20",
    "resnet56",
    "char_transformer",
    "CifarResNet",
    "CharTransformer",
]

#: Used when the data does not say: MNIST images and ten classes.
DEFAULT_INPUT_SHAPE = (1, 28, 28)
DEFAULT_NUM_CLASSES = 10


def sam_mlp(
    depth: Any = 4,
    width: Any = 1000,
    activation: Any = "relu",
    num_classes: Any = DEFAULT_NUM_CLASSES,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """sam_edge's MLP: ``depth`` linear layers (so ``depth - 1`` hidden layers of ``width``).

    The input is flattened; ``activation`` is ``relu`` (sam_edge) or ``tanh`` (the
    edge-of-stability toy runs). Weights are glorot-normal as Flax draws them (a normal
    truncated at two standard deviations, rescaled to the Glorot variance), biases zero.
    Source: google-deepmind/sam_edge, ``image_classification.py`` (``MLP``).
    """
    depth = _opt("sam-mlp", "depth", int, depth, minimum=2)
    width = _opt("sam-mlp", "width", int, width, minimum=1)
    act = _opt("sam-mlp", "activation", str, activation, choices=("relu", "tanh"))
    num_classes = _opt("sam-mlp", "num_classes", int, num_classes, minimum=1)
    features = math.prod(_shape(input_shape))
    sizes = [features] + [width] * (depth - 1) + [num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out)
        glorot_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(nn.ReLU() if act == "relu" else nn.Tanh())
    return nn.Sequential(*layers)


def cnn(
    blocks: Any = 2,
    layers_per_block: Any = 1,
    feature_multiplier: Any = 16,
    layernorm: Any = True,
    num_classes: Any = DEFAULT_NUM_CLASSES,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """sam_edge's CNN: ``blocks`` blocks of ``layers_per_block`` × [conv 3×3 with
    2^i·``feature_multiplier`` channels (i the block index), ReLU, LayerNorm], each block
    ending in 2×2 max-pooling; then a linear head.

    The LayerNorm normalises over the channels at each pixel (Flax's ``LayerNorm`` on NHWC,
    eps 1e-6, with a scale and offset per channel); ``layernorm=false`` drops it. Convs use
    "same" padding, glorot-normal kernels and zero biases, as in the source.
    Source: google-deepmind/sam_edge, ``image_classification.py`` (``CNN``).
    """
    blocks = _opt("cnn", "blocks", int, blocks, minimum=1)
    per_block = _opt("cnn", "layers_per_block", int, layers_per_block, minimum=1)
    mult = _opt("cnn", "feature_multiplier", int, feature_multiplier, minimum=1)
    use_ln = _opt("cnn", "layernorm", bool, layernorm)
    num_classes = _opt("cnn", "num_classes", int, num_classes, minimum=1)
    channels, height, width = _image_shape("cnn", input_shape)
    layers: list[nn.Module] = []
    for i in range(blocks):
        out = 2**i * mult
        for _ in range(per_block):
            conv = nn.Conv2d(channels, out, kernel_size=3, padding=1)
            glorot_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            if use_ln:
                layers.append(ChannelLayerNorm(out, eps=1e-6))
            channels = out
        layers.append(nn.MaxPool2d(2, 2))
        height, width = height // 2, width // 2
    if height < 1 or width < 1:
        raise UsageError(f"cnn: {blocks} blocks of 2×2 pooling shrink a {input_shape} input to nothing; use fewer blocks")
    head = nn.Linear(channels * height * width, num_classes)
    glorot_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, nn.Flatten(), head)


def lenet(
    dropout: Any = 0.5,
    batchnorm: Any = True,
    num_classes: Any = DEFAULT_NUM_CLASSES,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """entropy-sgd's ``mnistconv`` LeNet: conv5×5(20)–BN–ReLU–maxpool 3–dropout,
    conv5×5(50)–BN–ReLU–maxpool 2–dropout, linear(500)–BN–ReLU–dropout, linear(classes).

    132,220 parameters on 28×28 MNIST. ``dropout`` is the probability of every dropout layer
    (0.5 in the source; 0 makes the loss deterministic in train mode); ``batchnorm=false``
    drops the BatchNorm layers. PyTorch's default initialisation, as in the source.
    Source: ucla-vision/entropy-sgd, ``python/models.py`` (``mnistconv``).
    """
    p = _opt("lenet", "dropout", float, dropout, minimum=0.0)
    use_bn = _opt("lenet", "batchnorm", bool, batchnorm)
    num_classes = _opt("lenet", "num_classes", int, num_classes, minimum=1)
    channels, height, width = _image_shape("lenet", input_shape)

    def stage(ci: int, co: int, pool: int) -> list[nn.Module]:
        return [nn.Conv2d(ci, co, 5), *([nn.BatchNorm2d(co)] if use_bn else []), nn.ReLU(),
                nn.MaxPool2d(pool, stride=pool), nn.Dropout(p)]

    features = nn.Sequential(*stage(channels, 20, 3), *stage(20, 50, 2), nn.Flatten())
    with torch.no_grad():
        flat = features(torch.zeros(2, channels, height, width)).shape[1]
    return nn.Sequential(
        *features,
        nn.Linear(flat, 500),
        *([nn.BatchNorm1d(500)] if use_bn else []),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(500, num_classes),
    )


def resnet(
    depth: Any = 20,
    shortcut: Any = "conv",
    batchnorm: Any = True,
    width: Any = 1,
    num_classes: Any = DEFAULT_NUM_CLASSES,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """A CIFAR ResNet (He et al. 2016, §4.2): a 3×3 conv with 16 channels, three stages of
    n = (depth − 2)/6 basic blocks with 16/32/64 channels (×``width``; stride 2 at the start
    of stages 2 and 3), global average pooling and a linear head; 6n + 2 weighted layers.

    ``shortcut``: ``conv`` a 1×1 conv + BatchNorm projection where the shape changes (as in
    the anomalous-diffusion seed and the loss-landscape code it builds on), ``pad`` the
    paper's parameter-free option A (stride-2 subsampling, zero-padded channels), ``none``
    no skip connections (the seed's ``_noshort`` variants). ``batchnorm=false`` drops the
    BatchNorm layers of the residual branches (the seed's ``_nobatchnorm``). PyTorch's
    default initialisation, as in the seed.
    Source: ifgovh/Anomalous-diffusion-dynamics-of-SGD, ``train_DNN_code/models/resnet.py``.
    """
    depth = _opt("resnet", "depth", int, depth, minimum=8)
    if (depth - 2) % 6:
        raise UsageError(f"resnet: depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), not {depth}")
    kind = _opt("resnet", "shortcut", str, shortcut, choices=("conv", "pad", "none"))
    use_bn = _opt("resnet", "batchnorm", bool, batchnorm)
    width = _opt("resnet", "width", int, width, minimum=1)
    num_classes = _opt("resnet", "num_classes", int, num_classes, minimum=1)
    channels, _, _ = _image_shape("resnet", input_shape, default=(3, 32, 32))
    return CifarResNet((depth - 2) // 6, kind, use_bn, width, num_classes, channels)


def resnet14(shortcut: Any = "conv", batchnorm: Any = True, width: Any = 1,
             num_classes: Any = DEFAULT_NUM_CLASSES, input_shape: Sequence[int] | None = None) -> nn.Module:
    """ResNet-14 for CIFAR (n = 2; 16/32/64 channels); options as ``resnet``."""
    return resnet(14, shortcut, batchnorm, width, num_classes, input_shape)


def resnet20(shortcut: Any = "conv", batchnorm: Any = True, width: Any = 1,
             num_classes: Any = DEFAULT_NUM_CLASSES, input_shape: Sequence[int] | None = None) -> nn.Module:
    """ResNet-20 for CIFAR (n = 3; about 0.27M parameters); options as ``resnet``."""
    return resnet(20, shortcut, batchnorm, width, num_classes, input_shape)


def resnet56(shortcut: Any = "conv", batchnorm: Any = True, width: Any = 1,
             num_classes: Any = DEFAULT_NUM_CLASSES, input_shape: Sequence[int] | None = None) -> nn.Module:
    """ResNet-56 for CIFAR (n = 9; about 0.85M parameters); options as ``resnet``."""
    return resnet(56, shortcut, batchnorm, width, num_classes, input_shape)


def char_transformer(
    layers: Any = 6,
    heads: Any = 8,
    key_size: Any = 32,
    d_model: Any = 128,
    seq_len: Any = None,
    mlp_ratio: Any = 4,
    num_classes: Any = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """sam_edge's character-level Transformer LM: learned token and position embeddings,
    ``layers`` pre-LayerNorm blocks of causal multi-head attention (``heads`` heads of
    ``key_size``) and a GELU MLP (``mlp_ratio`` × ``d_model``), a final LayerNorm and an
    untied linear read-out. Input (B, T) integer tokens, output (B, T, V) logits.

    ``seq_len`` (default: the data's sequence length, else 64) sizes the position table;
    the vocabulary is the data's ``num_classes`` (128 byte tokens for ``text``).
    Initialisation as Haiku's: embeddings truncated-normal(0.02), attention and MLP
    weights variance-scaling(2/layers, fan-in, truncated), read-out 1/√fan-in.
    Source: google-deepmind/sam_edge, ``transformer_model.py`` (from Haiku's example).
    """
    layers = _opt("char-transformer", "layers", int, layers, minimum=1)
    heads = _opt("char-transformer", "heads", int, heads, minimum=1)
    key_size = _opt("char-transformer", "key_size", int, key_size, minimum=1)
    d_model = _opt("char-transformer", "d_model", int, d_model, minimum=1)
    mlp_ratio = _opt("char-transformer", "mlp_ratio", int, mlp_ratio, minimum=1)
    vocab = _opt("char-transformer", "num_classes", int, 128 if num_classes is None else num_classes, minimum=2)
    data_len = int(input_shape[0]) if input_shape else None
    if seq_len is None:
        seq_len = data_len or 64
    seq_len = _opt("char-transformer", "seq_len", int, seq_len, minimum=1)
    if data_len is not None and data_len > seq_len:
        raise UsageError(
            f"char-transformer: seq_len={seq_len} is shorter than the data's sequences ({data_len}); "
            f"raise seq_len or lower the data's seq_len"
        )
    return CharTransformer(vocab, seq_len, layers, heads, key_size, d_model, mlp_ratio)


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of (B, C, H, W) images, at every pixel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, batchnorm: bool):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(cout)
        # One ReLU module, applied twice, as in the seeds' blocks: `smoothout.relu_noise`
        # (and forward hooks) reach modules, not functional calls. No state: same state_dict.
        self.relu = nn.ReLU()
        self.kind = shortcut
        self.shortcut: nn.Module = nn.Identity()
        self.pad = cout - cin
        self.stride = stride
        if shortcut == "conv" and (stride != 1 or cin != cout):
            # The seed keeps BatchNorm on the projection even in its no-BN variant.
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.kind == "conv":
            out = out + self.shortcut(x)
        elif self.kind == "pad":
            skip = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
            if self.pad:
                skip = nn.functional.pad(skip, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            out = out + skip
        return self.relu(out)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet with ``n`` basic blocks per stage (see ``resnet``)."""

    def __init__(self, n: int, shortcut: str = "conv", batchnorm: bool = True, width: int = 1,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, shortcut, batchnorm))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # Global average pooling: the seed's avg_pool2d(8) on 32×32 inputs, any size here.
        return self.linear(out.mean(dim=(2, 3)))


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, key_size: int, init_scale: float):
        super().__init__()
        self.heads, self.key_size = heads, key_size
        inner = heads * key_size
        self.query = _linear(d_model, inner, init_scale)
        self.key = _linear(d_model, inner, init_scale)
        self.value = _linear(d_model, inner, init_scale)
        self.out = _linear(inner, d_model, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        split = lambda z: z.view(b, t, self.heads, self.key_size).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # Written out rather than scaled_dot_product_attention: Hessian-vector products
        # need double backward, which every op here supports on every backend.
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.key_size)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(b, t, self.heads * self.key_size))


class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int, key_size: int, mlp_ratio: int, init_scale: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=1e-5)
        self.attn = _CausalSelfAttention(d_model, heads, key_size, init_scale)
        self.ln2 = nn.LayerNorm(d_model, eps=1e-5)
        # Haiku's jax.nn.gelu defaults to the tanh approximation.
        self.mlp = nn.Sequential(
            _linear(d_model, mlp_ratio * d_model, init_scale),
            nn.GELU(approximate="tanh"),
            _linear(mlp_ratio * d_model, d_model, init_scale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A causal pre-LayerNorm Transformer language model (see ``char_transformer``)."""

    def __init__(self, vocab: int = 128, seq_len: int = 64, layers: int = 6, heads: int = 8,
                 key_size: int = 32, d_model: int = 128, mlp_ratio: int = 4):
        super().__init__()
        self.vocab, self.seq_len = vocab, seq_len
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.position_embedding = nn.Parameter(torch.empty(seq_len, d_model))
        _truncated_normal_(self.token_embedding.weight, 0.02)
        _truncated_normal_(self.position_embedding, 0.02)
        self.blocks = nn.ModuleList(_Block(d_model, heads, key_size, mlp_ratio, 2.0 / layers) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        self.readout = _linear(d_model, vocab, 1.0, correct=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of length {t} is longer than the model's seq_len {self.seq_len}")
        h = self.token_embedding(tokens.long()) + self.position_embedding[:t]
        for block in self.blocks:
            h = block(h)
        return self.readout(self.ln_f(h))


# ---------------------------------------------------------------------------------------
# Initialisation and option helpers
# ---------------------------------------------------------------------------------------

# Standard deviation of a unit normal truncated to [-2, 2]; JAX divides by it so that the
# truncated draw has the intended variance.
_TRUNC_STD = 0.87962566103423978


def glorot_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax/JAX ``glorot_normal``: variance 2/(fan_in + fan_out), truncated at ±2σ."""
    fan_in, fan_out = _fans(weight)
    return _truncated_normal_(weight, math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC_STD)


def _truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _linear(fan_in: int, fan_out: int, scale: float, correct: bool = True) -> nn.Linear:
    # Haiku's VarianceScaling(scale, fan_in, truncated) divides by the truncation std;
    # its default Linear init, TruncatedNormal(1/sqrt(fan_in)), does not.
    layer = nn.Linear(fan_in, fan_out)
    std = math.sqrt(scale / fan_in) / (_TRUNC_STD if correct else 1.0)
    _truncated_normal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _shape(input_shape: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(int(s) for s in input_shape) if input_shape else DEFAULT_INPUT_SHAPE


def _image_shape(model: str, input_shape: Sequence[int] | None, default=DEFAULT_INPUT_SHAPE) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape) if input_shape else default
    if len(shape) == 2:  # (H, W) grey images
        shape = (1,) + shape
    if len(shape) != 3:
        raise UsageError(f"{model} needs (channels, height, width) images, but the data has shape {shape}")
    return shape  # type: ignore[return-value]


def _opt(model: str, name: str, kind: type, value: Any, choices=None, minimum=None) -> Any:
    # One parser for every option, the core's, so that text from --model-opt and TOML
    # values are accepted and rejected the same way everywhere.
    return Option(name, kind, choices=choices, minimum=minimum).parse(value, model)
