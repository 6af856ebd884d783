"""Train the built-in demo model and its adapters (optax, CPU) and write them into the package.

    .venv/bin/python scripts/train_demo.py            # ~13 min on 2 cores; rewrites carajax/demo/

Base: a 4-layer byte-level Llama trained to echo a word (`hello=` -> `hello`). Adapters (one per
task in carajax/demo/tasks.py, base frozen): upper, rot13, reverse, vowels. Each model is scored
by exact match on held-out words (a fixed hash keeps one word in eight out of all training; only
words that every task changes), and the base is scored on every task too, to show it does not
solve them. Results, seeds, steps, timings and loss curves go to carajax/demo/manifest.json and
carajax/demo/loss_curves.png; the tests re-measure the accuracy through the engine. Deterministic
for a seed on a given machine and JAX version (see BENCHMARKS.md for a second run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import jax
from flax import nnx

from carajax.demo import tasks as T
from carajax.demo import train as D
from carajax.models import weights

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "carajax", "demo")


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _every_10(losses: list[float]) -> list[float]:
    return [round(x, 5) for x in losses[::10]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.path.normpath(ROOT), help="where model/, adapters/ and "
                    "manifest.json go (default: the package, replacing the shipped files)")
    ap.add_argument("--base-steps", type=int, default=D.BASE_TRAINING.steps)
    ap.add_argument("--adapter-steps", type=int, default=D.ADAPTER_TRAINING.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-words", type=int, default=512)
    ap.add_argument("--tasks", default=",".join(T.TASKS), help="comma-separated task names")
    args = ap.parse_args()

    t_start = time.perf_counter()
    words = T.eval_words(args.eval_words)
    base_cfg = dataclasses.replace(D.BASE_TRAINING, steps=args.base_steps, seed=args.seed)
    (model, base_losses), base_s = timed(D.train_base, base_cfg)
    curves = {"base (echo)": base_losses}
    graphdef, params = nnx.split(model)
    weights.save_hf(model, os.path.join(args.out, "model"))

    def score(task, lora=None) -> float:
        return T.exact_match(task, words, D.greedy_answers(graphdef, params, words, lora))

    base_acc = {"echo": score(T.ECHO)} | {name: score(t) for name, t in T.TASKS.items()}
    adapters = {}
    for name in args.tasks.split(","):
        task = T.TASKS[name]
        cfg = dataclasses.replace(D.ADAPTER_TRAINING, steps=args.adapter_steps, seed=args.seed + 1)
        (lora, alpha, losses), secs = timed(D.train_adapter, model, task, cfg)
        curves[f"{name} (r={task.rank})"] = losses
        D.save_adapter(os.path.join(args.out, "adapters", name), model.config, lora, task.rank,
                       alpha)
        acc = score(task, D.DenseLora(lora, alpha / task.rank))
        adapters[name] = dict(rank=task.rank, alpha=alpha, steps=cfg.steps, lr=cfg.lr,
                              batch=cfg.batch, final_loss=D.final_loss(losses),
                              loss_every_10_steps=_every_10(losses), train_s=round(secs, 1),
                              held_out_exact_match=acc, about=task.about)

    manifest = {
        "model": D.DEMO_CONFIG.name, "params": D.DEMO_CONFIG.num_params(),
        "trained": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python scripts/train_demo.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "prompt_format": "STX word '=' -> answer ETX (byte tokenizer)",
        "eval": f"{len(words)} held-out distinctive words (tasks.eval_words), greedy, exact match",
        "base": dict(task="echo", steps=base_cfg.steps, lr=base_cfg.lr, batch=base_cfg.batch,
                     final_loss=D.final_loss(base_losses),
                     loss_every_10_steps=_every_10(base_losses), train_s=round(base_s, 1),
                     held_out_exact_match=base_acc),
        "adapters": adapters,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    D.plot_losses(curves, os.path.join(args.out, "loss_curves.png"))

    print(f"\n{'model':<10} {'rank':>4} {'steps':>5} {'train s':>7} {'own task':>9} "
          f"{'base on it':>10}")
    print(f"{'base':<10} {'-':>4} {base_cfg.steps:>5} {base_s:>7.0f} {base_acc['echo']:>9.1%} "
          f"{'':>10}")
    for name, a in adapters.items():
        print(f"{name:<10} {a['rank']:>4} {a['steps']:>5} {a['train_s']:>7.0f} "
              f"{a['held_out_exact_match']:>9.1%} {base_acc[name]:>10.1%}")
    print(f"total {manifest['total_s']:.0f} s; wrote {args.out} (loss curves: loss_curves.png)")


if __name__ == "__main__":
    main()
