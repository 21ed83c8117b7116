"""Lightning and HuggingFace Trainer callbacks (`lscape.integrations`), a few CPU steps each."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lscape.store import RunReader


def _tensors(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_lightning_callback_records_probe_groups(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lscape.integrations import LscapeCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
            self.losses = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.losses.append(float(loss.detach()))
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    module = Tiny()
    out = str(tmp_path / "pl.zarr")
    callback = LscapeCallback(plugins=["grad-norm", "sharpness"], out=out, loss_fn=F.cross_entropy,
                              plugin_options={"sharpness": {"every": 2, "batches": 2}})
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(_tensors(), batch_size=8, shuffle=True), DataLoader(_tensors(16, 1), batch_size=8))
    r = RunReader(out)
    assert r.attrs["status"] == "completed" and r.attrs["steps_done"] == 8
    for group in ("train", "grad-norm", "sharpness", "eval"):
        assert r.has(group), r.groups()
    t = r.read("train")
    np.testing.assert_array_equal(t["step"], np.arange(8))
    np.testing.assert_allclose(t["loss"], module.losses, rtol=1e-6)
    np.testing.assert_array_equal(t["epoch"], np.repeat([0, 1], 4))
    np.testing.assert_array_equal(r.read("sharpness")["step"], [0, 2, 4, 6])
    assert np.all(r.read("grad-norm")["grad_norm"] > 0)
    ev = r.read("eval")
    np.testing.assert_array_equal(ev["step"], [3, 7])
    assert np.all(np.isfinite(ev["val_loss"]))


def _gpt2_run(tmp_path, name, callbacks):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (16, 12), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return model


def test_huggingface_callback_records_probe_groups_and_leaves_training_alone(tmp_path):
    pytest.importorskip("transformers")
    from lscape.integrations import LscapeTrainerCallback

    out = str(tmp_path / "hf.zarr")
    callback = LscapeTrainerCallback(plugins=["grad-norm"], out=out)
    measured = _gpt2_run(tmp_path, "a", [callback])
    bare = _gpt2_run(tmp_path, "b", [])
    for a, b in zip(measured.parameters(), bare.parameters()):
        assert torch.equal(a, b)
    r = RunReader(out)
    assert r.attrs["status"] == "completed" and r.attrs["steps_done"] == 3
    t = r.read("train")
    np.testing.assert_array_equal(t["step"], [0, 1, 2])
    assert np.all(np.isfinite(t["loss"])) and np.all(t["loss"] > 0)
    g = r.read("grad-norm")
    np.testing.assert_array_equal(g["step"], [0, 1, 2])
    assert np.all(g["grad_norm"] > 0) and np.all(g["update_size"][1:] > 0)


@pytest.mark.slow
def test_huggingface_callback_gives_data_probes_the_trainers_data_and_batch_size(tmp_path, capsys):
    pytest.importorskip("transformers")
    from lscape.integrations import LscapeTrainerCallback

    out = str(tmp_path / "hfdata.zarr")
    cheap = {"data": "subset", "measure_samples": 8, "every": 1, "k": 1, "max_iter": 5, "density_schedule": "never",
             "trace_schedule": "never", "warm_start": False}
    # no train_data=, no batch_size=: the Trainer's loader (a batch sampler, no batch_size) and its batch size
    callback = LscapeTrainerCallback(plugins=["hessian"], plugin_options={"hessian": cheap}, out=out, progress=True)
    _gpt2_run(tmp_path, "d", [callback])
    r = RunReader(out)
    assert r.attrs["status"] == "completed" and r.attrs["config"]["batch_size"] == 4
    assert len(r.read("hessian")["step"]) == 3
    err = capsys.readouterr().err
    assert "ETA" in err and "step 3/3" in err  # the Trainer's max_steps is the total
    assert "GPT2LMHeadModel(" not in err  # the model by its class name, not its repr


def test_attach_with_a_dataset_infers_the_batch_size_from_the_first_batch(tmp_path):
    """attach(train_data=<a Dataset>) asked for batch_size= even for data=full."""
    import lscape
    from lscape.trust import signed_by_user

    data = _tensors(32)
    model = torch.nn.Linear(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = str(tmp_path / "inferred.zarr")
    # data=full needed no batch size (passes of 256 samples); batches=K takes K training batches
    cheap = {"data": "subset", "batches": 2, "every": 1, "k": 1, "max_iter": 5, "density_schedule": "never", "trace_schedule": "never"}
    with lscape.attach(model, opt, "ce", train_data=data, plugins=["hessian"], plugin_options={"hessian": cheap},
                       out=out, progress=False) as session:
        for xb, yb in DataLoader(data, batch_size=8):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            session.step((xb, yb), loss)
    r = RunReader(out)
    assert r.attrs["config"]["batch_size"] == 8 and signed_by_user(r.attrs)
    assert r.attrs["status"] == "completed" and len(r.read("hessian")["step"]) == 4
    assert r.group_attrs("hessian")["measure_batch_size"] == 8  # batches of the inferred batch size
