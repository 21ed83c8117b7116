"""grad-noise's batch counts are limited up front by the memory the batches of one draw need."""

from __future__ import annotations

import os

from conftest import SMALL


def test_a_noise_size_beyond_memory_is_refused_before_the_store_exists(cli):
    code, out, err = cli("run", *SMALL, "--steps", "2", "--plugin", "grad-noise", "-o", "grad-noise.noise_size=10000000000")
    assert code == 2 and err.count("\n") == 1 and "grad-noise.noise_size" in err and "available" in err, err
    assert not os.path.exists("runs")
    code, out, err = cli("run", *SMALL, "--steps", "2", "--plugin", "grad-noise", "-o", "grad-noise.noise_size=2")
    assert code == 0, err
