"""The adapter pool's device layout, an adapter staged into it, and the arrays that hold it.

A page holds `page_rank` rank rows of all seven target projections in every layer
(`PagedLoraWeights`); a slot's row of the page table lists one adapter's pages (the kernels read
pages through it: `carajax.lora.kernels`, `page_table=`).

A copy moves only the projections the adapter targets (`staged_modules`: an attention-only
adapter is 45% of a seven-projection page), as one flat host buffer (`flat_pages`) crossing the
link in one `jax.device_put`, then scattered into the pool by a jitted install that donates it
(`install_flat`); a tensor-parallel pool stages per projection, placed as the pool's shards
(`install`). That buffer is the host tier's only copy of the adapter: per layer, each module's
A [r, d_in] and B [d_out, r] are views of it (`module_views`), which CPU assist reads. A page's
untargeted projections keep what they held; the slot's rank and scale there are 0, so no kernel
reads them. `PoolArrays` holds the arrays and runs the installs; the
pool (`carajax.lora.pool`) decides which pages and slot, and when.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from carajax.config import TARGET_MODULES, ModelConfig
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.lora.spec import MODULE_ORDER


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedLoraWeights:
    """The device page pool of every target projection, as the jitted step receives it.

    Slot s at layer l of module m: rank `ranks[m][l, s]` (0: no LoRA there), scale
    `scales[m][l, s]`, rank rows [k * page_rank, (k + 1) * page_rank) in page `page_table[s, k]`.
    """

    a: dict[str, jax.Array]  # module -> [L, P, page_rank, d_in]
    b: dict[str, jax.Array]  # module -> [L, P, d_out, page_rank]
    page_table: jax.Array  # int32 [S, r_max // page_rank]
    ranks: dict[str, jax.Array]  # module -> int32 [L, S] (0 = slot unused at that layer)
    scales: dict[str, jax.Array]  # module -> float32 [L, S]
    # Tensor parallel: the mesh the pages are sharded over (`carajax.parallel.lora_shardings`),
    # so the LoRA hook runs its kernels per shard; None: one device. Static (in the tree
    # structure, so in jit cache keys).
    mesh: jax.sharding.Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def zeros(cls, config: ModelConfig, num_pages: int, max_slots: int, pages_per_slot: int,
              page_rank: int, dtype, device: jax.Device | None = None) -> PagedLoraWeights:
        """An empty pool: every slot's rank 0 at every layer, so no kernel reads a page."""
        zeros = functools.partial(jnp.zeros, device=device)
        L, P, S = config.num_layers, num_pages, max_slots
        a, b, ranks, scales = {}, {}, {}, {}
        for m in TARGET_MODULES:
            d_in, d_out = config.projection_shape(m)
            a[m] = zeros((L, P, page_rank, d_in), dtype)
            b[m] = zeros((L, P, d_out, page_rank), dtype)
            ranks[m] = zeros((L, S), jnp.int32)
            scales[m] = zeros((L, S), jnp.float32)
        return cls(a=a, b=b, page_table=zeros((S, pages_per_slot), jnp.int32), ranks=ranks,
                   scales=scales)


def page_bytes(config: ModelConfig, page_rank: int, itemsize: int) -> int:
    """Device bytes of one page: `page_rank` rank rows of every target projection, every layer."""
    return sum(config.num_layers * page_rank * sum(config.projection_shape(m)) * itemsize
               for m in TARGET_MODULES)


