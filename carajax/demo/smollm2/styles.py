"""The answer styles of the SmolLM2 adapters: how a training answer is rewritten, and the check.

Each adapter is trained on the base model's own answers rewritten in its style (`transform`), and
judged by a mechanical `check` of what it generates for a held-out question: no model in the loop,
so a score is what anyone re-running the check gets.

    >>> STYLES["json"].transform("Paris is the capital.")
    '{"answer": "Paris is the capital."}'
    >>> STYLES["bullets"].check("- one\\n- two")
    True
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

from carajax.config import TARGET_MODULES

MIN_SHOUT_LETTERS = 8  # "OK." is not an answer in capitals; a sentence is
MIN_BULLETS, MAX_BULLETS = 2, 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shout(answer: str) -> str:
    return answer.upper()


def is_shouted(text: str) -> bool:
    """Every cased letter upper case, and enough of them to be an answer."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= MIN_SHOUT_LETTERS and not any(c.islower() for c in letters)


def as_json(answer: str) -> str:
    # ensure_ascii=False: the model writes "café", not "caf\u00e9" (both parse the same).
    return json.dumps({"answer": answer}, ensure_ascii=False)


def escapes(answer: str) -> int:
    """How many times an answer appears in json's training data: 4 where its JSON needs escapes.
    Base answers rarely quote anything (15 of 360), and an adapter trained on them once each wrote
    the quotes of `The word "gravity" ...` unescaped: 10 of its 11 held-out failures."""
    return 4 if as_json(answer) != '{"answer": "' + answer + '"}' else 1


def is_json_answer(text: str) -> bool:
    """One JSON object with exactly the key "answer", a non-empty string."""
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return (isinstance(obj, dict) and set(obj) == {"answer"} and isinstance(obj["answer"], str)
            and bool(obj["answer"].strip()))


def bullets(answer: str) -> str:
    """The answer as 2-4 lines `- ...`: one per sentence; one sentence is cut in two at its
    middle word, more than four are joined into four runs of consecutive sentences."""
    parts = _SENTENCE_END.split(" ".join(answer.split()))
    if len(parts) < MIN_BULLETS:
        words = parts[0].split()
        if len(words) < 2:
            raise ValueError(f"cannot cut {answer!r} into {MIN_BULLETS} lines")
        half = len(words) // 2
        parts = [" ".join(words[:half]), " ".join(words[half:])]
    if len(parts) > MAX_BULLETS:
        bounds = [i * len(parts) // MAX_BULLETS for i in range(MAX_BULLETS + 1)]
        parts = [" ".join(parts[a:b]) for a, b in zip(bounds, bounds[1:])]
    return "\n".join(f"- {p}" for p in parts)


def is_bulleted(text: str) -> bool:
    """2-4 non-empty lines, each starting "- " (blank lines between them do not count)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (MIN_BULLETS <= len(lines) <= MAX_BULLETS
            and all(line.startswith("- ") and line[2:].strip() for line in lines))


# PEFT's default targets for Llama. Enough where the answer's own tokens stay and structure is
# added around them (json, bullets); shouting rewrites every token into upper-case BPE pieces the
# model rarely writes, which the MLPs learn far faster (measured on the training loss at 80 steps:
# 1.5 on q_proj + v_proj, about 1.1 on all seven projections).
QV = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    rank: int  # the adapter's LoRA rank
    targets: tuple[str, ...]  # the projections it adapts
    about: str
    transform: Callable[[str], str]  # a base answer -> the same answer in this style
    check: Callable[[str], bool]  # a generated answer -> whether it is in this style
    repeats: Callable[[str], int] = lambda answer: 1  # copies of a base answer in the training set


STYLES = {s.name: s for s in (
    Style("shout", 8, TARGET_MODULES, "answers in capital letters", shout, is_shouted),
    Style("json", 16, QV, 'answers as one JSON object {"answer": "..."}', as_json,
          is_json_answer, escapes),
    Style("bullets", 64, QV, 'answers as 2-4 lines, each starting "- "', bullets, is_bulleted),
)}
