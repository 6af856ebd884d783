"""The host tier between the disk and the device: LRU eviction that keeps what is held, reads off
the engine's thread that race unregisters and meet broken files, one host copy per adapter, and
an engine serving more adapters than its host budget holds with the tokens of one that holds them
all."""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

import carajax
from carajax import AdapterError
from carajax.config import ATTENTION_MODULES, TARGET_MODULES
from carajax.lora.pool import AdapterPool, PoolFullError
from carajax.lora.spec import read_spec, spec_of
from carajax.testing import write_random_adapter
from tests.test_engine import GREEDY, REQUESTS, make_engine

# llama-test, float32, attention-only rank 16: one page of q/k/v/o = 2 layers * 16 rows * 448 * 4
# bytes = 57344, + its ranks and scales (int32 + float32 [7 projections, 2 layers]) = 112.
R16_HOST_BYTES = 57_344 + 112
# Rank 64 on all seven projections: 64 rows * 2 layers * 1024 * 4 bytes, + 112.
R64_HOST_BYTES = 64 * 2 * 1024 * 4 + 112


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_config) -> dict[str, str]:
    """r16_0 .. r16_5: rank-16 attention adapters on disk; r64: rank 64, all seven projections."""
    root = tmp_path_factory.mktemp("host_tier")
    out = {f"r16_{i}": write_random_adapter(root / f"r16_{i}", tiny_config, rank=16, seed=i)
           for i in range(6)}
    out["r64"] = write_random_adapter(root / "r64", tiny_config, rank=64, seed=9,
                                      target_modules=TARGET_MODULES)
    return out


@pytest.fixture
def make_pool(tiny_config, files):
    """make(host_budget, *names, **kw): a float32 pool of 8 pages with those adapters registered
    from disk (nothing read yet)."""
    pools = []

    def make(host_budget, *names, **kw):
        pool = AdapterPool(tiny_config, dtype=jnp.float32, max_lora_rank=64,
                           device_budget_bytes=8 * 131_072, host_budget_bytes=host_budget, **kw)
        pools.append(pool)
        for n in names:
            pool.register_spec(read_spec(files[n], tiny_config, max_rank=64, name=n))
        return pool

    yield make
    for pool in pools:
        pool.close()


def wait_for(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.002)


def read_in(pool: AdapterPool, name: str) -> None:
    """Read an adapter into the host tier (on the reader thread) and wait for it."""
    assert pool.fetch(name) in ("reading", None)
    wait_for(lambda: pool.where(name) == "host")


def in_host(pool: AdapterPool) -> list[str]:
    """The adapters whose weights are in host memory (on the device or not)."""
    return sorted(pool.host.lru)


# ---------------------------------------------------------------------------------------------
# Eviction: least recently used first; pinned, in-use and wanted host copies never
# ---------------------------------------------------------------------------------------------
def test_host_lru_keeps_pinned_in_use_and_wanted_adapters(make_pool):
    a, b, c, d, e, f = (f"r16_{i}" for i in range(6))
    pool = make_pool(3 * R16_HOST_BYTES, a, b, c, d, e, f)  # room for three host copies
    assert [pool.where(n) for n in (a, b, c)] == ["disk"] * 3 and pool.stats()["disk_only"] == 6
    for n in (a, b, c):
        read_in(pool, n)
    assert pool.stats()["host_bytes_used"] == 3 * R16_HOST_BYTES
    pool.touch(a)  # LRU order now b, c, a
    read_in(pool, d)
    assert pool.where(b) == "disk" and sorted(in_host(pool)) == [a, c, d]  # b: least recent
    pool.pin(c)  # the oldest now, but pinned
    pool.acquire(a)  # in use
    read_in(pool, e)
    assert pool.where(d) == "disk" and sorted(in_host(pool)) == [a, c, e]  # d: the only one free
    pool.want(e)  # a queued request waits for e: now nothing can go
    pool.want(f)
    assert pool.fetch(f) == "reading"  # asked for, but it waits for room
    st = pool.stats()
    assert st["reads_waiting_for_memory"] == 1 and st["reading"] == [] and pool.where(f) == "disk"
    assert st["host_bytes_used"] == 3 * R16_HOST_BYTES  # within the budget: nothing was evicted
    with pytest.raises(PoolFullError, match="host memory"):
        pool.load_now(b)  # a blocking load cannot wait for room either
    pool.unwant(e)  # e is free again: the next poll starts f's read, evicting e
    pool.poll()
    wait_for(lambda: pool.where(f) == "host")
    assert pool.where(e) == "disk" and sorted(in_host(pool)) == [a, c, f]
    pool.release(a)
    pool.unpin(c)
    pool.unwant(f)
    read_in(pool, b)  # c is the least recently used of the three, and free now
    assert pool.where(c) == "disk"


