"""CPU-assisted LoRA: the worker against float64 numpy, its thread policy, lanes and buckets by
hand, both of its paths (numpy under SMALL_JOB_FLOPS, the JAX CPU backend over several threads
above it), the host callback bridge inside `jax.jit` / `lax.scan` / `vmap` against
`bgmv_reference`, and cold rows through the model against the device path's logits."""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carajax.config import TARGET_MODULES
from carajax.lora import cpu_assist
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.lora.cpu_assist import CpuAssistBridge, CpuLoraWorker, bucket
from carajax.lora.kernels import bgmv_reference
from tests.conftest import assert_close


def _module(rng, d_in: int, d_out: int, rank: int, scale: float) -> LoraModule:
    return LoraModule(a=rng.standard_normal((rank, d_in)).astype(np.float32),
                      b=rng.standard_normal((d_out, rank)).astype(np.float32), scale=scale)


def _adapter(config, name: str, rank: int, modules, seed: int) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    return LoraAdapter(name=name, path="<memory>", modules={
        (layer, m): _module(rng, *config.projection_shape(m), rank, scale=2.0 / rank)
        for layer in range(config.num_layers) for m in modules})


def _numpy_delta(x, m: LoraModule) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    return m.scale * (x64 @ m.a.T.astype(np.float64)) @ m.b.T.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# CpuLoraWorker
# ---------------------------------------------------------------------------------------------
def test_bucket_by_hand():
    # 2^k and 3 * 2^(k-1), at least 8: 9 -> 12 (not 16), 13 -> 16, 150 -> 192, 300 -> 384.
    assert [bucket(n) for n in (1, 8, 9, 12, 13, 17, 150, 300, 4096)] == [
        8, 8, 12, 12, 16, 24, 192, 384, 4096]


