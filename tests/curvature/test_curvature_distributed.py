"""The curvature toolkit under torch.distributed (gloo, two CPU processes): ranks agree with the pooled operator."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ce = nn.functional.cross_entropy


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    # rank 0 holds 10 + 6 examples, rank 1 holds 4: unequal shards, weighted by size
    shards = [[(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
               for n in sizes] for sizes in ((10, 6), (4,))]
    return model, shards


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        from lscape.curvature import HessianOperator, hutchpp, lanczos

        model, shards = _problem()
        op = HessianOperator(model, ce, shards[rank])
        v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
        result = lanczos(op, k=2, tol=1e-8)
        trace = hutchpp(op, 30, seed=3)
        # finite differences: gradients on each rank's shard, θ moved in place, one all-reduce
        fd = HessianOperator(model, ce, shards[rank], method="finite-difference", fd_richardson=True)
        fd_hv = fd.matvec(v)
        torch.save({"hv": op.matvec(v), "grad": op.gradient(), "eig": result.eigenvalues,
                    "trace": trace.estimate, "samples": op.num_samples, "method": op.method,
                    "fd_hv": fd_hv, "fd_error": fd.product_error,
                    "params": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_reduce_products_to_the_pooled_operator(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    from lscape.curvature import HessianOperator, hutchpp, lanczos

    model, shards = _problem()
    pooled = HessianOperator(model, ce, shards[0] + shards[1])
    v = torch.linspace(-1, 1, pooled.dim, dtype=torch.float64)
    expected_eig = lanczos(pooled, k=2, tol=1e-8).eigenvalues
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for got in ranks:
        assert got["samples"] == 20
        torch.testing.assert_close(got["hv"], pooled.matvec(v), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["grad"], pooled.gradient(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["eig"], expected_eig, rtol=1e-7, atol=0)
        assert got["method"] == "double-backward"  # the ladder's check, reduced over ranks
        exact = pooled.matvec(v)
        assert float(torch.linalg.norm(got["fd_hv"] - exact) / torch.linalg.norm(exact)) <= 3 * got["fd_error"] < 1e-5
        assert all(torch.equal(a, b) for a, b in zip(got["params"], _problem()[0].parameters()))
    # every rank takes the same decisions and returns bitwise the same numbers
    assert torch.equal(ranks[0]["eig"], ranks[1]["eig"]) and ranks[0]["trace"] == ranks[1]["trace"]
    assert ranks[0]["fd_error"] == ranks[1]["fd_error"]
    assert ranks[0]["trace"] == pytest.approx(hutchpp(pooled, 30, seed=3).estimate, rel=1e-9)
