"""Replay results: per-policy summaries, the Markdown table, and the PNG plots.

Conventions: TTFT, TPOT and latency are measured by the client from each request's scheduled
arrival (see `driver`). A request with one output token has no TPOT and meets the TPOT SLO; a
failed request misses both SLOs. The "cold-start set" is every request that was a cold start
under some policy of the invocation: the same requests under every policy. "stall" sums, over
requests, the time their steps sat blocked on synchronous adapter loads (`wait` stalls the
whole batch, so one load counts once per request in that batch).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Slo:
    """Service-level objectives in seconds."""

    ttft_s: float = 1.0
    tpot_s: float = 0.05


def _stats(xs: Sequence[float]) -> dict[str, float | None]:
    if not len(xs):
        return {"mean": None, "p50": None, "p99": None}
    p50, p99 = np.percentile(xs, [50, 99])
    return {"mean": float(np.mean(xs)), "p50": float(p50), "p99": float(p99)}


def summarize(rows: Sequence[Mapping], slo: Slo) -> dict:
    """A JSON-able summary of one policy's rows."""
    ok = [r for r in rows if r["error"] is None and r["finish_reason"] != "error"]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    lat = [r["latency_s"] for r in ok if r["latency_s"] is not None]
    meets_ttft = [r["error"] is None and r["ttft_s"] is not None and r["ttft_s"] <= slo.ttft_s for r in rows]
    meets_tpot = [r["error"] is None and (r["tpot_s"] is None or r["tpot_s"] <= slo.tpot_s) for r in rows]
    n = max(1, len(rows))
    span = max((r["arrival_s"] + (r["latency_s"] or 0.0) for r in rows), default=0.0)
    tokens = sum(r["tokens"] for r in rows)
    cold = sum(bool(r["cold_start"]) for r in ok)
    adapter_reqs = sum(r["adapter"] is not None for r in ok)
    lags = [r["send_lag_s"] for r in rows if r["send_lag_s"] is not None]
    return {
        "requests": len(rows),
        "completed": len(ok),
        "errors": dict(Counter(r["error"].split(":")[0] for r in rows if r["error"] is not None)),
        "tokens_match_trace": all(r["tokens"] == r["output_tokens"] for r in ok),
        "output_tokens": tokens,
        "duration_s": span,
        "throughput_rps": len(ok) / span if span else 0.0,
        "output_tokens_per_s": tokens / span if span else 0.0,
        "ttft_s": _stats(ttft),
        "tpot_s": _stats(tpot),
        "latency_s": _stats(lat),
        "slo": dataclasses.asdict(slo),
        "slo_attainment": {"ttft": sum(meets_ttft) / n, "tpot": sum(meets_tpot) / n,
                           "both": sum(a and b for a, b in zip(meets_ttft, meets_tpot)) / n},
        "cold_starts": cold,
        "cold_start_fraction": cold / adapter_reqs if adapter_reqs else 0.0,
        "cpu_prefill_tokens": sum(r["cpu_prefill_tokens"] for r in ok),
        "stalled_s": sum(r["stalled_s"] for r in ok),
        "per_worker": dict(Counter(str(r["worker"]) for r in ok)),
        "max_send_lag_s": max(lags, default=0.0),
    }


def add_cold_split(summaries: Mapping[str, dict], results: Mapping[str, Sequence[Mapping]]) -> None:
    """TTFT of the requests that were a cold start under any policy of the invocation, and of
    the rest, for every policy: the same requests, so `cached` shows what those would have cost
    with their adapter already on the device (in place: `ttft_cold_set_s`, `ttft_rest_s`)."""
    cold = {r["index"] for rows in results.values() for r in rows if r["cold_start"]}
    for name, rows in results.items():
        ok = [r for r in rows if r["error"] is None and r["ttft_s"] is not None]
        summaries[name]["cold_set_requests"] = len(cold)
        summaries[name]["ttft_cold_set_s"] = _stats([r["ttft_s"] for r in ok if r["index"] in cold])
        summaries[name]["ttft_rest_s"] = _stats([r["ttft_s"] for r in ok if r["index"] not in cold])


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def _triple(d: Mapping, fmt) -> str:
    return " / ".join(fmt(d[k]) for k in ("mean", "p50", "p99"))


