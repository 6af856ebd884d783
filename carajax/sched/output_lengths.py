"""What a router has learned about how many tokens requests generate: an online distribution.

A router cannot know how long a reply will be, but it sees every reply end. `OutputLengths` keeps
the counts of finished output lengths and answers P(L < x | L > k): the chance that a request
which has already produced k tokens stops before x. The `carajax` policy uses it to price SLO
risk: a stall of X seconds breaks a request's time-per-token SLO only if the request is short
enough that X is not amortised over its remaining tokens (`carajax.sched.router`).

Until `min_observations` replies have ended it answers from a geometric prior with the configured
mean, so a fresh router is neither blind nor overconfident. Finished lengths are biased towards
short replies early on (they finish first); over a trace of thousands of requests this washes out.
"""

from __future__ import annotations

import math

import numpy as np


class OutputLengths:
    """Online empirical distribution of output lengths (tokens, >= 1), with a geometric prior."""

    def __init__(self, prior_mean: float = 128.0, min_observations: int = 32):
        if prior_mean < 1:
            raise ValueError(f"prior_mean must be >= 1, got {prior_mean}")
        self.prior_mean = float(prior_mean)
        self.min_observations = int(min_observations)
        self._counts = np.zeros(1025, dtype=np.int64)  # index = length; grows on demand
        self.n = 0
        self._cum: np.ndarray | None = None  # _cum[i] = P(L <= i), rebuilt lazily after observe

    def observe(self, length: int) -> None:
        """Records a reply that ended after `length` tokens."""
        length = max(1, int(length))
        if length >= len(self._counts):
            grown = np.zeros(max(length + 1, 2 * len(self._counts)), dtype=np.int64)
            grown[: len(self._counts)] = self._counts
            self._counts = grown
        self._counts[length] += 1
        self.n += 1
        self._cum = None

    def below(self, x: float) -> float:
        """P(L < x)."""
        if x <= 1:
            return 0.0
        k = math.ceil(x) - 1  # L < x  <=>  L <= ceil(x) - 1 for integer L
        if self.n < self.min_observations:
            # Geometric on {1, 2, ...} with mean m: P(L <= k) = 1 - (1 - 1/m)^k.
            return 1.0 - (1.0 - 1.0 / self.prior_mean) ** k
        if self._cum is None:
            self._cum = np.cumsum(self._counts) / self.n
        return float(self._cum[min(k, len(self._cum) - 1)])

    def stop_before(self, x: float, produced: int) -> float:
        """P(L < x | L > produced): a request with `produced` tokens so far ends before token x."""
        survived = self.below(produced + 1)  # P(L <= produced)
        if survived >= 1.0:
            return 0.0
        return max(0.0, self.below(x) - survived) / (1.0 - survived)

    def counts(self) -> dict[int, int]:
        """{length: replies observed with that length}."""
        return {int(i): int(self._counts[i]) for i in np.flatnonzero(self._counts)}

    def mean(self) -> float:
        """Mean of what was observed (the prior mean before `min_observations`)."""
        if self.n < self.min_observations:
            return self.prior_mean
        return float(np.dot(np.arange(len(self._counts)), self._counts) / self.n)


__all__ = ["OutputLengths"]
