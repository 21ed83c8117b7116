"""The seeds' data sets from files on disk: MNIST, Fashion-MNIST, CIFAR-10/100 and a text corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lscape.errors import UsageError
from lscape.options import Option

from .formats import find_file, read_bytes, read_cifar_batch, read_idx

__all__ = ["ArrayDataset", "mnist", "fashion_mnist", "cifar10", "cifar100", "text", "NORMALIZE_CHOICES"]

#: Image normalisations; see ``mnist``.
NORMALIZE_CHOICES = ("standardize", "center", "scale", "none")

#: Byte tokens below this value; larger bytes are clamped to VOCAB - 1.
VOCAB = 128


class ArrayDataset(TensorDataset):
    """In-memory samples ``(inputs[i], targets[i])`` with what a model factory needs to know.

    ``num_classes`` and ``input_shape`` (the shape of one input) are passed by the engine
    to model factories that accept them.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int):
        super().__init__(inputs, targets)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(inputs.shape[1:])

    @property
    def inputs(self) -> torch.Tensor:
        """All inputs, (N, *input_shape)."""
        return self.tensors[0]

    @property
    def targets(self) -> torch.Tensor:
        """All targets as an int64 tensor, (N,) or (N, T)."""
        return self.tensors[1]


def mnist(root: Any = None, subset: Any = None, eval_subset: Any = None, normalize: Any = "standardize") -> dict:
    """MNIST from the four IDX files in ``root`` (raw or gzipped, LeCun's file names:
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``; ``root/raw`` and torchvision's ``root/MNIST/raw`` are
    searched too). Images (1, 28, 28) float32, labels int64, 10 classes.

    ``subset=N`` keeps the first N training images (sam_edge's mini training set),
    ``eval_subset=N`` the first N test images. ``normalize``, always with statistics of
    the training images kept:

    - ``standardize`` (default): (x/255 − mean)/std per channel (0.1307/0.3081 on MNIST);
    - ``center``: x/256 minus the per-pixel mean image (sam_edge's preprocessing);
    - ``scale``: x/255 in [0, 1];
    - ``none``: raw 0–255 values as floats (entropy-sgd's Python loader).
    """
    return _idx_dataset("mnist", ("MNIST",), root, subset, eval_subset, normalize)


def fashion_mnist(root: Any = None, subset: Any = None, eval_subset: Any = None, normalize: Any = "standardize") -> dict:
    """Fashion-MNIST from its four IDX files in ``root`` (same names and format as MNIST;
    torchvision's ``root/FashionMNIST/raw`` is searched too). Options as ``mnist``."""
    return _idx_dataset("fashion-mnist", ("FashionMNIST", "fashion-mnist", "fashion"), root, subset, eval_subset, normalize)


def cifar10(root: Any = None, subset: Any = None, eval_subset: Any = None, normalize: Any = "standardize") -> dict:
    """CIFAR-10 from the python-pickle batches in ``root`` (``data_batch_1`` … ``data_batch_5``
    and ``test_batch``, as unpacked from ``cifar-10-python.tar.gz``; ``root/cifar-10-batches-py``
    is searched too). Images (3, 32, 32) float32, labels int64, 10 classes.

    ``subset``, ``eval_subset`` and ``normalize`` as ``mnist`` (``standardize`` is per
    channel, the usual CIFAR normalisation). No augmentation.
    """
    dirs = _dirs("cifar10", root, ("cifar-10-batches-py",))
    train_files = [find_file(dirs, [f"data_batch_{i}"]) for i in range(1, 6)]
    test_file = find_file(dirs, ["test_batch"])
    if not all(train_files) or test_file is None:
        raise UsageError(
            f"cifar10: no CIFAR-10 python batches in {_show(dirs)}; expected data_batch_1 … data_batch_5 and "
            f"test_batch (from cifar-10-python.tar.gz): set root=DIR"
        )
    train = [read_cifar_batch(p) for p in train_files]
    test = read_cifar_batch(test_file)
    x_train = np.concatenate([_cifar_images(b, p) for b, p in zip(train, train_files)])
    y_train = np.concatenate([_cifar_labels(b, b"labels", p) for b, p in zip(train, train_files)])
    return _image_splits("cifar10", x_train, y_train, _cifar_images(test, test_file),
                         _cifar_labels(test, b"labels", test_file), 10, subset, eval_subset, normalize)


