"""The optimisation path on the PCA directions of its checkpoints (loss-landscape's ``plot_trajectory``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["checkpoint_states", "pca_directions", "trajectory_matrix"]


def checkpoint_states(root: Any) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """``(step, model state dict)`` of every checkpoint in an open zarr run group, by step."""
    from lscape.checkpoint import load_checkpoint

    if "checkpoints" not in root.group_keys():
        return []
    group = root["checkpoints"]
    out = []
    for name in sorted(group.array_keys()):
        state = load_checkpoint(root, name)
        if state is not None and isinstance(state.get("model"), dict):
            out.append((int(group[name].attrs.get("step", int(name.rsplit("_", 1)[-1]))), state["model"]))
    return sorted(out, key=lambda t: t[0])


def trajectory_matrix(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str], theta: Sequence[torch.Tensor],
                      ignore: str = "biasbn") -> torch.Tensor:
    """Rows w_i − θ (flattened over ``names``) for every checkpoint state, float64 on the CPU.

    With ``ignore="biasbn"`` the entries of tensors with dim ≤ 1 are zeroed, as
    loss-landscape's ``setup_PCA_directions`` does (``ignore_biasbn``)."""
    rows = []
    for state in states:
        parts = []
        for name, t in zip(names, theta):
            if name not in state:
                raise KeyError(f"checkpoint has no entry '{name}'")
            d = state[name].detach().double().cpu() - t.detach().double().cpu()
            if ignore == "biasbn" and t.dim() <= 1:
                d = torch.zeros_like(d)
            parts.append(d.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def pca_directions(matrix: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` principal directions (unit rows, (k, n)) of the rows of ``matrix`` and their
    explained-variance ratios, as sklearn's ``PCA(n_components=k).fit(matrix)`` that
    loss-landscape uses: rows centred on their mean, SVD; each direction's sign is fixed so
    that its largest-magnitude entry is positive (sklearn's ``svd_flip``)."""
    centred = matrix - matrix.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    if (s > s[0] * 1e-12).sum() < k if len(s) else True:
        raise ValueError(f"the checkpoints span fewer than {k} directions: need at least {k + 1} distinct ones")
    dirs = vh[:k].clone()
    for i in range(k):
        j = int(dirs[i].abs().argmax())
        if dirs[i, j] < 0:
            dirs[i] = -dirs[i]
    var = s**2
    return dirs, var[:k] / var.sum()
