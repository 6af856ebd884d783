"""Fitted step-latency models for the rank-aware router (CaraServe §5, Fig. 5).

The router asks one question per candidate worker: how long does one engine step take for a given batch?
A *form* is a linear model over features of a `Batch`:

- `PaddedForm`   (Punica BGMV, pads every request to the batch's max rank): t = alpha * |S| * max_rank + beta
- `UnpaddedForm` (S-LoRA MBGMV, work proportional to each rank):            t = alpha * sum(rank) + beta
- `RichForm`     (ours): t = c . [tokens, tokens*mean_rank, context, |S|, |S|*max_rank, sum(rank), 1]
- `ShapedForm`   (ours, for engines whose work follows the step's shape): RichForm + [tokens * context / |S|,
                 has a prefill chunk, max_rank if tokens > K for K in 16..1024]

All forms are fitted by non-negative least squares on *relative* residuals (see `_fit_coef`), so every
coefficient is a non-negative cost per unit of work and predictions never decrease as a batch grows
(except `ShapedForm`'s, whose per-sequence context term can fall when a short sequence joins long ones).

A `CostModel` bundles a prefill model and a decode model for one LoRA kernel on one device, plus a
cold-start table (adapter load time vs rank), and round-trips through JSON (`save` / `load`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from carajax.data import COST_MODELS

KERNELS = ("padded", "unpadded")
PHASES = ("prefill", "decode")
# Rows of a profile: prefill-only steps, decode-only steps, and "mixed" steps (decodes plus a prefill
# chunk in one forward). The step model is fitted on all of them; prefill/decode on their own.
STEP_PHASES = ("prefill", "decode", "mixed")
FORMAT = "carajax.cost_model/v1"


@dataclasses.dataclass(frozen=True)
class Batch:
    """The host-side description of one engine step's batch.

    `ranks`: LoRA rank of each request (0 = base model only). `tokens`: tokens computed this step
    (prefill: prompt tokens; decode: len(ranks)). `context`: KV-cache tokens read, summed over the batch
    (a chunk reads its start + its length, a decode its context + 1). A fused step's batch holds every
    sequence of the step: its chunks' and its decodes' ranks, tokens and context together.
    """

    ranks: tuple[int, ...]
    tokens: int
    context: int = 0

    def __post_init__(self):
        # Accept lists from JSON but keep the dataclass hashable and immutable.
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if any(r < 0 for r in self.ranks) or self.tokens < 0 or self.context < 0:
            raise ValueError(f"negative rank/tokens/context in {self}")

    @property
    def size(self) -> int:
        """|S|: the number of requests in the batch."""
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    @property
    def sum_rank(self) -> int:
        return sum(self.ranks)

    def add(self, rank: int, tokens: int = 1, context: int = 0) -> Batch:
        """This batch with one more request (what the router prices when it considers a placement)."""
        return Batch(self.ranks + (int(rank),), self.tokens + tokens, self.context + context)


# ---------------------------------------------------------------------------------------------------------
# Forms


@dataclasses.dataclass(frozen=True)
class _LinearForm:
    """Shared machinery: t = features(batch) . coef. Subclasses define `name`, `feature_names`, `features`."""

    coef: tuple[float, ...]

    name: ClassVar[str] = ""
    feature_names: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        object.__setattr__(self, "coef", tuple(float(c) for c in self.coef))
        if len(self.coef) != len(self.feature_names):
            n, got = len(self.feature_names), len(self.coef)
            raise ValueError(f"{self.name}: expected {n} coefficients, got {got}")

    @staticmethod
    def features(batch: Batch) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def feature_matrix(cls, batches: Sequence[Batch]) -> np.ndarray:
        """[len(batches), n_features] float64 design matrix."""
        if not batches:
            return np.zeros((0, len(cls.feature_names)))
        return np.stack([cls.features(b) for b in batches])

    @staticmethod
    def py_features(batch: Batch) -> tuple[float, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    def predict(self, batch: Batch) -> float:
        """Predicted step time in seconds.

        Pure Python (features by plain arithmetic, dot product with the coefficient tuple): the
        simulator and router price many tiny batches one at a time, where numpy's per-call overhead
        dominates. Equal to `predict_numpy` up to float rounding (tests check 1e-12 relative)."""
        return float(sum(map(operator.mul, self.py_features(batch), self.coef)))

    def predict_arrays(self, n: np.ndarray, sum_rank: np.ndarray, max_rank: np.ndarray,
                       tokens: np.ndarray, context: np.ndarray) -> np.ndarray:  # pragma: no cover
        """`predict_stats` elementwise over float64 arrays of batch totals, one batch per element (a
        router pricing every worker at once). The same operations in the same order as
        `predict_stats`, so each element is the float `predict_stats` returns."""
        raise NotImplementedError

    def predict_numpy(self, batch: Batch) -> float:
        """`predict` through the numpy feature vector (the reference for the pure-Python path)."""
        return float(self.features(batch) @ np.asarray(self.coef))

    def predict_many(self, batches: Sequence[Batch]) -> np.ndarray:
        """Predicted step times in seconds, one per batch."""
        return self.feature_matrix(batches) @ np.asarray(self.coef)

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.name, "feature_names": list(self.feature_names), "coef": list(self.coef)}


class _AlphaBeta:
    """The paper's two-coefficient forms: t = alpha * feature + beta, coef = (alpha, beta)."""

    coef: tuple[float, ...]

    @property
    def alpha(self) -> float:
        return self.coef[0]

    @property
    def beta(self) -> float:
        return self.coef[1]


