"""LoRA kernel timings: Pallas SGMV (prefill) and BGMV (decode) vs their jnp references and the base matmul.

    python scripts/bench_kernels.py [--quick | --full] [--modes prefill decode] [--tokens 1 16 64]
        [--adapters 1 4] [--d 256] [--repeats 3] [--dtype float32] [--out results/bench_kernels.json]

One layer of d_in = d_out = d (4096: a Llama-2-7B q/k/v/o projection), a pool of S device slots
padded to r_max = 64. For each point (mode, T tokens, number of distinct adapters, rank mix):
- prefill: `sgmv` with the T tokens split into `adapters` equal contiguous segments;
- decode: `bgmv` with T tokens (one sequence each), spread over `adapters` slots;
it times the kernel unpadded (cost ~ sum of ranks), with `pad_to_max_rank=True` (cost ~ batch x
max rank), the fused SGMV (`sgmv_fused`: shrink + expand in one call), the matching jnp reference
and the base matmul `x @ W` (median ms after a warm-up call), and checks each kernel against its
reference (relative Frobenius error). Decode points also time what the engine's hook runs for
decode tokens (one-token segments through `sgmv`, unpadded and padded; the fused kernel likewise).
LoRA/base is per projection; for the four attention projections it is the same ratio. Points
with more adapters than tokens are skipped. Rank mixes: {8}, {64}, {8,16,32,64} (drawn uniformly per slot).

On GPU (`--full`, the default there): bfloat16, T in 1..4096, 1..64 adapters; it also measures
device copy bandwidth (a jitted 1 GiB elementwise op) and reports BGMV decode's achieved bandwidth
as a share of it. On CPU (`--quick`, the default there) the kernels run in Pallas interpret mode,
so the preset is small: d = 256, T in (1, 16, 64), 1 or 4 adapters, float32, 3 repeats.
Prints a table, writes JSON (and a PNG next to it when matplotlib is installed); exits 1 when a
kernel disagrees with its reference.

`--write-table [PATH]` also writes the measured kernel table that `lora_impl="auto"` reads
(`carajax.lora.kernel_table`; default: data/kernel_tables/<device>.json and its shipped copy
carajax/data/kernel_tables/<device>.json): per (tokens bucket, segments bucket, max rank) the
fastest of fused / pallas (unpadded) / padded / reference.

`--verified PATH` (a compiled GPU run only) removes from the record of verified kernel forms
(`carajax.autotune`; read from PATH, else the shipped one, written to PATH) each LoRA form
whose output here differed from its reference beyond the tolerance. It never adds one: that is
the compiled test classes' job (`scripts/record_verified.py`).
`--plot ""` writes no plot; `--replot JSON` draws the plot of an earlier run's JSON and exits.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from carajax import autotune
from carajax.lora import kernel_table
from carajax.lora.fused_kernels import sgmv_fused
from carajax.lora.kernels import bgmv, bgmv_reference, sgmv, sgmv_reference

try:  # progress bars are a nicety: tqdm is not a declared dependency
    from tqdm import tqdm
except ImportError:
    tqdm = None

R_MAX = 64
RANK_MIXES = {"8": (8,), "64": (64,), "8-64": (8, 16, 32, 64)}
PRESETS = {
    "full": dict(tokens=[1, 16, 64, 256, 1024, 2048, 4096], adapters=[1, 8, 32, 64], d=4096,
                 repeats=20, dtype="bfloat16"),
    "quick": dict(tokens=[1, 16, 64], adapters=[1, 4], d=256, repeats=3, dtype="float32"),
}
TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-4}
ALPHA = 16.0  # scale = alpha / rank, as in a PEFT adapter
# Jitted once here so that points of the same shapes reuse one compilation.
REFERENCES = {"prefill": jax.jit(sgmv_reference), "decode": jax.jit(bgmv_reference)}
BASE = jax.jit(jnp.matmul)


def time_ms(fns: dict[str, Callable[[], jax.Array]], repeats: int
            ) -> tuple[dict[str, float], dict[str, float], dict[str, jax.Array]]:
    """Per function: first call s (it compiles), median ms of `repeats` calls after it, output.

    The calls are interleaved round-robin, so that a burst of load from elsewhere on a shared
    machine slows all of them alike instead of skewing one ratio.
    """
    first, times, outs = {}, {k: [] for k in fns}, {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        outs[k] = jax.block_until_ready(fn())
        first[k] = time.perf_counter() - t0
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return first, {k: statistics.median(v) * 1e3 for k, v in times.items()}, outs


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    """Relative Frobenius error, in float64 so the check does not add rounding of its own."""
    o, r = (np.asarray(v.astype(jnp.float32), np.float64) for v in (out, ref))
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def copy_bandwidth_gbs(repeats: int) -> float:
    """Device memory bandwidth of a 1 GiB elementwise op (read + write), GB/s."""
    z = jnp.ones((1 << 28,), jnp.float32)
    # `z + 0` could be simplified away by XLA; scaling by 2 cannot, and moves the same bytes.
    op = jax.jit(lambda v: v * 2)
    _, ms, _ = time_ms({"copy": lambda: op(z)}, repeats)
    return 2 * z.nbytes / (ms["copy"] * 1e-3) / 1e9


def split_segments(T: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lens) of n contiguous segments covering T tokens, lengths within 1 of each other."""
    lens = np.full(n, T // n, np.int32)
    lens[: T % n] += 1
    return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32), lens