def test_a_copy_to_the_device_reads_first_and_keeps_its_host_copy(make_pool):
    """prefetch of an adapter only on disk: its read, then its copy from the reader thread. A
    loading adapter's host copy is never evicted, a resident one's may be (it is on the device)."""
    a, b = "r16_0", "r16_1"
    pool = make_pool(R16_HOST_BYTES, a, b)  # room for one host copy
    assert pool.prefetch(a)
    wait_for(lambda: pool.where(a) != "disk")
    assert pool.fetch(b) == "reading"  # a is loading: its copy stays, b waits
    assert pool.stats()["reads_waiting_for_memory"] == 1
    wait_for(lambda: a in pool.poll() or pool.where(a) == "device")
    assert pool.stats()["reads_waiting_for_memory"] == 0  # nobody wants b: dropped at a poll
    assert pool.load_now(b) >= 0  # a is resident now: its host copy makes room for b's read
    assert pool.where(a) == "device" and pool.where(b) == "device" and in_host(pool) == [b]
    pool.unregister(a)
    pool.unregister(b)
    assert pool.stats()["host_bytes_used"] == 0 and pool.stats()["pages_free"] == 8


# ---------------------------------------------------------------------------------------------
# Reads: off the caller's thread, racing an unregister, failing alone
# ---------------------------------------------------------------------------------------------
def test_a_read_racing_an_unregister_is_dropped(make_pool, tiny_config, files):
    pool = make_pool(None, "r16_0")
    gate, started, real_read = threading.Event(), threading.Event(), pool.host.read

    def slow_read(e):
        started.set()
        gate.wait(10)
        return real_read(e)

    pool.host.read = slow_read
    assert pool.prefetch("r16_0")  # read, then copy: the read is in flight on the reader thread
    assert started.wait(10) and pool.where("r16_0") == "disk"
    assert pool.stats()["reading"] == ["r16_0"] and pool.stats()["host_bytes_used"] == R16_HOST_BYTES
    pool.unregister("r16_0")  # while it reads
    with pytest.raises(AdapterError, match="unknown adapter"):
        pool.where("r16_0")
    # Registered again under the same name before the first read lands: a new entry, untouched by
    # the old read's result.
    pool.register_spec(read_spec(files["r16_1"], tiny_config, max_rank=64, name="r16_0"))
    gate.set()
    wait_for(lambda: not pool.stats()["reading"])
    st = pool.stats()
    assert st["host_bytes_used"] == 0 and pool.where("r16_0") == "disk"  # reservation given back
    assert st["loading"] == [] and st["pages_free"] == 8  # no copy started for the dropped read
    pool.host.read = real_read
    assert pool.load_now("r16_0") >= 0
    pool.load_all()
    # The device holds the new file's weights (r16_1's), not the old one's: k_proj's A pages
    # lead the host copy (projections in sorted order: k, o, q, v).
    flat, _, _ = pool.host.stage(carajax.load_adapter(files["r16_1"], tiny_config, max_rank=64))
    page = int(np.asarray(pool.weights.page_table)[pool.slot("r16_0"), 0])
    k = np.asarray(pool.weights.a["k_proj"])[:, page]  # [L, 16, d_in]
    np.testing.assert_array_equal(k.reshape(-1), flat[:k.size])


@pytest.mark.parametrize("breakage", ["deleted", "truncated", "reshaped", "nan"])
def test_a_broken_file_fails_its_read_with_its_cause(make_pool, tiny_config, files, tmp_path,
                                                    breakage):
    import shutil
    path = shutil.copytree(files["r16_0"], tmp_path / "copy")
    pool = make_pool(None)
    pool.register_spec(read_spec(path, tiny_config, max_rank=64, name="x"))
    weights = os.path.join(path, "adapter_model.safetensors")
    if breakage == "deleted":
        os.remove(weights)
    elif breakage == "truncated":
        os.truncate(weights, 100)
    elif breakage == "reshaped":  # another adapter (rank 64) written over it
        shutil.copyfile(os.path.join(files["r64"], "adapter_model.safetensors"), weights)
    else:
        from tests.test_adapter import Q_A, _edit_tensors, _set
        _edit_tensors(path, _set(Q_A, np.full((16, 64), np.nan, np.float32)))
    words = {"deleted": "missing adapter_model.safetensors", "truncated": "corrupt",
             "reshaped": "rank 64", "nan": "non-finite"}[breakage]
    with pytest.raises(AdapterError, match="could not be read") as err:
        pool.load_now("x")
    assert words in str(err.value), str(err.value)
    assert pool.where("x") == "disk" and pool.stats()["host_bytes_used"] == 0
    assert pool.stats()["read_failures"] == 1


