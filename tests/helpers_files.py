"""Writers of the seeds' data files (MNIST IDX, CIFAR python batches), shared by the tests."""

import gzip
import pickle
import struct

import numpy as np


def write_idx(path, array, gz):
    """LeCun's IDX: 0, 0, type code 0x08 (ubyte), ndim; sizes big-endian int32; data."""
    array = np.asarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def write_mnist(root, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / name, array, gz)
    return arrays


def write_cifar10(root, per_batch=4, n_test=3, seed=0):
    """Five data batches and a test batch: pickled dicts with bytes keys, as the originals."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * n,
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        out[name] = batch
    return out


# ---------------------------------------------------------------------------------------
# IDX / MNIST
# ---------------------------------------------------------------------------------------
