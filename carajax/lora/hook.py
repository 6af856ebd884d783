"""The model's LoRA hook: device slot weights + the slot of each batch row -> per-projection delta.

Device LoRA weights live in slots padded to `r_max` (see `carajax.lora.slots`). Every batch row
belongs to one request and so to one slot (-1: no LoRA). Prefill batches ([B, Tq > 1]) are
flattened into B segments of Tq tokens and go through `sgmv`; decode batches ([B, 1]) through
`bgmv`. Which implementation runs is decided here, in `resolve_lora_impl`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeights:
    """The device slot pool of every target projection (stacked over layers)."""

    a: dict[str, jax.Array]  # module -> [L, S, r_max, d_in]
    b: dict[str, jax.Array]  # module -> [L, S, d_out, r_max]
    ranks: dict[str, jax.Array]  # module -> int32 [L, S] (0: slot unused at that layer)
    scales: dict[str, jax.Array]  # module -> float32 [L, S]


def _ops(impl: str):
    """(sgmv, bgmv) callables for a resolved implementation name."""
    if impl == "reference":
        return kernels.sgmv_reference, kernels.bgmv_reference
    interpret = impl == "interpret"
    return (functools.partial(kernels.sgmv, interpret=interpret),
            functools.partial(kernels.bgmv, interpret=interpret))


class SlotLora:
    """A `LoraHook` over the device slot pool for one batch (built inside the jitted step)."""

    def __init__(self, weights: LoraWeights, row_slots: jax.Array, row_lens: jax.Array,
                 impl: str):
        self.weights = weights
        self.row_slots = row_slots  # int32 [B]; -1: no LoRA
        self.row_lens = row_lens  # int32 [B]: valid tokens per row (the rest is padding)
        self.sgmv, self.bgmv = _ops(impl)

    def __call__(self, layer: int, module: str, x: jax.Array) -> jax.Array | None:
        w = self.weights
        if module not in w.a:
            return None
        B, Tq, d_in = x.shape
        a, b = w.a[module][layer], w.b[module][layer]  # [S, r_max, d_in], [S, d_out, r_max]
        ranks, scales = w.ranks[module][layer], w.scales[module][layer]  # [S], [S]
        flat = x.reshape(B * Tq, d_in)
        if Tq == 1:  # decode: one token per row
            y = self.bgmv(flat, a, b, jnp.where(self.row_lens > 0, self.row_slots, -1),
                          ranks, scales)
        else:  # prefill: row i is the segment [i * Tq, i * Tq + row_lens[i])
            starts = jnp.arange(B, dtype=jnp.int32) * Tq
            y = self.sgmv(flat, a, b, starts, self.row_lens, self.row_slots, ranks, scales)
        return y.reshape(B, Tq, -1)
