"""Measured step-time residuals: how wrong a fitted step model is on the steps it was fitted to.

The simulator's oracle mode times every step with the cost model the router prices with, so the
router never mispredicts. In measured mode (`SimConfig.step_noise`) a step takes

    (the cost model's prediction) x (a relative residual drawn from a profile),

where a residual is measured / predicted of one timed repeat of one profiled step, under the step
model fitted to that same profile (`carajax.sched.profiler.fit_profile`). Every repeat is a sample,
so both the model's error on that batch shape and the run-to-run noise are in the draw.

Residuals are kept per step kind (`KINDS`: prefill-only, decode-only, and mixed steps, the
profile's `phase`s), because a fitted model is wrong differently on each (on the CPU profile of
llama-test the median residual is 0.91 on decode steps and 1.46 on mixed ones). A draw is i.i.d.
per step: the error of a batch shape is not kept from one step to the next, and residuals from
one device and model applied to another model's predictions are an assumption, not a measurement.

Determinism: worker w's k-th step of a kind takes the k-th value of its own stream (`stream`),
whatever else happens in the simulation, so a run of decode steps taken as one event
(`SimConfig.fast_forward`) and the same steps one by one draw the same residuals.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

KINDS = ("prefill", "decode", "mixed")  # a step of chunks only, of decodes only, of both
_BLOCK = 1024  # draws generated at a time: fixed, so a stream's values do not depend on its reads


@dataclasses.dataclass(frozen=True, repr=False)
class StepNoise:
    """Relative residuals (measured / predicted) per step kind; tuples, so the config hashes."""

    prefill: tuple[float, ...]
    decode: tuple[float, ...]
    mixed: tuple[float, ...]
    source: str = ""  # where the samples came from (a profile path and form), for reports

    def __post_init__(self):
        for kind in KINDS:
            v = np.asarray(getattr(self, kind), dtype=np.float64)
            if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
                raise ValueError(f"StepNoise.{kind}: need a non-empty sequence of positive residuals")

    def __repr__(self) -> str:  # the samples run to thousands of floats
        sizes = ", ".join(f"{k} {len(getattr(self, k))}" for k in KINDS)
        return f"StepNoise({self.source or 'unnamed'}: {sizes} samples)"

    @classmethod
    def ones(cls) -> StepNoise:
        """Zero error: every residual 1, so measured mode reproduces the oracle exactly."""
        return cls(prefill=(1.0,), decode=(1.0,), mixed=(1.0,), source="ones")

    @classmethod
    def pooled(cls, samples, source: str = "") -> StepNoise:
        """The same residuals for every kind of step (e.g. a known distribution in tests)."""
        s = tuple(float(v) for v in samples)
        return cls(prefill=s, decode=s, mixed=s, source=source)

    @classmethod
    def from_profile(cls, path: str | os.PathLike, form: str = "rich", kernel: str | None = None,
                     *, by_kind: bool = True, center: bool = False) -> StepNoise:
        """Residuals of the step model of `form` fitted to the profile at `path`, on its own rows.

        by_kind=False pools the kinds. center=True divides each kind's residuals (or the pool) by
        their mean: the spread of the model's errors without its average bias (a model fitted by
        relative least squares predicts low on average: mean measured / predicted > 1)."""
        from carajax.sched import cost_model as cm
        from carajax.sched import profiler

        doc = profiler.load_profile(path)
        model = profiler.fit_profile(doc, form=form, kernel=kernel)
        if model.step is None:
            raise ValueError(f"{path}: no mixed rows, so no step model to take residuals of "
                             "(profile again with a carajax that measures mixed steps)")
        by: dict[str, list[float]] = {k: [] for k in KINDS}
        for row in doc["measurements"]:
            if row.get("kernel") != model.kernel:
                continue
            batch = cm.Batch(tuple(row["ranks"]), int(row["tokens"]), int(row.get("context", 0)))
            predicted = model.step_time(batch)
            by[row["phase"]] += [t / predicted for t in row.get("repeats") or [row["seconds"]]]
        if not by_kind:
            pool = [v for k in KINDS for v in by[k]]
            by = {k: pool for k in KINDS}
        if center:
            by = {k: list(np.asarray(v) / np.mean(v)) for k, v in by.items()}
        source = (f"{os.fspath(path)} ({form} step model, kernel {model.kernel}"
                  + (", pooled" if not by_kind else "") + (", centered" if center else "") + ")")
        return cls(**{k: tuple(float(x) for x in by[k]) for k in KINDS}, source=source)

    def mean(self, kind: str) -> float:
        """What a step of `kind` costs on average, relative to its prediction."""
        return float(np.mean(getattr(self, kind)))

    def draw(self, kind: str, size: int, seed: int = 0) -> np.ndarray:
        """`size` residuals of steps of `kind`, drawn with replacement (seeded)."""
        return _Stream(self, seed, 0).take_many(kind, size)

    def stream(self, seed: int, worker: int) -> _Stream:
        """Worker `worker`'s residuals: one seeded sequence per step kind."""
        return _Stream(self, seed, worker)

    def summary(self) -> dict:
        """Per kind: samples, mean, and the 5/50/95th percentiles (JSON-able)."""
        out: dict = {"source": self.source}
        for k in KINDS:
            v = np.asarray(getattr(self, k))
            p5, p50, p95 = np.percentile(v, [5, 50, 95])
            out[k] = {"n": int(v.size), "mean": float(v.mean()), "p5": float(p5),
                      "p50": float(p50), "p95": float(p95)}
        return out


class _Stream:
    """One worker's residuals: per kind, an endless seeded sequence read in order."""

    def __init__(self, noise: StepNoise, seed: int, worker: int):
        self._samples = {k: np.asarray(getattr(noise, k), dtype=np.float64) for k in KINDS}
        self._rng = {k: np.random.default_rng([seed, worker, i]) for i, k in enumerate(KINDS)}
        self._buf: dict[str, list[float]] = {k: [] for k in KINDS}
        self._pos = dict.fromkeys(KINDS, 0)

    def _fill(self, kind: str, need: int) -> None:
        buf, pos = self._buf[kind], self._pos[kind]
        if pos:  # drop what was read
            del buf[:pos]
            self._pos[kind] = 0
        samples, rng = self._samples[kind], self._rng[kind]
        while len(buf) < need:
            buf += samples[rng.integers(0, samples.size, _BLOCK)].tolist()

    def take(self, kind: str) -> float:
        """The next residual of `kind`."""
        if self._pos[kind] >= len(self._buf[kind]):
            self._fill(kind, 1)
        v = self._buf[kind][self._pos[kind]]
        self._pos[kind] += 1
        return v

    def peek(self, kind: str, k: int) -> list[float]:
        """The next `k` residuals of `kind`, not consumed (`skip` them as they are used)."""
        if self._pos[kind] + k > len(self._buf[kind]):
            self._fill(kind, k)
        pos = self._pos[kind]
        return self._buf[kind][pos:pos + k]

    def skip(self, kind: str, k: int) -> None:
        """Consume `k` residuals of `kind` (after `peek`)."""
        if self._pos[kind] + k > len(self._buf[kind]):
            self._fill(kind, k)
        self._pos[kind] += k

    def take_many(self, kind: str, k: int) -> np.ndarray:
        v = np.array(self.peek(kind, k))
        self.skip(kind, k)
        return v


__all__ = ["KINDS", "StepNoise"]