@dataclasses.dataclass(frozen=True)
class PaddedForm(_AlphaBeta, _LinearForm):
    """Punica BGMV (the paper): t = alpha * |S| * max_rank + beta. coef = (alpha, beta)."""

    name: ClassVar[str] = "padded"
    feature_names: ClassVar[tuple[str, ...]] = ("size_x_max_rank", "one")

    @staticmethod
    def features(batch: Batch) -> np.ndarray:
        return np.array([batch.size * batch.max_rank, 1.0], dtype=np.float64)

    @staticmethod
    def py_features(batch: Batch) -> tuple[float, ...]:
        ranks = batch.ranks
        return (float(len(ranks) * max(ranks, default=0)), 1.0)

    def predict_stats(self, n: int, sum_rank: int, max_rank: int, tokens: int, context: int) -> float:
        c0, c1 = self.coef
        return float(0 + float(n * max_rank) * c0 + 1.0 * c1)

    def predict_arrays(self, n, sum_rank, max_rank, tokens, context):
        c0, c1 = self.coef
        return 0 + n * max_rank * c0 + 1.0 * c1


@dataclasses.dataclass(frozen=True)
class UnpaddedForm(_AlphaBeta, _LinearForm):
    """S-LoRA MBGMV (the paper): t = alpha * sum(rank) + beta. coef = (alpha, beta)."""

    name: ClassVar[str] = "unpadded"
    feature_names: ClassVar[tuple[str, ...]] = ("sum_rank", "one")

    @staticmethod
    def features(batch: Batch) -> np.ndarray:
        return np.array([batch.sum_rank, 1.0], dtype=np.float64)

    @staticmethod
    def py_features(batch: Batch) -> tuple[float, ...]:
        return (float(sum(batch.ranks)), 1.0)

    def predict_stats(self, n: int, sum_rank: int, max_rank: int, tokens: int, context: int) -> float:
        c0, c1 = self.coef
        return float(0 + float(sum_rank) * c0 + 1.0 * c1)

    def predict_arrays(self, n, sum_rank, max_rank, tokens, context):
        c0, c1 = self.coef
        return 0 + sum_rank * c0 + 1.0 * c1


@dataclasses.dataclass(frozen=True)
class RichForm(_LinearForm):
    """Ours: base compute (tokens), LoRA compute (tokens * mean rank), KV reads (context), per-request
    overhead (|S|), padded and unpadded adapter weight reads (|S| * max_rank, sum(rank)), fixed cost (1).

    sum_i tokens_i * rank_i is not known from a `Batch`, so it is approximated as tokens * sum(rank) / |S|
    (exact for decode, where every request contributes one token)."""

    name: ClassVar[str] = "rich"
    feature_names: ClassVar[tuple[str, ...]] = (
        "tokens",
        "tokens_x_mean_rank",
        "context",
        "size",
        "size_x_max_rank",
        "sum_rank",
        "one",
    )

    @staticmethod
    def features(batch: Batch) -> np.ndarray:
        mean_rank = batch.sum_rank / batch.size if batch.size else 0.0
        return np.array(
            [
                batch.tokens,
                batch.tokens * mean_rank,
                batch.context,
                batch.size,
                batch.size * batch.max_rank,
                batch.sum_rank,
                1.0,
            ],
            dtype=np.float64,
        )

    @staticmethod
    def py_features(batch: Batch) -> tuple[float, ...]:
        ranks, tokens = batch.ranks, batch.tokens
        n = len(ranks)
        s = sum(ranks)
        mean_rank = s / n if n else 0.0
        return (
            float(tokens),
            tokens * mean_rank,
            float(batch.context),
            float(n),
            float(n * max(ranks, default=0)),
            float(s),
            1.0,
        )

    def predict(self, batch: Batch) -> float:
        ranks = batch.ranks
        n = len(ranks)
        return self.predict_stats(n, sum(ranks), max(ranks) if n else 0, batch.tokens, batch.context)

    def predict_stats(self, n: int, sum_rank: int, max_rank: int, tokens: int, context: int) -> float:
        # `_LinearForm.predict` unrolled (the router's hottest call): same features, same order of
        # the sum, so the same float.
        c0, c1, c2, c3, c4, c5, c6 = self.coef
        mean_rank = sum_rank / n if n else 0.0
        return float(0 + float(tokens) * c0 + tokens * mean_rank * c1 + float(context) * c2
                     + float(n) * c3 + float(n * max_rank) * c4 + float(sum_rank) * c5 + 1.0 * c6)

    def predict_arrays(self, n, sum_rank, max_rank, tokens, context):
        c0, c1, c2, c3, c4, c5, c6 = self.coef
        mean_rank = np.divide(sum_rank, n, out=np.zeros_like(sum_rank), where=n > 0)
        return (0 + tokens * c0 + tokens * mean_rank * c1 + context * c2
                + n * c3 + n * max_rank * c4 + sum_rank * c5 + 1.0 * c6)


