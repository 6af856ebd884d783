"""Tensor parallelism: one engine's model over a 1-D device mesh (axis "tp"), Megatron-style.

Design (issue 8):

- The mesh is `jax.sharding.Mesh(devices[:tp], ("tp",))` with *Auto* axis types. Recent
  `jax.make_mesh` defaults to Explicit axes, where every sharded matmul must state its output
  sharding; with Auto axes the model code stays as it is and plain `jax.jit` lets GSPMD propagate
  shardings from the inputs and insert the collectives.
- Base weights (`Linear.kernel` is [d_in, d_out]): q/k/v/gate/up are column-parallel (d_out
  sharded: each device owns whole heads, resp. a slice of the MLP's hidden units), o/down are
  row-parallel (d_in sharded), so attention and the SwiGLU run locally and each block costs one
  all-reduce after o_proj and one after down_proj, as in Megatron-LM.
- Embeddings, lm_head, norms and the rotary table are replicated. Vocab-parallel embeddings /
  head would save memory (0.5 GB for Llama-2-70B in bf16, ~0.4 % of its weights) but need an
  all-gather or a sharded sampler for the logits; replicated logits keep the sampler unchanged.
- KV cache [rows, seq, kv_heads, head_dim] is sharded by KV heads, which requires
  num_kv_heads % tp == 0 (and num_heads % tp == 0): query head h reads KV head h // group, and
  contiguous column blocks of q/k/v then land on the same device as their KV heads.
- LoRA pool pages follow their base weight, so LoRA adds no collective of its own: for
  column-parallel modules A [L, P, pr, d_in] is replicated and B [L, P, d_out, pr] is sharded
  along d_out (x A is computed redundantly, (x A) B locally on each device's columns); for
  row-parallel modules A is sharded along d_in and B replicated, so each device's delta is a
  partial sum over its inputs. Page tables, ranks and scales are replicated.
  - The jnp references ("reference", the default off GPU) are partitioned by GSPMD: it reduces
    the row-parallel x A ([tokens, r_max]) in the base output's all-reduce op at decode; in
    prefill, `sgmv_reference`'s scan over segments reduces it once per segment.
  - The Pallas kernels ("pallas", "interpret") cannot be partitioned by GSPMD (it would
    all-gather the sharded pages to every device), so `shard_lora_op` runs them under
    `jax.shard_map` (`jax.experimental.shard_map` is deprecated since JAX 0.8) on each device's
    shard. The mesh reaches the jitted hook as a static field of the pool's `PagedLoraWeights`.
    Row-parallel partial deltas [tokens, d_out] are summed by one `psum`, which XLA combines into
    the base output's all-reduce op; it carries hidden-sized data where GSPMD's reduction of
    x A is rank-sized (reducing xa between the shrink and expand kernels would fix that).
- CPU-assisted deltas (`jax.pure_callback`) compute the full delta on the host; GSPMD feeds the
  callback the full x and gives its output the base output's sharding.
- Multi-host: `make_mesh` takes `jax.devices()`, which after `jax.distributed.initialize` lists
  every process's devices; the engine does not yet run its steps in lockstep across processes
  (see ARCHITECTURE.md, "Tensor parallelism").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from carajax.config import ModelConfig

AXIS = "tp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise ValueError unless `config` can be split over `tp` devices by heads and hidden units."""
    if tp < 1:
        raise ValueError(f"tensor parallelism must be >= 1, got {tp}")
    for field in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, field) % tp:
            raise ValueError(f"tp={tp} must divide ModelConfig.{field} ({getattr(config, field)}): "
                             "each device owns whole attention heads, whole KV heads and an equal "
                             "slice of the MLP")