def test_threads_for_by_hand():
    w = CpuLoraWorker(max_threads=4, tokens_per_core=100.0)
    # ceil(N / 100), capped at 4: 1 -> 1, 100 -> 1, 101 -> 2, 350 -> 4, 301 -> 4, 250 -> 3.
    assert [w.threads_for(n) for n in (0, 1, 100, 101, 250, 301, 350, 10_000)] == [
        0, 1, 1, 2, 3, 4, 4, 4]
    w.tokens_per_core = 0.5  # a core handles less than a token in budget: ceil(3 / 0.5) = 6 -> 4
    assert w.threads_for(1) == 2 and w.threads_for(3) == 4
    w.tokens_per_core = None  # not profiled: every thread (naive multithreading)
    assert w.threads_for(1) == 4
    w.close()
    with pytest.raises(ValueError):
        CpuLoraWorker(tokens_per_core=0.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_worker_delta_matches_float64(threads):
    rng = np.random.default_rng(threads)
    m = _module(rng, 96, 80, 8, scale=0.5)
    # tokens_per_core 2 makes threads_for(N) = min(threads, ceil(N / 2)): N=1 on one thread, N=7
    # on up to 3 (slices 3/3/1), N=300 in slices of 100 (bucket 128) or 150 (bucket 192).
    with CpuLoraWorker(max_threads=threads, tokens_per_core=2.0) as w:
        one = CpuLoraWorker(max_threads=1)
        for n in (1, 7, 64, 300):
            x = rng.standard_normal((n, 96)).astype(np.float32)
            y = w.delta(x, m)
            assert y.shape == (n, 80) and y.dtype == np.float32
            assert_close(y, _numpy_delta(x, m))
            # Slicing over threads (and the padding of each slice) does not change results
            # beyond float32 rounding (BLAS blocks a [3, 96] slice differently from [300, 96]).
            np.testing.assert_allclose(y, one.delta(x, m), rtol=1e-5, atol=1e-5)
        one.close()


def test_worker_delta_many_isolates_failures():
    rng = np.random.default_rng(0)
    good = _module(rng, 32, 16, 4, scale=1.5)
    bad = LoraModule(a=np.ones((4, 33), np.float32), b=np.ones((16, 4), np.float32), scale=1.0)
    x1, x2 = rng.standard_normal((40, 32)), rng.standard_normal((0, 32))
    with CpuLoraWorker(max_threads=2, tokens_per_core=8.0) as w:
        y1, err, y2 = w.delta_many([(x1, good), (x1, bad), (x2, good)])
        assert_close(y1, _numpy_delta(x1, good))
        assert isinstance(err, ValueError) and "[r, 32]" in str(err)
        assert y2.shape == (0, 16)
        with pytest.raises(ValueError):
            w.delta(x1, bad)
        # A failure while computing (not a shape check) fails that job's slices only.
        compute = w._compute
        cursed = _module(rng, 32, 16, 4, scale=7.0)

        def flaky(x, weights):
            # Small jobs carry the host module (numpy path), big ones CPU-backend arrays.
            scale = weights.scale if isinstance(weights, LoraModule) else float(weights[2])
            if scale == 7.0:
                raise RuntimeError("XLA:CPU fell over")
            return compute(x, weights)

        w._compute = flaky
        y1, err = w.delta_many([(x1, good), (x1, cursed)])
        assert_close(y1, _numpy_delta(x1, good))
        assert isinstance(err, RuntimeError)


def test_lanes_by_hand():
    # Jobs of 5000 and 300 tokens (5300 in all). Two threads: lanes of ceil(5300 / 2) = 2650
    # tokens, the first job cut at 2650. One thread: a single lane, cut into pieces of at most
    # MAX_BUCKET = 4096 tokens so no slice compiles a bucket past it.
    work = [(0, np.zeros((5000, 4)), "w0"), (1, np.zeros((300, 4)), "w1")]

    def spans(threads):
        return [[(j, start, start + len(x), w) for j, start, x, w in lane]
                for lane in CpuLoraWorker._lanes(work, threads)]

    assert spans(2) == [[(0, 0, 2650, "w0")], [(0, 2650, 5000, "w0"), (1, 0, 300, "w1")]]
    assert spans(1) == [[(0, 0, 4096, "w0"), (0, 4096, 5000, "w0"), (1, 0, 300, "w1")]]
    # Three threads: ceil(5300 / 3) = 1767 per lane, the last lane takes what is left (1766).
    assert [sum(e - s for _, s, e, _ in lane) for lane in spans(3)] == [1767, 1767, 1766]
    assert CpuLoraWorker._lanes([], 4) == []


@pytest.fixture
def jax_calls(monkeypatch):
    """Every call of the JAX CPU-backend function: (thread name, padded x shape)."""
    calls = []
    real = cpu_assist._lora_cpu

    def spy(x, a, b, scale):
        calls.append((threading.current_thread().name, x.shape))
        return real(x, a, b, scale)

    monkeypatch.setattr(cpu_assist, "_lora_cpu", spy)
    return calls


@pytest.mark.parametrize("threads, n, lanes", [
    # tokens_per_core 16 asks for ceil(n / 16) threads, more than there are: all of them.
    # n = 301 on 1 thread: one slice, padded to bucket(301) = 384.
    (1, 301, [384]),
    # n = 301 on 2 threads: slices of 151 and 150 tokens, both padded to 192.
    (2, 301, [192, 192]),
    # n = 997 on 3 threads: 333, 333, 331 tokens, each padded to 384.
    (3, 997, [384, 384, 384]),
])
def test_jax_path_over_threads_matches_float64(jax_calls, threads, n, lanes):
    """Above SMALL_JOB_FLOPS (a [n, 256] x rank 16 -> 192 job is n * 16 * 448 >= 2.1M multiply-adds)
    the delta runs on the JAX CPU backend, its tokens cut into one slice per thread, each padded
    to its bucket; the padding rows are dropped and the result is the float64 product."""
    rng = np.random.default_rng(n + threads)
    m = _module(rng, 256, 192, 16, scale=0.25)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    assert n * m.rank * (256 + 192) >= cpu_assist.SMALL_JOB_FLOPS
    with CpuLoraWorker(max_threads=threads, tokens_per_core=16.0) as w:
        y = w.delta(x, m)
    assert y.shape == (n, 192) and y.dtype == np.float32
    assert_close(y, _numpy_delta(x, m))
    assert sorted(shape[0] for _, shape in jax_calls) == lanes
    assert all(shape[1] == 256 for _, shape in jax_calls)
    # The caller computes one slice itself; the others run on the pool's threads.
    names = [name for name, _ in jax_calls]
    assert names.count(threading.current_thread().name) == 1
    assert sum(name.startswith("cpu-lora") for name in names) == threads - 1


def test_small_job_threshold_counts_both_products(jax_calls):
    """n * r * (d_in + d_out) multiply-adds decide the path: a [n, 1024] x rank 8 -> 16 job costs
    n * 8 * 1040 = 8320 n, so 126 tokens (1,048,320 < 2^20) run in numpy, 127 (1,056,640) on JAX."""
    rng = np.random.default_rng(3)
    m = _module(rng, 1024, 16, 8, scale=1.0)
    with CpuLoraWorker(max_threads=1) as w:
        for n, on_jax in ((126, False), (127, True)):
            jax_calls.clear()
            x = rng.standard_normal((n, 1024)).astype(np.float32)
            assert_close(w.delta(x, m), _numpy_delta(x, m))
            assert [shape for _, shape in jax_calls] == ([(bucket(n), 1024)] if on_jax else [])


def test_numpy_and_jax_paths_agree():
    """The same slice through both paths, at an odd length (37: the JAX path pads it to 48)."""
    rng = np.random.default_rng(11)
    m = _module(rng, 512, 384, 32, scale=0.5)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    with CpuLoraWorker(max_threads=1) as w:
        small = w._compute(x, m)  # what a job under SMALL_JOB_FLOPS gets
        big = w._compute(x, w._weights(m))  # the JAX CPU backend
    assert small.shape == big.shape == (37, 384)
    assert_close(big, _numpy_delta(x, m))
    # Float32 products of length 512 then 32, summed in different orders: rounding only.
    np.testing.assert_allclose(big, small, rtol=1e-4, atol=1e-4 * np.abs(small).max())


def test_profile_positive_and_grows_with_budget():
    with CpuLoraWorker(max_threads=1) as w:
        small = w.profile(1024, 1024, 16, budget_s=0.2e-3, repeats=3)
        assert small > 0 and w.tokens_per_core == small
        large = w.profile(1024, 1024, 16, budget_s=20e-3, repeats=3)
        # 100x the time budget: loosely more tokens (timings on a shared CPU are noisy).
        assert large > 4 * small, (small, large)
        assert w.threads_for(int(large)) == 1


# ---------------------------------------------------------------------------------------------
# CpuAssistBridge
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_config):
    """Two adapters: `attn` (rank 4, attention projections only) and `full` (rank 8, all seven),
    registered with a 3-thread worker that slices every call (tokens_per_core 3)."""
    attn = _adapter(tiny_config, "attn", 4, TARGET_MODULES[:4], seed=1)
    full = _adapter(tiny_config, "full", 8, TARGET_MODULES, seed=2)
    worker = CpuLoraWorker(max_threads=3, tokens_per_core=3.0)
    bridge = CpuAssistBridge(worker, tiny_config)
    ids = {"attn": bridge.register(attn), "full": bridge.register(full)}
    yield tiny_config, bridge, ids, {"attn": attn, "full": full}
    worker.close()


