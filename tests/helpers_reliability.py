"""User code that fails in the ways a user's own factories, losses and models do, for the
bad-input table (tests/test_reliability_errors.py)."""

import torch
from torch import nn
from torch.utils.data import Dataset


def raises_runtime(**kw):
    raise RuntimeError("CUDA out of memory (pretend)")


def raises_key(**kw):
    config = {}
    return config["hidden_size"]


def raises_os(**kw):
    raise FileNotFoundError(2, "No such file or directory", "/data/imagenet/train")


def returns_none(**kw):
    torch.zeros(1)  # forgot the return


class NoLen(Dataset):
    def __getitem__(self, i):
        return torch.zeros(4), 0


def no_len(**kw):
    return NoLen()


def returns_tuple(**kw):
    return nn.Linear(4, 3), "extra"


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), {"aux": 1}


def tuple_model(**kw):
    return TupleOut()


class Boom(Exception):
    pass


def raising_loss(output, target):
    raise Boom("label smoothing table missing")


def mlp_other(**kw):
    return nn.Sequential(nn.Linear(7, 2))


class WarnsThenFails(nn.Module):
    """A model whose forward warns (as torch does before some shape errors) and then fails."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        import warnings

        warnings.warn("Using a target size that is different to the input size", UserWarning)
        return self.lin(x)[:, :1].reshape(2, -1)


def warns_then_fails(**kw):
    return WarnsThenFails()