def format_table(summaries: Mapping[str, Mapping]) -> str:
    """One Markdown table, a row per policy."""
    any_s = next(iter(summaries.values()))
    slo = any_s["slo"]
    head = ("| policy | requests (errors) | TTFT mean / p50 / p99 (ms) | time per token mean / p50 / p99 "
            f"(ms) | latency mean / p50 / p99 (s) | TTFT p50 cold-start set / rest (ms) | "
            f"TTFT <= {slo['ttft_s']:g} s | TPOT <= "
            f"{slo['tpot_s'] * 1e3:g} ms | both SLOs | cold starts | CPU-LoRA prefill tokens | "
            "stall (req*s) | machine load (1 min) |")
    rows = [head, "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    sec = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for name, s in summaries.items():
        att = s["slo_attainment"]
        errs = sum(s["errors"].values())
        split = (f"{_ms(s['ttft_cold_set_s']['p50'])} / {_ms(s['ttft_rest_s']['p50'])}"
                 if "ttft_cold_set_s" in s else "-")
        rows.append(
            f"| {name} | {s['requests']} ({errs}) | {_triple(s['ttft_s'], _ms)} | "
            f"{_triple(s['tpot_s'], _ms)} | {_triple(s['latency_s'], sec)} | {split} | {att['ttft']:.1%} | "
            f"{att['tpot']:.1%} | {att['both']:.1%} | {s['cold_starts']} "
            f"({s['cold_start_fraction']:.0%}) | {s['cpu_prefill_tokens']} | {s['stalled_s']:.2f} | "
            f"{'-' if s.get('load_avg_1m') is None else format(s['load_avg_1m'], '.1f')} |")
    return "\n".join(rows)


def format_summary(summaries: Mapping[str, Mapping]) -> str:
    """The first screen: a row per policy, led by the cold-start set's TTFT against `cached`'s
    (what a cold-start policy buys), then every request's TTFT and time per token and the SLOs;
    under 120 columns (the full table is `format_table`, in replay.md)."""
    slo = next(iter(summaries.values()))["slo"]
    ref = summaries.get("cached", {}).get("ttft_cold_set_s", {}).get("p50")
    groups = [("", 12), ("cold-start set's TTFT (ms)", 28), ("all TTFT (ms)", 15),
              ("ms per token", 15), ("meeting the SLO", 23), ("", 13)]
    cols = [("policy", 12), ("p50", 8), ("p99", 8), ("p50/cached", 12), ("p50", 7), ("p99", 8),
            ("p50", 7), ("p99", 8), ("TTFT", 7), ("TPOT", 8), ("both", 8), ("cold", 6),
            ("errors", 7)]

    def line(cells):
        return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(cells))

    out = ["".join(f"{g:^{w}}" for g, w in groups).rstrip(), line(cols)]
    for name, s in summaries.items():
        cold = s.get("ttft_cold_set_s", {"p50": None, "p99": None})
        vs = "-" if not ref or cold["p50"] is None else f"{cold['p50'] / ref:.2f}"
        att = s["slo_attainment"]
        values = [name[:11], _ms(cold["p50"]), _ms(cold["p99"]), vs, _ms(s["ttft_s"]["p50"]),
                  _ms(s["ttft_s"]["p99"]), _ms(s["tpot_s"]["p50"]), _ms(s["tpot_s"]["p99"]),
                  f"{att['ttft']:.1%}", f"{att['tpot']:.1%}", f"{att['both']:.1%}",
                  str(s["cold_starts"]), str(sum(s["errors"].values()))]
        out.append(line(zip(values, (w for _, w in cols))))
    n = next(iter(summaries.values())).get("cold_set_requests", 0)
    out.append(f"cold-start set: the {n} requests that were a cold start under some policy (the same "
               f"under each); SLOs: TTFT <= {slo['ttft_s']:g} s,")
    out.append(f"time per output token <= {slo['tpot_s'] * 1e3:g} ms; cold: this policy's cold "
               "starts; latencies from each request's scheduled arrival")
    return "\n".join(out)