def _expected(config, adapters_by_row, layer, module, x, row_lens):
    """bgmv_reference with one slot per adapter: the oracle for a [B, Tq] batch."""
    B, Tq, d_in = x.shape
    d_out = config.projection_shape(module)[1]
    S, r_max = len(adapters_by_row), 8
    a = np.zeros((S, r_max, d_in), np.float32)
    b = np.zeros((S, d_out, r_max), np.float32)
    ranks, scales = np.zeros(S, np.int32), np.zeros(S, np.float32)
    for s, adapter in enumerate(adapters_by_row):
        m = adapter.modules.get((layer, module)) if adapter is not None else None
        if m is not None:
            a[s, :m.rank], b[s, :, :m.rank], ranks[s], scales[s] = m.a, m.b, m.rank, m.scale
    valid = np.arange(Tq)[None, :] < np.asarray(row_lens)[:, None]  # [B, Tq]
    slots = np.where(valid, np.arange(B)[:, None], -1).reshape(-1).astype(np.int32)
    y = bgmv_reference(jnp.asarray(x).reshape(B * Tq, d_in), a, b, slots, ranks, scales)
    return np.asarray(y).reshape(B, Tq, d_out)


def _batch(setup, seed=0, dtype=jnp.float32):
    """4 rows of Tq=8: attn (5 valid tokens), not cold, full (8 valid), attn (0 valid)."""
    config, bridge, ids, adapters = setup
    x = jax.random.normal(jax.random.key(seed), (4, 8, config.hidden_size), dtype)
    cpu_ids = jnp.array([ids["attn"], -1, ids["full"], ids["attn"]], jnp.int32)
    row_lens = jnp.array([5, 8, 8, 0], jnp.int32)
    by_row = [adapters["attn"], None, adapters["full"], adapters["attn"]]
    return x, cpu_ids, row_lens, by_row


