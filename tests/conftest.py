"""Shared fixtures: a fresh plugin manager per test, small real workloads, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, tmp_path_factory, monkeypatch):
    """Every test runs in its own folder, so default `runs/` stores never collide, with its
    own per-user config folder (the key that signs stores: lscape.trust), outside that folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("user-config")))
    monkeypatch.delenv("LSCAPE_SECRET_FILE", raising=False)
    monkeypatch.delenv("LSCAPE_TRACE_PLUGINS", raising=False)
    monkeypatch.delenv("LSCAPE_PLUGINS", raising=False)
    yield


@pytest.fixture
def cli(capsys):
    """Run `lscape ARGS` in-process; returns (exit_code, stdout, stderr)."""
    from lscape.cli import main

    def invoke(*args: str):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def run_subprocess(*args: str, cwd=None, timeout=300, env=None):
    """Run `python -m lscape ARGS` in a real process (for signals and tracebacks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lscape", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


SMALL = ["--data", "synthetic", "--data-opt", "n=128", "--data-opt", "dim=8", "--data-opt", "classes=3",
         "--model-opt", "widths=16", "--batch-size", "32", "--no-progress"]


#: Tests of more than about a second on 2 cores (real processes, SIGKILLs, torchrun, wheels,
#: real-format examples): marked `slow` so that `python -m pytest -m "not slow"` is the fast
#: edit-test loop. CI runs everything. Listed by function name so that moving a test file keeps
#: its mark; a test marked with `@pytest.mark.slow` in its file is slow too.
SLOW_TESTS = frozenset({
    "test_attach_under_torchrun_equals_one_process",
    "test_checkpoints_load_weights_only_and_nothing_written_outside_out",
    "test_cifar10_resnet_runs_three_steps_in_bf16",
    "test_entropy_sgd_statistics_through_the_engine_and_its_figure",
    "test_eos_figures_without_sam_skip_the_sam_edge_figure",
    "test_every_method_matches_the_dense_hessian_on_bn_and_inplace_models",
    "test_every_probe_leaves_the_users_training_bit_identical",
    "test_example_runs_two_steps_on_files_in_the_real_formats",
    "test_existing_store_is_never_touched",
    "test_fisher_matrices_match_dense_references",
    "test_fuzzed_command_line",
    "test_fuzzed_config_file",
    "test_garbage_config_file",
    "test_ggn_equals_jacobian_transpose_output_hessian_jacobian",
    "test_gpt2_on_dict_batches_trains_and_every_probe_family_measures_it",
    "test_imagenet_grad_noise_resnet34_runs_three_steps",
    "test_killed_measure_is_measured_again",
    "test_lanczos_matches_exact_hessian_top1_and_top5",
    "test_linear_regression_minibatch_noise_matches_closed_form",
    "test_lock_of_a_killed_writer_is_stale_and_taken_over",
    "test_model_state_is_untouched_in_train_mode",
    "test_online_diffusion_rows_are_exact_after_a_resume_from_an_earlier_checkpoint",
    "test_pca_trajectory_over_the_loss_contour_from_a_runs_checkpoints",
    "test_plot_command_format_dpi_smooth",
    "test_plot_overlays_several_runs",
    "test_plots_draw_lambda_max_top_k_and_density",
    "test_plugin_state_round_trips_at_every_step",
    "test_probe_changes_nothing_the_training_sees",
    "test_reader_polling_a_live_writer_always_sees_a_consistent_prefix",
    "test_real_process_bad_input_has_no_traceback",
    "test_seed_style_loop_records_probes_and_leaves_training_bit_identical",
    "test_sigkill_and_resume_mid_epoch_with_workers_is_exact",
    "test_sigkill_then_resume_equals_uninterrupted_run",
    "test_signals_flush_and_mark_interrupted",
    "test_state_dict_resumes_exactly",
    "test_store_opens_with_show_plot_and_xarray",
    "test_trace_plugins_prints_hook_calls",
    "test_trace_within_two_standard_errors_in_90_percent_of_trials",
    "test_two_process_run_equals_single_process",
    "test_two_ranks_reduce_products_to_the_pooled_operator",
    "test_two_sigkills_and_resumes_equal_the_uninterrupted_run",
    "test_wandb_offline_logs_every_groups_scalars",
    "test_wheel_installs_and_imports_every_builtin_plugin",
    "test_workers_0_and_2_store_the_same_with_random_augmentation",
})


def pytest_collection_modifyitems(items):
    for item in items:
        if getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
