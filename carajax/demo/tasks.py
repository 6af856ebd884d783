"""The demo's tasks: string transformations whose answers a test can check exactly.

Every task reads the same prompt, `"{word}="` after the byte tokenizer's STX, and answers with the
transformed word and ETX. The base model is trained to echo the word; each adapter is trained to
do one transformation instead. So one prompt sent with different adapters gives visibly different,
checkable answers, and a wrong adapter (or none) is caught at a glance:

    hello=   base: hello   upper: HELLO   reverse: olleh   rot13: uryyb   vowels: hll
"""

from __future__ import annotations

import codecs
import dataclasses
import zlib
from collections.abc import Callable

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 3, 10  # letters per word
SEP = "="  # ends the prompt


@dataclasses.dataclass(frozen=True)
class Task:
    """One checkable behaviour: `fn(word)` is the exact answer to the prompt `word=`."""

    name: str
    fn: Callable[[str], str]
    rank: int  # LoRA rank of the shipped adapter (harder tasks get more)
    about: str


def _drop_vowels(word: str) -> str:
    return "".join(c for c in word if c not in "aeiou")


ECHO = Task("echo", lambda w: w, 0, "the base model: repeats the word")
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("upper", str.upper, 8, "upper-cases the word"),
    Task("rot13", lambda w: codecs.encode(w, "rot13"), 8, "rotates each letter by 13"),
    Task("reverse", lambda w: w[::-1], 16, "spells the word backwards"),
    Task("vowels", _drop_vowels, 32, "drops the vowels"),
)}


def prompt(word: str) -> str:
    return word + SEP


def is_held_out(word: str) -> bool:
    """One word in eight (by a fixed hash) is never trained on: evaluation words come from
    these, so an accuracy measures generalisation, not memory."""
    return zlib.crc32(word.encode()) % 8 == 0


def random_words(n: int, seed: int, *, held_out: bool = False, mixed_case: bool = False
                 ) -> list[str]:
    """n random lowercase words of MIN_LEN..MAX_LEN uniform letters, all from the training split
    (or, with `held_out`, all from the held-out split). `mixed_case` (the base model's echo
    training) upper-cases some words or letters: the base must have seen capitals, or no
    adapter could teach it to write them (LoRA does not touch the embeddings or the head)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < n:
        k = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        w = "".join(ALPHABET[i] for i in rng.integers(0, 26, k))
        if is_held_out(w) != held_out:
            continue
        if mixed_case:
            style = rng.random()
            if style < 0.25:
                w = w.upper()
            elif style < 0.5:
                w = "".join(c.upper() if u else c for c, u in zip(w, rng.random(k) < 0.5))
        words.append(w)
    return words


def exact_match(task: Task, words: list[str], answers: list[str]) -> float:
    """Fraction of answers that equal the task's output exactly."""
    return float(np.mean([task.fn(w) == a for w, a in zip(words, answers, strict=True)]))


def distinctive(word: str) -> bool:
    """Every task's answer differs from the word itself (it has a vowel, is not a palindrome):
    on such words echoing is wrong for every task, so the base model scores zero honestly."""
    return all(t.fn(word) != word for t in TASKS.values())


def eval_words(n: int, seed: int = 10_000) -> list[str]:
    """n held-out, distinctive words: what accuracies are measured on."""
    words: list[str] = []
    while len(words) < n:
        words += [w for w in random_words(n, seed, held_out=True) if distinctive(w)]
        seed += 1
    return words[:n]