def cifar100(root: Any = None, subset: Any = None, eval_subset: Any = None, normalize: Any = "standardize",
             labels: Any = "fine") -> dict:
    """CIFAR-100 from the python-pickle files ``train`` and ``test`` in ``root`` (as unpacked
    from ``cifar-100-python.tar.gz``; ``root/cifar-100-python`` is searched too).

    ``labels=fine`` (default, 100 classes) or ``coarse`` (the 20 superclasses). Other
    options as ``cifar10``.
    """
    kind = Option("labels", str, choices=("fine", "coarse")).parse(labels, "cifar100")
    dirs = _dirs("cifar100", root, ("cifar-100-python",))
    train_file, test_file = find_file(dirs, ["train"]), find_file(dirs, ["test"])
    if train_file is None or test_file is None:
        raise UsageError(
            f"cifar100: no CIFAR-100 python files in {_show(dirs)}; expected 'train' and 'test' "
            f"(from cifar-100-python.tar.gz): set root=DIR"
        )
    key = b"fine_labels" if kind == "fine" else b"coarse_labels"
    train, test = read_cifar_batch(train_file), read_cifar_batch(test_file)
    return _image_splits("cifar100", _cifar_images(train, train_file), _cifar_labels(train, key, train_file),
                         _cifar_images(test, test_file), _cifar_labels(test, key, test_file),
                         100 if kind == "fine" else 20, subset, eval_subset, normalize)


def text(path: Any = None, seq_len: Any = 64, stride: Any = None, train_fraction: Any = 0.9,
         subset: Any = None, eval_subset: Any = None) -> dict:
    """A text file as a character-level language-modelling corpus (sam_edge's transformer).

    Bytes are the tokens (vocabulary 128; bytes ≥ 128, i.e. non-ASCII UTF-8, are clamped
    to 127 — sam_edge rejects such files instead). The first ``train_fraction`` (0.9) of
    the bytes is the training split and the rest the test split, as sam_edge's
    tiny-shakespeare train/test files. A sample is ``(x[t:t+T], x[t+1:t+T+1])``, T =
    ``seq_len``, for t = 0, ``stride``, 2·``stride``, … within a split; the default stride
    T + 1 cuts the split into sam_edge's non-overlapping crops of T + 1 bytes, ``stride=1``
    gives every window. Inputs and targets are int64 (N, T); ``num_classes`` is 128 and
    ``input_shape`` (T,). ``subset``/``eval_subset`` keep the first N samples.
    """
    if path is None:
        raise UsageError("text: no corpus given; set path=FILE (a plain text file, e.g. tiny-shakespeare)")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise UsageError(f"text: corpus file {file} does not exist; set path=FILE to a plain text file")
    seq_len = Option("seq_len", int, minimum=1).parse(seq_len, "text")
    stride = seq_len + 1 if stride is None else Option("stride", int, minimum=1).parse(stride, "text")
    fraction = Option("train_fraction", float).parse(train_fraction, "text")
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"text: train_fraction must lie strictly between 0 and 1, not {fraction}")
    tokens = np.minimum(np.frombuffer(read_bytes(file), np.uint8), VOCAB - 1).astype(np.int64)
    cut = int(len(tokens) * fraction)
    splits = {}
    for split, part, n in (("train", tokens[:cut], subset), ("eval", tokens[cut:], eval_subset)):
        if len(part) < seq_len + 1:
            raise UsageError(
                f"text: the {split} split of {file} has {len(part)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                f"use a longer file or a shorter seq_len"
            )
        part = torch.from_numpy(part)
        # unfold gives views into one token buffer, so stride=1 costs no extra memory.
        x = part[:-1].unfold(0, seq_len, stride)
        y = part[1:].unfold(0, seq_len, stride)
        keep = _count("text", "subset" if split == "train" else "eval_subset", n, len(x))
        splits[split] = ArrayDataset(x[:keep], y[:keep], VOCAB)
    return splits


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

