"""Fitting step forms (`step_forms`) to measured step times, and how well they fit.

Non-negative least squares on relative residuals (`fit`, see `_fit_coef` for why), R^2 and MAPE
on held-out rows (`evaluate`, `train_test_split`, `fit_report`), a profile's rows as batches
(`parse_rows`: what `carajax.sched.profiler` saves), and the predicted-vs-measured plot.
`cost_model.fit_cost_model` builds a whole `CostModel` from these.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from carajax.sched.step_forms import FORMS, Batch, Model

KERNELS = ("padded", "unpadded")
PHASES = ("prefill", "decode")
# Rows of a profile: prefill-only steps, decode-only steps, and "mixed" steps (decodes plus a prefill
# chunk in one forward). The step model is fitted on all of them; prefill/decode on their own.
STEP_PHASES = ("prefill", "decode", "mixed")


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


def parse_rows(measurements: Sequence[Mapping[str, Any]], phase: str, kernel: str | None):
    """(batches, seconds) of the rows of `phase` ("step": every row) for `kernel` (None: any)."""
    rows = [m for m in measurements if (phase == "step" or m["phase"] == phase)
            and (kernel is None or m.get("kernel") == kernel)]
    batches = [Batch(tuple(m["ranks"]), int(m["tokens"]), int(m.get("context", 0))) for m in rows]
    return batches, np.array([float(m["seconds"]) for m in rows])


def has_mixed(measurements: Sequence[Mapping[str, Any]], kernel: str) -> bool:
    return any(m["phase"] == "mixed" and m.get("kernel") == kernel for m in measurements)


def infer_kernel(measurements: Sequence[Mapping[str, Any]], kernel: str | None) -> str:
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
    kernel = infer_kernel(measurements, kernel)
    report = {}
    for phase in PHASES + (("step",) if has_mixed(measurements, kernel) else ()):
        batches, seconds = parse_rows(measurements, phase, kernel)
        if len(batches) < 2:
            continue
        tr, te = train_test_split(len(batches), 0.8, seed)
        model = fit(form, [batches[i] for i in tr], seconds[tr])
        metrics = evaluate(model, [batches[i] for i in te], seconds[te])
        report[phase] = {**metrics, "n_train": len(tr), "n_test": len(te)}
    return report


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


__all__ = ["KERNELS", "PHASES", "STEP_PHASES", "evaluate", "fit", "fit_report", "has_mixed",
           "infer_kernel", "nnls", "parse_rows", "plot_predicted_vs_measured", "train_test_split"]