def _scatter(w: PagedLoraWeights, slot, pages, table_row, a, b, ranks, scales) -> PagedLoraWeights:
    """Staged pages into the pool and slot `slot`'s metadata. a / b hold only the projections
    the adapter targets: the others keep whatever their pages held (an evicted adapter's
    weights, finite) and are never read, as the slot's rank and scale there are 0. ranks /
    scales: [M, L] for every projection in MODULE_ORDER (two arguments, not fourteen: each
    argument is a transfer per install)."""
    return PagedLoraWeights(
        a={m: w.a[m].at[:, pages].set(a[m], unique_indices=True) if m in a else w.a[m]
           for m in w.a},  # [L, n, pr, d_in]
        b={m: w.b[m].at[:, pages].set(b[m], unique_indices=True) if m in b else w.b[m]
           for m in w.b},  # [L, n, d_out, pr]
        page_table=w.page_table.at[slot].set(table_row),
        ranks={m: w.ranks[m].at[:, slot].set(ranks[i]) for i, m in enumerate(MODULE_ORDER)},
        scales={m: w.scales[m].at[:, slot].set(scales[i]) for i, m in enumerate(MODULE_ORDER)},
        mesh=w.mesh)


@functools.partial(jax.jit, donate_argnums=0)
def install(w: PagedLoraWeights, slot, pages, table_row, a, b, ranks, scales) -> PagedLoraWeights:
    """Scatter per-projection staged pages (the sharded pool's staging) in place (donated).
    Compiles once per (page count, targeted projections): the dicts' keys are its structure."""
    return _scatter(w, slot, pages, table_row, a, b, ranks, scales)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="modules")
def install_flat(w: PagedLoraWeights, slot, pages, table_row, flat, ranks, scales, *,
                  modules: tuple[str, ...]) -> PagedLoraWeights:
    """`install` from one flat staged buffer in the host layout (`flat_pages`: each of
    `modules`' A [L, R, d_in] then B [L, d_out, R]). One host-to-device copy per adapter instead
    of one per array (on the CPU backend each costs ~30 us beside a loaded engine); the split
    into pages, B's transpose included, runs on the device. Compiles once per (page count,
    targeted projections)."""
    n, a, b, k = pages.shape[0], {}, {}, 0
    for m in modules:
        L, _, pr, d_in = w.a[m].shape
        d_out = w.b[m].shape[2]
        a[m] = flat[k:k + L * n * pr * d_in].reshape(L, n, pr, d_in)
        k += L * n * pr * d_in
        b[m] = flat[k:k + L * d_out * n * pr].reshape(L, d_out, n, pr).transpose(0, 2, 1, 3)
        k += L * n * d_out * pr
    return _scatter(w, slot, pages, table_row, a, b, ranks, scales)


def staged_modules(adapter) -> tuple[str, ...]:
    """The projections whose pages cross the link for this adapter (MODULE_ORDER): the ones it
    targets (`LoraAdapter` or `AdapterSpec`). Typical adapters target q/v or the four attention
    projections: a copy of all seven would move 2-3x the bytes for pages that are never read."""
    present = set(adapter.target_modules)
    return tuple(m for m in MODULE_ORDER if m in present)


def module_offsets(spec, config: ModelConfig, n_pages: int, page_rank: int
                   ) -> dict[str, tuple[int, int, int]]:
    """Where each staged projection lies in the flat host buffer (`flat_pages`): module ->
    (start of A [L, R, d_in], start of B [L, d_out, R], end), in elements; R = n_pages * page_rank."""
    R, L, k, out = n_pages * page_rank, config.num_layers, 0, {}
    for m in staged_modules(spec):
        d_in, d_out = config.projection_shape(m)
        out[m] = (k, k + L * R * d_in, k + L * R * (d_in + d_out))
        k = out[m][2]
    return out


