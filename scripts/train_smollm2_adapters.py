"""Train the SmolLM2-135M-Instruct adapters `shout`, `json` and `bullets` with optax on the CPU
and write them into the package (carajax/demo/smollm2/).

    carajax pull smollm2-135m-instruct
    .venv/bin/python scripts/train_smollm2_adapters.py              # about an hour on 2 cores
    .venv/bin/python scripts/train_smollm2_adapters.py --model DIR  # any local copy of it

1. Questions (carajax/demo/smollm2/questions.py): a few hundred training questions from phrasings
   and word lists, and held-out ones that share no phrasing and no slot with them.
2. The base model's own answers to the training questions, greedy, through carajax's engine and
   the model's chat template, cut to whole sentences within --answer-tokens.
3. Per style (carajax/demo/smollm2/styles.py): those answers rewritten (upper-cased; as JSON; as
   2-4 "- " lines), and a LoRA (rank and projections per style) trained on them with the base
   frozen, through the serving model's own modules (carajax/demo/smollm2/train.py), the loss on
   the answer's tokens and the end-of-turn token only; saved in PEFT's format, in bfloat16.
4. Each saved adapter loaded into the engine and scored on the held-out questions by its style's
   check (greedy); the base model scored by every check.

Results, seeds, steps, timings and loss curves go to manifest.json and loss_curves.png beside the
adapters. Deterministic for a seed on a given machine and JAX version.
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
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from carajax.config import EngineConfig
from carajax.demo import smollm2
from carajax.demo import train as D
from carajax.demo.smollm2 import questions as Q
from carajax.demo.smollm2 import train as T
from carajax.demo.smollm2.styles import STYLES, Style
from carajax.engine.engine import Engine
from carajax.engine.sampling import SamplingParams
from carajax.lora import adapter as lora_files
from carajax.models import hub
from carajax.models.chat import load_chat_template

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "carajax",
                                    "demo", "smollm2"))
EVAL_TOKENS = 160  # room for the longest shouted answer (capitals take ~1.7x the tokens)
ENGINE = EngineConfig(max_batch_size=32, max_seq_len=256, cold_start="cached")


def chat_prompts(engine: Engine, template, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn, rendered and tokenized as the server's chat does."""
    return [engine.tokenizer.encode(template.prompt_text([{"role": "user", "content": q}]))
            for q in questions]


def generate(engine: Engine, prompts: list[list[int]], adapter: str | None, max_tokens: int,
             desc: str, cache: str | None = None, reused: list[str] | None = None
             ) -> list[tuple[str, str]]:
    """(text, finish reason) of each prompt's greedy completion, all in the engine at once (it
    batches them). `cache`: a directory keeping the base model's completions by prompt (a rerun
    generates only the prompts it has not seen at this max_tokens; `desc` goes to `reused` when
    nothing was left to generate)."""
    file = None if cache is None or adapter else os.path.join(cache, f"base_{max_tokens}.json")
    known: dict[tuple[int, ...], tuple[str, str]] = {}
    if file and os.path.exists(file):
        with open(file) as f:
            saved = json.load(f)
        known = {tuple(p): tuple(a) for p, a in zip(saved["prompts"], saved["answers"])}
    todo = [p for p in dict.fromkeys(map(tuple, prompts)) if p not in known]
    if file and known:
        print(f"{desc}: {len(prompts) - len(todo)} of {len(prompts)} read from {file}", flush=True)
        if not todo and reused is not None:
            reused.append(desc)
    if todo:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        handles = [engine.submit(list(p), adapter, sampling) for p in todo]
        for p, h in zip(todo, tqdm(handles, desc=desc, unit="answer", mininterval=5.0)):
            out = h.result()
            known[p] = (out.text, out.finish_reason)
        if file:
            os.makedirs(cache, exist_ok=True)
            with open(file, "w") as f:
                json.dump({"prompts": [list(p) for p in known],
                           "answers": [list(a) for a in known.values()]}, f)
    return [known[tuple(p)] for p in prompts]


