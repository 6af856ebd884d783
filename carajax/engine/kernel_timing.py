"""`auto`'s measurement: each verified kernel form timed on the engine's own step shapes.

Run once per engine, at its start (`ModelRunner.__init__` calls `warm_up` before anything is
traced: the attention reads the measured choice at trace time, so a variant traced before keeps
the reference). Per op ("attention", "lora") and shape class ("decode", "prefill") the
candidates are the forms recorded verified for the device kind and the jnp reference, each
called on a step of the engine's shape (`EngineShapes`, from the runner's own buckets); the
fastest that agrees with the reference wins (`carajax.autotune.decide`) and becomes what `auto`
reads (`carajax.autotune.measured_once`). The rule itself, the record and the readers are
`carajax.autotune`, below the attention and the LoRA hook; this module sits above them, since it
calls them.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from carajax import autotune
from carajax.autotune import FORMS, OPS, SHAPE_CLASSES, Choice
from carajax.engine.step_shapes import bucket, query_block
from carajax.lora import kernel_table
from carajax.lora.hook import BatchLora
from carajax.lora.pages import PagedLoraWeights
from carajax.models.attention import paged_attention

REPEATS = 5  # timed calls per candidate and shape class
CONTEXT = 1024  # context length of the timed attention calls (at most the engine's own)
KV_BYTES = 256 << 20  # and at most this many bytes of keys (as many of values) in all
# A candidate whose output is further than this from the reference's (relative Frobenius) is
# left out: the record says the form passed its tests, this checks it on the engine's shapes.
AGREEMENT = {"float32": 1e-3}
AGREEMENT_LOW_PRECISION = 3e-2  # bfloat16 / float16


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
                   prefill_block=query_block(prefill, S, decode_only=False),
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
    kv = [jnp.asarray(rng.standard_normal((num_pages, s.kv_heads, s.page_size, s.head_dim)), dt)
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


def warm_up(model, engine, dtype, *, platform: str | None = None, device_kind: str | None = None,
            verified: Mapping[str, Iterable[str]] | None = None, interpret: bool = False,
            repeats: int = REPEATS) -> dict[str, Choice]:
    """Decide what `auto` runs for this engine (a ModelConfig, an EngineConfig and its compute
    dtype), measuring where the rule says so (`carajax.autotune`); once per process for the same
    device kind and shapes. Off a GPU it returns at once (the reference everywhere).

    Only ops left to `auto` are measured: the attention always, LoRA under
    `engine.lora_impl == "auto"`. A tensor-parallel engine (`engine.tp > 1`) is not measured
    (its kernels run per shard under `shard_map`; timings on one device would not be its own):
    it keeps the reference unless a table ships. `platform`, `device_kind`, `verified` (op ->
    forms) and `interpret` (time the Pallas forms in interpret mode) are for tests on CPU."""
    plat, kind = autotune.device()  # by module: tests replace it
    plat, kind = platform or plat, device_kind or kind
    if plat != "gpu":
        return {op: Choice.reference(op) for op in OPS}
    table = kernel_table.load(kind)
    forms = autotune.verified_forms(kind) if verified is None else {
        op: frozenset(verified.get(op, ())) & set(FORMS[op]) for op in OPS}
    shapes = EngineShapes.for_engine(model, engine, dtype)
    wanted = {"attention": True, "lora": engine.lora_impl == "auto"}
    key = (kind, shapes, tuple(sorted((op, tuple(sorted(f))) for op, f in forms.items())),
           interpret, engine.tp, tuple(sorted(wanted.items())))
    def measure_each() -> dict[str, Choice]:
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
                    c: autotune.decide(plat, verified=forms[op], timings=timings[c])
                    for c in SHAPE_CLASSES}, timings, shapes)
        return choices

    return autotune.measured_once(key, kind, measure_each)


__all__ = ["CANDIDATES", "EngineShapes", "attention_candidates", "lora_candidates", "measure",
           "rel_err", "warm_up"]