def flat_pages(adapter: LoraAdapter, config: ModelConfig, n_pages: int, page_rank: int, dtype
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An adapter as the host tier holds it and a copy moves it: one flat buffer of its
    `staged_modules`, each A [L, R, d_in] then B [L, d_out, R] (R = n_pages * page_rank; rows past
    a module's rank and layers it does not touch are zero), and its ranks int32 [M, L] and
    scales float32 [M, L] for every projection, M in MODULE_ORDER (0 where it has none). Per
    layer, a module's A[:r] and B[:, :r] are views of the buffer (`module_views`)."""
    R, L = n_pages * page_rank, config.num_layers
    offsets = module_offsets(adapter, config, n_pages, page_rank)
    flat = np.zeros(max((end for _, _, end in offsets.values()), default=0), dtype)
    ranks = np.zeros((len(MODULE_ORDER), L), np.int32)
    scales = np.zeros((len(MODULE_ORDER), L), np.float32)
    for (layer, m), mod in adapter.modules.items():
        d_in, d_out = config.projection_shape(m)
        a0, b0, end = offsets[m]
        flat[a0:b0].reshape(L, R, d_in)[layer, :mod.rank] = mod.a
        flat[b0:end].reshape(L, d_out, R)[layer, :, :mod.rank] = mod.b
        i = MODULE_ORDER.index(m)
        ranks[i, layer], scales[i, layer] = mod.rank, mod.scale
    return flat, ranks, scales


def module_views(spec, host: tuple, config: ModelConfig, page_rank: int) -> LoraAdapter:
    """The adapter as `LoraModule`s whose A [r, d_in] and B [d_out, r] are views of its host copy
    (`flat_pages`' buffer): what CPU assist computes from, without a second host copy."""
    flat, ranks, scales = host
    n_pages = -(-spec.rank // page_rank)
    R, L, modules = n_pages * page_rank, config.num_layers, {}
    for m, (a0, b0, end) in module_offsets(spec, config, n_pages, page_rank).items():
        d_in, d_out = config.projection_shape(m)
        a, b, i = flat[a0:b0].reshape(L, R, d_in), flat[b0:end].reshape(L, d_out, R), \
            MODULE_ORDER.index(m)
        for layer in np.flatnonzero(ranks[i]):
            r = int(ranks[i, layer])
            modules[(int(layer), m)] = LoraModule(a=a[layer, :r], b=b[layer, :, :r],
                                                  scale=float(scales[i, layer]))
    return LoraAdapter(name=spec.name, path=spec.path, modules=modules)


def copy_bytes(adapter, config: ModelConfig, page_rank: int, itemsize: int) -> int:
    """Bytes one copy of `adapter` moves: its pages of the projections it targets
    (`staged_modules`; the pool reserves its pages in every projection)."""
    rows = -(-adapter.rank // page_rank) * page_rank * config.num_layers
    return sum(rows * sum(config.projection_shape(m)) * itemsize for m in staged_modules(adapter))


def stage(spec, config: ModelConfig, n_pages: int, page_rank: int, host: tuple, *,
          device: jax.Device | None = None, shardings: dict[str, tuple] | None = None) -> tuple:
    """The adapter on its way to the device: (device arrays to wait for, the install function,
    its staged arguments). Its host copy (`flat_pages`) as one buffer, or on a sharded pool per
    projection in page shape, placed by `shardings` (module -> (a sharding, b sharding))."""
    flat, ranks, scales = host
    modules = staged_modules(spec)
    if shardings is None:
        flat = jax.device_put(flat, device)
        return (flat,), functools.partial(install_flat, modules=modules), (flat, ranks, scales)
    a, b, L, pr = {}, {}, config.num_layers, page_rank
    for m, (a0, b0, end) in module_offsets(spec, config, n_pages, page_rank).items():
        d_in, d_out = config.projection_shape(m)
        pa = flat[a0:b0].reshape(L, n_pages, pr, d_in)
        pb = np.ascontiguousarray(flat[b0:end].reshape(L, d_out, n_pages, pr).transpose(0, 2, 1, 3))
        sa, sb = shardings[m]  # pages placed as the pool's shards
        a[m], b[m] = jax.device_put(pa, sa), jax.device_put(pb, sb)
    return (*a.values(), *b.values()), install, (a, b, ranks, scales)


def install_zeros(w: PagedLoraWeights, config: ModelConfig, modules: tuple[str, ...], slot: int,
                  pages: list[int], page_rank: int, dtype, *, sharded: bool) -> PagedLoraWeights:
    """An install of zeros into `pages` and `slot`, for `modules`: compiles the install variant
    of (modules, len(pages)) that a later copy will run (`AdapterPool.warmup`)."""
    L, M, n = config.num_layers, len(MODULE_ORDER), len(pages)
    empty = (np.zeros((M, L), np.int32), np.zeros((M, L), np.float32))
    args = (np.int32(slot), np.asarray(pages, np.int32), np.zeros(w.page_table.shape[1], np.int32))
    if not sharded:
        size = L * n * page_rank * sum(sum(config.projection_shape(m)) for m in modules)
        return install_flat(w, *args, jnp.zeros(size, dtype), *empty, modules=modules)
    a, b = {}, {}
    for m in modules:
        d_in, d_out = config.projection_shape(m)
        a[m] = jnp.zeros((L, n, page_rank, d_in), dtype)
        b[m] = jnp.zeros((L, n, d_out, page_rank), dtype)
    return install(w, *args, a, b, *empty)



class PoolArrays:
    """The pool's device arrays and what writes them: the page pool (`weights`, donated by every
    install: read it afresh for each step), the install variants compiled so far, and on a
    sharded pool (tensor parallel) the page shardings copies are staged with. The engine thread
    owns it; `stage` alone may run on any thread (it reads only the layout)."""

    def __init__(self, config: ModelConfig, num_pages: int, max_slots: int, pages_per_slot: int,
                 page_rank: int, dtype, device: jax.Device | None = None):
        self.config, self.page_rank, self.dtype, self.device = config, page_rank, dtype, device
        self.weights = PagedLoraWeights.zeros(config, num_pages, max_slots, pages_per_slot,
                                              page_rank, dtype, device)
        self.shardings: dict[str, tuple] | None = None  # module -> (a, b) page shardings
        self.compiled: set[tuple[tuple[str, ...], int]] = set()  # (modules, pages) installed so far

    def shard(self, shardings: PagedLoraWeights) -> None:
        """Place the pool by `shardings` (`carajax.parallel.lora_shardings`); later copies are
        staged with the same page shardings, so installs stay on the mesh."""
        self.weights = jax.device_put(dataclasses.replace(self.weights, mesh=shardings.mesh),
                                      shardings)
        self.shardings = {m: (shardings.a[m], shardings.b[m]) for m in shardings.a}

    def stage(self, spec, n_pages: int, host: tuple) -> tuple:
        """`stage` for this pool's layout, device and shardings."""
        return stage(spec, self.config, n_pages, self.page_rank, host, device=self.device,
                     shardings=self.shardings)

    def install(self, staged: tuple, slot: int, pages: list[int], modules: tuple[str, ...]) -> None:
        """A staged copy into `pages`, and slot `slot`'s page-table row, ranks and scales."""
        _, fn, args = staged
        row = np.zeros(self.weights.page_table.shape[1], np.int32)  # past the rank: never read
        row[:len(pages)] = pages
        self.weights = fn(self.weights, np.int32(slot), np.asarray(pages, np.int32), row, *args)
        self.compiled.add((modules, len(pages)))

    def warm(self, want: set[tuple[tuple[str, ...], int]], pages: list[int], slot: int) -> int:
        """Compile each (modules, page count) of `want` not yet installed, by installing zeros
        into free `pages` and a free `slot` (which nothing references); how many it compiled."""
        done = 0
        for modules, n in sorted(want - self.compiled, key=lambda v: (v[1], v[0])):
            if n > len(pages):
                continue
            self.weights = install_zeros(self.weights, self.config, modules, slot, pages[:n],
                                         self.page_rank, self.dtype,
                                         sharded=self.shardings is not None)
            self.compiled.add((modules, n))
            done += 1
        return done

__all__ = ["MODULE_ORDER", "PagedLoraWeights", "copy_bytes", "flat_pages", "install",
           "install_flat", "install_zeros", "module_offsets", "module_views", "page_bytes",
           "PoolArrays", "stage", "staged_modules"]
