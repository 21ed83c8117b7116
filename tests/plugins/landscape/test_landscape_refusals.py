"""Bad landscape input is refused in one line before the store exists (issue 21's class: every
option checked up front, nothing materialised before its size limit)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import SMALL
from lscape.plugins.landscape import parse_range


def test_a_huge_range_is_refused_before_any_array_is_made():
    with pytest.raises(ValueError, match="2e\\+12 points"):
        parse_range("-1:1:1e-12")
    with pytest.raises(ValueError, match="more than the 1,000,000"):
        parse_range("-1:1:#2000000")
    with pytest.raises(ValueError, match="more than the 10"):
        parse_range("0:1:0.01", max_points=10)
    assert len(parse_range("-1:1:#51")) == 51 and np.isclose(parse_range("-0.3:0.02:0.31")[-1], 0.3)


@pytest.mark.parametrize("spec", ["-1:1:1e-12", "-1:1:#5000000"])
def test_landscape_cli_refuses_a_huge_grid_with_nothing_written(cli, spec):
    code, out, err = cli("run", *SMALL, "--steps", "2", "--plugin", "landscape", "-o", f"landscape.alpha={spec}")
    assert code == 2 and err.count("\n") == 1 and "points" in err, err
    assert not os.path.exists("runs")


def test_interpolate_other_that_is_not_a_state_dict_is_refused_up_front(cli, tmp_path):
    (tmp_path / "text.txt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "other_model.pt")
    for other, words in (("text.txt", "cannot load"), ("list.pt", "not a model state dict"),
                         ("other_model.pt", "not a state of this model")):
        code, out, err = cli("run", *SMALL, "--steps", "2", "--plugin", "interpolate", "-o",
                             f"interpolate.other={tmp_path / other}")
        assert code == 2 and err.count("\n") == 1 and words in err, (other, err)
        assert not os.path.exists("runs"), other
