"""Send prompts to the base model and to every adapter in one continuous batch, print a table.

With the built-in model (the default) the adapters are its trained ones and every answer is
checked; with SmolLM2-135M-Instruct (`smollm2-135m-instruct`) a few questions go through its
chat template to its three shipped adapters, each answer checked against its adapter's style;
with any other model two random adapters are written and the text is noise. The engine compiles
its step variants first, so the TTFT column is serving time, not compilation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from carajax.cli.args import add_cold_start_arg, add_dtype_arg, add_link_args, add_tp_arg, check_tp
from carajax.config import DEMO_MODEL

HELP = "send prompts to the base and every adapter in one batch"
QUESTIONS = ("What is the capital of France?", "Give me a tip for staying focused.")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"{DEMO_MODEL} (built in, with trained adapters), smollm2-135m-instruct "
                        "(pulled by name, with its three shipped adapters), a preset name (random "
                        "weights), an HF checkpoint dir or a GGUF file (two random adapters) "
                        "(default: %(default)s)")
    add_dtype_arg(p)
    p.add_argument("--words", default="hello,carajax,serving",
                   help="comma-separated lowercase words, each sent to the base and every adapter "
                        "(built-in model only; default: %(default)s)")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="a question for a chat model with shipped adapters, sent to the base and "
                        "every adapter; repeat for more (default: " + " and ".join(
                            repr(q) for q in QUESTIONS) + ")")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens generated per answer (default: 16 for the built-in model, "
                        "96 for a chat model)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="where to write the random adapters of a model without shipped ones "
                        "(default: carajax-demo-adapters in the temporary directory)")
    add_cold_start_arg(p)
    add_link_args(p)
    add_tp_arg(p)


def _jobs(args, engine, builtin):
    """(kind, adapter paths, [(shown prompt, adapter)], engine prompts, stop at EOS?)."""
    from carajax.config import ATTENTION_MODULES, TARGET_MODULES
    from carajax.models import hub
    from carajax.models.chat import load_chat_template
    from carajax.testing import write_random_adapter

    if builtin.is_demo(args.model):
        paths = builtin.adapter_dirs()
        jobs = [(w, a) for w in args.words.split(",") for a in (None, *paths)]
        return "trained", paths, jobs, [builtin.prompt(w) for w, _ in jobs], True
    paths = builtin.shipped_adapters(args.model)
    if paths:
        template = load_chat_template(hub.resolve(args.model), engine.tokenizer)
        jobs = [(q, a) for q in (args.question or QUESTIONS) for a in (None, *paths)]
        prompts = [engine.tokenizer.encode(template.prompt_text([{"role": "user", "content": q}]))
                   for q, _ in jobs]
        return "chat", paths, jobs, prompts, True
    root = args.adapter_dir or os.path.join(tempfile.gettempdir(), "carajax-demo-adapters")
    specs = {"attn-r8": dict(rank=8, target_modules=ATTENTION_MODULES, seed=1),
             "all-r32": dict(rank=32, target_modules=TARGET_MODULES, seed=2)}
    paths = {name: write_random_adapter(os.path.join(root, name), engine.model_config, **spec)
             for name, spec in specs.items()}
    jobs = [("The quick brown fox", a) for a in (None, *paths)]
    return "random", paths, jobs, [w for w, _ in jobs], False


def demo_cmd(args: argparse.Namespace) -> None:
    """Warm up, then serve every prompt with the base and every adapter in one batch; a table."""
    import jax

    from carajax import demo as builtin
    from carajax.config import EngineConfig
    from carajax.engine.engine import Engine
    from carajax.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    check_tp(args.model, args.tp)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, config=EngineConfig(
        cold_start=args.cold_start, emulated_link_gbps=args.link_gbps,
        emulated_link_latency_ms=args.link_latency_ms, tp=args.tp))
    with engine:
        kind, paths, jobs, prompts, stop = _jobs(args, engine, builtin)
        for name, path in paths.items():
            engine.add_adapter(name, path)
        link = (f"emulated link {args.link_gbps} GB/s + {args.link_latency_ms} ms"
                if args.link_gbps else "no link emulation")
        tp = f"; tensor parallel over {args.tp} devices" if args.tp > 1 else ""
        what = {"trained": "trained", "chat": "pretrained", "random": "random weights"}[kind]
        print(f"model {args.model} ({engine.model_config.num_params() / 1e6:.2f}M params, {what}) "
              f"on {jax.devices()[0].platform}; cold starts: {args.cold_start} ({link}){tp}; "
              f"loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        t0 = time.perf_counter()
        variants = _warmup(engine)
        print(f"compiled {variants} step variants in {time.perf_counter() - t0:.1f}s", flush=True)
        max_tokens = args.max_tokens or (96 if kind == "chat" else 16)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                  stop_token_ids=None if stop else ())
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=[a for _, a in jobs], sampling=sampling)
        elapsed = time.perf_counter() - t0
    right = (_chat_table(jobs, outs) if kind == "chat"
             else _table(jobs, prompts, outs, kind, builtin))
    total = sum(len(o.token_ids) for o in outs)
    print(f"\n{len(jobs)} requests, {total} tokens in {elapsed:.2f}s in one continuous batch, "
          "after warm-up (cold starts included: the adapters start on the host)")
    if kind == "trained":
        print(f"{right}/{len(jobs)} answers correct. The base echoes the word; each adapter "
              "does its own task: " + ", ".join(f"{n} {t.about}" for n, t in builtin.TASKS.items()))
    elif kind == "chat":
        from carajax.demo import smollm2

        held = smollm2.manifest()["adapters"]
        styled = sum(a is not None for _, a in jobs)
        print(f"{right}/{styled} adapter answers in their adapter's style. On held-out questions "
              "when trained: " + ", ".join(f"{n} {held[n]['held_out_accuracy']:.0%} (base "
                                            f"{held[n]['base_held_out_accuracy']:.0%})" for n in held))
    else:
        print("This model has random weights, so its text is noise; each adapter changes it.")


def _warmup(engine) -> int:
    from tqdm import tqdm

    with tqdm(desc="compiling step variants", unit="variant", mininterval=2.0) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return engine.warmup(progress=progress)


def _table(jobs, prompts, outs, kind, builtin) -> int:
    print(f"\n{'prompt':<22} {'adapter':<8} {'TTFT ms':>8} {'CPU-LoRA tok':>12}  output (greedy)")
    right = 0
    for (word, adapter), prompt, out in zip(jobs, prompts, outs):
        text = out.text if out.text else str(out.token_ids)
        mark = ""
        if kind == "trained":
            task = builtin.TASKS[adapter] if adapter else builtin.ECHO
            ok = text == task.fn(word)
            right += ok
            mark = "  ok" if ok else f"  WRONG (expected {task.fn(word)!r})"
        print(f"{prompt!r:<22} {adapter or '(base)':<8} {out.metrics.ttft_s * 1e3:>8.1f} "
              f"{out.metrics.cpu_prefill_tokens:>12}  {text!r}{mark}")
    return right


def _chat_table(jobs, outs) -> int:
    """Each answer under a line naming its adapter, TTFT, and whether it is in the style."""
    from carajax.demo.smollm2.styles import STYLES

    right = 0
    for (question, adapter), out in zip(jobs, outs):
        if adapter is None:
            print(f"\n== {question}")
        style = STYLES.get(adapter)
        ok = style.check(out.text) if style else None
        right += bool(ok)
        check = "" if style is None else f"; {style.about}: {'yes' if ok else 'NO'}"
        print(f"-- {adapter or '(base)'} (TTFT {out.metrics.ttft_s * 1e3:.0f} ms, "
              f"{len(out.token_ids)} tokens, {out.finish_reason}{check})")
        for line in out.text.strip().splitlines() or [""]:
            print(f"   {line}")
    return right


__all__ = ["HELP", "add_demo_args", "demo_cmd"]
