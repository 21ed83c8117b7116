"""Forwarding a run's scalars to experiment trackers: the `tensorboard` and `wandb` plugins, on
the shared ``ScalarForwarder`` base (third-party trackers subclass it)."""

from ._forwarder import ScalarForwarder, scalar

__all__ = ["ScalarForwarder", "scalar"]