# `ShapedForm`'s staircase: a max-rank cost for steps of more than each of these tokens.
SHAPE_STEPS = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass(frozen=True)
class ShapedForm(_LinearForm):
    """`RichForm` plus what a step's static shape decides, for engines whose work is not linear
    in a batch's totals (the jnp LoRA forms on CPU, a GPU kernel table chosen per step shape):

    - `tokens_x_context_per_seq` = tokens * context / |S|: a prefill chunk's attention, each of
      its tokens over the positions its sequence reads (exact for a uniform batch; for a decode
      step it equals `context`);
    - `has_chunk` = 1 when the step holds a prefill chunk (tokens > |S|): such a step runs other
      compiled pieces (query blocks, the LoRA form for chunks) than a decode-only step;
    - `max_rank_x_tokens_gt_K` = max_rank when tokens > K, for K in `SHAPE_STEPS`: a staircase
      that prices a per-rank cost switched on by the step's token count. The engine's CPU LoRA
      switches from the compact form (the distinct adapters' pages, a few GEMMs) to the blocked
      one (blocks padded to the step's largest rank, ~4 * max_batch_size token rows more) above
      `COMPACT_TOKENS_PER_SEGMENT * max_batch_size` padded tokens (carajax.lora.hook.jnp_form);
      the fit finds that step (NNLS keeps the other stairs at or near 0) with no engine setting
      in the model.

    Every feature is a function of (|S|, Σrank, max rank, tokens, context), so the router's
    running totals price it (`predict_stats`, `predict_arrays`). Not monotone: the engine's
    attention work is the padded tokens times the step's *longest* context, which totals do not
    give; tokens * mean context is that on uniform batches but falls when a short sequence joins
    long ones, so a price difference (Pre(queue + r) - Pre(queue)) can come out negative. Meant
    for the step model the simulator charges (`fit_cost_model(step_form="shaped")`)."""

    name: ClassVar[str] = "shaped"
    feature_names: ClassVar[tuple[str, ...]] = RichForm.feature_names + (
        "tokens_x_context_per_seq",
        "has_chunk",
        *(f"max_rank_x_tokens_gt_{k}" for k in SHAPE_STEPS),
    )

    @staticmethod
    def features(batch: Batch) -> np.ndarray:
        n, t, mx = batch.size, batch.tokens, batch.max_rank
        ctx_per = batch.context / n if n else 0.0
        return np.concatenate([RichForm.features(batch), np.array(
            [t * ctx_per, 1.0 if t > n else 0.0, *(mx if t > k else 0.0 for k in SHAPE_STEPS)],
            dtype=np.float64)])

    @staticmethod
    def py_features(batch: Batch) -> tuple[float, ...]:
        ranks, tokens = batch.ranks, batch.tokens
        n = len(ranks)
        mx = float(max(ranks, default=0))
        ctx_per = batch.context / n if n else 0.0
        return (*RichForm.py_features(batch), tokens * ctx_per, 1.0 if tokens > n else 0.0,
                *(mx if tokens > k else 0.0 for k in SHAPE_STEPS))

    def predict(self, batch: Batch) -> float:
        ranks = batch.ranks
        n = len(ranks)
        return self.predict_stats(n, sum(ranks), max(ranks) if n else 0, batch.tokens, batch.context)

    def predict_stats(self, n: int, sum_rank: int, max_rank: int, tokens: int, context: int) -> float:
        c = self.coef
        mean_rank = sum_rank / n if n else 0.0
        ctx_per = context / n if n else 0.0
        t = (0 + float(tokens) * c[0] + tokens * mean_rank * c[1] + float(context) * c[2]
             + float(n) * c[3] + float(n * max_rank) * c[4] + float(sum_rank) * c[5] + 1.0 * c[6]
             + tokens * ctx_per * c[7] + (1.0 if tokens > n else 0.0) * c[8])
        mx = float(max_rank)
        for k, ck in zip(SHAPE_STEPS, c[9:]):
            t = t + (mx if tokens > k else 0.0) * ck
        return float(t)

    def predict_arrays(self, n, sum_rank, max_rank, tokens, context):
        c = self.coef
        mean_rank = np.divide(sum_rank, n, out=np.zeros_like(sum_rank), where=n > 0)
        ctx_per = np.divide(context, n, out=np.zeros_like(context), where=n > 0)
        t = (0 + tokens * c[0] + tokens * mean_rank * c[1] + context * c[2]
             + n * c[3] + n * max_rank * c[4] + sum_rank * c[5] + 1.0 * c[6]
             + tokens * ctx_per * c[7] + np.where(tokens > n, 1.0, 0.0) * c[8])
        for k, ck in zip(SHAPE_STEPS, c[9:]):
            t = t + np.where(tokens > k, max_rank, 0.0) * ck
        return t


