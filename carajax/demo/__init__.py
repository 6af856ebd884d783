"""The built-in demo: a small byte-level Llama trained to echo a word, and LoRA adapters trained
to transform it, so that which adapter served a request is visible in its answer.

    >>> from carajax import demo
    >>> engine = demo.engine()                      # the shipped base, adapters registered
    >>> engine.generate(demo.prompt("hello"), adapters="reverse", sampling=demo.GREEDY)[0].text
    'olleh'

The files under `carajax/demo/model` and `carajax/demo/adapters` are produced by
`scripts/train_demo.py` (optax, CPU, minutes); `manifest.json` records how and how well.
HF `transformers` + `peft` load them as they are (a Llama checkpoint and PEFT LoRA adapters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from carajax.config import DEMO_MODEL as MODEL_NAME
from carajax.demo.tasks import ECHO, TASKS, Task, exact_match, prompt, random_words
from carajax.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent
# Greedy, and long enough for the longest answer plus ETX.
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def model_dir() -> str:
    """The shipped base model (HF layout: config.json + model.safetensors)."""
    return str(ROOT / "model")


SMOLLM2 = "smollm2-135m-instruct"  # carajax.demo.smollm2's base model


def adapter_dirs(model: str = MODEL_NAME) -> dict[str, str]:
    """Shipped adapter name -> its PEFT directory, for the demo model (one per task in `TASKS`)
    or for "smollm2-135m-instruct" (`carajax.demo.smollm2`: shout, json, bullets); KeyError for
    a model with none shipped."""
    if model == MODEL_NAME:
        return {name: str(ROOT / "adapters" / name) for name in TASKS}
    if model == SMOLLM2 and (ROOT / "smollm2" / "adapters").is_dir():
        from carajax.demo import smollm2

        return smollm2.adapter_dirs()
    shipped = [MODEL_NAME, *([SMOLLM2] if (ROOT / "smollm2" / "adapters").is_dir() else [])]
    raise KeyError(f"no shipped adapters for {model!r}; there are for {', '.join(map(repr, shipped))}")


def shipped_adapters(model: str) -> dict[str, str]:
    """`adapter_dirs(model)` for a model shipped with trained adapters (the built-in one, also
    by its directory, or smollm2-135m-instruct); {} for any other."""
    if is_demo(model):
        return adapter_dirs()
    try:
        return adapter_dirs(model)
    except KeyError:
        return {}


def manifest() -> dict:
    """How the shipped files were trained, and the accuracies measured when they were."""
    with open(ROOT / "manifest.json") as f:
        return json.load(f)


def engine(config=None, **kwargs):
    """An `Engine` on the demo base with every shipped adapter registered under its task name."""
    from carajax.engine.engine import Engine

    eng = Engine.from_pretrained(MODEL_NAME, config=config, **kwargs)
    for name, path in adapter_dirs().items():
        eng.add_adapter(name, path)
    return eng


def is_demo(name_or_path: str) -> bool:
    return name_or_path == MODEL_NAME or (
        os.path.isdir(name_or_path) and Path(name_or_path).resolve() == ROOT / "model")


__all__ = ["ECHO", "GREEDY", "MODEL_NAME", "TASKS", "Task", "adapter_dirs", "engine",
           "exact_match", "is_demo", "manifest", "model_dir", "prompt", "random_words",
           "shipped_adapters"]