_IDX_NAMES = {
    # LeCun's names, and the ".idx3-ubyte" spelling of some redistributions.
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _idx_dataset(name: str, subdirs: tuple[str, ...], root: Any, subset: Any, eval_subset: Any, normalize: Any) -> dict:
    dirs = _dirs(name, root, ("raw",) + tuple(f"{s}/raw" for s in subdirs) + subdirs)
    files = {key: find_file(dirs, names) for key, names in _IDX_NAMES.items()}
    missing = [names[0] for key, names in _IDX_NAMES.items() if files[key] is None]
    if missing:
        raise UsageError(
            f"{name}: missing IDX file(s) {', '.join(missing)} (raw or .gz) in {_show(dirs)}; "
            f"set root=DIR to the folder holding the four IDX files"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UsageError(
                f"{name}: {files[f'{split}_images']} {images.shape} and {files[f'{split}_labels']} {labels.shape} "
                f"are not N images with N labels"
            )
    return _image_splits(name, arrays["train_images"][:, None], arrays["train_labels"],
                         arrays["test_images"][:, None], arrays["test_labels"], 10, subset, eval_subset, normalize)


def _image_splits(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  num_classes: int, subset: Any, eval_subset: Any, normalize: Any) -> dict:
    how = Option("normalize", str, choices=NORMALIZE_CHOICES).parse(normalize, name)
    n_train = _count(name, "subset", subset, len(x_train))
    n_test = _count(name, "eval_subset", eval_subset, len(x_test))
    train = torch.from_numpy(np.ascontiguousarray(x_train[:n_train])).float()
    test = torch.from_numpy(np.ascontiguousarray(x_test[:n_test])).float()
    # Statistics come from the training images kept, so a subset is normalised by its own
    # mean, as sam_edge centres its mini training set.
    if how == "standardize":
        train, test = train / 255.0, test / 255.0
        mean = train.mean(dim=(0, 2, 3), keepdim=True)
        std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        train, test = (train - mean) / std, (test - mean) / std
    elif how == "center":
        train, test = train / 256.0, test / 256.0
        mean = train.mean(dim=0, keepdim=True)
        train, test = train - mean, test - mean
    elif how == "scale":
        train, test = train / 255.0, test / 255.0
    labels = lambda y, n: torch.from_numpy(np.asarray(y[:n], dtype=np.int64))  # noqa: E731
    return {"train": ArrayDataset(train, labels(y_train, n_train), num_classes),
            "eval": ArrayDataset(test, labels(y_test, n_test), num_classes)}


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: b'data' has shape {data.shape}, expected (N, 3072) for 3×32×32 images")
    return data.reshape(-1, 3, 32, 32)


def _cifar_labels(batch: dict, key: bytes, path: Path) -> np.ndarray:
    if key not in batch:
        raise UsageError(f"{path}: no {key!r} entry in this CIFAR batch")
    labels = np.asarray(batch[key], dtype=np.int64)
    if len(labels) != len(batch[b"data"]):
        raise UsageError(f"{path}: {len(labels)} labels for {len(batch[b'data'])} images")
    return labels


def _dirs(name: str, root: Any, subdirs: tuple[str, ...]) -> list[Path]:
    if root is None:
        raise UsageError(f"{name}: no data directory given; set root=DIR (lscape never downloads data)")
    base = Path(str(root)).expanduser()
    if not base.is_dir():
        raise UsageError(f"{name}: data directory {base} does not exist; set root=DIR to the folder holding the files")
    return [base] + [base / s for s in subdirs]


def _show(dirs: list[Path]) -> str:
    return f"{dirs[0]} (and its {', '.join(str(d.relative_to(dirs[0])) for d in dirs[1:])} folders)" if len(dirs) > 1 else str(dirs[0])


def _count(name: str, option: str, value: Any, available: int) -> int:
    if value is None:
        return available
    n = Option(option, int, minimum=1).parse(value, name)
    return min(n, available)