# ---------------------------------------------------------------------------------------------
# One host copy per adapter; a registry that costs what its names cost
# ---------------------------------------------------------------------------------------------
def test_host_bytes_per_adapter_are_its_served_bytes(make_pool, tiny_config, files):
    """Measured with tracemalloc (numpy reports its buffers to it): a host copy is the pages the
    device copy moves, within 10% (ranks, scales, Python objects), never a second copy."""
    names = [f"r16_{i}" for i in range(6)] + ["r64"]
    pool = make_pool(None, *names)
    served = sum(pool.copy_bytes(pool.adapter(n)) for n in names)
    for n in names:  # read once: compiles nothing, warms the reader thread's imports
        read_in(pool, n)
    for n in names:
        pool.unregister(n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in names:
            pool.register_spec(read_spec(files[n], tiny_config, max_rank=64, name=n))
            read_in(pool, n)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert pool.stats()["host_bytes_used"] == sum(pool.host_bytes(pool.adapter(n)) for n in names)
    assert served <= grown <= 1.1 * served, (grown, served)
    # CPU assist computes from views of that copy, equal to the adapter's own weights.
    view = pool.host_view("r64")
    parsed = carajax.load_adapter(files["r64"], tiny_config, max_rank=64)
    assert view.modules.keys() == parsed.modules.keys()
    for key, m in parsed.modules.items():
        v = view.modules[key]
        assert np.shares_memory(v.a, pool._table.entries["r64"].host[0])
        np.testing.assert_array_equal(v.a, m.a)
        np.testing.assert_array_equal(v.b, m.b)
        assert v.scale == pytest.approx(m.scale)


def test_stats_and_registration_do_not_grow_with_the_registry(make_pool, tiny_config, files):
    """2,000 adapters registered (header only, one file under many names): stats() lists only
    what is held or moving, and each registered adapter costs a spec, not its weights."""
    spec = read_spec(files["r16_0"], tiny_config, max_rank=64)
    pool = make_pool(4 * R16_HOST_BYTES)
    sizes = {}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            pool.register_spec(read_spec(files["r16_0"], tiny_config, max_rank=64, name=f"n{i}"))
            if i + 1 in (100, 2000):
                sizes[i + 1] = len(json.dumps(pool.stats()))
        per_adapter = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    assert spec.file_bytes > 50_000 and per_adapter < 2_048, per_adapter  # ~1.2 KB, vs 59 KB on disk
    assert sizes[2000] - sizes[100] < 10 and pool.stats()["disk_only"] == 2000  # (digits only)


# ---------------------------------------------------------------------------------------------
# The engine: more adapters than the host budget holds, same tokens
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_files(tmp_path_factory, tiny_config):
    from tests.test_engine import NAMES, RANKS
    root = tmp_path_factory.mktemp("tier-engine")
    return {name: write_random_adapter(root / name, tiny_config, rank=r, seed=i,
                                       target_modules=TARGET_MODULES if i % 2 else ATTENTION_MODULES)
            for i, (name, r) in enumerate(zip(NAMES, RANKS))}


@pytest.fixture(scope="module")
def reference(engine_files):
    with make_engine(engine_files, cold_start="cached") as engine:
        return [engine.generate([p], adapters=[a], sampling=GREEDY)[0].token_ids
                for p, a in REQUESTS]


@pytest.mark.parametrize("policy", ["async", "cpu_assist", "wait"])
def test_engine_serves_past_its_host_budget_with_the_same_tokens(engine_files, reference, policy,
                                                                 tiny_config):
    """8 adapters (ranks 8 to 64), host memory for a rank-64 and a rank-16 one: the two rank-64
    adapters stay on disk at registration, the requests read them (off the engine's thread) and
    evict each other, and every token is the same as an engine holding all of them."""
    budget = R64_HOST_BYTES + 16 * 2 * 1024 * 4 + 112
    with make_engine(engine_files, cold_start=policy, host_lora_budget_bytes=budget) as engine:
        st = engine.stats()["adapters"]
        assert st["adapters"] == 8 and st["disk_only"] == 2
        outs = engine.generate([p for p, _ in REQUESTS], adapters=[a for _, a in REQUESTS],
                               sampling=GREEDY)
        assert [o.token_ids for o in outs] == reference
        st = engine.stats()["adapters"]
        assert st["host_bytes_used"] <= budget and st["reads"] >= 2
        assert st["read_failures"] == 0 and st["read_bytes_per_s"] > 0


def test_engine_fails_only_the_requests_of_an_unreadable_adapter(engine_files, reference, tmp_path):
    import shutil
    broken = shutil.copytree(engine_files["a6"], tmp_path / "a6")
    files = {**engine_files, "a6": str(broken)}
    # One rank-64 host copy: a0..a5 but a3 are read at registration, a3, a6, a7 stay on disk.
    with make_engine(files, cold_start="async", host_lora_budget_bytes=R64_HOST_BYTES) as engine:
        assert engine.pool.where("a6") == "disk"
        moved = str(broken) + ".away"
        os.rename(os.path.join(broken, "adapter_model.safetensors"), moved)
        outs = engine.generate([p for p, _ in REQUESTS], adapters=[a for _, a in REQUESTS],
                               sampling=GREEDY)
        failed = [i for i, (_, a) in enumerate(REQUESTS) if a == "a6"]
        for i, out in enumerate(outs):
            if i in failed:
                assert out.finish_reason == "error"
                assert "could not be read" in out.error and "adapter_model.safetensors" in out.error
            else:
                assert out.token_ids == reference[i], i
        # The file is back: the next request reads it and is served.
        os.rename(moved, os.path.join(broken, "adapter_model.safetensors"))
        i = failed[0]
        assert engine.generate([REQUESTS[i][0]], adapters=["a6"], sampling=GREEDY)[0].token_ids \
            == reference[i]


def test_add_adapter_reads_weights_only_when_the_host_tier_has_room(engine_files, tiny_config):
    with make_engine(host_lora_budget_bytes=R64_HOST_BYTES) as engine:
        engine.add_adapter("a1", engine_files["a1"])  # rank 16: read, and kept in host memory
        spec = engine.add_adapter("a3", engine_files["a3"])  # rank 64: no room left, header only
        assert engine.pool.where("a1") == "host" and engine.pool.where("a3") == "disk"
        assert engine.stats()["adapters"]["host_bytes_used"] == 16 * 2 * 1024 * 4 + 112
        parsed = carajax.load_adapter(engine_files["a3"], tiny_config, max_rank=64)
        assert spec.same_shape(spec_of(parsed, tiny_config)) and spec.rank == 64
        assert spec.modules == {k: (m.rank, pytest.approx(m.scale)) for k, m in parsed.modules.items()}
        with pytest.raises(AdapterError, match="already registered"):
            engine.add_adapter("a3", engine_files["a3"])


def test_worker_stats_list_only_adapters_in_memory(engine_files):
    """Stats (polled by routers every 0.5 s) names the adapters in host memory or on the device,
    counts the rest, and carries a registry version; ListAdapters lists every one."""
    from carajax.server import carajax_pb2 as pb
    from carajax.server.worker import CaraServeServicer

    with make_engine(engine_files, cold_start="async", host_lora_budget_bytes=R64_HOST_BYTES) as engine:
        servicer = CaraServeServicer(engine, name="w")
        st = servicer.Stats(pb.StatsRequest(), None)
        on_disk = {"a3", "a6", "a7"}  # no room for them at registration
        assert {a.adapter_id for a in st.adapters} == set(engine_files) - on_disk
        assert st.adapters_registered == 8 and st.memory.disk_adapters == 3
        assert st.memory.host_adapters == 5 and st.memory.disk_read_bytes_per_s > 0
        listed = servicer.ListAdapters(pb.ListAdaptersRequest(), None).adapters
        assert {a.adapter_id for a in listed if a.where == pb.RESIDENCY_DISK} == on_disk
        assert len(listed) == 8
        engine.remove_adapter("a7")
        again = servicer.Stats(pb.StatsRequest(), None)
        assert again.adapters_version != st.adapters_version and again.adapters_registered == 7