def slo_verdict(summaries: Mapping[str, Mapping]) -> str:
    """One sentence: whether the policies separate in SLO terms at this load, from the results."""
    both = {name: s["slo_attainment"]["both"] for name, s in summaries.items()}
    lo, hi = min(both, key=both.get), max(both, key=both.get)
    n = next(iter(summaries.values())).get("cold_set_requests", 0)
    if both[hi] - both[lo] < 0.01:
        return (f"At this load the policies do not separate in SLO terms (every one meets both SLOs "
                f"for {both[lo]:.1%}-{both[hi]:.1%} of requests); they differ in the TTFT of the "
                f"{n} cold-start requests. A heavier load or a slower link separates them (--scale, "
                "--link-gbps, --slo-ttft-s).")
    return (f"Both SLOs met: {both[hi]:.1%} of requests under {hi}, {both[lo]:.1%} under {lo} "
            f"({(both[hi] - both[lo]) * 100:.1f} points apart).")


# -- plots ---------------------------------------------------------------------------------------
_COLORS = {"cached": "tab:green", "wait": "tab:red", "async": "tab:orange", "cpu_assist": "tab:blue",
           "auto": "tab:purple"}


def _color(name: str, i: int) -> str:
    base = name.split("/")[0].split(" ")[0]
    return _COLORS.get(base, f"C{(i + 3) % 10}")


def _cdf(ax, values: Sequence[float], label: str, color: str) -> None:
    x = np.sort(np.asarray(values, dtype=float))
    if len(x):
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label, color=color, lw=1.8)


