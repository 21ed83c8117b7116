"""Tiny HuggingFace-style workloads for the tests: a GPT-2 built from a config (no download)
trained on dict batches of tokens, as `model(**batch)` with `labels`."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, SEQ = 48, 8


class TokenDicts(Dataset):
    """Random token sequences with a learnable rule (next token = previous + 1 mod VOCAB,
    with noise), as dicts ``{"input_ids", "attention_mask", "labels"}`` like a tokenised HF data set."""

    def __init__(self, n: int = 96, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        ids = (start + torch.arange(SEQ)) % VOCAB
        flip = torch.rand(n, SEQ, generator=g) < 0.1
        self.ids = torch.where(flip, torch.randint(0, VOCAB, (n, SEQ), generator=g), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def tokens(n: int = 96, seed: int = 0) -> dict:
    return {"train": TokenDicts(n, seed), "eval": TokenDicts(32, seed + 1)}


def tiny_gpt2(layers: int = 1, width: int = 16, attn: str = "sdpa"):
    transformers = __import__("transformers")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=width, n_layer=layers, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def lm_logits_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) against labels (B, T), shifted as HF does."""
    return torch.nn.functional.cross_entropy(output[:, :-1].reshape(-1, output.shape[-1]), labels[:, 1:].reshape(-1))