def check_devices(tp: int, devices: Sequence[jax.Device] | None = None) -> None:
    """Raise ValueError unless there are at least `tp` devices (default: `jax.devices()`)."""
    n = len(jax.devices() if devices is None else devices)
    if not 1 <= tp <= n:
        raise ValueError(f"tp={tp} needs {tp} devices; {n} available "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh of the first `tp` devices, axis "tp" (Auto axis type: GSPMD propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    check_devices(tp, devices)
    return Mesh(np.array(devices[:tp]), (AXIS,))


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def param_spec(path, ndim: int) -> P:
    """The PartitionSpec of one model parameter, from its path in the NNX state."""
    names = _names(path)
    if "kernel" in names and ndim == 2:
        module = names[names.index("kernel") - 1]
        if module in COLUMN_PARALLEL:
            return P(None, AXIS)  # [d_in, d_out]: shard d_out
        if module in ROW_PARALLEL:
            return P(AXIS, None)  # shard d_in
    return P()  # embeddings, lm_head, norms, inv_freq: replicated


def shard_params(state, mesh: Mesh):
    """The NNX state with every leaf placed by `param_spec` on `mesh`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, NamedSharding(mesh, param_spec(p, np.ndim(x)))), state)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """Paged KV cache [layers, pages, kv_heads, page_size, head_dim]: sharded by KV heads."""
    return NamedSharding(mesh, P(None, None, AXIS, None, None))


def shard_cache(cache, mesh: Mesh):
    """A PagedKVCache (any pytree of [L, pages, kv_heads, page_size, head_dim]) placed by KV heads."""
    return jax.device_put(cache, jax.tree_util.tree_map(lambda _: cache_sharding(mesh), cache))


def lora_page_specs(module: str) -> tuple[P, P]:
    """(A spec, B spec) of a module's pages A [L, P, pr, d_in], B [L, P, d_out, pr]."""
    if module in COLUMN_PARALLEL:
        return P(), P(None, None, AXIS, None)  # A replicated, B along d_out
    if module in ROW_PARALLEL:
        return P(None, None, None, AXIS), P()  # A along d_in, B replicated
    raise KeyError(f"unknown projection {module!r}")


def lora_shardings(weights, mesh: Mesh):
    """Shardings for a `PagedLoraWeights` (same structure, `mesh` field set to `mesh`): pages by
    `lora_page_specs`, page table, ranks and scales replicated."""
    rep = NamedSharding(mesh, P())
    a = {m: NamedSharding(mesh, lora_page_specs(m)[0]) for m in weights.a}
    b = {m: NamedSharding(mesh, lora_page_specs(m)[1]) for m in weights.b}
    return type(weights)(a=a, b=b, page_table=rep,
                         ranks={m: rep for m in weights.ranks},
                         scales={m: rep for m in weights.scales}, mesh=mesh)


def shard_lora_op(op: Callable[..., jax.Array], mesh: Mesh, module: str) -> Callable[..., jax.Array]:
    """A LoRA op of one layer, run on each device's shard of `module`'s pages (`jax.shard_map`).

    `op(x [T, d_in], a [P, pr, d_in], b [P, d_out, pr], *meta) -> y [T, d_out]`, with `meta`
    (segments or token slots, ranks, scales, page table) replicated: a Pallas kernel, which GSPMD
    cannot partition (left to it, the sharded pages would be all-gathered to every device).
    Per device, as a loop over the tp shards k of the weights:

        column-parallel: y[:, cols_k] = op(x, a, b[:, cols_k])      A replicated, B along d_out
        row-parallel:    y = sum_k op(x[:, in_k], a[:, :, in_k], b)  A along d_in, B replicated

    The row-parallel sum is one `psum` of [T, d_out] (the size of the base output's all-reduce).
    `check_vma=False`: the kernels' `pallas_call`s declare no per-axis variance of their outputs.
    """
    a_spec, b_spec = (P(*spec[1:]) for spec in lora_page_specs(module))  # drop the layer axis
    if module in COLUMN_PARALLEL:
        x_spec, y_spec, body = P(), P(None, AXIS), op
    else:
        x_spec, y_spec = P(None, AXIS), P()

        def body(*args):
            return jax.lax.psum(op(*args), AXIS)

    def run(x, a, b, *meta):
        return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, a_spec, b_spec, *[P()] * len(meta)),
                             out_specs=y_spec, check_vma=False)(x, a, b, *meta)

    return run
