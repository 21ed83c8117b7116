"""`wandb`: every group's scalars to Weights & Biases (`pip install 'lscape[wandb]'`)."""

from __future__ import annotations

import os
import secrets

from lscape import Option, UsageError, hookimpl
from ._forwarder import ScalarForwarder, require_writable_folder


class WandB(ScalarForwarder):
    """Logs every scalar the active plugins record (`train/loss`, `eos/lambda_max`, ...) to a
    W&B run, with the resolved config; `-o wandb.mode=offline` keeps it local (`wandb sync`
    uploads it later). A resumed lscape run continues the same W&B run."""

    name = "wandb"
    options = (
        Option("project", str, "lscape", "W&B project"),
        Option("entity", str, None, "W&B entity (team or user; default: yours)"),
        Option("name", str, None, "W&B run name (default: the run store's name)"),
        Option("mode", str, None, "online, offline or disabled (default: wandb's, e.g. WANDB_MODE)",
               choices=("online", "offline", "disabled")),
        Option("dir", str, None, "folder for W&B's files (default: wandb/ inside the run store's folder)"),
        Option("tags", str, None, "comma-separated W&B tags"),
        Option("every", int, 1, "send the collected scalars every N steps", minimum=1),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self.run_id: str | None = None
        self._run = None

    def check(self, ctx):
        _wandb()
        if self.opts.dir:
            require_writable_folder(self.opts.dir, "wandb.dir")

    def open(self, ctx):
        wandb = _wandb()
        path = str(ctx.store.path).removeprefix("file://").rstrip("/")
        name = self.opts.name or os.path.basename(path).removesuffix(".zarr")
        folder = self.opts.dir or (os.path.join(path, "wandb") if "://" not in path else "wandb")
        os.makedirs(folder, exist_ok=True)
        self.run_id = self.run_id or secrets.token_hex(4)  # W&B's id format: 8 of [a-z0-9]
        self._run = wandb.init(project=self.opts.project, entity=self.opts.entity, name=name, id=self.run_id,
                               resume="allow", mode=self.opts.mode, dir=folder, config=ctx.config.to_dict(),
                               tags=[t.strip() for t in self.opts.tags.split(",")] if self.opts.tags else None,
                               reinit=True)

    def write(self, step, scalars):
        self._run.log(scalars, step=step)

    def close(self, ctx, status):
        self._run.summary["lscape_status"] = status
        self._run.finish(exit_code=0 if status == "completed" else 1)
        self._run = None

    def state_dict(self):
        return {"run_id": self.run_id}  # a resumed run logs into the same W&B run

    def load_state_dict(self, state):
        self.run_id = state.get("run_id")


def _wandb():
    try:
        import wandb
    except ImportError:
        raise UsageError("the wandb plugin needs Weights & Biases: pip install 'lscape[wandb]'") from None
    return wandb


@hookimpl
def register_plugins(register):
    register(WandB)
