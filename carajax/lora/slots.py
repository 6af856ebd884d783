"""Device adapter slots: a fixed number of padded LoRA slots with least-recently-used reuse.

The foundation's device side: `num_slots` slots, each holding one adapter padded to `r_max` for
every target projection. An adapter is copied into a slot the first time a request needs it; when
all slots are taken, the least recently used one is reused.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import LoraAdapter
from carajax.lora.hook import LoraWeights


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(weights: LoraWeights, slot, a, b, ranks, scales) -> LoraWeights:
    """Copy one adapter's stacked arrays into slot `slot` of every projection, in place."""
    return LoraWeights(
        a={m: weights.a[m].at[:, slot].set(a[m]) for m in weights.a},
        b={m: weights.b[m].at[:, slot].set(b[m]) for m in weights.b},
        ranks={m: weights.ranks[m].at[:, slot].set(ranks[m]) for m in weights.ranks},
        scales={m: weights.scales[m].at[:, slot].set(scales[m]) for m in weights.scales})


class DeviceSlots:
    """`num_slots` device LoRA slots of rank `r_max` over every target projection."""

    def __init__(self, config: ModelConfig, *, num_slots: int, r_max: int, dtype,
                 device: jax.Device | None = None):
        self.config, self.num_slots, self.r_max, self.dtype = config, num_slots, r_max, dtype
        L = config.num_layers
        zeros = functools.partial(jax.device_put, device=device)
        a, b, ranks, scales = {}, {}, {}, {}
        for m in TARGET_MODULES:
            d_in, d_out = config.projection_shape(m)
            a[m] = zeros(jnp.zeros((L, num_slots, r_max, d_in), dtype))
            b[m] = zeros(jnp.zeros((L, num_slots, d_out, r_max), dtype))
            ranks[m] = zeros(jnp.zeros((L, num_slots), jnp.int32))
            scales[m] = zeros(jnp.zeros((L, num_slots), jnp.float32))
        self.weights = LoraWeights(a=a, b=b, ranks=ranks, scales=scales)
        self._slots: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first

    @property
    def resident(self) -> list[str]:
        """Adapters in a slot, least recently used first."""
        return list(self._slots)

    def slot_for(self, adapter: LoraAdapter) -> int:
        """The adapter's slot, copying it in (and reusing the LRU slot) if it is not resident."""
        if adapter.name in self._slots:
            self._slots.move_to_end(adapter.name)
            return self._slots[adapter.name]
        if adapter.rank > self.r_max:
            raise ValueError(f"adapter {adapter.name!r} rank {adapter.rank} exceeds the slot "
                             f"rank {self.r_max}")
        if len(self._slots) < self.num_slots:
            slot = len(self._slots) if not self._slots else (
                min(set(range(self.num_slots)) - set(self._slots.values())))
        else:
            _, slot = self._slots.popitem(last=False)
        arrays = {m: adapter.stacked(self.config, m, self.r_max, np.dtype(self.dtype))
                  for m in TARGET_MODULES}
        self.weights = _write_slot(
            self.weights, np.int32(slot),
            {m: arrays[m][0] for m in arrays}, {m: arrays[m][1] for m in arrays},
            {m: arrays[m][2] for m in arrays}, {m: arrays[m][3] for m in arrays})
        self._slots[adapter.name] = slot
        return slot

    def evict(self, name: str) -> None:
        """Forget an adapter's slot (its weights stay until the slot is reused)."""
        self._slots.pop(name, None)
