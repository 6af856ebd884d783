"""Time real engine steps (prefill, decode and mixed, for each rank mix and kernel mode of a grid)
and adapter loads on this device; print the held-out fit quality of each cost-model form, save the
raw measurements (--out), the fitted cost model (--fit) and a predicted-vs-measured plot (--plot).
The flags after --kernel override single fields of the --grid preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from carajax.cli.args import add_dtype_arg, model_config_arg

HELP = "time real engine steps on this device and fit cost models"


def add_profile_args(p: argparse.ArgumentParser) -> None:
    from carajax.sched.cost_model import FORMS, KERNELS
    from carajax.sched.profiler import GRIDS

    p.add_argument("--model", default="llama-test",
                   help="preset name (random weights), HF checkpoint dir, GGUF file or a model carajax "
                        "pulls by name (default: %(default)s)")
    add_dtype_arg(p)
    p.add_argument("--grid", default="quick", choices=sorted(GRIDS),
                   help="what to measure: quick takes minutes for a small model on a CPU, full is sized "
                        "for a fit worth keeping on a GPU (default: %(default)s)")
    p.add_argument("--impl", default="auto", choices=["auto", "pallas", "interpret", "reference"],
                   help="LoRA ops: auto takes the fastest form measured or verified on a GPU and the jnp "
                        "references on a CPU, where only one kernel mode is profiled; interpret runs "
                        "the Pallas kernels in interpret mode (default: %(default)s)")
    p.add_argument("--out", default="profile.json",
                   help="where to write the raw measurements, JSON (default: %(default)s)")
    p.add_argument("--fit", default=None, metavar="COSTMODEL.json",
                   help="write the cost model fitted on all points here")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a predicted vs measured plot here")
    p.add_argument("--form", default="rich", choices=sorted(FORMS),
                   help="form of the saved fit (default: %(default)s)")
    p.add_argument("--step-form", default=None, choices=sorted(FORMS), help="form of the saved "
                   "fit's step model (default: --form)")
    p.add_argument("--kernel", default=None, choices=KERNELS, help="kernel mode of the saved fit "
                   "(default: the first profiled)")
    grid = " (default: the --grid's)"
    p.add_argument("--batch-sizes", default=None, metavar="INTS",
                   help="comma-separated requests per step (decodes), a mixed step adding one prefill" + grid)
    p.add_argument("--prompt-tokens", default=None, metavar="INTS",
                   help="comma-separated prompt tokens per request of a prefill step, one chunk" + grid)
    p.add_argument("--contexts", default=None, metavar="INTS",
                   help="comma-separated tokens already cached per request, for a prefill the chunk's "
                        "offset" + grid)
    p.add_argument("--load-ranks", default=None, metavar="INTS",
                   help="comma-separated adapter ranks whose load time is measured" + grid)
    p.add_argument("--mixes", default=None,
                   help="comma-separated rank mixes of the batch: base (no adapter), uniformN (all rank "
                        "N), mixed A..B (the powers of two from B down to A, cycled over the requests), "
                        "e.g. 'base,uniform8,mixed 8..64'" + grid)
    p.add_argument("--kernels", default=None,
                   help="comma-separated kernel modes: unpadded (each request does its own rank's "
                        "work) or padded (every request does the batch's largest rank's)" + grid)
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per point, >= 1" + grid)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point" + grid)
    p.add_argument("--seq-len", type=int, default=None, help="KV-cache row length (default: the "
                   "model's context length, as a serving engine; a 7B model's 4096 rows at batch 32 "
                   "need 64 GiB)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (default: %(default)s)")


def profile_cmd(args: argparse.Namespace) -> dict:
    """Profile real engine steps, print held-out R^2/MAPE per form and phase, save the raw
    measurements, the fitted CostModel (`--form`) and a predicted-vs-measured plot."""
    import dataclasses

    from carajax.sched import profiler

    model_config_arg(args.model)
    ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
    names = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    over = {f: conv(v) for f, v, conv in (
        ("batch_sizes", args.batch_sizes, ints), ("prompt_tokens", args.prompt_tokens, ints),
        ("contexts", args.contexts, ints), ("rank_mixes", args.mixes, names),
        ("kernels", args.kernels, names), ("load_ranks", args.load_ranks, ints),
        ("warmup", args.warmup, int), ("repeats", args.repeats, int),
        ("seq_len", args.seq_len, int)) if v is not None}
    grid = dataclasses.replace(profiler.GRIDS[args.grid], **over)
    doc = profiler.profile(args.model, grid, dtype=args.dtype, lora_impl=args.impl,
                           progress=args.progress)
    meta = doc["metadata"]
    profiler.save_profile(doc, args.out)
    print(f"{len(doc['measurements'])} steps of {meta['model_name']} on "
          f"{profiler.device_label(meta)} (lora_impl {meta['lora_impl']}); wrote {args.out}")
    for note in meta["notes"]:
        print(f"  note: {note}")
    print("\nadapter load time (pool.load_now):")
    for row in doc["load_time"]:
        print(f"  rank {row['rank']:>4}: {row['bytes'] / 2**20:8.2f} MiB  {row['seconds'] * 1e3:8.2f} ms")
    print("\nheld-out fit quality (random 20% of the points):")
    print(profiler.format_report(profiler.report(doc)))
    model = profiler.fit_profile(doc, form=args.form, kernel=args.kernel, step_form=args.step_form)
    if args.fit:
        Path(args.fit).parent.mkdir(parents=True, exist_ok=True)
        model.save(args.fit)
        step = f", step model {args.step_form} form" if args.step_form not in (None, args.form) else ""
        print(f"\nwrote {args.fit} ({args.form} form{step}, kernel {model.kernel}, fitted on all "
              "points)")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        wrote = profiler.plot_profile(doc, model, args.plot)
        print(f"wrote {args.plot}" if wrote else "matplotlib is not installed: no plot")
    return doc


__all__ = ["HELP", "add_profile_args", "profile_cmd"]
