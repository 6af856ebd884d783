"""What `auto` runs on this device, for the paged attention and for the LoRA ops (issue 24, item
7: GPU defaults that cannot hurt).

A compiled kernel form runs by default only where it has passed the compiled correctness run on
this device kind. Per op ("attention": `models.attention.paged_attention`, "lora": the hook's
SGMV) the rule is, in order (`decide` is the pure rule for one shape class):

1. off a GPU: the jnp reference (on CPU Pallas only interprets, several times slower);
2. a measured kernel table for the device kind ships (`lora.kernel_table`; its `entries` for
   LoRA, its `attention` for the attention): the table;
3. some forms are recorded verified for the device kind (`verified_forms`, from the shipped
   record `carajax/data/kernel_tables/verified.json`) and `warm_up` has measured them: per
   shape class ("decode", "prefill") the fastest of those forms and the reference, timed on the
   engine's own shapes (`measure`: median of a few calls after a compiling one; a form that
   raises or disagrees with the reference is left out);
4. otherwise the jnp reference: never an untested kernel by default.

The record is written by the GPU run (`scripts/gpu_check.sh`: `scripts/record_verified.py` adds
the forms whose compiled test classes all passed; `scripts/bench_kernels.py --verified` removes
a LoRA form that disagrees with its reference). It ships empty until a GPU has run them.

`warm_up` is called once per engine (`ModelRunner.__init__`, before anything is traced: the
attention reads the measured choice at trace time, so a variant traced before keeps the
reference). Its results are process-wide, per device kind; `attention_impl` and `lora_impl`
read them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from carajax import data
from carajax.lora import kernel_table

OPS = ("attention", "lora")
# The compiled kernel forms of each op (the jnp "reference" is always allowed): attention's Pallas
# kernel; LoRA's two-call Pallas SGMV unpadded ("pallas") or padded to the batch's max rank
# ("padded"), and the fused one-call SGMV ("fused"): `hook._ops` runs each.
FORMS = {"attention": ("pallas",), "lora": ("pallas", "padded", "fused")}
SHAPE_CLASSES = ("decode", "prefill")
RECORD_PATH = data.KERNEL_TABLES / "verified.json"
ENV_RECORD = "CARAJAX_VERIFIED_KERNELS"  # a record file to read instead of the shipped one
REPEATS = 5  # timed calls per candidate and shape class
CONTEXT = 1024  # context length of the timed attention calls (at most the engine's own)
KV_BYTES = 256 << 20  # and at most this many bytes of keys (as many of values) in all
# A candidate whose output is further than this from the reference's (relative Frobenius) is
# left out: the record says the form passed its tests, this checks it on the engine's shapes.
AGREEMENT = {"float32": 1e-3}
AGREEMENT_LOW_PRECISION = 3e-2  # bfloat16 / float16


def device() -> tuple[str, str]:
    """(platform, device kind) of JAX's default device, e.g. ("gpu", "NVIDIA H200"), ("cpu",
    "cpu"). Tests replace this to simulate a GPU."""
    return jax.default_backend(), jax.devices()[0].device_kind


# -- the record of verified forms ---------------------------------------------------------------
def record_path() -> Path:
    return Path(os.environ.get(ENV_RECORD) or RECORD_PATH)


@functools.cache
def _read_record(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {"devices": {}}


def load_record(path: str | os.PathLike | None = None) -> dict:
    """The record document: {"about": ..., "devices": {device kind: {op: {form: provenance}}}}."""
    return _read_record(str(path or record_path()))


def verified_forms(device_kind: str, record: Mapping | None = None) -> dict[str, frozenset[str]]:
    """Per op, the forms recorded as passing the compiled correctness run on this device kind
    (only known forms of known ops count)."""
    entry = (load_record() if record is None else record).get("devices", {}).get(device_kind, {})
    return {op: frozenset(f for f in entry.get(op, {}) if f in FORMS[op]) for op in OPS}


def update_record(doc: Mapping, device_kind: str, op: str, *, passed: Iterable[str] = (),
                  failed: Iterable[str] = (), provenance: Mapping | None = None) -> dict:
    """A copy of the record with this device kind's `passed` forms of `op` added (with their
    provenance: date, commit, jax, check) and its `failed` ones removed; other entries kept."""
    if op not in FORMS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    passed, failed = list(passed), set(failed)
    unknown = sorted({*passed, *failed} - set(FORMS[op]))
    if unknown:
        raise ValueError(f"unknown {op} forms {unknown}; expected some of {FORMS[op]}")
    out = json.loads(json.dumps(dict(doc)))  # a deep copy
    devices = out.setdefault("devices", {})
    forms = devices.setdefault(device_kind, {}).setdefault(op, {})
    for f in passed:
        if f not in failed:
            forms[f] = dict(provenance or {})
    for f in failed:
        forms.pop(f, None)
    if not forms:
        devices[device_kind].pop(op)
    if not devices[device_kind]:
        devices.pop(device_kind)
    return out


# -- the decision -------------------------------------------------------------------------------
def decide(platform: str, *, table: bool = False, verified: Iterable[str] = (),
           timings: Mapping[str, float] | None = None) -> str:
    """What `auto` runs for one op and shape class: "reference" (the jnp path), "table" (the
    shipped measured table decides) or a verified form.

    Off a GPU: "reference". With a table: "table". With verified forms and their `timings`
    (seconds per call, e.g. from `measure`, the reference's included): the fastest of the
    verified forms and the reference (a tie goes to the reference; a form not verified is never
    chosen, however fast). Otherwise (nothing verified, or not measured): "reference"."""
    if platform != "gpu":
        return "reference"
    if table:
        return "table"
    allowed = set(verified) | {"reference"}
    timed = {f: t for f, t in (timings or {}).items() if f in allowed and math.isfinite(t)}
    if len(allowed) == 1 or not timed:
        return "reference"
    return min(timed, key=lambda f: (timed[f], f != "reference"))


# -- the measurement ----------------------------------------------------------------------------
def rel_err(out, ref) -> float:
    """Relative Frobenius error in float64 (an all-zero reference: the absolute error)."""
    o, r = (np.asarray(jnp.asarray(v).astype(jnp.float32), np.float64) for v in (out, ref))
    norm = np.linalg.norm(r)
    return float(np.linalg.norm(o - r) / (norm if norm > 0 else 1.0))


def measure(candidates: Mapping[str, Callable[[], Any]], repeats: int = REPEATS, *,
            reference: str | None = None, tolerance: float | None = None,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each candidate, its output waited for.

    Each is called once untimed first (it compiles); one that raises there, or whose output is
    further than `tolerance` (relative) from the `reference` candidate's, is left out (the
    reference itself must run). Then `repeats` rounds call every candidate once, in turn, so
    load from elsewhere slows all alike."""
    names = sorted(candidates, key=lambda n: n != reference)  # the reference first
    ref_out, live = None, []
    for name in names:
        try:
            out = jax.block_until_ready(candidates[name]())
        except Exception:
            if name == reference:
                raise
            continue
        if name == reference:
            ref_out = out
        elif reference is not None and tolerance is not None and not (
                rel_err(out, ref_out) <= tolerance):
            continue
        live.append(name)
    times: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(max(repeats, 1)):
        for name in live:
            t0 = clock()
            jax.block_until_ready(candidates[name]())
            times[name].append(clock() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


@dataclasses.dataclass(frozen=True)
class EngineShapes:
    """The shapes of an engine's steps that `warm_up` times the candidates on: a decode step
    (`seqs` sequences of one token, query block 1) and a prefill step (`prefill_tokens` in
    chunks of `chunk` tokens), at `context` positions each, LoRA on q_proj."""

    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    table_width: int  # block-table width: pages of the engine's longest context
    context: int
    seqs: int  # max_batch_size: the sequence / segment axis
    decode_tokens: int
    prefill_tokens: int
    chunk: int
    prefill_block: int  # the attention's query block of the prefill step
    d_in: int
    d_out: int
    page_rank: int
    max_rank: int
    dtype: str

    @classmethod
    def for_engine(cls, model, engine, dtype) -> EngineShapes:
        """From a ModelConfig and an EngineConfig, the buckets and query blocks as
        `ModelRunner` makes them."""
        from carajax.engine.runner import MAX_PREFILL_BLOCK, PREFILL_BLOCK, bucket

        S = engine.max_batch_size
        seq_len = engine.seq_len(model)
        per_position = S * model.num_kv_heads * model.head_dim * jnp.dtype(dtype).itemsize
        context = max(1, min(seq_len, CONTEXT, KV_BYTES // per_position))
        prefill = bucket(min(engine.max_step_tokens, engine.max_prefill_tokens),
                         engine.min_prefill_bucket)
        d_in, d_out = model.projection_shape("q_proj")
        return cls(heads=model.num_heads, kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                   page_size=engine.kv_page_size,
                   table_width=-(-seq_len // engine.kv_page_size), context=context, seqs=S,
                   decode_tokens=bucket(S, min(8, S)), prefill_tokens=prefill,
                   chunk=min(engine.prefill_chunk, context, prefill),
                   prefill_block=min(MAX_PREFILL_BLOCK, max(PREFILL_BLOCK, bucket(prefill // S, 1))),
                   d_in=d_in, d_out=d_out, page_rank=engine.lora_page_rank,
                   max_rank=engine.max_lora_rank, dtype=jnp.dtype(dtype).name)

    def segments(self, shape_class: str) -> tuple[int, np.ndarray]:
        """(T, per-sequence token counts [seqs]) of the decode or the prefill step."""
        if shape_class == "decode":
            return self.decode_tokens, np.ones(self.seqs, np.int32)
        n = np.zeros(self.seqs, np.int32)
        left = self.prefill_tokens
        for s in range(self.seqs):  # whole chunks while they fit (the last sequence takes less)
            n[s] = min(self.chunk, left)
            left -= n[s]
        return self.prefill_tokens, n


def _impl_name(form: str, interpret: bool) -> str:
    return "interpret" if interpret and form in ("pallas", "padded") else form


def attention_candidates(shapes: EngineShapes, shape_class: str, forms: Iterable[str], *,
                         interpret: bool = False, seed: int = 0) -> dict[str, Callable[[], Any]]:
    """The reference and each form as a call of `paged_attention` on a step of this shape class
    (random queries and pages; each sequence's tokens end its `context`-long context)."""
    from carajax.models.attention import paged_attention

    s = shapes
    T, n = s.segments(shape_class)
    rng = np.random.default_rng(seed)
    per_seq = -(-s.context // s.page_size)
    used = int((n > 0).sum())
    tables = np.zeros((s.seqs, max(s.table_width, per_seq)), np.int32)
    for i in range(used):  # page 0 is left for padding entries
        tables[i, :per_seq] = 1 + i * per_seq + np.arange(per_seq)
    num_pages = 1 + used * per_seq
    dt = jnp.dtype(s.dtype)
    q = jnp.asarray(rng.standard_normal((T, s.heads, s.head_dim)), dt)
    kv = [jnp.asarray(rng.standard_normal((num_pages, s.page_size, s.kv_heads, s.head_dim)), dt)
          for _ in range(2)]
    seq_lens = np.where(n > 0, s.context, 0).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    args = (q, *kv, jnp.asarray(tables), jnp.asarray(seq_lens), jnp.asarray(starts))
    block = 1 if shape_class == "decode" else s.prefill_block
    out = {}
    for form in ("reference", *forms):
        fn = jax.jit(functools.partial(paged_attention, impl=_impl_name(form, interpret),
                                       query_block=block))
        out[form] = functools.partial(fn, *args)
    return out


def lora_candidates(shapes: EngineShapes, shape_class: str, forms: Iterable[str], *,
                    interpret: bool = False, seed: int = 0) -> dict[str, Callable[[], Any]]:
    """The reference and each form as the hook (`BatchLora`) runs them on q_proj for a step of
    this shape class: one adapter per sequence, ranks cycling over the page-rank multiples up to
    the pool's max rank."""
    from carajax.lora.hook import BatchLora
    from carajax.lora.pool import PagedLoraWeights

    s = shapes
    T, n = s.segments(shape_class)
    rng = np.random.default_rng(seed)
    pages_per_slot = s.max_rank // s.page_rank
    P = s.seqs * pages_per_slot
    dt = jnp.dtype(s.dtype)
    x = jnp.asarray(rng.standard_normal((T, s.d_in)), dt)
    a = jnp.asarray(0.05 * rng.standard_normal((1, P, s.page_rank, s.d_in)), dt)
    b = jnp.asarray(0.05 * rng.standard_normal((1, P, s.d_out, s.page_rank)), dt)
    table = jnp.asarray(np.arange(P, dtype=np.int32).reshape(s.seqs, pages_per_slot))
    ranks = (s.page_rank * (1 + np.arange(s.seqs) % pages_per_slot)).astype(np.int32)
    scales = (16.0 / ranks).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int32)
    slots = np.where(n > 0, np.arange(s.seqs), -1).astype(np.int32)
    args = (x, a, b, table, jnp.asarray(ranks[None]), jnp.asarray(scales[None]),
            jnp.asarray(starts), jnp.asarray(n), jnp.asarray(slots))

    def run(impl, pad, x, a, b, table, ranks, scales, starts, lens, slots):
        w = PagedLoraWeights(a={"q_proj": a}, b={"q_proj": b}, page_table=table,
                             ranks={"q_proj": ranks}, scales={"q_proj": scales})
        return BatchLora(w, starts, lens, slots, impl, pad_to_max_rank=pad)(
            jnp.int32(0), ("q_proj",), x)[0]

    out = {}
    for form in ("reference", *forms):
        fn = jax.jit(functools.partial(run, _impl_name(form, interpret), form == "padded"))
        out[form] = functools.partial(fn, *args)
    return out


CANDIDATES = {"attention": attention_candidates, "lora": lora_candidates}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `auto` runs for one op on one device kind, and why."""

    op: str
    source: str  # "reference" | "table" (the shipped table decides) | "measured" (by `warm_up`)
    forms: Mapping[str, str]  # shape class -> form; empty under "table"
    timings: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    shapes: EngineShapes | None = None  # what was timed ("measured")

    @classmethod
    def reference(cls, op: str) -> Choice:
        return cls(op, "reference", {c: "reference" for c in SHAPE_CLASSES})


_LOCK = threading.Lock()
_MEASURED: dict[str, dict[str, Choice]] = {}  # device kind -> op -> the Choice warm_up measured
_DONE: dict[tuple, dict[str, Choice]] = {}  # what warm_up already measured, by its inputs


def reset() -> None:
    """Forget every measured choice (tests)."""
    with _LOCK:
        _MEASURED.clear()
        _DONE.clear()


def warm_up(model, engine, dtype, *, platform: str | None = None, device_kind: str | None = None,
            verified: Mapping[str, Iterable[str]] | None = None, interpret: bool = False,
            repeats: int = REPEATS) -> dict[str, Choice]:
    """Decide what `auto` runs for this engine (a ModelConfig, an EngineConfig and its compute
    dtype), measuring where the rule says so (module docstring); once per process for the same
    device kind and shapes. Off a GPU it returns at once (the reference everywhere).

    Only ops left to `auto` are measured: the attention always, LoRA under
    `engine.lora_impl == "auto"`. A tensor-parallel engine (`engine.tp > 1`) is not measured
    (its kernels run per shard under `shard_map`; timings on one device would not be its own):
    it keeps the reference unless a table ships. `platform`, `device_kind`, `verified` (op ->
    forms) and `interpret` (time the Pallas forms in interpret mode) are for tests on CPU."""
    plat, kind = device()
    plat, kind = platform or plat, device_kind or kind
    if plat != "gpu":
        return {op: Choice.reference(op) for op in OPS}
    table = kernel_table.load(kind)
    forms = verified_forms(kind) if verified is None else {
        op: frozenset(verified.get(op, ())) & set(FORMS[op]) for op in OPS}
    shapes = EngineShapes.for_engine(model, engine, dtype)
    wanted = {"attention": True, "lora": engine.lora_impl == "auto"}
    key = (kind, shapes, tuple(sorted((op, tuple(sorted(f))) for op, f in forms.items())),
           interpret, engine.tp, tuple(sorted(wanted.items())))
    with _LOCK:
        if key in _DONE:
            return _DONE[key]
        choices = {}
        for op in OPS:
            has_table = table is not None and bool(table.attention if op == "attention"
                                                   else table.entries)
            if has_table:
                choices[op] = Choice(op, "table", {})
            elif not (wanted[op] and forms[op]) or engine.tp > 1:
                choices[op] = Choice.reference(op)
            else:
                tol = AGREEMENT.get(shapes.dtype, AGREEMENT_LOW_PRECISION)
                timings = {c: measure(CANDIDATES[op](shapes, c, sorted(forms[op]),
                                                     interpret=interpret),
                                      repeats, reference="reference", tolerance=tol)
                           for c in SHAPE_CLASSES}
                choices[op] = Choice(op, "measured", {
                    c: decide(plat, verified=forms[op], timings=timings[c])
                    for c in SHAPE_CLASSES}, timings, shapes)
                _MEASURED.setdefault(kind, {})[op] = choices[op]
        _DONE[key] = choices
        return choices


def current(device_kind: str | None = None) -> dict[str, Choice]:
    """The choices `warm_up` measured on this device kind (default: JAX's device), by op."""
    return dict(_MEASURED.get(device_kind or device()[1], {}))


# -- what `auto` reads ----------------------------------------------------------------------------
def attention_impl(decode: bool) -> str:
    """`paged_attention(impl="auto")`'s form for a decode-shaped (query block 1) or a prefill
    step, read at trace time: the shipped table's, else the measured one, else "reference"."""
    plat, kind = device()
    if plat != "gpu":
        return "reference"
    cls = "decode" if decode else "prefill"
    table = kernel_table.load(kind)
    if table is not None and table.attention:
        return table.attention.get(cls, "reference")
    chosen = _MEASURED.get(kind, {}).get("attention")
    return chosen.forms.get(cls, "reference") if chosen is not None else "reference"


def lora_table(device_kind: str | None = None) -> kernel_table.KernelTable | None:
    """The per-shape LoRA table `lora_impl="table"` reads: the shipped one, else one made from
    the measured choices (an entry for the decode and for the prefill step), else None."""
    kind = device_kind or device()[1]
    table = kernel_table.load(kind)
    if table is not None and table.entries:
        return table
    chosen = _MEASURED.get(kind, {}).get("lora")
    if chosen is None or chosen.source != "measured":
        return None
    s = chosen.shapes
    # The hook asks per step (T tokens, G = seqs segments, the pool's max rank): the nearest of
    # the decode step's and the prefill step's entries.
    return kernel_table.KernelTable(kernel_table.device_name(kind), {
        (kernel_table.bucket(s.segments(c)[0]), kernel_table.bucket(s.seqs), s.max_rank):
            chosen.forms[c] for c in SHAPE_CLASSES})


def lora_impl(platform: str | None = None) -> str:
    """`lora_impl="auto"` resolved for this device: "reference" off a GPU or with nothing
    shipped or measured; "table" with a shipped table (or measured choices that differ between
    decode and prefill: `lora_table` holds them); else the one measured form."""
    plat, kind = device()
    if (platform or plat) != "gpu":
        return "reference"
    table = kernel_table.load(kind)
    if table is not None and table.entries:
        return "table"
    chosen = _MEASURED.get(kind, {}).get("lora")
    if chosen is None:
        return "reference"
    forms = set(chosen.forms.values())
    return forms.pop() if len(forms) == 1 else "table"
