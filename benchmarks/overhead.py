"""Engine overhead: the same model, data and steps trained by a plain PyTorch loop and by the
lscape engine with only its always-on plugins (training metrics, progress), in one process;
and the same plain loop with `lscape.attach` (train metrics only: `session.step` where the
loop called `optimizer.step()`).

Prints the time ratios engine / plain (target ≤ 1.05×) and attach / plain (target ≤ 1.03×). Both loops draw the same minibatches
in the same order from the same seed, record the loss each step with `.item()`, and check
that their final losses agree. Run: python benchmarks/overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from lscape.api import make_config
from lscape.data import BatchStream, derived_seed
from lscape.engine import Engine

MODEL = {"widths": "512,512"}
DATA = {"task": "classification", "n": 8192, "dim": 256, "classes": 10}


def config(out, steps, device):
    return make_config(None, model="mlp", model_opts=MODEL, data="synthetic", data_opts=DATA, batch_size=128,
                       steps=steps, lr=0.05, momentum=0.9, plugins=[], progress=False, out=out, device=device,
                       eval_schedule="never", checkpoint_schedule="never")


def plain_loop(steps, device):
    """What a careful user writes by hand: same model, data stream, optimizer, loss logging."""
    cfg = config(None, steps, device)
    eng = Engine(cfg)
    ctx = eng.prepare()  # same model init and data; the loop below is plain PyTorch
    model, opt, loss_fn = ctx.model, ctx.optimizer, ctx.loss_fn
    stream = BatchStream(ctx.train_set, 128, derived_seed(cfg.seed, "train-stream"), ctx.device)
    losses = []
    _sync(device)
    t0 = _clock()
    model.train()
    for _ in range(steps):
        (x, y), _, _ = stream.next()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _sync(device)
    return _clock() - t0, losses[-1]


def attach_loop(steps, device, tmp):
    """The plain loop above with the lines `lscape.attach` adds; timed from attach to close."""
    import lscape

    cfg = config(None, steps, device)
    eng = Engine(cfg)
    ctx = eng.prepare()
    model, opt, loss_fn = ctx.model, ctx.optimizer, ctx.loss_fn
    stream = BatchStream(ctx.train_set, 128, derived_seed(cfg.seed, "train-stream"), ctx.device)
    losses = []
    _sync(device)
    t0 = _clock()
    session = lscape.attach(model, opt, loss_fn, out=f"{tmp}/attach-{time.perf_counter_ns()}.zarr", progress=False)
    model.train()
    for _ in range(steps):
        (x, y), _, _ = stream.next()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        session.step((x, y), loss)
        losses.append(loss.item())
    session.close()
    _sync(device)
    return _clock() - t0, losses[-1]


def engine_loop(steps, device, tmp):
    eng = Engine(config(f"{tmp}/run-{time.perf_counter_ns()}.zarr", steps, device))
    eng.prepare()
    _sync(device)
    t0 = _clock()
    result = eng.run()
    _sync(device)
    from lscape.store import RunReader

    return _clock() - t0, float(RunReader(result.path).read("train")["loss"][-1])


#: the timer: wall-clock (default) or this process's CPU time (--clock cpu), which other
#: processes on a shared machine disturb far less (single-threaded torch: CPU time is work done)
_clock = time.perf_counter


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or process CPU time (steadier on a busy machine; CPU only)")
    args = parser.parse_args()
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine_loop(20, args.device, tmp), plain_loop(20, args.device), attach_loop(20, args.device, tmp)  # warm-up
        plain, engine, attached = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all three
            tp, lp = plain_loop(args.steps, args.device)
            te, le = engine_loop(args.steps, args.device, tmp)
            ta, la = attach_loop(args.steps, args.device, tmp)
            plain.append(tp)
            engine.append(te)
            attached.append(ta)
            assert abs(lp - le) <= 1e-6 * max(1.0, abs(lp)), (lp, le)
            assert la == lp, (lp, la)  # the same loop: bit-identical training
    mp, me, ma = statistics.median(plain), statistics.median(engine), statistics.median(attached)
    print(f"lscape engine overhead — MLP 256-512-512-10 ({MODEL['widths']}), batch 128, {args.steps} steps, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"{'loop':<34}{'median s':>10}{'per step ms':>14}")
    print(f"{'plain PyTorch':<34}{mp:>10.3f}{1e3 * mp / args.steps:>14.3f}")
    print(f"{'lscape (train-metrics, progress)':<34}{me:>10.3f}{1e3 * me / args.steps:>14.3f}")
    print(f"{'plain loop + lscape.attach (train)':<34}{ma:>10.3f}{1e3 * ma / args.steps:>14.3f}")
    print(f"time ratio engine/plain: {me / mp:.3f}x  (target <= 1.05x; same final loss: yes)")
    print("per-repeat ratios: " + ", ".join(f"{e / p:.3f}" for p, e in zip(plain, engine)))
    print(f"time ratio attach/plain: {ma / mp:.3f}x  (target <= 1.03x; bit-identical final loss: yes)")
    print("per-repeat ratios: " + ", ".join(f"{a / p:.3f}" for p, a in zip(plain, attached)))


if __name__ == "__main__":
    main()
