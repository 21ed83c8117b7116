"""Built-in plugin that registers the seeds' models and data sets (see docs/workloads.md)."""

from __future__ import annotations

from lscape import hookimpl

from . import datasets, images, models, resnet_imagenet

#: name -> (factory, help); the names users give to --model.
MODELS = {
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