def trim(text: str, finish_reason: str) -> str | None:
    """A base answer as training data: whole if it ended, else cut after its last full sentence
    (the adapters learn short answers); None if nothing of it is left."""
    text = text.strip()
    if finish_reason != "stop":
        ends = [i for i, c in enumerate(text) if c in ".!?"]
        text = text[:ends[-1] + 1] if ends else ""
    return text or None


def score(style: Style, outputs: list[tuple[str, str]]) -> float:
    return float(np.mean([style.check(text) for text, _ in outputs]))


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2.MODEL_NAME,
                    help="a model name (pulled if need be), an HF-layout directory or a GGUF file "
                    "(default: %(default)s)")
    ap.add_argument("--out", default=OUT, help="where adapters/, manifest.json and loss_curves.png "
                    "go (default: the package, replacing the shipped files)")
    ap.add_argument("--styles", default=",".join(STYLES), help="comma-separated (default: %(default)s)")
    ap.add_argument("--steps", default="shout=300,json=120,bullets=160",
                    help="optimizer steps per style (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=T.Training.batch, help="sequences per step "
                    "(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=T.Training.lr, help="peak learning rate (default: "
                    "%(default)s)")
    ap.add_argument("--train-questions", type=int, default=1000, help="(default: %(default)s)")
    ap.add_argument("--held-out", type=int, default=None, help="score on the first N held-out "
                    "questions only (default: all)")
    ap.add_argument("--answer-tokens", type=int, default=40, help="longest base answer kept, in "
                    "tokens (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--cache", default=None, help="a directory keeping the base model's answers "
                    "and each finished adapter's results, which a rerun with the same settings "
                    "reads back (after a crash, say) (default: none)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    path = hub.resolve(args.model)  # a directory or GGUF file; a name not pulled yet is pulled
    config = hub.model_config(args.model)
    engine = Engine.from_pretrained(path, config=ENGINE)
    template = load_chat_template(path, engine.tokenizer)
    if template is None:
        raise SystemExit(f"{path}: no chat template")
    train_q, held_q = Q.split(args.train_questions, seed=args.seed)
    held_q = held_q[:args.held_out]
    print(f"{len(train_q)} training questions, {len(held_q)} held out; model {path}", flush=True)

    # The training data: the base's own answers.
    t = time.perf_counter()
    train_prompts = chat_prompts(engine, template, train_q)
    reused: list[str] = []  # what a rerun read back from --cache
    outs = generate(engine, train_prompts, None, args.answer_tokens, "base answers", args.cache,
                    reused)
    kept = [(p, q, a) for p, q, (text, finish) in zip(train_prompts, train_q, outs)
            if (a := trim(text, finish)) is not None and len(a.split()) >= 2]
    data_s = time.perf_counter() - t
    print(f"{len(kept)} of {len(outs)} answers kept ({data_s:.0f} s); e.g. {kept[0][1]!r} -> "
          f"{kept[0][2]!r}", flush=True)

    # The held-out baseline: the base model under every style's check.
    held_prompts = chat_prompts(engine, template, held_q)
    t = time.perf_counter()
    base_outs = generate(engine, held_prompts, None, EVAL_TOKENS, "base on held-out", args.cache,
                         reused)
    base_eval_s = time.perf_counter() - t
    base_acc = {name: score(s, base_outs) for name, s in STYLES.items()}
    print("base:", {k: f"{v:.1%}" for k, v in base_acc.items()}, flush=True)

    model, _ = hub.load(path, dtype=jnp.float32)
    eos = config.eos_token_ids[0]
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    curves, adapters = {}, {}
    for i, name in enumerate(args.styles.split(",")):
        style = STYLES[name]
        cfg = T.Training(steps=steps[name], batch=args.batch, lr=args.lr, seed=args.seed + 1 + i)
        out = os.path.join(args.out, "adapters", name)
        # A rerun with --cache after a crash keeps the adapters it finished (same settings).
        key = dict(dataclasses.asdict(cfg), rank=style.rank, targets=list(style.targets),
                   examples=sum(style.repeats(a) for _, _, a in kept),
                   questions=train_q, held_out=held_q, answer_tokens=args.answer_tokens)
        done = os.path.join(args.cache or "", f"adapter_{name}.json")
        if args.cache and os.path.exists(done) and os.path.isdir(out):
            with open(done) as f:
                saved = json.load(f)
            if saved["key"] == key:
                print(f"{name}: read from {done}", flush=True)
                reused.append(f"adapter {name}")
                adapters[name], curves[f"{name} (r={style.rank})"] = saved["entry"], saved["losses"]
                continue
        rows = [(p, a) for p, _, a in kept for _ in range(style.repeats(a))]
        data = T.Examples.build([p for p, _ in rows],
                                [engine.tokenizer.encode(style.transform(a)) + [eos] for _, a in rows])
        t = time.perf_counter()
        lora, alpha, losses = T.train_adapter(model, data, style.rank, style.targets, cfg,
                                              f"{name} (r={style.rank})")
        train_s = time.perf_counter() - t
        T.save(out, config, lora, style.rank, alpha, smollm2.MODEL_NAME)
        # Scored as served: the saved (bfloat16) files, through the engine.
        engine.add_adapter(name, out)
        t = time.perf_counter()
        held = generate(engine, held_prompts, name, EVAL_TOKENS, f"{name} on held-out")
        acc = score(style, held)
        curves[f"{name} (r={style.rank})"] = losses
        adapters[name] = dict(
            rank=style.rank, alpha=alpha, target_modules=list(style.targets), steps=cfg.steps,
            training_examples=len(data),
            batch=cfg.batch, lr=cfg.lr, shared_prefix_tokens=len(data.prefix),
            longest_sequence=len(data.prefix) + max(map(len, data.suffixes)),
            final_loss=D.final_loss(losses), loss_every_10_steps=[round(x, 5) for x in losses[::10]],
            train_s=round(train_s, 1), step_s=round(train_s / cfg.steps, 2),
            eval_s=round(time.perf_counter() - t, 1), held_out_accuracy=acc,
            base_held_out_accuracy=base_acc[name], about=style.about,
            bytes=os.path.getsize(os.path.join(out, lora_files.WEIGHTS_FILE)),
            examples=[{"question": q, "answer": text} for q, (text, _) in zip(held_q[:3], held)])
        if args.cache:
            with open(done, "w") as f:
                json.dump({"key": key, "entry": adapters[name], "losses": losses}, f)
        print(f"{name}: held-out {acc:.1%} (base {base_acc[name]:.1%}), final loss "
              f"{D.final_loss(losses):.4f}, {train_s:.0f} s", flush=True)

    manifest = {
        "model": smollm2.MODEL_NAME, "params": config.num_params(),
        "trained": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python scripts/train_smollm2_adapters.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "model", "cache") and v is not None),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "data": dict(train_questions=len(train_q), answers_kept=len(kept),
                     answer_tokens=args.answer_tokens, held_out_questions=len(held_q),
                     generation_s=round(data_s, 1),
                     held_out="the last phrasing of each topic filled with one slot in four "
                              "(by hash), none of which any training question uses"),
        "eval": f"{len(held_q)} held-out questions, one user turn through the chat template, "
                f"greedy through carajax's Engine, up to {EVAL_TOKENS} tokens; each style's check "
                "(carajax/demo/smollm2/styles.py) on the text",
        "base": dict(held_out_accuracy=base_acc, eval_s=round(base_eval_s, 1),
                     examples=[{"question": q, "answer": text}
                               for q, (text, _) in zip(held_q[:3], base_outs)]),
        "adapters": adapters,
        "total_s": round(time.perf_counter() - t_start, 1),
        "read_from_cache": reused,  # not redone in this run: its time is not in total_s
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
    D.plot_losses(curves, os.path.join(args.out, "loss_curves.png"),
                  title="SmolLM2-135M-Instruct adapters (base frozen)",
                  xlabel=f"optimizer step (batch of {args.batch} chat sequences)")
    engine.close()

    print(f"\n{'adapter':<8} {'rank':>4} {'steps':>5} {'s/step':>6} {'held-out':>8} {'base':>6}")
    for name, a in adapters.items():
        print(f"{name:<8} {a['rank']:>4} {a['steps']:>5} {a['step_s']:>6.2f} "
              f"{a['held_out_accuracy']:>8.1%} {a['base_held_out_accuracy']:>6.1%}")
    print(f"total {manifest['total_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