@pytest.mark.parametrize("module", ["q_proj", "k_proj", "gate_proj", "down_proj"])
def test_bridge_in_jit_matches_bgmv_reference(setup, module):
    config, bridge, _, _ = setup
    x, cpu_ids, row_lens, by_row = _batch(setup)
    d_in = config.projection_shape(module)[0]
    x = jnp.tile(x, (1, 1, d_in // x.shape[-1]))  # down_proj reads the 128-wide MLP hidden

    @functools.partial(jax.jit, static_argnums=0)
    def step(module, x, cpu_ids, row_lens):
        return bridge.delta(1, module, x, cpu_ids, row_lens)

    bridge.take_errors()
    before = bridge.stats()
    y = np.asarray(step(module, x, cpu_ids, row_lens))
    want = _expected(config, by_row, 1, module, x, row_lens)
    assert_close(y, want)
    assert np.abs(y[2]).max() > 0  # `full` targets every projection
    np.testing.assert_array_equal(y[0, 5:], 0)  # padding tokens beyond row_lens
    np.testing.assert_array_equal(y[1], 0)  # cpu id -1
    np.testing.assert_array_equal(y[3], 0)  # row_lens 0
    if module in ("gate_proj", "down_proj"):  # `attn` does not target the MLP: exactly 0
        np.testing.assert_array_equal(y[0], 0)
    else:
        assert np.abs(y[0, :5]).max() > 0
    after = bridge.stats()
    assert after.calls == before.calls + 1 and after.cold_calls == before.cold_calls + 1
    # Tokens computed: full's 8, plus attn's 5 where attn targets the projection.
    assert after.tokens - before.tokens == (8 if module in ("gate_proj", "down_proj") else 13)
    assert after.host_s > before.host_s
    assert bridge.take_errors() == {}


def test_bridge_deltas_share_one_callback(setup):
    """q/k/v read the same x: one callback returns all three, equal to three separate calls."""
    config, bridge, _, _ = setup
    x, cpu_ids, row_lens, by_row = _batch(setup, seed=4)
    qkv = ("q_proj", "k_proj", "v_proj")
    fused = jax.jit(lambda x: bridge.deltas(1, qkv, x, cpu_ids, row_lens))
    before = bridge.stats()
    ys = fused(x)
    after = bridge.stats()
    assert after.calls == before.calls + 1
    assert after.tokens - before.tokens == 3 * 13  # 13 cold tokens, three projections each
    assert [y.shape for y in ys] == [(4, 8, 64), (4, 8, 32), (4, 8, 32)]
    for module, y in zip(qkv, ys):
        assert_close(y, _expected(config, by_row, 1, module, x, row_lens))
        # Same as a call of its own, to float32 rounding (numpy/BLAS may block the two
        # calls' products differently).
        np.testing.assert_allclose(np.asarray(y), np.asarray(
            jax.jit(lambda x, m=module: bridge.delta(1, m, x, cpu_ids, row_lens))(x)),
            rtol=1e-5, atol=1e-6)


def test_bridge_in_scan_over_layers(setup):
    """The layer index is traced inside a scan: it travels to the host as data."""
    config, bridge, _, _ = setup
    x, cpu_ids, row_lens, by_row = _batch(setup, seed=1)

    @jax.jit
    def all_layers(x, cpu_ids, row_lens):
        def body(carry, layer):
            return carry, bridge.delta(layer, "v_proj", x, cpu_ids, row_lens)
        return jax.lax.scan(body, 0, jnp.arange(config.num_layers))[1]  # [L, B, Tq, d_out]

    y = np.asarray(all_layers(x, cpu_ids, row_lens))
    for layer in range(config.num_layers):
        assert_close(y[layer], _expected(config, by_row, layer, "v_proj", x, row_lens))
    assert not np.allclose(y[0], y[1])  # the layers' weights differ, so must their deltas


def test_bridge_under_vmap_is_one_callback(setup):
    config, bridge, ids, adapters = setup
    x, cpu_ids, row_lens, by_row = _batch(setup, seed=2)
    xs = jnp.stack([x, -x, 2 * x])  # [3, B, Tq, d]
    f = jax.jit(jax.vmap(lambda x: bridge.delta(0, "q_proj", x, cpu_ids, row_lens)))
    before = bridge.stats().calls
    y = np.asarray(f(xs))
    assert bridge.stats().calls == before + 1  # broadcast_all: the mapped axis becomes rows
    for i in range(3):
        assert_close(y[i], _expected(config, by_row, 0, "q_proj", xs[i], row_lens))


def test_bridge_bfloat16(setup):
    config, bridge, _, _ = setup
    x, cpu_ids, row_lens, by_row = _batch(setup, seed=3, dtype=jnp.bfloat16)
    y = jax.jit(lambda x: bridge.delta(0, "o_proj", x, cpu_ids, row_lens))(x)
    assert y.dtype == jnp.bfloat16
    assert_close(y, _expected(config, by_row, 0, "o_proj", x.astype(jnp.float32), row_lens),
                 "bfloat16")


def test_bridge_failures_give_zero_rows_and_are_reported(tiny_config):
    rng = np.random.default_rng(5)
    good = _adapter(tiny_config, "good", 4, ("q_proj",), seed=3)
    d_in, d_out = tiny_config.projection_shape("q_proj")
    broken_b = LoraAdapter(name="broken_b", path="<memory>", modules={
        (0, "q_proj"): _module(rng, d_in, d_out + 1, 4, 1.0)})  # lora_B one row too many
    broken_a = LoraAdapter(name="broken_a", path="<memory>", modules={
        (0, "q_proj"): _module(rng, d_in + 1, d_out, 4, 1.0)})  # lora_A one column too many
    with CpuLoraWorker(max_threads=2) as worker:
        bridge = CpuAssistBridge(worker, tiny_config)
        ids = [bridge.register(a) for a in (good, broken_b, broken_a)]
        gone = bridge.register(good)
        bridge.unregister(gone)  # a step still carrying this id must not fail the others
        x = jax.random.normal(jax.random.key(0), (5, 4, d_in))
        cpu_ids = jnp.array([ids[0], ids[1], ids[2], gone, ids[0]], jnp.int32)
        row_lens = jnp.full((5,), 4, jnp.int32)
        y = np.asarray(jax.jit(lambda x: bridge.delta(0, "q_proj", x, cpu_ids, row_lens))(x))
        for row in (1, 2, 3):
            np.testing.assert_array_equal(y[row], 0)
        for row in (0, 4):
            assert_close(y[row], _numpy_delta(x[row], good.modules[(0, "q_proj")]))
        errors = bridge.take_errors()
        assert sorted(errors) == [ids[1], ids[2], gone]
        assert isinstance(errors[ids[1]], ValueError) and "lora_B" in str(errors[ids[1]])
        assert isinstance(errors[ids[2]], ValueError)
        assert isinstance(errors[gone], KeyError)
        assert bridge.take_errors() == {}  # taken: cleared
        assert bridge.stats().tokens == 8  # only the two good rows were computed


def test_bridge_unexpected_failure_fails_every_cold_id(setup, monkeypatch):
    config, bridge, ids, _ = setup
    x, cpu_ids, row_lens, _ = _batch(setup)

    def boom(jobs):
        raise MemoryError("host out of memory")

    monkeypatch.setattr(bridge.worker, "delta_many", boom)
    bridge.take_errors()
    y = jax.jit(lambda x: bridge.delta(0, "q_proj", x, cpu_ids, row_lens))(x)
    np.testing.assert_array_equal(np.asarray(y), 0)
    errors = bridge.take_errors()
    # Row 3 (attn, 0 valid tokens) is not cold this call, but attn's row 0 is.
    assert sorted(errors) == sorted([ids["attn"], ids["full"]])
    assert all(isinstance(e, MemoryError) for e in errors.values())


def test_bridge_without_cold_rows_computes_nothing(setup):
    config, bridge, _, _ = setup
    x, _, row_lens, _ = _batch(setup)
    before = bridge.stats()
    y = jax.jit(lambda x: bridge.delta(0, "q_proj", x, jnp.full((4,), -1, jnp.int32),
                                       row_lens))(x)
    np.testing.assert_array_equal(np.asarray(y), 0)
    after = bridge.stats()
    assert (after.calls, after.cold_calls, after.tokens) == (
        before.calls + 1, before.cold_calls, before.tokens)
    assert len(after.recent_call_s) == min(1024, after.calls)


# ---------------------------------------------------------------------------------------------
# Through the model: a cold row's CPU LoRA gives the device path's logits
# ---------------------------------------------------------------------------------------------
def test_cold_rows_through_the_model_give_the_device_path_logits(tiny_config, jax_calls):
    """One forward of two 160-token sequences of the same rank-64 adapter, as an engine step
    runs them: both on the device (the pool's pages), or the first one cold (its rows gathered
    for the bridge, `BatchLora`'s CPU part) beside the second one warm. Per layer, 160 cold
    tokens x rank 64 x (d_in + d_out) multiply-adds: q, o 1.3M, gate, up 2.0M, down 2.0M, over
    SMALL_JOB_FLOPS (the JAX CPU path), but k, v (d_out 32) 0.98M, under it (numpy): one
    callback mixes both paths. 2 threads (tokens_per_core 32) split each callback's tokens."""
    from flax import nnx

    from carajax.lora.hook import BatchLora
    from carajax.lora.pool import AdapterPool
    from carajax.models import weights
    from carajax.models.llama import PagedKVCache, dense_batch

    n, page_size = 160, 16
    adapter = _adapter(tiny_config, "cold", 64, TARGET_MODULES, seed=7)  # scale 2 / 64
    model = weights.random_model(tiny_config, seed=0, init_std=0.1)
    graphdef, state = nnx.split(model)
    pool = AdapterPool(tiny_config, dtype=jnp.float32, max_lora_rank=64, device_budget_bytes=1 << 22)
    worker = CpuLoraWorker(max_threads=2, tokens_per_core=32.0)
    bridge = CpuAssistBridge(worker, tiny_config)
    try:
        pool.register(adapter)
        pool.load_now("cold")
        slot, cid = pool.slot("cold"), bridge.register(adapter)
        batch, pages = dense_batch(2, n, page_size)
        tokens = np.random.default_rng(0).integers(4, tiny_config.vocab_size, 2 * n)
        batch = dataclasses.replace(batch, tokens=jnp.asarray(tokens, jnp.int32))
        starts, lens = jnp.array([0, n], jnp.int32), jnp.array([n, n], jnp.int32)
        # The gathered rows: the cold sequence's tokens, then 8 padding rows (>= T, dropped).
        rows = jnp.concatenate([jnp.arange(n), jnp.full(8, 2 * n)]).astype(jnp.int32)
        owners = jnp.where(rows < 2 * n, cid, -1).astype(jnp.int32)

        @functools.partial(jax.jit, static_argnames="cold")
        def forward(state, lora, slots, *, cold):
            hook = BatchLora(lora, starts, lens, slots, "reference",
                             cpu=(bridge, rows, owners) if cold else None)
            cache = PagedKVCache.zeros(tiny_config, pages, page_size, jnp.float32)
            return nnx.merge(graphdef, state)(batch, cache, hook, query_block=16)[0]

        warm = np.asarray(forward(state, pool.weights, jnp.array([slot, slot], jnp.int32), cold=False))
        assert jax_calls == []  # no callback without cold rows
        before = bridge.stats()
        cold = np.asarray(forward(state, pool.weights, jnp.array([-1, slot], jnp.int32), cold=True))
        after = bridge.stats()
        base = np.asarray(forward(state, pool.weights, jnp.array([-1, -1], jnp.int32), cold=False))
    finally:
        worker.close()
        pool.close()
    assert bridge.take_errors() == {}
    assert cold.shape == warm.shape == (2 * n, tiny_config.vocab_size)
    assert_close(cold, warm)
    # The cold sequence's LoRA matters (it is not a match of two base forwards) ...
    assert np.abs(warm[:n] - base[:n]).max() > 100 * np.abs(cold[:n] - warm[:n]).max()
    # ... and the warm one beside it got its device LoRA.
    assert_close(cold[n:], warm[n:])
    # 4 callbacks per layer (q/k/v, o, gate/up, down): 7 projections x 160 tokens x 2 layers.
    assert (after.cold_calls - before.cold_calls, after.tokens - before.tokens) == (8, 7 * n * 2)
    # The JAX slices of one layer, padded: q/k/v's 480 tokens in lanes of 240, q whole in the
    # first (160 -> 192; k, v in numpy); o in two lanes of 80 (-> 96); gate and up one lane
    # each (160 -> 192); down (d_in 128) in two lanes of 80 (-> 96).
    per_layer = [(96, 64)] * 2 + [(96, 128)] * 2 + [(192, 64)] * 3
    assert sorted(shape for _, shape in jax_calls) == sorted(per_layer * 2)
