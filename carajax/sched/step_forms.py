"""Step-latency forms for the rank-aware router (CaraServe §5, Fig. 5): how long one engine step
takes for a given batch.

A *form* is a linear model over features of a `Batch`:

- `PaddedForm`   (Punica BGMV, pads every request to the batch's max rank): t = alpha * |S| * max_rank + beta
- `UnpaddedForm` (S-LoRA MBGMV, work proportional to each rank):            t = alpha * sum(rank) + beta
- `RichForm`     (ours): t = c . [tokens, tokens*mean_rank, context, |S|, |S|*max_rank, sum(rank), 1]
- `ShapedForm`   (ours, for engines whose work follows the step's shape): RichForm + [tokens * context / |S|,
                 has a prefill chunk, max_rank if tokens > K for K in 16..1024]

All forms are fitted by non-negative least squares on *relative* residuals (`step_fit`), so every
coefficient is a non-negative cost per unit of work and predictions never decrease as a batch grows
(except `ShapedForm`'s, whose per-sequence context term can fall when a short sequence joins long ones).
Each form prices a batch three ways that give the same float: from the `Batch` (`predict`), from the
batch's running totals (`predict_stats`, a router's innermost loop), and elementwise over arrays of
totals (`predict_arrays`, every worker at once).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np


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


__all__ = ["FORMS", "SHAPE_STEPS", "Batch", "Model", "PaddedForm", "RichForm", "ShapedForm",
           "UnpaddedForm", "model_from_dict"]