Model = PaddedForm | UnpaddedForm | RichForm | ShapedForm
FORMS: dict[str, type[_LinearForm]] = {f.name: f for f in (PaddedForm, UnpaddedForm, RichForm, ShapedForm)}


def model_from_dict(d: Mapping[str, Any]) -> Model:
    """Inverse of `Model.to_dict()`; checks the feature names so a reordered file fails loudly."""
    cls = FORMS[d["form"]]
    if "feature_names" in d and tuple(d["feature_names"]) != cls.feature_names:
        raise ValueError(f"{d['form']}: feature names {d['feature_names']} != {cls.feature_names}")
    return cls(tuple(d["coef"]))


# ---------------------------------------------------------------------------------------------------------
# Fitting


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """min ||a x - b||_2 subject to x >= 0 (Lawson-Hanson active set; small n, so exact is cheap).

    Written here rather than taken from scipy, which is installed but not a declared dependency."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * max(m, n) * max(np.abs(a).sum(axis=0).max(initial=0.0), 1.0)
    max_iter = 3 * n + 10 if max_iter is None else max_iter
    w = a.T @ (b - a @ x)
    for _ in range(max_iter):
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(s[passive] > tol):
                break
            # Step from x towards s until the first passive variable hits zero, then drop it.
            bad = passive & (s <= tol)
            step = np.min(x[bad] / np.maximum(x[bad] - s[bad], 1e-300))
            x = x + step * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = s
        w = a.T @ (b - a @ x)
    return x


def _fit_coef(feats: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative residuals.

    Rows are divided by the measured time because step latencies span orders of magnitude (a one-token
    decode vs a 4k-token prefill) and profiler noise is multiplicative: plain least squares would fit the
    long steps and ignore the short ones the router mostly prices. Columns are scaled to unit norm so the
    active-set tolerance means the same for every feature."""
    seconds = np.asarray(seconds, dtype=np.float64)
    if feats.shape[0] != seconds.shape[0] or feats.shape[0] == 0:
        n, m = feats.shape[0], seconds.shape[0]
        raise ValueError(f"need matching, non-empty batches and times; got {n}, {m}")
    if np.any(seconds <= 0):
        raise ValueError("measured seconds must be positive")
    a = feats / seconds[:, None]
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0  # an all-zero feature (e.g. context never varies from 0) keeps coefficient 0
    return nnls(a / norms, np.ones_like(seconds)) / norms


def fit(form_name: str, batches: Sequence[Batch], seconds: Sequence[float] | np.ndarray) -> Model:
    """Fit form `form_name` ("padded" | "unpadded" | "rich") to measured step times (seconds)."""
    if form_name not in FORMS:
        raise ValueError(f"unknown form {form_name!r}; expected one of {sorted(FORMS)}")
    cls = FORMS[form_name]
    return cls(tuple(_fit_coef(cls.feature_matrix(batches), np.asarray(seconds))))


