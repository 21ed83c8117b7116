"""The seeds' models and data sets: real file formats read back exactly, shapes, counts, causality."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from lscape.errors import UsageError
from lscape.plugins import workloads
from lscape.plugins.workloads import datasets, models
from lscape.plugins.workloads.formats import read_idx

# writers for the real formats, independent of the readers under test
from helpers_files import write_cifar10, write_mnist

torch.set_num_threads(1)



@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files_back_exactly(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = workloads.DATASETS["mnist"][0](root=str(tmp_path), normalize="none")
    train, test = data["train"], data["eval"]
    assert len(train) == 12 and len(test) == 5
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert torch.equal(train.inputs[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).float())
    assert torch.equal(train.targets, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(test.inputs[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float())
    assert torch.equal(test.targets, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert train.num_classes == 10 and train.input_shape == (1, 28, 28)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and int(y) == int(arrays["train-labels-idx1-ubyte"][3])


def test_read_idx_handles_other_types_and_rejects_bad_magic(tmp_path):
    values = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2i", 2, 3) + values.tobytes())
    assert np.array_equal(read_idx(path), values.astype(np.int32))
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 12)
    with pytest.raises(UsageError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 10) + b"\x01\x02")
    with pytest.raises(UsageError, match="malformed IDX"):
        read_idx(short)


def test_fashion_mnist_found_in_torchvision_layout(tmp_path):
    arrays = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False, seed=1)
    data = datasets.fashion_mnist(root=tmp_path, normalize="none")
    assert torch.equal(data["train"].targets, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())


def test_missing_directory_and_files_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as e:
        datasets.mnist(root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="train-images-idx3-ubyte"):
        datasets.mnist(root=tmp_path)
    with pytest.raises(UsageError, match="root=DIR"):
        datasets.mnist()
    with pytest.raises(UsageError, match="data_batch_1"):
        datasets.cifar10(root=tmp_path)
    with pytest.raises(UsageError, match="'train' and 'test'"):
        datasets.cifar100(root=tmp_path)
    with pytest.raises(UsageError, match=str(tmp_path / "none.txt")):
        datasets.text(path=tmp_path / "none.txt")


def test_subset_keeps_the_first_n_and_normalisations(tmp_path):
    arrays = write_mnist(tmp_path)
    raw = torch.from_numpy(arrays["train-images-idx3-ubyte"][:4]).float()[:, None]
    data = datasets.mnist(root=tmp_path, subset="4", eval_subset=2, normalize="center")
    assert len(data["train"]) == 4 and len(data["eval"]) == 2
    # sam_edge: x/256 minus the mean image of the (mini) training set.
    torch.testing.assert_close(data["train"].inputs, raw / 256 - (raw / 256).mean(0, keepdim=True))
    std = datasets.mnist(root=tmp_path, subset=4)["train"].inputs
    assert abs(float(std.mean())) < 1e-5 and abs(float(std.std()) - 1) < 1e-3
    scaled = datasets.mnist(root=tmp_path, normalize="scale")["eval"].inputs
    assert float(scaled.min()) >= 0 and float(scaled.max()) <= 1
    with pytest.raises(UsageError, match="normalize"):
        datasets.mnist(root=tmp_path, normalize="zca")
    with pytest.raises(UsageError, match="subset"):
        datasets.mnist(root=tmp_path, subset=0)


# ---------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------


def test_cifar10_reads_pickled_batches_back_exactly(tmp_path):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    data = datasets.cifar10(root=tmp_path, normalize="none", subset=18)
    train = data["train"]
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])[:18]
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])[:18]
    assert len(train) == 18 and train.input_shape == (3, 32, 32) and train.num_classes == 10
    assert torch.equal(train.inputs, torch.from_numpy(expected.reshape(-1, 3, 32, 32)).float())
    # Channel-major rows: the first 1024 bytes of a row are the red plane.
    assert torch.equal(train.inputs[0, 0].flatten(), torch.from_numpy(expected[0, :1024]).float())
    assert train.targets.tolist() == labels
    assert data["eval"].targets.tolist() == batches["test_batch"][b"labels"]


def test_cifar100_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 2)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [19] * n}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=4))
    fine = datasets.cifar100(root=tmp_path)
    assert fine["train"].targets.tolist() == list(range(90, 96)) and fine["train"].num_classes == 100
    coarse = datasets.cifar100(root=tmp_path, labels="coarse")
    assert coarse["eval"].targets.tolist() == [19, 19] and coarse["train"].num_classes == 20
    means = fine["train"].inputs.mean(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.zeros(3), atol=1e-5, rtol=0)


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    write_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UsageError, match="refusing to load"):
        datasets.cifar10(root=tmp_path)


# ---------------------------------------------------------------------------------------
# Text corpus
# ---------------------------------------------------------------------------------------


def test_text_corpus_split_windows_and_clamping(tmp_path):
    corpus = bytes(range(32, 122)) + "é".encode() + b"abcdefgh"  # 100 bytes, two above 127
    path = tmp_path / "corpus.txt"
    path.write_bytes(corpus)
    tokens = [min(b, 127) for b in corpus]
    data = datasets.text(path=path, seq_len=8)
    train, test = data["train"], data["eval"]
    # First 90 bytes train, last 10 test; default stride T + 1 (sam_edge's crops).
    assert len(train) == (90 - 9) // 9 + 1 and len(test) == 1
    for i in range(len(train)):
        x, y = train[i]
        t = 9 * i
        assert x.tolist() == tokens[t : t + 8] and y.tolist() == tokens[t + 1 : t + 9]
    x, y = test[0]
    assert x.tolist() == tokens[90:98] and y.tolist() == tokens[91:99]
    assert max(tokens) == 127 and 127 in data["eval"].inputs.tolist()[0]
    assert train.num_classes == 128 and train.input_shape == (8,) and train.targets.dtype == torch.int64
    every = datasets.text(path=path, seq_len=8, stride=1, subset=5)["train"]
    assert len(every) == 5 and every[4][0].tolist() == tokens[4:12]
    assert len(datasets.text(path=path, seq_len=8, stride=1)["train"]) == 90 - 8
    with pytest.raises(UsageError, match="fewer than seq_len"):
        datasets.text(path=path, seq_len=20)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_image_models_forward_shapes():
    x = torch.randn(3, 1, 28, 28)
    assert models.sam_mlp(width=32, depth=3, activation="tanh")(x).shape == (3, 10)
    assert models.cnn(blocks=2, layers_per_block=2, feature_multiplier=4)(x).shape == (3, 10)
    assert models.lenet(num_classes=7)(x).shape == (3, 7)
    rgb = torch.randn(2, 3, 32, 32)
    cnn = models.cnn(feature_multiplier=4, num_classes=100, input_shape=(3, 32, 32))
    assert cnn(rgb).shape == (2, 100)
    assert models.resnet14(shortcut="pad", num_classes=100)(rgb).shape == (2, 100)
    assert models.resnet(depth=8, shortcut="none", batchnorm=False, input_shape=(1, 28, 28))(x).shape == (3, 10)


def test_sam_mlp_is_glorot_normal_with_zero_bias():
    mlp = models.sam_mlp(input_shape=(1, 28, 28))
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(784, 1000), (1000, 1000), (1000, 1000), (1000, 10)]
    w = linears[1].weight.detach()
    assert abs(float(w.std()) - (2 / 2000) ** 0.5) < 0.02 * (2 / 2000) ** 0.5
    assert float(w.abs().max()) <= 2 * (2 / 2000) ** 0.5 / 0.8796 + 1e-6  # truncated at 2σ
    assert all(float(l.bias.detach().abs().max()) == 0 for l in linears)
    assert n_params(mlp) == 784 * 1000 + 2 * 1000 * 1000 + 1000 * 10 + 3 * 1000 + 10


def test_lenet_matches_entropy_sgd_mnistconv_parameter_count():
    assert n_params(models.lenet()) == 132_220


@pytest.mark.parametrize("factory,option_a,option_b", [
    (models.resnet20, 269_722, 272_474),  # He et al.: 0.27M
    (models.resnet56, 853_018, 855_770),  # He et al.: 0.85M
])
def test_resnet_parameter_counts_match_cifar_resnets(factory, option_a, option_b):
    assert n_params(factory(shortcut="pad")) == option_a
    assert n_params(factory()) == option_b  # 1×1 projections: + 2,752


def test_model_options_are_checked():
    with pytest.raises(UsageError, match="6n\\+2"):
        models.resnet(depth=21)
    with pytest.raises(UsageError, match="activation"):
        models.sam_mlp(activation="sigmoid")
    with pytest.raises(UsageError, match="seq_len"):
        models.char_transformer(seq_len=16, input_shape=(32,))
    with pytest.raises(UsageError, match="blocks"):
        models.cnn(blocks=6)


def tiny_transformer(**kw):
    return models.char_transformer(layers=2, heads=2, key_size=8, d_model=16, seq_len=12, **kw)


def test_char_transformer_is_causal():
    torch.manual_seed(0)
    model = tiny_transformer().eval()
    tokens = torch.randint(1, 128, (2, 12))
    out = model(tokens)
    assert out.shape == (2, 12, 128)
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 5) % 128
    out2 = model(changed)
    torch.testing.assert_close(out2[:, :7], out[:, :7], rtol=0, atol=1e-6)
    assert (out2[:, 7:] - out[:, 7:]).abs().amax(dim=-1).min() > 1e-4


def test_char_transformer_supports_hessian_vector_products():
    torch.manual_seed(0)
    model = tiny_transformer()
    tokens = torch.randint(0, 128, (2, 12))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum((g * torch.ones_like(g)).sum() for g in grads), params)
    assert all(torch.isfinite(h).all() for h in hv)


# ---------------------------------------------------------------------------------------
# Together, and registered
# ---------------------------------------------------------------------------------------


def test_dataset_attributes_build_matching_models(tmp_path):
    write_mnist(tmp_path)
    train = datasets.mnist(root=tmp_path)["train"]
    model = models.cnn(feature_multiplier=4, num_classes=train.num_classes, input_shape=train.input_shape)
    assert model(train.inputs[:4]).shape == (4, 10)
    (tmp_path / "t.txt").write_text("to be or not to be " * 20)
    corpus = datasets.text(path=tmp_path / "t.txt", seq_len=10)["train"]
    lm = tiny_transformer(num_classes=corpus.num_classes, input_shape=corpus.input_shape)
    x, y = corpus[0]
    assert lm(x[None]).shape == (1, 10, 128)


def test_registered_through_the_plugin_manager():
    from lscape.manager import build_registry, get_plugin_manager

    pm = get_plugin_manager(["lscape.plugins.workloads"], entry_points=False, builtins=False)
    pm.check_pending()
    reg = build_registry(pm)
    for name in ("sam-mlp", "cnn", "lenet", "resnet14", "resnet20", "resnet56", "char-transformer"):
        assert reg.models[name].obj is workloads.MODELS[name][0] and reg.models[name].help
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "text"):
        assert reg.datasets[name].obj is workloads.DATASETS[name][0]