def bench_point(mode: str, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, mix: str,
                ranks: np.ndarray, n: int, repeats: int, rng: np.random.Generator) -> dict:
    """Time kernel (unpadded, padded), fused, reference and base matmul for one sweep point."""
    T, d = x.shape
    interpret = jax.default_backend() != "gpu"  # Pallas only lowers for real on GPU here
    scales = jnp.asarray(ALPHA / ranks, jnp.float32)
    ranks_j = jnp.asarray(ranks, jnp.int32)
    if mode == "prefill":
        starts, lens = split_segments(T, n)
        data = (x, a, b, jnp.asarray(starts), jnp.asarray(lens), jnp.arange(n, dtype=jnp.int32),
                ranks_j, scales)
        kernel = sgmv
        token_slots = np.repeat(np.arange(n), lens)
        seg_data = data
    else:
        # Decode batches interleave adapters; every one of the n slots gets at least one token.
        token_slots = rng.permutation(np.arange(T) % n).astype(np.int32)
        data = (x, a, b, jnp.asarray(token_slots), ranks_j, scales)
        kernel = bgmv
        # What the hook runs for decode tokens: T segments of one token each.
        seg_data = (x, a, b, jnp.arange(T, dtype=jnp.int32), jnp.ones(T, jnp.int32),
                    jnp.asarray(token_slots), ranks_j, scales)
    unpadded = functools.partial(kernel, interpret=interpret)
    padded = functools.partial(kernel, interpret=interpret, pad_to_max_rank=True)
    fused = functools.partial(sgmv_fused, interpret=interpret)
    fns = {"kernel": lambda: unpadded(*data), "padded": lambda: padded(*data),
           "fused": lambda: fused(*seg_data),
           "ref": lambda: REFERENCES[mode](*data), "base": lambda: BASE(x, w)}
    if mode == "decode":
        fns["seg_kernel"] = lambda: sgmv(*seg_data, interpret=interpret)
        fns["seg_padded"] = lambda: sgmv(*seg_data, interpret=interpret, pad_to_max_rank=True)
    first, ms, out = time_ms(fns, repeats)
    k_ms, p_ms, r_ms, base_ms = ms["kernel"], ms["padded"], ms["ref"], ms["base"]
    used = ranks[:n]
    row = {
        "mode": mode, "tokens": T, "adapters": n, "mix": mix, "ranks": used.tolist(), "d": d,
        "dtype": str(x.dtype), "kernel_first_s": first["kernel"], "kernel_ms": k_ms,
        "padded_ms": p_ms,
        "ref_ms": r_ms, "base_ms": base_ms, "kernel_over_ref": k_ms / r_ms,
        "padded_over_unpadded": p_ms / k_ms, "lora_over_base": k_ms / base_ms,
        # What padding should cost if time followed rank: T x max rank over the sum of token ranks.
        "padded_rank_work_ratio": float(T * used.max() / ranks[token_slots].sum()),
        "err": rel_err(out["kernel"], out["ref"]), "err_padded": rel_err(out["padded"], out["ref"]),
        "fused_ms": ms["fused"], "fused_over_ref": ms["fused"] / r_ms,
        "err_fused": rel_err(out["fused"], out["ref"]),
        # The kernel table's view (what the hook chooses between): segments as the hook sees
        # them, the batch's max rank, and each choice's time on the hook's own call.
        "segments": n if mode == "prefill" else T, "max_rank": int(used.max()),
        "choice_ms": {"fused": ms["fused"], "reference": r_ms,
                      "pallas": ms.get("seg_kernel", k_ms), "padded": ms.get("seg_padded", p_ms)},
    }
    if mode == "decode":
        # Least HBM traffic BGMV can do: each distinct slot's A rows and B columns up to its rank
        # once (tokens sharing a slot hit cache), plus x read and y written.
        item = x.dtype.itemsize
        row["bytes"] = int(used.sum() * 2 * d * item + 2 * T * d * item)
        row["achieved_gbs"] = row["bytes"] / (k_ms * 1e-3) / 1e9
    return row