def evaluate(
    model: Model, batches: Sequence[Batch], seconds: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """{"r2": coefficient of determination, "mape": mean absolute percentage error as a fraction}."""
    y = np.asarray(seconds, dtype=np.float64)
    pred = model.predict_many(batches)
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return {"r2": r2, "mape": float(np.mean(np.abs(pred - y) / y))}


def train_test_split(n: int, frac: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, test) index arrays: round(frac * n) training rows, at least one of each when n >= 2."""
    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(int(round(frac * n)), 1), n - 1) if n >= 2 else n
    return np.sort(perm[:k]), np.sort(perm[k:])


# ---------------------------------------------------------------------------------------------------------
# Measurements (what the profiler saves) -> models


def _parse(measurements: Sequence[Mapping[str, Any]], phase: str, kernel: str | None):
    """(batches, seconds) of the rows of `phase` ("step": every row) for `kernel` (None: any)."""
    rows = [m for m in measurements if (phase == "step" or m["phase"] == phase)
            and (kernel is None or m.get("kernel") == kernel)]
    batches = [Batch(tuple(m["ranks"]), int(m["tokens"]), int(m.get("context", 0))) for m in rows]
    return batches, np.array([float(m["seconds"]) for m in rows])


def _has_mixed(measurements: Sequence[Mapping[str, Any]], kernel: str) -> bool:
    return any(m["phase"] == "mixed" and m.get("kernel") == kernel for m in measurements)


def _infer_kernel(measurements: Sequence[Mapping[str, Any]], kernel: str | None) -> str:
    if kernel is not None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return kernel
    kernels = {m.get("kernel") for m in measurements}
    if len(kernels) != 1 or next(iter(kernels)) not in KERNELS:
        raise ValueError(f"measurements mix kernels {sorted(map(str, kernels))}; pass kernel=")
    return next(iter(kernels))


def fit_report(
    measurements: Sequence[Mapping[str, Any]], form: str = "rich", seed: int = 0, kernel: str | None = None
) -> dict[str, dict[str, float]]:
    """Per phase: fit on a random 80%, report R^2 and MAPE on the held-out 20% (plus the row counts).
    "step" (when there are mixed rows, see `fit_cost_model`) is fitted and tested on every row."""
    kernel = _infer_kernel(measurements, kernel)
    report = {}
    for phase in PHASES + (("step",) if _has_mixed(measurements, kernel) else ()):
        batches, seconds = _parse(measurements, phase, kernel)
        if len(batches) < 2:
            continue
        tr, te = train_test_split(len(batches), 0.8, seed)
        model = fit(form, [batches[i] for i in tr], seconds[tr])
        metrics = evaluate(model, [batches[i] for i in te], seconds[te])
        report[phase] = {**metrics, "n_train": len(tr), "n_test": len(te)}
    return report


# ---------------------------------------------------------------------------------------------------------
# CostModel


@functools.lru_cache(maxsize=4096)
def _interp_load(table: tuple[tuple[int, float], ...], rank: float) -> float:
    """`CostModel.load_seconds` on its (sorted) table; cached, since a router asks for the same few
    ranks on every worker for every request."""
    r = np.array([p[0] for p in table], dtype=np.float64)
    s = np.array([p[1] for p in table], dtype=np.float64)
    if len(r) == 1:
        return float(s[0] * rank / r[0])  # a single point: proportional to size
    i = int(np.clip(np.searchsorted(r, rank) - 1, 0, len(r) - 2))
    t = s[i] + (s[i + 1] - s[i]) * (rank - r[i]) / (r[i + 1] - r[i])
    return float(max(t, 0.0))


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Prefill and decode step-latency models for one LoRA kernel on one device, plus cold-start costs.

    `step`: the engine's fused step, one forward over all of a step's sequences, priced on the merged
    `Batch` (every sequence's rank, all tokens, Σ KV positions read); None for models measured
    before the engine fused its steps (they price a step as Pre(chunks) + Dec(decoders) only).
    `load_time`: ((rank, seconds), ...) measured adapter load times; `load_bytes_per_rank`: the adapter
    bytes per unit of rank those loads moved, so a load of some other size can be priced by bytes."""

    prefill: Model
    decode: Model
    kernel: str
    source: str = ""
    device: str = ""
    model_name: str = ""
    date: str = ""
    notes: str = ""
    load_time: tuple[tuple[int, float], ...] = ()
    load_bytes_per_rank: float | None = None
    step: Model | None = None

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        object.__setattr__(self, "load_time", tuple(sorted((int(r), float(s)) for r, s in self.load_time)))

    @property
    def rank_aware(self) -> bool:
        """Whether any of its prefill / decode coefficients prices LoRA rank. A model whose rank
        terms are all zero prices every adapter like the base model: a rank-aware router
        (caraserve, carajax) would be routing blind with it."""
        return any(c > 0 for form in (self.prefill, self.decode)
                   for name, c in zip(form.feature_names, form.coef) if "rank" in name)

    def describe(self) -> str:
        """One line: where it was measured, on what, when (for logs and metrics)."""
        return f"{self.model_name or '?'} on {self.device or '?'} ({self.kernel}, {self.date or '?'})"

    def prefill_time(self, batch: Batch) -> float:
        """Seconds for one prefill step over `batch`."""
        return self.prefill.predict(batch)

    def decode_time(self, batch: Batch) -> float:
        """Seconds for one decode step over `batch`."""
        return self.decode.predict(batch)

    def step_time(self, batch: Batch) -> float:
        """Seconds for one fused engine step over `batch`: every sequence of the step, prefill chunks
        and decodes merged (see `Batch`)."""
        if self.step is None:
            raise ValueError(f"cost model {self.model_name or '?'} ({self.device or 'device unknown'}, "
                             f"{self.date or 'undated'}) has no step model: it was fitted before the "
                             "engine's fused step; refit it from a new profile (carajax profile --fit)")
        return self.step.predict(batch)

    def prefill_time_stats(self, n: int, sum_rank: int, max_rank: int, tokens: int, context: int) -> float:
        """`prefill_time` of a batch given by its totals (n requests, Σrank, max rank, tokens,
        context): what a router with running totals asks, without building the rank tuple."""
        return self.prefill.predict_stats(n, sum_rank, max_rank, tokens, context)

    def decode_time_stats(self, n: int, sum_rank: int, max_rank: int, tokens: int, context: int) -> float:
        """`decode_time` of a batch given by its totals (see `prefill_time_stats`)."""
        return self.decode.predict_stats(n, sum_rank, max_rank, tokens, context)

    def prefill_time_arrays(self, n, sum_rank, max_rank, tokens, context) -> np.ndarray:
        """`prefill_time_stats` elementwise over float64 arrays (one batch per element)."""
        return self.prefill.predict_arrays(n, sum_rank, max_rank, tokens, context)

    def decode_time_arrays(self, n, sum_rank, max_rank, tokens, context) -> np.ndarray:
        """`decode_time_stats` elementwise over float64 arrays (one batch per element)."""
        return self.decode.predict_arrays(n, sum_rank, max_rank, tokens, context)

    def load_seconds(self, rank: float, nbytes: float | None = None) -> float:
        """Seconds to load one adapter to the device, linear in rank between the table's points.

        With `nbytes`, the adapter is priced as the rank that would move as many bytes (needs
        `load_bytes_per_rank`). Outside the table the nearest segment is extended (never below zero),
        because the fixed cost at small ranks and the bandwidth slope at large ranks both carry on."""
        if not self.load_time:
            raise ValueError("this cost model has no load_time table")
        if nbytes is not None:
            if not self.load_bytes_per_rank:
                raise ValueError("nbytes given but load_bytes_per_rank is unknown")
            rank = nbytes / self.load_bytes_per_rank
        return _interp_load(self.load_time, float(rank))

    def to_json(self) -> str:
        """A stable, human-readable JSON document (see `load`)."""
        d = {
            "format": FORMAT,
            "kernel": self.kernel,
            "metadata": {
                "source": self.source,
                "device": self.device,
                "model_name": self.model_name,
                "date": self.date,
                "notes": self.notes,
            },
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict(),
            "load_time": {str(r): s for r, s in self.load_time},
            "load_bytes_per_rank": self.load_bytes_per_rank,
        }
        if self.step is not None:  # absent, not null, in models without one (older files stay as they were)
            d["step"] = self.step.to_dict()
        return json.dumps(d, indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document (format={d.get('format')!r})")
        meta = d.get("metadata", {})
        return cls(
            prefill=model_from_dict(d["prefill"]),
            decode=model_from_dict(d["decode"]),
            kernel=d["kernel"],
            source=meta.get("source", ""),
            device=meta.get("device", ""),
            model_name=meta.get("model_name", ""),
            date=meta.get("date", ""),
            notes=meta.get("notes", ""),
            load_time=tuple((int(r), float(s)) for r, s in d.get("load_time", {}).items()),
            load_bytes_per_rank=d.get("load_bytes_per_rank"),
            step=model_from_dict(d["step"]) if d.get("step") is not None else None,
        )


def load(path: str | os.PathLike) -> CostModel:
    """Read a CostModel written by `CostModel.save`."""
    with open(path) as f:
        return CostModel.from_json(f.read())


COST_MODEL_DIR = COST_MODELS  # shipped in the package: copies of the repository's data/cost_models/
DEFAULT_COST_MODELS = ("cpu_llama-test.json", "a10_paper.json")  # first found wins


class RankBlindModelError(ValueError):
    """A rank-aware routing policy was given a cost model with no rank terms."""


def require_rank_terms(model: CostModel, policy: str, where: str = "") -> None:
    """Refuse a rank-blind model for the rank-aware policies (`caraserve`, `carajax`)."""
    if policy in RANK_AWARE_POLICIES and not model.rank_aware:
        raise RankBlindModelError(
            f"cost model {model.describe()}{where} has every rank coefficient at 0: policy "
            f"{policy!r} prices adapters by rank and would route blind with it; fit one on this "
            "device (`carajax profile --fit FILE`, or `carajax serve --cost-model auto`) or "
            "choose a rank-blind policy (most_idle, round_robin, random, first_fit)")


RANK_AWARE_POLICIES = ("caraserve", "carajax")


def default_cost_model() -> CostModel:
    """The shipped model used when none is given: fitted on a CPU for llama-test by
    `carajax profile` (what the built-in demo cluster runs), else the derived A10 model.
    Both ship in the package (carajax/data/cost_models/, copies of the repository's
    data/cost_models/, whose README gives their provenance)."""
    for name in DEFAULT_COST_MODELS:
        if (COST_MODEL_DIR / name).exists():
            return load(COST_MODEL_DIR / name)
    raise FileNotFoundError(f"no cost model in {COST_MODEL_DIR} (looked for {DEFAULT_COST_MODELS}); "
                            "pass one (carajax profile --fit FILE writes one)")


def fit_cost_model(
    measurements: Sequence[Mapping[str, Any]],
    form: str = "rich",
    kernel: str | None = None,
    step_form: str | None = None,
    **metadata: Any,
) -> CostModel:
    """Fit prefill and decode models to profiler measurements of one kernel (each on its own rows),
    and the fused `step` model on every row (prefill, decode and mixed) when there are mixed rows,
    in `step_form` (default: `form`). The simulator charges steps with the step model; the router
    prices placements with the prefill and decode views, as differences of two predictions, where
    a form that is monotone in the batch (every form but `shaped`, see `ShapedForm`) is safer.

    Without mixed rows (a profile of the engine before it fused its steps) there is no step model:
    one fitted only on steps of one kind would price the mixed steps it never saw.
    `metadata`: CostModel fields such as source, device, model_name, date, notes, load_time."""
    kernel = _infer_kernel(measurements, kernel)
    models = {}
    for phase in PHASES:
        batches, seconds = _parse(measurements, phase, kernel)
        if not batches:
            raise ValueError(f"no {phase} measurements for kernel {kernel!r}")
        models[phase] = fit(form, batches, seconds)
    step = (fit(step_form or form, *_parse(measurements, "step", kernel))
            if _has_mixed(measurements, kernel) else None)
    return CostModel(prefill=models["prefill"], decode=models["decode"], kernel=kernel, step=step,
                     **metadata)


def plot_predicted_vs_measured(
    model: Model, batches: Sequence[Batch], seconds: Sequence[float] | np.ndarray, path: str | os.PathLike
) -> bool:
    """Scatter predicted vs measured (log-log, with y = x) to `path`. Returns False, doing nothing, when
    matplotlib is not importable: it is an optional extra, never a dependency of serving."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    y = np.asarray(seconds, dtype=np.float64) * 1e3
    pred = model.predict_many(batches) * 1e3
    m = evaluate(model, batches, seconds)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y, pred, s=8, alpha=0.6)
    lo, hi = min(y.min(), pred.min()), max(y.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)")
    ax.set_title(f"{model.name}: R2={m['r2']:.3f}, MAPE={100 * m['mape']:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# A GPU-like model from published numbers and first principles (data/cost_models/a10_paper.json)

# CaraServe §2 (arXiv 2401.11240 v1): loading one Llama-2-7B adapter (q, k, v) to an A10.
PAPER_A10_LOAD_TIME = ((8, 4.9e-3), (32, 11.8e-3), (64, 20.6e-3), (128, 50.7e-3))


def a10_first_principles(kernel: str = "padded") -> CostModel:
    """Llama-2-7B on an NVIDIA A10, derived from datasheet numbers, NOT fitted to measurements.

    The paper's Fig. 5 coefficients are not published in a form we have, so each coefficient here is a
    roofline term (see `notes` in the result and data/cost_models/README.md for the arithmetic)."""
    hbm = 600e9  # A10 datasheet HBM (GDDR6) bandwidth, B/s; peak, so memory terms are lower bounds
    flops = 0.6 * 125e12  # A10 dense bf16 tensor peak 125 TFLOP/s at an assumed 60% efficiency
    n_params, layers, d, bytes_el = 6.74e9, 32, 4096, 2
    weight_read = n_params * bytes_el / hbm  # 13.5 GB per step -> 22.5 ms
    flop_per_token = 2 * n_params / flops  # 13.5 GFLOP per token -> 0.18 ms
    kv_per_token = 2 * layers * d * bytes_el / hbm  # K and V, all layers: 512 KiB per cached token
    # LoRA on q,k,v,o: per layer and unit rank, A (d x 1) and B (1 x d) for 4 modules.
    lora_bytes_per_rank = 4 * 2 * d * bytes_el * layers  # 2 MiB per unit rank
    lora_read = lora_bytes_per_rank / hbm
    lora_flop_per_token_rank = 2 * 4 * 2 * d * layers / flops  # 2 FLOP/MAC, shrink + expand, 4 modules
    prefill_overhead = 5e-3  # assumed launch + sampling overhead; compute hides the weight read (>=128 tok)
    pad, unpad = (lora_read, 0.0) if kernel == "padded" else (0.0, lora_read)
    # RichForm order: tokens, tokens*mean_rank, context, size, size*max_rank, sum_rank, one
    shared = (flop_per_token, lora_flop_per_token_rank, kv_per_token, 0.0, pad, unpad)
    prefill = RichForm(shared + (prefill_overhead,))
    decode = RichForm(shared + (weight_read,))
    notes = " ".join(
        [
            "First-principles roofline model, not a fit. A10: 600 GB/s HBM, 125 TFLOP/s dense bf16 peak",
            "at an assumed 60% (75 TFLOP/s). Llama-2-7B: 6.74e9 params, 32 layers, d=4096, bf16.",
            f"decode intercept = 13.48 GB / 600 GB/s = {weight_read * 1e3:.2f} ms (all weights read once",
            f"per step); prefill intercept = {prefill_overhead * 1e3:.1f} ms assumed overhead",
            "(compute-bound, the weight read hidden under compute);",
            f"tokens = 2*6.74e9 FLOP / 75 TFLOP/s = {flop_per_token * 1e3:.4f} ms per token (added to, not",
            "max'ed with, the weight read: an upper bound in decode);",
            f"context = 2*32*4096*2 B / 600 GB/s = {kv_per_token * 1e6:.3f} us per cached token read",
            "(prefill's in-prompt quadratic attention is not modelled: ~4% of FLOPs at 2k tokens);",
            f"LoRA weights (q,k,v,o) = 4*2*4096*r*2 B*32 layers = {lora_bytes_per_rank / 2**20:.0f} MiB per",
            f"unit rank / 600 GB/s = {lora_read * 1e6:.3f} us per unit rank, on |S|*max_rank (padded BGMV)",
            "or sum(rank) (unpadded MBGMV; summed per request, i.e. every request has its own adapter as in",
            "the paper's workload);",
            f"LoRA compute = 2*4*2*4096*32 FLOP / 75 TFLOP/s = {lora_flop_per_token_rank * 1e9:.3f} ns per",
            "token per unit rank. load_time: the paper's measured q,k,v adapter loads; load_bytes_per_rank",
            "= 3*2*4096*2 B*32 layers (q,k,v, bf16).",
            "step (the engine's fused step: one forward over every sequence of a step, prefill chunks",
            "and decodes) = the decode coefficients on the merged batch: the weights are read once per",
            f"step ({weight_read * 1e3:.2f} ms) and every token's FLOPs are added to that read, not",
            "max'ed with it: an upper bound, by up to the weight read on a step with a long chunk, where",
            "compute hides it (so a prefill-only step costs more than the prefill model says; a mixed",
            f"step saves the prefill intercept, {prefill_overhead * 1e3:.1f} ms, against Pre + Dec).",
        ]
    )
    return CostModel(
        prefill=prefill,
        decode=decode,
        kernel=kernel,
        source=" ".join(
            [
                "Derived, not measured: step-latency coefficients from A10 datasheet peaks (600 GB/s,",
                "125 TFLOP/s bf16) and Llama-2-7B shapes by roofline arithmetic",
                "(carajax.sched.cost_model.a10_first_principles); the linear forms follow CaraServe",
                "(arXiv 2401.11240 v1) Fig. 5 (BGMV ~ a*|S|*max_rank + b, MBGMV ~ a*sum(rank) + b,",
                "R^2 0.96), whose coefficients are not reproduced here. load_time: CaraServe's measured",
                "Llama-2-7B q,k,v adapter loads to an A10 (4.9/11.8/20.6/50.7 ms at rank 8/32/64/128).",
            ]
        ),
        device="NVIDIA A10 (24 GB, 600 GB/s) - datasheet, no measurement",
        model_name="llama2-7b",
        date="2024-01 (paper v1); derived 2025",
        notes=notes,
        load_time=PAPER_A10_LOAD_TIME,
        load_bytes_per_rank=float(3 * 2 * d * bytes_el * layers),
        step=decode,
    )
