"""The model's LoRA hook: device slot weights + the slot of each batch row -> per-projection delta.

Device LoRA weights live in the adapter pool's pages (see `carajax.lora.pool`); a slot is a row of
its page table. Every batch row belongs to one request and so to one slot (-1: no device LoRA).
Prefill batches ([B, Tq > 1]) are flattened into B segments of Tq tokens and go through `sgmv`;
decode batches ([B, 1]) through `bgmv`. Which implementation runs is decided here, in
`resolve_lora_impl`, and nowhere else. Under tensor parallelism (the pool's pages carry a mesh)
the Pallas kernels run on each device's shard of the pages (`carajax.parallel.shard_lora_op`);
GSPMD partitions the jnp references like the rest of the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from carajax import parallel
from carajax.lora import kernels

LORA_IMPLS = ("auto", "pallas", "interpret", "reference")


def resolve_lora_impl(name: str = "auto") -> str:
    """"auto": Pallas kernels on a GPU; the pure-jnp references elsewhere (on CPU, Pallas only
    runs in interpret mode, several times slower than jnp). "interpret" forces the kernels in
    interpret mode (for tests)."""
    if name not in LORA_IMPLS:
        raise ValueError(f"lora impl must be one of {LORA_IMPLS}, got {name!r}")
    if name == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return name


def _ops(impl: str, pad_to_max_rank: bool = False):
    """(sgmv, bgmv) callables for a resolved implementation name.

    `pad_to_max_rank` (EngineConfig.lora_kernel == "padded") goes to the Pallas kernels as their
    static flag. The references have no such flag and ignore it: they gather every slot at the
    pool's page-padded r_max (max_lora_rank), i.e. always pad, and further than the batch's max."""
    if impl == "reference":
        return kernels.sgmv_reference, kernels.bgmv_reference
    kw = dict(interpret=impl == "interpret", pad_to_max_rank=bool(pad_to_max_rank))
    return functools.partial(kernels.sgmv, **kw), functools.partial(kernels.bgmv, **kw)


class BatchLora:
    """A `LoraHook` for one batch (built inside the jitted step).

    Device part: the pool's paged weights (`PagedLoraWeights`) and each row's slot (-1: none).
    CPU part (optional): `(bridge, cpu_ids)`: rows whose adapter is still being copied get their
    delta from the host through a callback (`CpuAssistBridge.delta`); their slot is -1.
    `pad_to_max_rank`: the Pallas kernels' padded (BGMV-like) mode; see `_ops`.
    """

    def __init__(self, weights, row_slots: jax.Array, row_lens: jax.Array, impl: str, cpu=None,
                 pad_to_max_rank: bool = False):
        self.weights = weights  # PagedLoraWeights | None
        self.row_slots = row_slots  # int32 [B]; -1: no device LoRA
        self.row_lens = row_lens  # int32 [B]: valid tokens per row (the rest is padding)
        self.impl = impl
        self.pad_to_max_rank = pad_to_max_rank
        self.sgmv, self.bgmv = _ops(impl, pad_to_max_rank)
        self.cpu = cpu

    def __call__(self, layer: int, modules: tuple[str, ...], x: jax.Array
                 ) -> tuple[jax.Array | None, ...]:
        ys = [None if self.weights is None or m not in self.weights.a
              else self._device(layer, m, x) for m in modules]
        if self.cpu is not None:  # one host callback for all projections sharing x
            bridge, cpu_ids = self.cpu
            cs = bridge.deltas(layer, modules, x, cpu_ids, self.row_lens)
            ys = [c if y is None else y + c for y, c in zip(ys, cs)]
        return tuple(ys)

    def _device(self, layer: int, module: str, x: jax.Array) -> jax.Array:
        w = self.weights
        B, Tq, d_in = x.shape
        a, b = w.a[module][layer], w.b[module][layer]  # pages [P, pr, d_in], [P, d_out, pr]
        ranks, scales = w.ranks[module][layer], w.scales[module][layer]  # [S], [S]
        slots, table = self.row_slots, w.page_table  # [B], [S, r_max // pr]
        if self.impl == "reference":
            # Gather only this batch's slots (B of them), not the whole pool: row i uses slot i.
            safe = jnp.maximum(slots, 0)
            table, ranks, scales = table[safe], ranks[safe], scales[safe]
            slots = jnp.where(slots >= 0, jnp.arange(B, dtype=jnp.int32), -1)
        if Tq == 1:  # decode: one token per row
            meta = (jnp.where(self.row_lens > 0, slots, -1), ranks, scales, table)

            def op(x, a, b, token_slots, ranks, scales, table):
                return self.bgmv(x, a, b, token_slots, ranks, scales, page_table=table)
        else:  # prefill: row i is the segment [i * Tq, i * Tq + row_lens[i])
            meta = (jnp.arange(B, dtype=jnp.int32) * Tq, self.row_lens, slots, ranks, scales, table)

            def op(x, a, b, starts, lens, seg_slots, ranks, scales, table):
                return self.sgmv(x, a, b, starts, lens, seg_slots, ranks, scales, page_table=table)
        if w.mesh is not None and self.impl != "reference":
            # Tensor parallel: each device runs the kernel on its shard of the pages (GSPMD
            # partitions the jnp references by itself, but cannot partition a Pallas call).
            op = parallel.shard_lora_op(op, w.mesh, module)
        return op(x.reshape(B * Tq, d_in), a, b, *meta).reshape(B, Tq, -1)
