"""Replay a trace open-loop and compare policies side by side.

With no arguments it is the README's main job: 30 s of the Azure LLM 2023 conversation trace at
half its rate (`--scale`: 1 is the trace's rate, 2 twice it) against two `carajax-demo` workers
behind the router over gRPC, 128 random adapters of ranks 8/16/32/64 with Zipf(1.8) popularity,
under the `cached`, `wait`, `async`, `cpu_assist` and `auto` cold-start policies; prints a table,
writes JSON, Markdown and PNG plots. `--mode engine` replays against an in-process engine
instead, `--target HOST:PORT` against a running worker or router over gRPC, `--target
http://HOST:PORT` against an OpenAI HTTP server (a worker's or router's --http-port, or the Ray
Serve app of `carajax ray`).

The defaults are sized for a 2-core CPU machine: several minutes the first time (the workers
compile their step variants and fit their cost models, cached for later runs), a moderate load
(the cached workers' queues stay short: at the trace's full rate the demo model's two workers on
2 cores queue, cached TTFT p50 ~0.7 s), prompts and outputs clipped so a request costs a few
dozen steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from carajax.cli.args import UsageError, existing_file, int_list, model_config_arg
from carajax.config import COLD_START_POLICIES, DEMO_MODEL, EngineConfig
from carajax.replay.report import Slo
from carajax.replay.runs import DEFAULT_TRACE, REPO

HELP = ("replay a trace open-loop against workers behind a router (the main job), an engine or a "
        "running server; compare policies")


def add_replay_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace")
    g.add_argument("--trace", default=None, help=f"JSONL or Azure CSV trace (default {DEFAULT_TRACE.name}, "
                   "the Azure LLM 2023 conversation trace shipped with carajax)")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed trace lines")
    g.add_argument("--start", type=float, default=120.0, help="window start, trace seconds (default: "
                   "%(default)s, past the first two minutes of the conversation trace, which ramp up "
                   "from ~2 req/s)")
    g.add_argument("--duration", type=float, default=30.0,
                   help="window length, trace seconds (default: %(default)s)")
    g.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="cut the window to its first N requests")
    g.add_argument("--scale", type=float, default=0.5, help="multiply the arrival rate (time "
                   "compression; default: %(default)s, half the trace's rate, a moderate load for two "
                   "workers on 2 CPU cores)")
    g.add_argument("--max-prompt", type=int, default=256,
                   help="clip prompts to this many tokens (default: %(default)s)")
    g.add_argument("--max-output", type=int, default=64,
                   help="clip outputs to this many tokens (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the adapters' weights, each request's "
                   "adapter and rank, and the synthesized prompts (default: %(default)s)")
    g = p.add_argument_group("adapters")
    g.add_argument("--adapters", type=int, default=128,
                   help="random adapters, with Zipf popularity (default: %(default)s)")
    g.add_argument("--zipf", type=float, default=1.8,
                   help="Zipf exponent of adapter popularity (default: %(default)s)")
    g.add_argument("--ranks", default="8,16,32,64",
                   help="comma-separated adapter ranks (default: %(default)s)")
    g.add_argument("--rank-weights", default=None,
                   help="comma-separated weights of --ranks, one each (default: uniform)")
    g.add_argument("--adapter-dir", default=None, metavar="DIR", help="use the PEFT adapters in DIR "
                   "(by folder name, Zipf over their sorted names) instead of random ones")
    g.add_argument("--adapter-cache", default=None, metavar="DIR", help="where random adapters are "
                   "written once (default: adapters/ under $CARAJAX_HOME, default ~/.cache/carajax)")
    g = p.add_argument_group("serving")
    g.add_argument("--mode", default="cluster", choices=["cluster", "engine"],
                   help="cluster: workers (`carajax serve` processes) behind a router over gRPC; "
                   "engine: one in-process engine (default: %(default)s)")
    g.add_argument("--target", default=None, metavar="HOST:PORT|http://HOST:PORT",
                   help="replay against a running worker or router instead: HOST:PORT over gRPC (adapters "
                   "it lacks are registered with LoadAdapter, so its workers must allow their paths: "
                   "`carajax serve --adapter-root` a directory holding --adapter-cache or --adapter-dir), "
                   "or http://HOST:PORT over OpenAI HTTP, e.g. `carajax ray` (streamed /v1/completions; "
                   "adapters it lacks are loaded with /v1/load_lora_adapter if it allows that, else the "
                   "replay stops naming them); --model must match its model")
    g.add_argument("--model", default=DEMO_MODEL, help="the built-in trained model, a "
                   "preset name (random weights), an HF checkpoint dir, a GGUF file or a model "
                   "carajax pulls by name (smollm2-135m-instruct; default: %(default)s)")
    g.add_argument("--workers", type=int, default=2, help="cluster mode: `carajax serve` worker "
                   "processes behind the router, started afresh for each policy (default: %(default)s)")
    g.add_argument("--cold-starts", default="cached,wait,async,cpu_assist,auto",
                   help="comma-separated cold-start policies to compare (as `carajax serve "
                        "--cold-start`), one run each (default: %(default)s)")
    g.add_argument("--router-policies", default="carajax", help="comma-separated routing policies to "
                   "compare in cluster mode (default: %(default)s)")
    g.add_argument("--max-batch", type=int, default=4, help="requests running at once per worker (each "
                   "power of two up to it is a compiled step variant: seconds each on CPU; default: "
                   "%(default)s)")
    g.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per request per step "
                   "(also the smallest prefill bucket: fewer compiled variants; default: %(default)s)")
    g.add_argument("--lora-pages", type=int, default=0, help="device adapter pages (16 ranks each) per "
                   "worker under every policy but cached (evicting LRU); 0: room for every adapter, as "
                   "cached (default: %(default)s)")
    g.add_argument("--link-gbps", type=float, default=0.05, help="emulated host->device link (GB/s) for "
                   "adapter copies, used when there is no accelerator (nor --real-link, --target); "
                   "scaled to the tiny model, see the output (default: %(default)s)")
    g.add_argument("--link-latency-ms", type=float, default=3.0, help="fixed latency of each emulated "
                   "adapter copy, in milliseconds (default: %(default)s)")
    g.add_argument("--real-link", action="store_true", help="no link emulation even on CPU")
    g.add_argument("--engine-config", default=None, metavar="JSON", help="more EngineConfig fields for "
                   "every engine, e.g. '{\"lora_impl\": \"reference\"}'")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="engine mode: compile every step variant before replaying (default: %(default)s)")
    g = p.add_argument_group("report")
    g.add_argument("--slo-ttft-s", type=float, default=0.5, help="time-to-first-token SLO in seconds "
                   "(default: %(default)s, about 3x the cached median of the default replay on a 2-core "
                   "CPU)")
    g.add_argument("--slo-tpot-ms", type=float, default=30.0, help="time-per-output-token SLO in "
                   "milliseconds (default: %(default)s, about 3x the cached median of the default "
                   "replay on a 2-core CPU)")
    g.add_argument("--out", default="results/replay",
                   help="output directory: JSON, Markdown, PNG plots (default: %(default)s)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar per replay (default: %(default)s)")


def check_replay_args(args: argparse.Namespace) -> None:
    """Every argument checked before anything starts (no worker, no log, no adapter written):
    `UsageError` naming the first bad one."""
    from carajax.replay import adapters as adapter_store
    from carajax.sched.router import POLICIES

    existing_file("--trace", args.trace or DEFAULT_TRACE)
    model_config_arg(args.model)
    names = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    for flag, given, known in (("--cold-starts", args.cold_starts, COLD_START_POLICIES),
                               ("--router-policies", args.router_policies, POLICIES)):
        bad = [x for x in names(given) if x not in known]
        if bad or not names(given):
            raise UsageError(f"{flag} {given!r}: unknown {bad or 'none given'}; choose from "
                             f"{', '.join(known)}")
    ranks = int_list("--ranks", args.ranks)
    if args.rank_weights is not None:
        try:
            weights = [float(w) for w in args.rank_weights.split(",")]
        except ValueError:
            raise UsageError(f"--rank-weights {args.rank_weights!r}: expected numbers") from None
        if len(weights) != len(ranks) or min(weights) < 0 or sum(weights) <= 0:
            raise UsageError(f"--rank-weights {args.rank_weights!r}: one non-negative weight per "
                             f"rank of --ranks ({len(ranks)}), not all zero")
    for flag, value, low in (("--workers", args.workers, 1), ("--max-batch", args.max_batch, 1),
                             ("--prefill-chunk", args.prefill_chunk, 1), ("--adapters", args.adapters, 1),
                             ("--max-prompt", args.max_prompt, 1), ("--max-output", args.max_output, 1),
                             ("--lora-pages", args.lora_pages, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be >= {low}")
    for flag, value in (("--scale", args.scale), ("--duration", args.duration),
                        ("--link-gbps", args.link_gbps), ("--slo-ttft-s", args.slo_ttft_s),
                        ("--slo-tpot-ms", args.slo_tpot_ms)):
        if not value > 0:
            raise UsageError(f"{flag} {value}: must be > 0")
    if args.adapter_dir is not None:
        if not os.path.isdir(args.adapter_dir):
            raise UsageError(f"--adapter-dir {args.adapter_dir}: no such directory")
        try:
            adapter_store.scan_adapter_dir(args.adapter_dir)
        except (FileNotFoundError, ValueError, TypeError) as e:  # none there, or a bad config
            raise UsageError(f"--adapter-dir {args.adapter_dir}: {e}") from None
    if args.target is not None:
        from urllib.parse import urlsplit

        from carajax.replay.runs import is_http_target

        if is_http_target(args.target):
            try:
                port = urlsplit(args.target).port
            except ValueError:
                port = None
            if not urlsplit(args.target).hostname or port is None:
                raise UsageError(f"--target {args.target!r}: expected http://HOST:PORT")
        elif not args.target.rpartition(":")[2].isdigit():
            raise UsageError(f"--target {args.target!r}: expected HOST:PORT (gRPC) or http://HOST:PORT")
    try:
        extra = json.loads(args.engine_config) if args.engine_config else {}
        for cs in names(args.cold_starts):
            EngineConfig(**{"cold_start": cs, "max_batch_size": args.max_batch,
                            "prefill_chunk": args.prefill_chunk, **extra})
    except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"bad --engine-config: {e}") from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")


def machine_info() -> dict:
    """Where the numbers come from: CPU, cores, load, accelerator, versions."""
    import jax

    from carajax.sched.profiler import host_info

    host = host_info()
    dev = jax.devices()[0]

    def git(*args: str) -> str:  # "" where git is not installed or this is no checkout
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or None
    return {"cpu": host["cpu_model"], "cores": host["cpu_count"], "load_avg_at_start": os.getloadavg(),
            "platform": host["platform"], "python": host["python"],
            "jax": jax.__version__, "device": dev.platform, "device_kind": dev.device_kind,
            "git_commit": commit, "git_dirty": bool(commit and git("status", "--porcelain", "carajax"))}


WIDTH = 118  # every line this command prints fits a 120-column terminal


def _log(msg: str) -> None:
    """Print, each line wrapped to WIDTH columns (continuations indented)."""
    for line in msg.split("\n"):
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        print(textwrap.fill(line, WIDTH, subsequent_indent=indent, break_on_hyphens=False)
              if len(line) > WIDTH else line, flush=True)


def replay_cmd(args: argparse.Namespace) -> dict:
    """Run the replay(s); print the table; write replay.json, replay.md and the plots."""
    from carajax.replay import runs
    from carajax.replay.report import (
        add_cold_split,
        format_summary,
        format_table,
        plot_results,
        slo_verdict,
        summarize,
    )
    from carajax.trace import TraceError

    check_replay_args(args)
    t_start = time.monotonic()
    # This process asks JAX which device it has; on a GPU that must not take the memory the
    # workers (other processes on the same GPU) need. Read when the backend starts, i.e. later.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        plan = runs.plan(args)
    except TraceError as e:
        raise UsageError(f"--trace {e}") from None
    for line in plan.notes:
        _log(line)
    results, run_info = runs.execute_all(plan, args, _log)
    slo = Slo(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_ms / 1e3)
    summaries = {k: summarize(v, slo) for k, v in results.items()}
    for k, s in summaries.items():
        s["load_avg_1m"] = run_info[k].get("load_avg_after", (None,))[0]
    add_cold_split(summaries, results)
    if plan.link and "cached" in summaries and summaries["cached"]["tpot_s"]["p50"]:
        step = summaries["cached"]["tpot_s"]["p50"]
        r64 = runs.copy_ms(64, plan.model_config, *plan.link)
        check = (f"link check: an emulated rank-64 copy ({r64:.1f} ms) is {r64 / 1e3 / step:.1f}x the "
                 f"median time per token under cached in this run ({step * 1e3:.1f} ms)")
        plan.notes.append(check)
        plan.caveats.append(check)
    table = format_table(summaries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_results(results, summaries, out, subtitle=plan.subtitle)
    argv = getattr(args, "argv", None)  # recorded: every number comes with its command
    if argv is None and sys.argv[1:2] == ["replay"]:
        argv = sys.argv[2:]
    doc = {
        "kind": "carajax replay",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "carajax replay" + ("" if not argv else " " + shlex.join(argv)),
        "machine": machine_info(),
        "emulated": plan.emulated,
        "notes": plan.notes,
        "caveats": plan.caveats,
        "setup": plan.setup,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "summaries": summaries,
        "runs": run_info,
        "table_markdown": table,
        "subtitle": plan.subtitle,
        "plots": [os.path.relpath(p, out) for p in plots],
        "wall_s": None,
        "requests": results,
    }
    doc["wall_s"] = time.monotonic() - t_start
    with open(out / "replay.json", "w") as f:
        json.dump(doc, f, indent=1)
    (out / "replay.md").write_text("\n".join(["# carajax replay", "", *[f"- {n}" for n in plan.notes], "",
                                              table, "", slo_verdict(summaries), ""]))
    _log(f"\n== results: {len(summaries)} policies, the same {plan.setup['requests']} requests each")
    _log(format_summary(summaries))
    _log(slo_verdict(summaries))
    _log(f"plot of the cold-start requests' TTFT: {plots[0]}" if plots and "cold_ttft" in plots[0]
         else "no request was a cold start under any policy")
    _log("\nScaled, clipped, synthesised or emulated (details at the top and in replay.json):")
    for line in plan.caveats:
        _log(f"  - {line}")
    _log(f"\nwrote {out / 'replay.md'} (the full table), {out / 'replay.json'} (per-request rows); "
         f"plots: {', '.join(os.path.relpath(p, out) for p in plots)} in {out}")
    _log(f"total wall time {doc['wall_s']:.0f} s")
    return doc


__all__ = ["HELP", "add_replay_args", "check_replay_args", "machine_info", "replay_cmd"]
