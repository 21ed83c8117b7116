"""HuggingFace-style workloads: a GPT-2 built from a tiny config (no download) on dict batches,
trained by the engine and measured by the probes through the one batch adapter."""

import numpy as np
import pytest
import torch

import lscape

pytest.importorskip("transformers")

COMMON = dict(model="helpers_hf:tiny_gpt2", data="helpers_hf:tokens", batch_size=16, optimizer="adam", lr=1e-3,
              progress=False)
C_PROJ = "transformer.h.0.mlp.c_proj.*"


def test_gpt2_on_dict_batches_trains_and_every_probe_family_measures_it(tmp_path):
    subset = {"measure_samples": 32}
    result = lscape.run(**COMMON, loss="model", steps=4, out=str(tmp_path / "hf.zarr"),
                        plugins=["sharpness", "hessian-exact", "hessian", "grad-stats", "landscape"],
                        plugin_options={
                            "sharpness": {**subset, "schedule": "at:3", "params": C_PROJ, "tol": 1e-5},
                            "hessian-exact": {**subset, "schedule": "at:3", "params": C_PROJ},
                            "hessian": {**subset, "schedule": "at:3", "k": 2, "tol": 1e-3},
                            "grad-stats": {"schedule": "at:1"},
                            "landscape": {**subset, "schedule": "at:3", "alpha": "-1:1:5"},
                        })
    assert result.status == "completed"
    run = lscape.open_run(result.path)
    train = run.read("train")
    assert np.isfinite(train["loss"]).all() and train["loss"][-1] < train["loss"][0]
    # λ_max of the LM loss over the c_proj block: Lanczos equals the dense Hessian's top eigenvalue
    lam = run.read("sharpness")["lambda_max"][-1]
    dense = run.read("hessian-exact")["eigenvalues"][-1].max()
    assert lam == pytest.approx(dense, rel=1e-4)
    # all parameters, through scaled-dot-product attention (math kernel for second order)
    top = run.read("hessian")["top_eigenvalues"][-1]
    assert np.isfinite(top).all() and top[0] >= top[1] > 0
    assert run.read("grad-stats")["trace_cov"][0] > 0
    # HF attention masks cannot be vmapped: method=auto fell back to the loop and says why
    stats_attrs = run.root["grad-stats"].attrs
    assert stats_attrs["method_used"] == "loop" and stats_attrs["method_fallback_reason"]
    surface = run.read("landscape")["train_loss"][-1]
    assert np.isfinite(surface).all() and surface[2] == pytest.approx(train["loss"][-1], rel=0.2)


def test_named_loss_on_logits_equals_the_models_own_loss(tmp_path):
    """dict batch + a named loss: the adapter calls model(**inputs) without labels and hands
    .logits and labels to the loss; shifted cross-entropy is what HF's own loss computes."""
    own = lscape.run(**COMMON, loss="model", steps=6, out=str(tmp_path / "own.zarr"), plugins=[])
    named = lscape.run(**COMMON, loss="helpers_hf:lm_logits_loss", steps=6, out=str(tmp_path / "named.zarr"),
                       plugins=[])
    a = lscape.open_run(own.path).read("train")["loss"]
    b = lscape.open_run(named.path).read("train")["loss"]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert "eval_loss" in lscape.open_run(named.path).read("train")


def test_micro_batches_of_dict_batches_accumulate_the_same_update(tmp_path):
    whole = lscape.run(**COMMON, loss="model", steps=3, out=str(tmp_path / "a.zarr"), plugins=[])
    split = lscape.run(**COMMON, loss="model", steps=3, micro_batch_size=5, out=str(tmp_path / "b.zarr"),
                       plugins=[])
    a = lscape.open_run(whole.path).read("train")["loss"]
    b = lscape.open_run(split.path).read("train")["loss"]
    # the model's own loss is a mean over tokens; equal token counts per sample make chunk
    # weighting by samples exact, so the curves agree to float32 rounding
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_dict_batch_without_labels_and_a_named_loss_is_one_clear_line(tmp_path):
    from lscape.batch import BatchAdapter
    from lscape.errors import UsageError

    model = torch.nn.Linear(3, 2)
    with pytest.raises(UsageError, match="needs a target"):
        BatchAdapter(torch.nn.functional.cross_entropy).loss(lambda **kw: model(kw["x_in"]), {"x_in": torch.ones(2, 3)})
