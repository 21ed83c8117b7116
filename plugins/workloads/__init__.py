"""Workloads: every built-in model, data set, loss and base optimizer (see docs/workloads.md).

The default experiment's pieces (`mlp`, `synthetic`, `digits`, `ce`, `mse`, `sgd`, `adam`, `adamw`)
live in `defaults`, the seeds' models in `models`/`resnet_imagenet`, their data sets in
`datasets`/`images`, file formats and HuggingFace data sets in `formats`; this module is the one
plugin that registers them all."""

from __future__ import annotations

from lscape import hookimpl

from . import datasets, defaults, images, models, resnet_imagenet
from .formats import from_hf

__all__ = ["MODELS", "DATASETS", "LOSSES", "OPTIMIZERS", "from_hf"]

#: name -> (factory, help); the names users give to --model.
MODELS = {
    "mlp": (defaults.mlp, "fully connected network: widths=64,64 activation=relu bias=true"),
    "sam-mlp": (models.sam_mlp, "sam_edge's MLP: depth, width, activation=relu|tanh; glorot-normal, zero bias"),
    "cnn": (models.cnn, "sam_edge's CNN: blocks, layers_per_block, feature_multiplier, layernorm"),
    "lenet": (models.lenet, "entropy-sgd's mnistconv LeNet: dropout, batchnorm"),
    "resnet14": (models.resnet14, "CIFAR ResNet-14 (16/32/64 channels): shortcut=conv|pad|none, batchnorm, width"),
    "resnet20": (models.resnet20, "CIFAR ResNet-20 (16/32/64 channels): shortcut=conv|pad|none, batchnorm, width"),
    "resnet56": (models.resnet56, "CIFAR ResNet-56 (16/32/64 channels): shortcut=conv|pad|none, batchnorm, width"),
    "resnet": (models.resnet, "CIFAR ResNet of any depth 6n+2: depth, shortcut, batchnorm, width"),
    "char-transformer": (models.char_transformer,
                         "sam_edge's causal character Transformer: layers, heads, key_size, d_model, seq_len, mlp_ratio"),
    **{f"resnet{d}": (getattr(resnet_imagenet, f"resnet{d}"), f"torchvision's ImageNet ResNet-{d} (in-place ReLUs): "
                      "channels (64), zero_init_residual") for d in (18, 34, 50, 101)},
}

#: name -> (factory, help); the names users give to --data.
DATASETS = {
    "synthetic": (defaults.synthetic, "seeded teacher data: task=classification|regression n dim classes noise"),
    "digits": (defaults.digits, "1,797 real 8x8 handwritten digits (UCI), shipped; flat=true"),
    "mnist": (datasets.mnist, "MNIST IDX files in root=DIR (raw or .gz): subset, eval_subset, normalize"),
    "fashion-mnist": (datasets.fashion_mnist, "Fashion-MNIST IDX files in root=DIR: subset, eval_subset, normalize"),
    "cifar10": (datasets.cifar10, "CIFAR-10 python batches in root=DIR: subset, eval_subset, normalize"),
    "cifar100": (datasets.cifar100, "CIFAR-100 python files in root=DIR: labels=fine|coarse, subset, normalize"),
    "imagefolder": (images.imagefolder, "an ImageFolder of JPEGs (root/CLASS or root/train+val) read with Pillow: "
                    "root, size, augment=imagenet|cifar|none, mean, std, subset"),
    "text": (datasets.text, "a text file as a byte-level LM corpus: path, seq_len, stride, train_fraction, subset"),
}


@hookimpl
def register_models(register):
    """Register the seeds' model factories."""
    for name, (factory, help) in MODELS.items():
        register(name, factory, help=help)


@hookimpl
def register_datasets(register):
    """Register the seeds' data set factories."""
    for name, (factory, help) in DATASETS.items():
        register(name, factory, help=help)


#: name -> (function, help); the names users give to --loss.
LOSSES = {
    "ce": (defaults.cross_entropy, "cross-entropy (class targets; sequence outputs flattened)"),
    "mse": (defaults.mse, "mean squared error (integer targets one-hot encoded)"),
}

#: name -> (factory, help); the names users give to --optimizer.
OPTIMIZERS = {
    "sgd": (defaults.sgd, "SGD with momentum, nesterov and weight decay"),
    "adam": (defaults.adam, "Adam"),
    "adamw": (defaults.adamw, "AdamW (decoupled weight decay)"),
}


@hookimpl
def register_losses(register):
    """Register the built-in losses."""
    for name, (fn, help) in LOSSES.items():
        register(name, fn, help)


@hookimpl
def register_optimizers(register):
    """Register the built-in base optimizers."""
    for name, (factory, help) in OPTIMIZERS.items():
        register(name, factory, help)
