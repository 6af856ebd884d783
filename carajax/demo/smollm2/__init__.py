"""LoRA adapters trained on SmolLM2-135M-Instruct: `shout`, `json` and `bullets`.

    >>> from carajax import demo
    >>> demo.adapter_dirs("smollm2-135m-instruct")
    {'shout': '.../smollm2/adapters/shout', 'json': '...', 'bullets': '...'}

Each adapter makes the model answer a question in its style (`styles.STYLES`): in capitals, as
one JSON object, or as 2-4 lines starting "- ". They are PEFT LoRA adapters (of all seven
projections for `shout`, q_proj and v_proj for the others: `Style.targets` says why), stored in
bfloat16 to keep the package small, trained by
`scripts/train_smollm2_adapters.py` on the base model's own greedy answers to generated questions
(`questions`), rewritten in each style. `manifest.json` records how, and each adapter's score on
held-out questions beside the base model's, measured by generating through carajax's engine;
`loss_curves.png` the training losses.
"""

from __future__ import annotations

import json
from pathlib import Path

from carajax.demo.smollm2.styles import STYLES, Style

MODEL_NAME = "smollm2-135m-instruct"  # the base model's name for `carajax pull`
ROOT = Path(__file__).resolve().parent


def adapter_dirs() -> dict[str, str]:
    """Adapter name -> its PEFT directory, one per style in `STYLES`."""
    return {name: str(ROOT / "adapters" / name) for name in STYLES}


def manifest() -> dict:
    """How the shipped adapters were trained, and the accuracies measured when they were."""
    with open(ROOT / "manifest.json") as f:
        return json.load(f)


__all__ = ["MODEL_NAME", "ROOT", "STYLES", "Style", "adapter_dirs", "manifest"]
