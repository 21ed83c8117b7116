"""Image folders of JPEGs (torchvision's ImageFolder layout) read with Pillow, with
torchvision's reference augmentations, and a generator of small such folders.

No torchvision: its wheel does not load beside every torch build. The transforms below
are written after ``torchvision.transforms`` (``RandomResizedCrop``, ``RandomCrop`` with
padding, ``RandomHorizontalFlip``, ``Resize``, ``CenterCrop``, ``ToTensor``,
``Normalize``) and draw their randomness from torch's global RNG only, which lscape's
loader seeds per sample (``lscape.data``), so the same sample of the same epoch gets the
same crop in any worker process and on resume.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lscape.errors import UsageError
from lscape.options import Option

__all__ = ["ImageFolder", "imagefolder", "make_image_folder", "IMG_EXTENSIONS", "AUGMENTS",
           "IMAGENET_MEAN", "IMAGENET_STD"]

#: file endings read as images (torchvision's IMG_EXTENSIONS)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: training augmentations: imagenet (RandomResizedCrop + flip), cifar (pad-4 crop + flip), none
AUGMENTS = ("imagenet", "cifar", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: split folder names: training, then the held-out split (the first one present)
TRAIN_SPLIT = "train"
EVAL_SPLITS = ("val", "validation", "test")


def _image_module():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is in the images extra
        raise UsageError("imagefolder needs Pillow: pip install 'lscape[images]' (or pip install pillow)") from e
    return Image


# ---------------------------------------------------------------------------------------
# Transforms (torchvision's, on PIL images, randomness from torch's global RNG)
# ---------------------------------------------------------------------------------------


def resize_shorter(img: Any, size: int) -> Any:
    """``transforms.Resize(size)``: the shorter side becomes ``size``, aspect kept (bilinear)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _image_module().BILINEAR)


def center_crop(img: Any, size: int) -> Any:
    """``transforms.CenterCrop(size)`` (zero padding where the image is smaller)."""
    w, h = img.size
    if w < size or h < size:
        img = pad(img, max(0, (size - w + 1) // 2), max(0, (size - h + 1) // 2))
        w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pad(img: Any, px: int, py: int | None = None) -> Any:
    """Zero (black) padding of ``px`` pixels left/right and ``py`` top/bottom."""
    py = px if py is None else py
    if px == 0 and py == 0:
        return img
    Image = _image_module()
    w, h = img.size
    out = Image.new(img.mode, (w + 2 * px, h + 2 * py))
    out.paste(img, (px, py))
    return out


def random_resized_crop(img: Any, size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> Any:
    """``transforms.RandomResizedCrop(size)``: a crop of random area (``scale`` of the image)
    and aspect ratio (log-uniform in ``ratio``), ten tries then the central crop, resized
    to ``size``×``size`` (bilinear)."""
    width, height = img.size
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    box = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,)).item())
            j = int(torch.randint(0, width - w + 1, size=(1,)).item())
            box = (i, j, h, w)
            break
    if box is None:  # fallback: the central crop of the closest allowed ratio
        in_ratio = float(width) / float(height)
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    i, j, h, w = box
    return img.crop((j, i, j + w, i + h)).resize((size, size), _image_module().BILINEAR)


def random_crop(img: Any, size: int, padding: int = 4) -> Any:
    """``transforms.RandomCrop(size, padding)``: zero-pad, then a uniformly placed crop."""
    img = pad(img, padding)
    w, h = img.size
    if w < size or h < size:
        img = center_crop(img, max(size, w, h))
        w, h = img.size
    if w == size and h == size:
        return img
    i = int(torch.randint(0, h - size + 1, size=(1,)).item())
    j = int(torch.randint(0, w - size + 1, size=(1,)).item())
    return img.crop((j, i, j + size, i + size))


def random_flip(img: Any, p: float = 0.5) -> Any:
    """``transforms.RandomHorizontalFlip(p)``."""
    if torch.rand(1).item() < p:
        return img.transpose(_image_module().FLIP_LEFT_RIGHT)
    return img


