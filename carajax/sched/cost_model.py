"""The cost model a router prices placements with and the simulator charges steps with.

A `CostModel` bundles, for one LoRA kernel on one device, a prefill and a decode step model (the
router's views), the fused `step` model (what the engine runs), and a cold-start table (adapter
load time vs rank); it round-trips through JSON (`save` / `load`). `fit_cost_model` fits one to
a profile; `default_cost_model` is the one shipped.

The forms are `carajax.sched.step_forms`, their fitting `carajax.sched.step_fit` (both re-exported
here, where their users import them); the A10 model derived from datasheet numbers is
`carajax.sched.a10_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from carajax.data import COST_MODELS
from carajax.sched.step_fit import (
    KERNELS,
    PHASES,
    STEP_PHASES,
    evaluate,
    fit,
    fit_report,
    has_mixed,
    infer_kernel,
    nnls,
    parse_rows,
    plot_predicted_vs_measured,
    train_test_split,
)
from carajax.sched.step_forms import (
    FORMS,
    SHAPE_STEPS,
    Batch,
    Model,
    PaddedForm,
    RichForm,
    ShapedForm,
    UnpaddedForm,
    model_from_dict,
)

FORMAT = "carajax.cost_model/v1"


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
    kernel = infer_kernel(measurements, kernel)
    models = {}
    for phase in PHASES:
        batches, seconds = parse_rows(measurements, phase, kernel)
        if not batches:
            raise ValueError(f"no {phase} measurements for kernel {kernel!r}")
        models[phase] = fit(form, batches, seconds)
    step = (fit(step_form or form, *parse_rows(measurements, "step", kernel))
            if has_mixed(measurements, kernel) else None)
    return CostModel(prefill=models["prefill"], decode=models["decode"], kernel=kernel, step=step,
                     **metadata)


__all__ = [
    # this module
    "COST_MODEL_DIR", "DEFAULT_COST_MODELS", "FORMAT", "RANK_AWARE_POLICIES", "CostModel",
    "RankBlindModelError", "default_cost_model", "fit_cost_model", "load", "require_rank_terms",
    # step_forms
    "FORMS", "SHAPE_STEPS", "Batch", "Model", "PaddedForm", "RichForm", "ShapedForm", "UnpaddedForm",
    "model_from_dict",
    # step_fit
    "KERNELS", "PHASES", "STEP_PHASES", "evaluate", "fit", "fit_report", "nnls", "parse_rows",
    "plot_predicted_vs_measured", "train_test_split",
]
