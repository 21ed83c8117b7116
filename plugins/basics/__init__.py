"""Always-on and basic plugins: `train-metrics` (loss, lr, epoch, time per step), `progress` (the
rich progress bars) and `grad-norm` (the step's gradient norm and update size)."""