def max_err(row: dict) -> float:
    return max(row["err"], row["err_padded"], row["err_fused"])


def print_table(rows: list[dict], copy_gbs: float | None) -> None:
    bw = copy_gbs is not None
    print(f"{'mode':<8}{'T':>6}{'adapt':>6} {'ranks':<6}{'kernel ms':>10}{'padded ms':>10}"
          f"{'fused ms':>9}{'ref ms':>9}{'base ms':>9}{'kern/ref':>9}{'pad/unpad':>10}"
          f"{'lora/base':>10}{'err':>9}"
          + (f"{'bw %':>7}" if bw else ""))
    for r in rows:
        line = (f"{r['mode']:<8}{r['tokens']:>6}{r['adapters']:>6} {r['mix']:<6}"
                f"{r['kernel_ms']:>10.3f}{r['padded_ms']:>10.3f}{r['fused_ms']:>9.3f}"
                f"{r['ref_ms']:>9.3f}"
                f"{r['base_ms']:>9.3f}{r['kernel_over_ref']:>9.2f}{r['padded_over_unpadded']:>10.2f}"
                f"{r['lora_over_base']:>10.2f}{max_err(r):>9.1e}")
        if bw and r["mode"] == "decode":
            line += f"{100 * r['achieved_gbs'] / copy_gbs:>6.1f}%"
        print(line)


