"""What the adapter registry keeps of an adapter: its name, path, shapes and ranks, never weights.

A registered adapter is an `AdapterSpec`: enough to plan with (its pages, its copy's bytes, its
LoRA's multiply-adds, the ranks and scales its slot gets) and to read it again from disk. It is
built from the safetensors header and the config alone (`read_spec`: every check `load_adapter`
makes except the values' finiteness, which needs the weights), or from an adapter already parsed
(`spec_of`). Its weights live in the host tier (`carajax.lora.host_tier`) while they are there, in
the device pool's layout, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import numpy as np

from carajax import _safetensors
from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import (
    MAX_ADAPTER_BYTES,
    AdapterError,
    LoraAdapter,
    _check_header,
    _module_key,
    _pattern_value,
    open_adapter_dir,
)

MODULE_ORDER = tuple(sorted(TARGET_MODULES))  # jax flattens dicts by sorted key: staging agrees


class ModuleSpec(NamedTuple):
    """One projection of one layer: its rank and scale (what `LoraModule` says without weights)."""

    rank: int
    scale: float


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterSpec:
    """A registered adapter without its weights: a few hundred bytes, whatever its rank."""

    name: str
    path: str
    rank: int  # the largest rank over its projections
    target_modules: tuple[str, ...]  # in TARGET_MODULES order
    ranks: np.ndarray  # int32 [M, L], M in MODULE_ORDER: 0 where it has no LoRA
    scales: np.ndarray  # float32 [M, L]
    nbytes: int  # its A and B in float32 (as `load_adapter` parses them)
    macs_per_token: int  # multiply-adds of its LoRA for one token, all layers and projections
    file_bytes: int = 0  # the weights file's size (0: registered from memory)

    @property
    def modules(self) -> dict[tuple[int, str], ModuleSpec]:
        """{(layer, projection): (rank, scale)} where it has LoRA, as `LoraAdapter.modules` keys."""
        out = {}
        for m in self.target_modules:
            i = MODULE_ORDER.index(m)
            for layer in np.flatnonzero(self.ranks[i]):
                out[(int(layer), m)] = ModuleSpec(int(self.ranks[i, layer]),
                                                  float(self.scales[i, layer]))
        return dict(sorted(out.items()))

    def same_shape(self, other: AdapterSpec) -> bool:
        """Same projections, ranks and scales: a file read again still fits its registration."""
        return (np.array_equal(self.ranks, other.ranks)
                and np.array_equal(self.scales, other.scales))


def _spec(name: str, path: str, config: ModelConfig, entries, file_bytes: int) -> AdapterSpec:
    """entries: (layer, projection, rank, scale) of each LoRA module."""
    ranks = np.zeros((len(MODULE_ORDER), config.num_layers), np.int32)
    scales = np.zeros((len(MODULE_ORDER), config.num_layers), np.float32)
    nbytes = macs = 0
    for layer, module, r, scale in entries:
        i = MODULE_ORDER.index(module)
        ranks[i, layer], scales[i, layer] = r, scale
        width = sum(config.projection_shape(module))
        nbytes, macs = nbytes + 4 * r * width, macs + r * width
    present = {m for m, row in zip(MODULE_ORDER, ranks) if row.any()}
    return AdapterSpec(name=name, path=path, rank=int(ranks.max(initial=0)),
                       target_modules=tuple(m for m in TARGET_MODULES if m in present),
                       ranks=ranks, scales=scales, nbytes=nbytes, macs_per_token=macs,
                       file_bytes=file_bytes)


def spec_of(adapter: LoraAdapter, config: ModelConfig, file_bytes: int = 0) -> AdapterSpec:
    """The spec of an adapter already parsed (and checked against `config`)."""
    return _spec(adapter.name, adapter.path, config,
                 ((layer, m, mod.rank, mod.scale) for (layer, m), mod in adapter.modules.items()),
                 file_bytes)


def read_spec(path: str | os.PathLike, config: ModelConfig, *, max_rank: int,
              name: str | None = None, max_bytes: int = MAX_ADAPTER_BYTES) -> AdapterSpec:
    """An adapter directory's spec from its config and safetensors header alone: `load_adapter`'s
    checks (files, size limit, unsupported features, names, dtypes, shapes against the model,
    ranks) without reading a tensor. `AdapterError` naming the cause."""
    path = os.fspath(path)
    cfg, weights_file = open_adapter_dir(path, max_bytes)
    try:
        header, _ = _safetensors.read_header(weights_file)
    except _safetensors.SafetensorsError as e:
        raise AdapterError(f"corrupt adapter weights: {e}") from None
    pairs = _check_header(weights_file, header, cfg, config, max_rank)
    entries = []
    for (layer, module), keys in pairs.items():
        key, r = _module_key(layer, module), header[keys["A"]]["shape"][0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, key, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        entries.append((layer, module, r, float(scale)))
    return _spec(name or os.path.basename(os.path.normpath(path)), path, config, entries,
                 os.path.getsize(weights_file))


__all__ = ["AdapterSpec", "MODULE_ORDER", "ModuleSpec", "read_spec", "spec_of"]
