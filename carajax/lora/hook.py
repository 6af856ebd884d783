"""The model's LoRA hook: device slot weights + the slot of each sequence -> per-projection delta.

Device LoRA weights live in the adapter pool's pages (see `carajax.lora.pool`); a slot is a row of
its page table. A step is one flattened batch of tokens, sequence after sequence; each sequence is
a segment with one slot (-1: no device LoRA), prefill chunks and decode tokens alike, and goes
through `sgmv` (Pallas on GPU; elsewhere the jnp formulations of `jnp_ops`, picked by shape).
Which implementation runs is decided here, in `resolve_lora_impl` (and, for "auto" on a GPU with
a measured table, per step shape in `BatchLora._device` from `kernel_table`), and nowhere else. Under
tensor parallelism (the pool's pages carry a mesh) the Pallas kernels run on each device's shard
of the pages (`carajax.parallel.shard_lora_op`); GSPMD partitions the jnp path like the rest of
the model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from carajax import autotune, parallel
from carajax.lora import jnp_ops, kernels
from carajax.lora.fused_kernels import sgmv_fused

LORA_IMPLS = ("auto", "pallas", "fused", "interpret", "reference")
# The jnp path (CPU) by static shape: up to this many tokens per segment (sequence) the compact
# formulation (the step's distinct adapters' pages, two GEMMs over every token) wins; beyond,
# blocks of PREFILL_TOKEN_BLOCK tokens of one segment each (measured on the 2-core CPU box: 1024
# tokens in 16 sequences, blocks of 16 / 32 / 64 / 128: 25 / 15 / 5.9 / 11 ms).
COMPACT_TOKENS_PER_SEGMENT = 4
PREFILL_TOKEN_BLOCK = 64


def jnp_form(T: int, G: int) -> str:
    """Which jnp formulation a step of T tokens in G segments runs (static shapes, so one choice
    per compiled variant): "compact" for decode-like steps (the bytes of the distinct adapters
    dominate), "blocked" for steps with prefill chunks (the work per token dominates). Both
    follow the step's real ranks (`jnp_ops`)."""
    return "compact" if T <= COMPACT_TOKENS_PER_SEGMENT * G else "blocked"


def resolve_lora_impl(name: str = "auto", *, platform: str | None = None) -> str:
    """"auto": `carajax.autotune.lora_impl`: on a GPU with a measured table for its kind
    (`kernel_table.load`), "table" (each step shape takes the table's fastest of fused / pallas /
    padded / reference); without one, what the engine's warm-up measured fastest among the forms
    verified compiled on this device kind and the reference (one form, or "table" when decode
    and prefill differ); elsewhere, or with nothing verified, the pure-jnp references (on CPU,
    Pallas only runs in interpret mode, several times slower than jnp; on a GPU, the reference
    is what no kernel may be slower than). "fused": the one-call fused SGMV kernel
    (`fused_kernels`). "interpret" forces the two-call kernels in interpret mode (for tests).
    `platform` defaults to JAX's default backend."""
    if name not in LORA_IMPLS:
        raise ValueError(f"lora impl must be one of {LORA_IMPLS}, got {name!r}")
    if name == "auto":
        return autotune.lora_impl(platform)
    return name


def _ops(impl: str, pad_to_max_rank: bool = False, interpret: bool = False):
    """(sgmv, bgmv) callables for a resolved implementation name (or a table's choice).

    `pad_to_max_rank` (EngineConfig.lora_kernel == "padded") goes to the Pallas kernels as their
    static flag ("padded", a table's choice, sets it). The references have no such flag and
    ignore it: they gather every slot at the pool's page-padded r_max (max_lora_rank), i.e.
    always pad, and further than the batch's max. There is no fused BGMV: "fused" pairs the
    fused SGMV with the two-call BGMV (the hook runs decode tokens as one-token segments)."""
    if impl == "reference":
        return kernels.sgmv_reference, kernels.bgmv_reference
    kw = dict(interpret=interpret or impl == "interpret",
              pad_to_max_rank=bool(pad_to_max_rank) or impl == "padded")
    sgmv = sgmv_fused if impl == "fused" else kernels.sgmv
    return functools.partial(sgmv, **kw), functools.partial(kernels.bgmv, **kw)


def table_choice(T: int, G: int, r_max: int) -> str:
    """The measured table's choice for a step of T tokens in G segments at pool rank r_max."""
    table = autotune.lora_table()
    return "reference" if table is None else table.choose(T, G, r_max)


