"""The `carajax` command line.

    carajax demo [--model llama-test] [--max-tokens 24]   generate with two adapters and the base
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from carajax.config import ATTENTION_MODULES, TARGET_MODULES, EngineConfig
from carajax.engine import Engine
from carajax.sampling import SamplingParams
from carajax.testing import write_random_adapter


def demo(args: argparse.Namespace) -> None:
    """Load the model, register two PEFT adapters of different ranks, generate, print a table."""
    import jax

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, config=EngineConfig(
        cold_start=args.cold_start, emulated_link_gbps=args.link_gbps,
        emulated_link_latency_ms=args.link_latency_ms))
    root = args.adapter_dir or os.path.join(tempfile.gettempdir(), "carajax-demo-adapters")
    specs = {"attn-r8": dict(rank=8, target_modules=ATTENTION_MODULES, seed=1),
             "all-r32": dict(rank=32, target_modules=TARGET_MODULES, seed=2)}
    with engine:
        for name, spec in specs.items():
            engine.add_adapter(name, write_random_adapter(os.path.join(root, name),
                                                          engine.model_config, **spec))
        link = (f"emulated link {args.link_gbps} GB/s + {args.link_latency_ms} ms"
                if args.link_gbps else "no link emulation")
        print(f"model {args.model} ({engine.model_config.num_params() / 1e6:.2f}M params, "
              f"random weights) on {jax.devices()[0].platform}; cold starts: {args.cold_start} "
              f"({link}); ready in {time.perf_counter() - t0:.1f}s; adapters in {root}")
        prompts = ["The quick brown fox", "LoRA adapters are", "The quick brown fox"]
        adapters = ["attn-r8", "all-r32", None]
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=())
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=adapters, sampling=sampling)
        elapsed = time.perf_counter() - t0
    print(f"\n{'adapter':<10} {'prompt':<22} {'tokens':>6} {'TTFT ms':>8} {'CPU-LoRA tok':>12}  "
          "output (greedy)")
    for prompt, adapter, out in zip(prompts, adapters, outs):
        text = out.text if out.text else str(out.token_ids)
        print(f"{adapter or '(base)':<10} {prompt:<22} {len(out.token_ids):>6} "
              f"{out.metrics.ttft_s * 1e3:>8.1f} {out.metrics.cpu_prefill_tokens:>12}  {text!r}")
    total = sum(len(o.token_ids) for o in outs)
    print(f"\n{total} tokens in {elapsed:.2f}s in one continuous batch (includes compilation); "
          f"compiled variants: {Engine.compiled_variants()}")
    print("The built-in model has random weights, so its text is noise; each adapter changes it.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carajax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with two adapters and the base model")
    p.add_argument("--model", default="llama-test", help="preset name or HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--adapter-dir", default=None, help="where to write the demo adapters")
    p.add_argument("--cold-start", default="cpu_assist", choices=["cpu_assist", "wait", "cached"])
    p.add_argument("--link-gbps", type=float, default=None, help="emulate the host->device link")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