def _plain_log_ticks(axis, ticker) -> None:
    """Log-axis labels as plain numbers at 1, 2, 5 x 10^k (0.1, 0.2, 0.5, 1, ...), none on minor
    ticks: matplotlib's default labels minor ticks 2x10^-1, 3x10^-1, ... when a range spans under
    a decade, and they overlap."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_results(results: Mapping[str, Sequence[Mapping]], summaries: Mapping[str, Mapping],
                 out_dir: str | Path, subtitle: str = "") -> list[str]:
    """Write cold_ttft.png (when there were cold starts), latency_cdf.png, ttft_over_time.png and
    slo_attainment.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(results)
    slo = next(iter(summaries.values()))["slo"]
    paths = []

    def finish(fig, title: str, file: str, legend_row: bool = False) -> None:
        # The subtitle wrapped to the figure's width (~12 characters an inch at this size).
        sub = textwrap.fill(subtitle, int(12 * fig.get_figwidth())) if subtitle else ""
        fig.suptitle(title + (f"\n{sub}" if sub else ""), fontsize=11)
        top = 1.0
        if legend_row:  # one legend for every panel, between the title and the panels
            seen: dict[str, object] = {}
            for ax in fig.axes:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    seen.setdefault(lab, h)
            labels = sorted(seen, key=lambda lab: "median" in lab)  # markers first, then the lines
            ncol = min(3, len(labels))
            h = fig.get_figheight()
            fig.legend([seen[lab] for lab in labels], labels, loc="upper center", ncol=ncol, fontsize=9,
                       bbox_to_anchor=(0.5, 1 - 0.5 / h), frameon=False)
            top = 1 - (0.55 + 0.2 * -(-len(labels) // ncol) + 0.3) / h
        fig.tight_layout()
        if legend_row:
            fig.subplots_adjust(top=top)  # tight_layout would leave room for the title only
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        paths.append(str(out / file))

    # 0. The cold-start set's TTFT per policy: what each policy does to the requests that need an
    # adapter the device does not hold (the same requests under every policy).
    cold = {r["index"] for rows in results.values() for r in rows if r["cold_start"]}
    if cold:
        fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.6))
        data = [[r["ttft_s"] * 1e3 for r in results[n] if r["index"] in cold and r["error"] is None
                 and r["ttft_s"] is not None] for n in names]
        ax.boxplot(data, vert=False, widths=0.55, showfliers=False, medianprops={"color": "black"})
        rng = np.random.default_rng(0)
        for i, (name, xs) in enumerate(zip(names, data)):
            ax.scatter(xs, i + 1 + rng.uniform(-0.18, 0.18, len(xs)), s=14, alpha=0.75,
                       color=_color(name, i), zorder=3)
            if xs:
                ax.annotate(f"p50 {np.median(xs):.0f} ms", (max(xs), i + 1), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(range(1, len(names) + 1), names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis, ticker)
        ax.set_xlabel(f"time to first token of the {len(cold)} cold-start requests (ms, log scale)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        finish(fig, "Cold-start requests' TTFT per policy (the same requests in every row)",
               "cold_ttft.png")

    # 1. CDFs of TTFT and end-to-end latency.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, name in enumerate(names):
        ok = [r for r in results[name] if r["error"] is None]
        _cdf(axes[0], [r["ttft_s"] for r in ok if r["ttft_s"] is not None], name, _color(name, i))
        _cdf(axes[1], [r["latency_s"] for r in ok if r["latency_s"] is not None], name, _color(name, i))
    axes[0].axvline(slo["ttft_s"], color="0.3", ls="--", lw=1, label=f"TTFT SLO {slo['ttft_s']:g} s")
    for ax, what in zip(axes, ("time to first token", "end-to-end latency")):
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis, ticker)
        ax.set_xlabel(f"{what} (s, log scale)")
        ax.set_ylabel("fraction of requests (CDF)")
        ax.set_title(what)
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
    finish(fig, "Latency CDF per policy", "latency_cdf.png")

    # 2. TTFT over the replay, one panel per policy; cold starts marked.
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.3 * len(names) + 0.8), sharex=True,
                             sharey=True, squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[:, 0], names)):
        ok = [r for r in results[name] if r["error"] is None and r["ttft_s"] is not None]
        warm = [(r["arrival_s"], r["ttft_s"]) for r in ok if not r["cold_start"]]
        cold = [(r["arrival_s"], r["ttft_s"]) for r in ok if r["cold_start"]]
        if warm:
            ax.scatter(*zip(*warm), s=10, color="0.55", alpha=0.7, label="warm adapter")
        if cold:
            ax.scatter(*zip(*cold), s=30, marker="x", color="black", label="cold start")
        if len(ok) >= 5:  # a rolling median shows the trend through the scatter
            t = np.array([r["arrival_s"] for r in ok])
            y = np.array([r["ttft_s"] for r in ok])
            k = max(3, len(ok) // 25)
            med = [np.median(y[max(0, j - k):j + k + 1]) for j in range(len(y))]
            ax.plot(t, med, color=_color(name, i), lw=2,
                    label=f"{name}: rolling median of {2 * k + 1} requests")
        ax.axhline(slo["ttft_s"], color="tab:orange", ls="--", lw=1.2, label=f"TTFT SLO {slo['ttft_s']:g} s")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis, ticker)
        ax.set_ylabel("TTFT (s, log)")
        ax.set_title(name, fontsize=10, loc="left", color=_color(name, i), fontweight="bold")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("arrival time in the replay (s)")
    finish(fig, "Time to first token over the replay", "ttft_over_time.png", legend_row=True)

    # 3. SLO attainment per policy.
    fig, ax = plt.subplots(figsize=(max(6.5, 1.9 * len(names) + 3), 4.3))
    kinds = [("ttft", f"TTFT <= {slo['ttft_s']:g} s"), ("tpot", f"TPOT <= {slo['tpot_s'] * 1e3:g} ms"),
             ("both", "both")]
    width = 0.8 / len(kinds)
    x = np.arange(len(names))
    for j, (key, label) in enumerate(kinds):
        vals = [100 * summaries[n]["slo_attainment"][key] for n in names]
        bars = ax.bar(x + (j - 1) * width, vals, width, label=label, color=f"C{j}", alpha=0.85)
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xticks(x, names)
    ax.set_ylabel("requests meeting the SLO (%)")
    ax.set_ylim(0, 112)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.1))
    finish(fig, "SLO attainment per policy", "slo_attainment.png")
    return paths
