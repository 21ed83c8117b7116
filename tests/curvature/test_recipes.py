"""CONTRIBUTING.md's curvature recipes, done in a temporary package: a new matrix is one file
(registered through the `register_curvature_operators` hook), a new curvature probe is one
file; both work through the engine and agree with the dense spectrum."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

import lscape
from lscape.curvature import HessianOperator, dense_matrix, operator_names, register_operator
from lscape.curvature import registry
from lscape.errors import UsageError
from lscape.store import RunReader

WORKLOAD = dict(model="mlp", model_opts={"widths": "8"}, data="synthetic",
                data_opts={"n": 64, "dim": 6, "classes": 3}, batch_size=16, progress=False, eval_schedule="never")
SUBSET = {"data": "subset", "batches": 2}

# Recipe "Add a curvature matrix": the whole file.
MATRIX = '''
    """`doubled-hessian`: 2·H, a derived matrix (a preconditioned Hessian has the same shape)."""

    from lscape import hookimpl
    from lscape.curvature import Hessian


    class DoubledHessian(Hessian):
        name = "doubled-hessian"

        def apply(self, vs):  # vs: (c, dim) flat vectors as rows; returns M applied to each row
            return 2 * super().apply(vs)


    @hookimpl
    def register_curvature_operators(register):
        register("doubled-hessian", DoubledHessian)
'''

# Recipe "Add a curvature probe": the whole file.
PROBE = '''
    """`eigengap`: λ₁ − λ₂ of the curvature matrix the options choose."""

    from lscape import Output, hookimpl
    from lscape.curvature import lanczos
    from lscape.plugins.curvature.base import CurvatureProbe


    class EigenGap(CurvatureProbe):
        name = "eigengap"
        schedule = "every:10"
        outputs = (Output("lambda_1", long_name="largest eigenvalue"), Output("gap", long_name="λ₁ − λ₂"))

        def measure(self, ctx, state):
            op = self.operator(ctx, self.batches(ctx, state))
            top = lanczos(op, k=2, tol=1e-5)
            op.release()
            return {"lambda_1": float(top.eigenvalues[0]), "gap": float(top.eigenvalues[0] - top.eigenvalues[1])}


    @hookimpl
    def register_probes(register):
        register(EigenGap)
'''


@pytest.fixture
def restored_registry():
    saved = dict(registry.OPERATORS)
    yield
    registry.OPERATORS.clear()
    registry.OPERATORS.update(saved)


@pytest.fixture
def package(tmp_path, monkeypatch, restored_registry):
    """A third-party package `curvrecipes` with the two files, installed as an entry-point plugin."""
    root = tmp_path / "site"
    pkg = root / "curvrecipes"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "doubled_hessian.py").write_text(textwrap.dedent(MATRIX))
    (pkg / "eigengap.py").write_text(textwrap.dedent(PROBE))
    dist = root / "curvrecipes-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: curvrecipes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lscape]\ndoubled-hessian = curvrecipes.doubled_hessian\n"
                                           "eigengap = curvrecipes.eigengap\n")
    monkeypatch.syspath_prepend(str(root))
    return root


def test_a_new_matrix_is_one_file_and_one_registry_line(restored_registry):
    from torch import nn

    from lscape.curvature import Hessian

    class DoubledHessian(Hessian):
        name = "doubled-hessian"

        def apply(self, vs):
            return 2 * super().apply(vs)

    assert "doubled-hessian" not in operator_names()
    register_operator("doubled-hessian", DoubledHessian)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    loss = torch.nn.functional.cross_entropy
    h = dense_matrix(HessianOperator(model, loss, batches))
    doubled = HessianOperator(model, loss, batches, kind="doubled-hessian")
    assert isinstance(doubled, DoubledHessian) and doubled.kind == "doubled-hessian"
    torch.testing.assert_close(dense_matrix(doubled), 2 * h, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already registered"):
        register_operator("doubled-hessian", Hessian)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        register_operator("not-a-matrix", object)


def test_the_recipes_in_a_package_run_through_the_engine(package, tmp_path):
    result = lscape.run(
        out=str(tmp_path / "r.zarr"), **WORKLOAD, steps=1, checkpoint_schedule="never",
        plugins=["sharpness", "hessian-exact", "eigengap"],
        plugin_options={"sharpness": {**SUBSET, "kind": "doubled-hessian", "tol": 1e-5},
                        "eigengap": {**SUBSET, "every": 1},
                        "hessian-exact": {**SUBSET}},
    )  # fmt: skip
    assert result.status == "completed"
    reader = RunReader(result.path)
    exact = np.sort(reader.read("hessian-exact")["eigenvalues"][0])[::-1]
    sharp = reader.read("sharpness")
    gap = reader.read("eigengap")
    # the dense reference: the Hessian's spectrum on the same fixed subset, doubled
    assert sharp["lambda_max"][0] == pytest.approx(2 * exact[0], rel=1e-4) and sharp["converged"][0]
    assert gap["lambda_1"][0] == pytest.approx(exact[0], rel=1e-4)
    assert gap["gap"][0] == pytest.approx(exact[0] - exact[1], rel=1e-3)
    assert "doubled-hessian" in operator_names()


def test_an_unknown_kind_lists_the_registered_matrices(tmp_path):
    with pytest.raises(UsageError, match="bad value for sharpness.kind: 'no-such'; choose one of hessian, ggn"):
        lscape.run(out=str(tmp_path / "bad.zarr"), **WORKLOAD, steps=1, plugins=["sharpness"],
                   plugin_options={"sharpness": {"kind": "no-such"}})
    assert not (tmp_path / "bad.zarr").exists()


def test_the_probe_layer_says_library_errors_in_options_and_flags():
    """lscape.curvature raises ValueError in its own words; the probes name options and flags."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from torch import nn

    from lscape.batch import BatchAdapter
    from lscape.plugins.curvature.base import check_curvature, make_operator
    from lscape.plugins.curvature.sharpness import Sharpness

    model = nn.Sequential(nn.Linear(3, 2))
    batches = [(torch.randn(4, 3), torch.randn(4, 2))]
    ctx = SimpleNamespace(model=model, adapter=BatchAdapter(F.mse_loss), config=SimpleNamespace(seed=0))
    with pytest.raises(ValueError, match="cross-entropy") as raised:
        HessianOperator(model, F.mse_loss, batches, kind="fisher")
    assert "--" not in str(raised.value) and not isinstance(raised.value, UsageError)
    with pytest.raises(UsageError, match=r"sharpness: kind=fisher .*cross-entropy.*--loss"):
        check_curvature(Sharpness(kind="fisher"), ctx)
    with pytest.raises(UsageError, match=r"sharpness: kind=ggn needs a loss of the model's output .*--loss model"):
        check_curvature(Sharpness(kind="ggn"), SimpleNamespace(model=model, adapter=BatchAdapter(None)))
    with pytest.raises(UsageError, match=r"bad value for sharpness.params: .*frozen"):
        model[0].weight.requires_grad_(False)
        make_operator(Sharpness(params="0.weight"), ctx, batches)
