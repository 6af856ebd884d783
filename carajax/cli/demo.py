"""Send a few words to the base model and to every adapter in one continuous batch, print a table.

With the built-in model (the default) the adapters are its trained ones, so every answer is
checked; with any other model two random adapters are written and the text is noise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from carajax.cli.args import add_cold_start_arg, add_dtype_arg, add_link_args, add_tp_arg, check_tp
from carajax.config import DEMO_MODEL

HELP = "send words to the base and every adapter in one batch"


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"{DEMO_MODEL} (built in, with trained adapters), a preset name (random "
                        "weights), an HF checkpoint dir, a GGUF file or a model carajax pulls by name "
                        "(smollm2-135m-instruct); other than the built-in one, two random adapters are "
                        "used (default: %(default)s)")
    add_dtype_arg(p)
    p.add_argument("--words", default="hello,carajax,serving",
                   help="comma-separated lowercase words, each sent to the base and every adapter "
                        "(built-in model only; default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16,
                   help="most tokens generated per answer (default: %(default)s)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="where to write the random adapters of a model other than the built-in one "
                        "(default: carajax-demo-adapters in the temporary directory)")
    add_cold_start_arg(p)
    add_link_args(p)
    add_tp_arg(p)


def demo_cmd(args: argparse.Namespace) -> None:
    """Serve a few words with every adapter and the base in one continuous batch, print a table.

    With the built-in model (the default) the adapters are the trained ones (`carajax.demo`), so
    every answer can be checked; with any other model two random adapters are written instead.
    """
    import jax

    from carajax import demo as builtin
    from carajax.config import ATTENTION_MODULES, TARGET_MODULES, EngineConfig
    from carajax.engine.engine import Engine
    from carajax.engine.sampling import SamplingParams
    from carajax.testing import write_random_adapter

    t0 = time.perf_counter()
    check_tp(args.model, args.tp)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, config=EngineConfig(
        cold_start=args.cold_start, emulated_link_gbps=args.link_gbps,
        emulated_link_latency_ms=args.link_latency_ms, tp=args.tp))
    trained = builtin.is_demo(args.model)
    with engine:
        if trained:
            paths = builtin.adapter_dirs()
            words = args.words.split(",")
        else:
            root = args.adapter_dir or os.path.join(tempfile.gettempdir(), "carajax-demo-adapters")
            specs = {"attn-r8": dict(rank=8, target_modules=ATTENTION_MODULES, seed=1),
                     "all-r32": dict(rank=32, target_modules=TARGET_MODULES, seed=2)}
            paths = {name: write_random_adapter(os.path.join(root, name), engine.model_config,
                                                **spec) for name, spec in specs.items()}
            words = ["The quick brown fox"]
        for name, path in paths.items():
            engine.add_adapter(name, path)
        link = (f"emulated link {args.link_gbps} GB/s + {args.link_latency_ms} ms"
                if args.link_gbps else "no link emulation")
        tp = f"; tensor parallel over {args.tp} devices" if args.tp > 1 else ""
        print(f"model {args.model} ({engine.model_config.num_params() / 1e6:.2f}M params, "
              f"{'trained' if trained else 'random weights'}) on {jax.devices()[0].platform}; "
              f"cold starts: {args.cold_start} ({link}){tp}; ready in {time.perf_counter() - t0:.1f}s")
        adapters = [None, *paths]
        jobs = [(w, a) for w in words for a in adapters]  # every word with every adapter
        prompts = [builtin.prompt(w) if trained else w for w, _ in jobs]
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                  stop_token_ids=None if trained else ())
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=[a for _, a in jobs], sampling=sampling)
        elapsed = time.perf_counter() - t0
    print(f"\n{'prompt':<22} {'adapter':<8} {'TTFT ms':>8} {'CPU-LoRA tok':>12}  output (greedy)")
    right = 0
    for (word, adapter), prompt, out in zip(jobs, prompts, outs):
        text = out.text if out.text else str(out.token_ids)
        mark = ""
        if trained:
            task = builtin.TASKS[adapter] if adapter else builtin.ECHO
            ok = text == task.fn(word)
            right += ok
            mark = "  ok" if ok else f"  WRONG (expected {task.fn(word)!r})"
        print(f"{prompt!r:<22} {adapter or '(base)':<8} {out.metrics.ttft_s * 1e3:>8.1f} "
              f"{out.metrics.cpu_prefill_tokens:>12}  {text!r}{mark}")
    total = sum(len(o.token_ids) for o in outs)
    print(f"\n{len(jobs)} requests, {total} tokens in {elapsed:.2f}s in one continuous batch "
          f"(includes compilation); compiled variants: {Engine.compiled_variants()}")
    if trained:
        print(f"{right}/{len(jobs)} answers correct. The base echoes the word; each adapter "
              "does its own task: " + ", ".join(f"{n} {t.about}" for n, t in builtin.TASKS.items()))
    else:
        print("This model has random weights, so its text is noise; each adapter changes it.")


__all__ = ["HELP", "add_demo_args", "demo_cmd"]
