"""The model's LoRA hook: device slot weights + the slot of each batch row -> per-projection delta.

Device LoRA weights live in slots padded to `r_max` (see `carajax.lora.slots`). Every batch row
belongs to one request and so to one slot (-1: no LoRA). The delta for a projection is
`scale[slot] * (x @ A[slot].T) @ B[slot].T`, computed here by gathering each row's slot weights
(pure `jnp`). Padded rank rows/columns are zero, so padding changes nothing in the result.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeights:
    """The device slot pool of every target projection (stacked over layers)."""

    a: dict[str, jax.Array]  # module -> [L, S, r_max, d_in]
    b: dict[str, jax.Array]  # module -> [L, S, d_out, r_max]
    ranks: dict[str, jax.Array]  # module -> int32 [L, S] (0: slot unused at that layer)
    scales: dict[str, jax.Array]  # module -> float32 [L, S]


def lora_delta_gather(
    x: jax.Array,  # [B, T, d_in]
    a: jax.Array,  # [S, r_max, d_in]
    b: jax.Array,  # [S, d_out, r_max]
    row_slots: jax.Array,  # int32 [B], -1: no LoRA for that row
    scales: jax.Array,  # float32 [S]
) -> jax.Array:  # [B, T, d_out]
    """for each row i with slot s >= 0: out[i] = scales[s] * (x[i] @ a[s].T) @ b[s].T; else 0."""
    valid = row_slots >= 0
    s = jnp.where(valid, row_slots, 0)
    a_rows, b_rows = a[s], b[s]  # [B, r_max, d_in], [B, d_out, r_max]
    xa = jnp.einsum("btd,brd->btr", x, a_rows.astype(x.dtype), preferred_element_type=jnp.float32)
    y = jnp.einsum("btr,bor->bto", xa, b_rows.astype(jnp.float32))
    y = y * jnp.where(valid, scales[s], 0.0)[:, None, None]
    return y.astype(x.dtype)


class SlotLora:
    """A `LoraHook` over the device slot pool for one batch (built inside the jitted step)."""

    def __init__(self, weights: LoraWeights, row_slots: jax.Array):
        self.weights = weights
        self.row_slots = row_slots  # int32 [B]

    def __call__(self, layer: int, module: str, x: jax.Array) -> jax.Array | None:
        w = self.weights
        if module not in w.a:
            return None
        return lora_delta_gather(x, w.a[module][layer], w.b[module][layer], self.row_slots,
                                 w.scales[module][layer])