def to_tensor(img: Any) -> torch.Tensor:
    """``transforms.ToTensor``: a (C, H, W) float32 tensor in [0, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


# ---------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Samples ``(image, label)`` of an ImageFolder split: ``image`` a float32 (3, size, size)
    tensor, normalised; ``label`` an int (the class folder's index in sorted order).

    ``train=True`` applies the augmentation (``imagenet``: RandomResizedCrop(size) and a
    horizontal flip; ``cifar``: a random crop of the 4-pixel zero-padded image and a flip;
    ``none``: the deterministic transform); ``train=False`` the deterministic transform
    (``imagenet``: the shorter side resized to size·256/224 and a central crop; else the
    shorter side resized to ``size`` and a central crop, a no-op for images already
    size×size).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], size: int = 224,
                 augment: str = "imagenet", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, train: bool = True):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.size = int(size)
        self.input_shape = (3, self.size, self.size)
        self.augment = augment
        self.train = bool(train)
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Any:
        """The PIL image of sample ``index``, in RGB (torchvision's ``pil_loader``)."""
        Image = _image_module()
        path = self.samples[index][0]
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")

    def transform(self, img: Any) -> Any:
        size = self.size
        if self.train and self.augment == "imagenet":
            return random_flip(random_resized_crop(img, size))
        if self.train and self.augment == "cifar":
            return random_flip(random_crop(center_crop(resize_shorter(img, size), size), size, padding=4))
        if self.augment == "imagenet":
            return center_crop(resize_shorter(img, int(size * 256 / 224)), size)
        return center_crop(resize_shorter(img, size), size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        x = to_tensor(self.transform(self.load(index)))
        x = (x - self.mean) / self.std
        return x, self.targets[index]

    def __repr__(self) -> str:
        return (f"ImageFolder({len(self)} images, {self.num_classes} classes, size={self.size}, "
                f"augment={self.augment if self.train else 'eval'})")


def find_classes(root: Path) -> list[str]:
    """The class folders of ``root``, sorted (torchvision's order)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def find_samples(root: Path, class_to_idx: dict[str, int], where: str) -> list[tuple[str, int]]:
    """``(path, label)`` of every image under ``root/CLASS`` (recursively, sorted)."""
    samples = []
    for name in sorted(class_to_idx):
        folder = root / name
        if not folder.is_dir():
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    found.append((os.path.join(dirpath, fname), class_to_idx[name]))
        if not found:
            raise UsageError(f"imagefolder: class folder {folder} holds no image "
                             f"({', '.join(IMG_EXTENSIONS)}); remove it or add images ({where})")
        samples.extend(found)
    return samples


def _floats(name: str, value: Any, channels: int = 3) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)]
    elif isinstance(value, str):
        try:
            values = [float(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise UsageError(f"imagefolder.{name} must be numbers separated by commas, got '{value}'") from None
    elif isinstance(value, (list, tuple)):
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise UsageError(f"imagefolder.{name} must be a list of numbers, got {value!r}") from None
    else:
        raise UsageError(f"imagefolder.{name} must be a number or comma-separated numbers, got {value!r}")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise UsageError(f"imagefolder.{name} needs 1 or {channels} finite numbers, got {value!r}")
    if name == "std" and any(v <= 0 for v in values):
        raise UsageError(f"imagefolder.std must be positive, got {value!r}")
    return tuple(values)


def imagefolder(root: Any = None, size: Any = 224, augment: Any = "imagenet", mean: Any = IMAGENET_MEAN,
                std: Any = IMAGENET_STD, subset: Any = None, eval_subset: Any = None) -> dict:
    """An ImageFolder tree of images read with Pillow: ``root/CLASS/*.jpg``, or
    ``root/train/CLASS/*.jpg`` with ``root/val`` (or ``validation``, ``test``) as the
    evaluation split. Classes are the sorted folder names of the training split.

    ``size`` the crop (224; 32 for CIFAR), ``augment`` the training augmentation
    (``imagenet``, ``cifar`` or ``none``, see :class:`ImageFolder`), ``mean``/``std`` the
    per-channel normalisation (ImageNet's by default; comma-separated text or a list),
    ``subset``/``eval_subset`` keep the first N images of each split (in sorted order).
    """
    if root is None:
        raise UsageError("imagefolder: no image folder given; set root=DIR (root/CLASS/*.jpg, or root/train "
                         "and root/val)")
    base = Path(str(root)).expanduser()
    if not base.is_dir():
        raise UsageError(f"imagefolder: {base} is not a folder; set root=DIR to an ImageFolder tree "
                         f"(root/CLASS/*.jpg, or root/train and root/val)")
    size = Option("size", int, minimum=1).parse(size, "imagefolder")
    augment = Option("augment", str, choices=AUGMENTS).parse(augment, "imagefolder")
    mean, std = _floats("mean", mean), _floats("std", std)
    held = next((base / s for s in EVAL_SPLITS if (base / s).is_dir()), None)
    train_root = base / TRAIN_SPLIT if (base / TRAIN_SPLIT).is_dir() else base
    if held is not None and train_root == base:
        raise UsageError(f"imagefolder: {base} has a {held.name}/ split but no train/ split")
    classes = find_classes(train_root)
    if not classes:
        raise UsageError(f"imagefolder: {train_root} has no class folders (expected {train_root}/CLASS/*.jpg)")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    _pil = _image_module()  # noqa: F841 - fail here, before the store exists, without Pillow
    out = {}
    splits = [("train", train_root, subset)] + ([("eval", held, eval_subset)] if held is not None else [])
    for split, folder, keep in splits:
        if split == "eval":
            extra = sorted(set(find_classes(folder)) - set(classes))
            if extra:
                raise UsageError(f"imagefolder: {folder} has class folder '{extra[0]}', which the training "
                                 f"split {train_root} lacks")
        samples = find_samples(folder, class_to_idx, f"the {split} split")
        if not samples:
            raise UsageError(f"imagefolder: no images in {folder}")
        if keep is not None:
            samples = samples[:Option("subset" if split == "train" else "eval_subset", int, minimum=1)
                              .parse(keep, "imagefolder")]
        out[split] = ImageFolder(samples, classes, size, augment, mean, std, train=split == "train")
    return out


# ---------------------------------------------------------------------------------------
# Generated image folders, for tests and benchmarks
# ---------------------------------------------------------------------------------------


def make_image_folder(path: Any, classes: int = 3, per_class: int = 8, size: int | tuple[int, int] = 32,
                      seed: int = 0, val_per_class: int = 0, quality: int = 90) -> Path:
    """Write a small ImageFolder of JPEGs under ``path`` and return it.

    ``classes`` folders ``class_0`` … each with ``per_class`` RGB images of ``size`` pixels
    (an int for squares, or (width, height)); a class is a colour and a stripe direction
    plus noise, so a model can learn it. With ``val_per_class`` > 0 the images go to
    ``path/train`` and ``val_per_class`` more per class to ``path/val``. Deterministic in
    ``seed``.
    """
    Image = _image_module()
    root = Path(path)
    rng = np.random.RandomState(int(seed))
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    colours = rng.uniform(40, 215, size=(classes, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    splits = [("train", per_class), ("val", val_per_class)] if val_per_class > 0 else [("", per_class)]
    for split, count in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}" if split else root / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            stripe = np.sin((xx if c % 2 == 0 else yy) * (0.5 + 0.25 * (c // 2)))[:, :, None]
            for i in range(count):
                pixels = colours[c] + 30 * stripe + rng.normal(0, 20, size=(h, w, 3))
                img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
                img.save(folder / f"img_{i:04d}.jpg", quality=quality)
    return root