def plot(rows: list[dict], path: str) -> None:
    """Kernel and base ms against T, one panel per mode; skipped when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        for mix, n in sorted({(r["mix"], r["adapters"]) for r in mine}):
            pts = [r for r in mine if r["mix"] == mix and r["adapters"] == n]
            ax.plot([r["tokens"] for r in pts], [r["kernel_ms"] for r in pts], marker="o",
                    label=f"ranks {mix}, {n} adapters")
        base = {r["tokens"]: r["base_ms"] for r in mine}
        ax.plot(sorted(base), [base[t] for t in sorted(base)], "k--", label="base x @ W")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms",
               title=f"{mode} ({'sgmv' if mode == 'prefill' else 'bgmv'}, unpadded)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def progress(points: list) -> Iterable:
    """A tqdm bar on a terminal; otherwise (tqdm missing, output to a log) one line per point."""
    if tqdm is not None and sys.stderr.isatty():
        yield from tqdm(points, unit="pt")
        return
    for i, p in enumerate(points):
        print(f"[{i + 1}/{len(points)}] " + " ".join(map(str, p)), flush=True)
        yield p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_const", dest="preset", const="quick",
                        help="small sizes for Pallas interpret mode (default on CPU)")
    preset.add_argument("--full", action="store_const", dest="preset", const="full",
                        help="Llama-2-7B sizes (default on GPU)")
    parser.add_argument("--modes", nargs="+", choices=["prefill", "decode"],
                        default=["prefill", "decode"])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--adapters", type=int, nargs="+")
    parser.add_argument("--d", type=int, help="d_in = d_out")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--dtype", choices=sorted(TOLERANCE))
    parser.add_argument("--out", default="results/bench_kernels.json")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default: --out with .png; \"\": no plot)")
    parser.add_argument("--replot", metavar="JSON", help="plot an earlier run's JSON and exit")
    parser.add_argument("--write-table", nargs="?", const="", default=None, metavar="PATH",
                        help="also write the kernel table lora_impl='auto' reads (default PATH: "
                             "data/kernel_tables/<device>.json and the package's copy)")
    parser.add_argument("--verified", metavar="PATH",
                        help="remove LoRA forms that failed here from this record of verified "
                             "kernel forms (compiled GPU runs only)")
    args = parser.parse_args()
    if args.replot:
        plot(json.load(open(args.replot))["rows"],
             args.plot or os.path.splitext(args.replot)[0] + ".png")
        return

    on_gpu = jax.default_backend() == "gpu"
    cfg = dict(PRESETS[args.preset or ("full" if on_gpu else "quick")])
    for key in cfg:  # explicit flags override the preset
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    dtype, d, S = jnp.dtype(cfg["dtype"]), cfg["d"], max(cfg["adapters"])

    # One pool of S slots shared by every point, as in serving: a point with n adapters uses
    # slots 0..n-1. Everything is random and non-zero, padding beyond each rank included: the
    # kernels must ignore it (the references mask it).
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(0, 0.05, (S, R_MAX, d)), dtype)
    b = jnp.asarray(rng.normal(0, 0.05, (S, d, R_MAX)), dtype)
    w = jnp.asarray(rng.normal(0, d ** -0.5, (d, d)), dtype)
    xs = {T: jnp.asarray(rng.normal(0, 1, (T, d)), dtype) for T in cfg["tokens"]}
    # Ranks from their own generator, so a slot's rank does not depend on --d or --tokens.
    rank_rng = np.random.default_rng(0)
    mix_ranks = {m: rank_rng.choice(rs, S).astype(np.int32) for m, rs in RANK_MIXES.items()}

    # A point cannot have more distinct adapters than tokens: those are skipped.
    points = [(mode, T, n, m) for mode in args.modes for T in cfg["tokens"]
              for n in cfg["adapters"] if n <= T for m in RANK_MIXES]
    if not points:
        sys.exit("nothing to run: every --adapters value exceeds every --tokens value")
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} cores, "
          f"jax {jax.__version__}; {'Pallas' if on_gpu else 'Pallas interpret mode'}, {dtype.name}, "
          f"d={d}, r_max={R_MAX}, {S} slots, median of {cfg['repeats']}; {len(points)} points")
    print(f"slot ranks of mix 8-64: {mix_ranks['8-64'].tolist()}")
    copy_gbs = copy_bandwidth_gbs(cfg["repeats"]) if on_gpu else None
    if copy_gbs is not None:
        print(f"device copy bandwidth: {copy_gbs:.0f} GB/s")

    rows = []
    for mode, T, n, mix in progress(points):
        row = bench_point(mode, xs[T], w, a, b, mix, mix_ranks[mix], n, cfg["repeats"], rng)
        if copy_gbs is not None and mode == "decode":
            row["achieved_pct_of_copy"] = 100 * row["achieved_gbs"] / copy_gbs
        rows.append(row)

    print_table(rows, copy_gbs)
    worst = max(max_err(r) for r in rows)
    ok = worst <= TOLERANCE[dtype.name]
    print(f"max relative error vs reference: {worst:.2e} (tolerance {TOLERANCE[dtype.name]:.0e})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": str(device),
                   "device_kind": device.device_kind, "backend": jax.default_backend(),
                   "interpret": not on_gpu, "platform": platform.platform(),
                   "cpu_count": os.cpu_count(), "jax": jax.__version__, "r_max": R_MAX,
                   "config": cfg, "copy_gbs": copy_gbs, "max_err": worst, "ok": ok,
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot != "":
        plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png")
    if args.write_table is not None:
        name = kernel_table.device_name(device.device_kind)
        paths = [args.write_table] if args.write_table else [
            str(d / f"{name}.json") for d in (kernel_table.SOURCE_DIR, kernel_table.TABLE_DIR)]
        doc = kernel_table.table_from_rows(
            rows, device=name, device_kind=device.device_kind, backend=jax.default_backend(),
            date=datetime.date.today().isoformat(), dtype=dtype.name, d=d, r_max=R_MAX,
            command=" ".join(["python"] + sys.argv))
        for path in paths:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                json.dump(doc, f, indent=2)
        print(f"wrote {', '.join(paths)}: " + ", ".join(
            f"T{e['tokens']}/G{e['segments']}/r{e['max_rank']} {e['best']}"
            for e in doc["entries"]))
    if args.verified and on_gpu:
        tol = TOLERANCE[dtype.name]
        failed = [form for form, key in (("pallas", "err"), ("padded", "err_padded"),
                                         ("fused", "err_fused"))
                  if max(r[key] for r in rows) > tol]
        base = args.verified if os.path.isfile(args.verified) else autotune.RECORD_PATH
        record = autotune.update_record(autotune.load_record(base), device.device_kind, "lora",
                                        failed=failed)
        with open(args.verified, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        print(f"verified record {args.verified}: "
              + (f"removed {failed} on {device.device_kind}" if failed else "no LoRA form failed"))
    if not ok:
        sys.exit(f"FAIL: a kernel differs from its reference by {worst:.2e} "
                 f"> {TOLERANCE[dtype.name]:.0e}")


if __name__ == "__main__":
    main()
