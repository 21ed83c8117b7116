"""Stores this user wrote are trusted without --trust-store: their config is signed with a
per-user key (lscape.trust); an edited config, or a store signed with another key, is not."""

import json
import os
import stat

import pytest
import zarr

from lscape.store import RunReader
from lscape.trust import SIGNATURE_ATTR, secret_path, signed_by_user

CODE = ["--model", "helpers_workloads:linear", "--data", "helpers_workloads:linear_regression", "--loss", "mse"]


@pytest.fixture
def own_store(cli):
    code, _, err = cli("run", *CODE, "--steps", "3", "--checkpoint-schedule", "every:1", "--out", "c.zarr",
                       "--no-progress")
    assert code == 0, err
    return "c.zarr"


def test_own_store_resumes_and_is_measured_without_the_flag(cli, own_store):
    attrs = RunReader(own_store).attrs
    assert SIGNATURE_ATTR in attrs and signed_by_user(attrs)
    assert stat.S_IMODE(os.stat(secret_path()).st_mode) == 0o600  # made on first use, private
    code, _, err = cli("run", "--resume", own_store, "--steps", "5")
    assert code == 0, err
    assert RunReader(own_store).attrs["steps_done"] == 5
    assert signed_by_user(RunReader(own_store).attrs)  # the extended config is signed again
    code, _, err = cli("measure", own_store, "--plugin", "grad-norm", "--out", "m.zarr", "--no-progress")
    assert code == 0, err


def _edit_config(path):
    group = zarr.open_group(path, mode="r+")
    config = dict(group.attrs["config"])
    config["lr"] = 0.5
    group.attrs["config"] = config


@pytest.mark.parametrize("how", ["edited", "another key", "unsigned"])
def test_edited_or_foreign_store_needs_trust_store(cli, own_store, how, tmp_path, monkeypatch):
    if how == "edited":
        _edit_config(own_store)
    elif how == "another key":
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
    else:  # written before signatures, or stripped of its signature
        group = zarr.open_group(own_store, mode="r+")
        del group.attrs[SIGNATURE_ATTR]
    before = json.dumps(dict(RunReader(own_store).attrs), sort_keys=True, default=str)
    for args in (["run", "--resume", own_store, "--steps", "5"],
                 ["measure", own_store, "--plugin", "grad-norm", "--out", "m.zarr", "--no-progress"]):
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--trust-store" in err, err
        if how == "edited":
            assert "changed" in err
    assert not os.path.exists("m.zarr")
    assert json.dumps(dict(RunReader(own_store).attrs), sort_keys=True, default=str) == before
    code, _, err = cli("run", "--resume", own_store, "--steps", "5", "--trust-store")
    assert code == 0, err