def step_compact_plan(weights, seg_starts, seg_lens, seg_slots, T: int
                      ) -> jnp_ops.CompactPlan | jnp_ops.PrefillPlan:
    """The jnp forms' plan of a step (layer 0's page ids): each slot's pages up to its largest
    rank over every projection and layer (they share pages). A decode-like step's is the compact
    form's (`CompactPlan`); a step with prefill chunks gets its decodes and its chunks planned
    apart (`PrefillPlan`), as `jnp_form` says."""
    slot_ranks = functools.reduce(jnp.maximum, [r.max(axis=0) for r in weights.ranks.values()])
    pr = next(iter(weights.a.values())).shape[2]
    make = (jnp_ops.compact_plan if jnp_form(T, seg_slots.shape[0]) == "compact"
            else jnp_ops.prefill_plan)
    return make(seg_starts, seg_lens, seg_slots, slot_ranks, weights.page_table, pr, T)


class BatchLora:
    """A `LoraHook` for one step's flattened batch (built inside the jitted step).

    Device part: the pool's paged weights (`PagedLoraWeights`) and one slot per segment (a
    sequence of the batch; -1: no device LoRA). CPU part (optional): `(bridge, cpu_rows,
    cpu_ids)`: the rows of x whose adapter is still being copied; only those rows cross to the
    host (gathered into [C, d_in]), and their deltas are scattered back.
    `pad_to_max_rank`: the Pallas kernels' padded (BGMV-like) mode; see `_ops`.
    """

    def __init__(self, weights, seg_starts: jax.Array, seg_lens: jax.Array, seg_slots: jax.Array,
                 impl: str, cpu=None, pad_to_max_rank: bool = False, compact=None):
        self.weights = weights  # PagedLoraWeights | None
        self.seg_starts, self.seg_lens, self.seg_slots = seg_starts, seg_lens, seg_slots  # [G] each
        self.impl = impl
        self.pad_to_max_rank = pad_to_max_rank
        self.cpu = cpu
        # The jnp forms' plan: given (the runner builds it once per step), or built at the
        # first projection that needs it.
        self._compact: jnp_ops.CompactPlan | jnp_ops.PrefillPlan | None = compact

    def _compact_plan(self, T: int) -> jnp_ops.CompactPlan | jnp_ops.PrefillPlan:
        """The step's jnp plan, built once per step (`step_compact_plan`)."""
        if self._compact is None:
            self._compact = step_compact_plan(self.weights, self.seg_starts, self.seg_lens,
                                              self.seg_slots, T)
        return self._compact

    def __call__(self, layer: int, modules: tuple[str, ...], x: jax.Array
                 ) -> tuple[jax.Array | None, ...]:
        present = [m for m in modules if self.weights is not None and m in self.weights.a]
        if len(present) > 1 and self._groups(x):
            got = dict(zip(present, self._device_group(layer, tuple(present), x)))
        else:
            got = {m: self._device(layer, m, x) for m in present}
        ys = [got.get(m) for m in modules]
        if self.cpu is not None:  # one host callback for all projections sharing x
            bridge, rows, cpu_ids = self.cpu  # [C], [C]; padding rows are >= T
            T = x.shape[0]
            xc = x.at[rows].get(mode="fill", fill_value=0)[:, None, :]  # [C, 1, d_in]
            cs = bridge.deltas(layer, modules, xc, cpu_ids, (rows < T).astype(jnp.int32))
            ys = [(jnp.zeros((T, c.shape[-1]), x.dtype) if y is None else y)
                  .at[rows].add(c[:, 0].astype(x.dtype), mode="drop") for y, c in zip(ys, cs)]
        return tuple(ys)

    def _groups(self, x: jax.Array) -> bool:
        """Whether projections sharing x run as one jnp group op (static): the jnp forms on one
        device (tensor parallel shards each projection its own way)."""
        return self.impl == "reference" and self.weights.mesh is None

    def _layer_plan(self, layer: int, T: int, P: int):
        """The step's jnp plan with this layer's page ids (layer l's pages are [l * P, (l + 1)
        * P) of the flat pool)."""
        plan = self._compact_plan(T)
        if isinstance(plan, jnp_ops.PrefillPlan):
            return dataclasses.replace(
                plan, decode=dataclasses.replace(plan.decode, pages=plan.decode.pages + layer * P),
                prompt=dataclasses.replace(plan.prompt, pages=plan.prompt.pages + layer * P))
        return dataclasses.replace(plan, pages=plan.pages + layer * P)

    def _device_group(self, layer: int, modules: tuple[str, ...], x: jax.Array
                      ) -> tuple[jax.Array, ...]:
        """`_device`'s jnp forms for several projections that read x: one A GEMM for all where
        they run the compact form."""
        w = self.weights
        L, P = w.a[modules[0]].shape[:2]
        a = tuple(w.a[m].reshape(L * P, *w.a[m].shape[2:]) for m in modules)  # this layer: offset
        b = tuple(w.b[m].reshape(L * P, *w.b[m].shape[2:]) for m in modules)
        ranks = tuple(w.ranks[m][layer] for m in modules)  # [S] each
        scales = tuple(w.scales[m][layer] for m in modules)
        plan = self._layer_plan(layer, x.shape[0], P)
        table = w.page_table + layer * P
        meta = (self.seg_starts, self.seg_lens, self.seg_slots, ranks, scales)
        if isinstance(plan, jnp_ops.PrefillPlan):  # its own conds skip what no segment uses
            return jnp_ops.sgmv_prefill_group(x, a, b, *meta, page_table=table, plan=plan,
                                              token_block=PREFILL_TOKEN_BLOCK)
        slot = jnp.maximum(self.seg_slots, 0)
        used = jnp.any((self.seg_slots >= 0) & (jnp.max(jnp.stack([r[slot] for r in ranks]), 0) > 0))
        return jax.lax.cond(
            used,
            lambda: jnp_ops.sgmv_compact_group(x, a, b, *meta, page_table=table, plan=plan),
            lambda: tuple(jnp.zeros((x.shape[0], bm.shape[1]), x.dtype) for bm in b))

    def _device(self, layer: int, module: str, x: jax.Array) -> jax.Array:
        w = self.weights
        a, b = w.a[module], w.b[module]  # [L, P, pr, d_in], [L, P, d_out, pr]
        L, P, pr = a.shape[:3]
        ranks, scales = w.ranks[module][layer], w.scales[module][layer]  # [S], [S]
        impl = self.impl
        if impl == "table":  # static shapes: one choice per compiled variant
            impl = table_choice(x.shape[0], len(self.seg_slots), w.page_table.shape[1] * pr)
        form = jnp_form(x.shape[0], len(self.seg_slots)) if impl == "reference" else None
        # Layer l's pages are [l * P, (l + 1) * P) of the flat pool (a free reshape), so the ops
        # read only the pages the batch uses instead of slicing out the layer.
        a, b = a.reshape(L * P, *a.shape[2:]), b.reshape(L * P, *b.shape[2:])
        table = w.page_table + layer * P  # [S, r_max // pr]
        meta = (self.seg_starts, self.seg_lens, self.seg_slots, ranks, scales, table)
        if form is not None:  # the step's jnp plan, this layer's pages
            plan = self._layer_plan(layer, x.shape[0], P)
        if form == "compact":
            def op(x, a, b, starts, lens, slots, ranks, scales, table):  # decode-like steps
                return jnp_ops.sgmv_compact(x, a, b, starts, lens, slots, ranks, scales,
                                            page_table=table, plan=plan)
        elif form == "blocked":
            def op(x, a, b, starts, lens, slots, ranks, scales, table):  # prefill chunks
                # The decodes beside them apart; the chunks in blocks of one sequence each,
                # unless their adapters are few and small enough that the compact form's plain
                # GEMMs cost less (`jnp_ops.sgmv_prefill_group`).
                return jnp_ops.sgmv_prefill_group(x, (a,), (b,), starts, lens, slots, (ranks,),
                                                  (scales,), page_table=table, plan=plan,
                                                  token_block=PREFILL_TOKEN_BLOCK)[0]
        else:
            # A table's kernel off a GPU (tests) can only run interpreted.
            sgmv = _ops(impl, self.pad_to_max_rank,
                        interpret=self.impl == "table" and jax.default_backend() != "gpu")[0]

            def op(x, a, b, starts, lens, slots, ranks, scales, table):
                return sgmv(x, a, b, starts, lens, slots, ranks, scales, page_table=table)
        if w.mesh is not None and impl != "reference":
            # Tensor parallel: each device runs the kernel on its shard of the pages (GSPMD
            # partitions the jnp references by itself, but cannot partition a Pallas call).
            op = parallel.shard_lora_op(op, w.mesh, module)
        # Skip the op when no segment's adapter has this projection at this layer (e.g. the
        # MLP under attention-only adapters): on CPU a cond runs only the branch it takes.
        used = jnp.any((self.seg_slots >= 0) & (ranks[jnp.maximum(self.seg_slots, 0)] > 0))
        d_out = b.shape[1]
        return jax.lax.cond(used, lambda: op(x, a, b, *meta),
                            lambda: jnp.zeros((x.shape[0], d_out), x.dtype))
