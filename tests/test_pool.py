"""The tiered adapter pool: exact page contents, byte accounting by hand, LRU with pins and
references, asynchronous copies over an emulated link, and errors that leave the pool unchanged."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carajax import AdapterError, LoraAdapter, load_adapter
from carajax.config import TARGET_MODULES
from carajax.lora import jnp_ops
from carajax.lora.adapter import LoraModule
from carajax.lora.fused_kernels import sgmv_fused
from carajax.lora.kernels import bgmv_reference, sgmv, sgmv_reference
from carajax.lora.pool import AdapterPool, PoolFullError
from carajax.testing import write_random_adapter

# llama-test: hidden 64, intermediate 128, 4 heads of 16 (q/o out: 64), 2 KV heads (k/v out: 32),
# 2 layers. d_in + d_out: q 128, k 96, v 96, o 128, gate 192, up 192, down 192 -> 1024 in all.
# One page of 16 rank rows = 2 layers * 16 * 1024 * 4 bytes (float32) = 131072 bytes.
PAGE_BYTES = 131_072
# A copy moves only the projections an adapter targets: for the attention-only r16_* adapters
# q + k + v + o = 448 of the 1024, so 2 * 16 * 448 * 4 = 57344 bytes of a page.
ATTENTION_PAGE_BYTES = 57_344
# Emulated link of 0.001 GB/s = 1e6 bytes/s with 50 ms latency: a one-page attention-only copy is
# 0.057344 s on the wire + 0.05 s = 0.107344 s.
LINK = dict(emulated_link_gbps=0.001, emulated_link_latency_ms=50.0)
ONE_PAGE_COPY_S = 0.05 + ATTENTION_PAGE_BYTES / 1e6
# Beside its pages the host tier keeps an adapter's ranks and scales: int32 + float32 [7, 2].
META_BYTES = 2 * 4 * 7 * 2


def mixed_adapter(config, seed: int = 0) -> LoraAdapter:
    """Ranks that differ per projection and layer: q_proj@0 rank 20 (two pages: 16 + 4 rows),
    v_proj@1 rank 5, down_proj@1 rank 3; everything else untouched (rank 0, scale 0)."""
    rng = np.random.default_rng(seed)
    modules = {}
    for layer, m, r, scale in ((0, "q_proj", 20, 0.5), (1, "v_proj", 5, 2.0), (1, "down_proj", 3, 1.5)):
        d_in, d_out = config.projection_shape(m)
        modules[(layer, m)] = LoraModule(a=rng.standard_normal((r, d_in)).astype(np.float32),
                                         b=rng.standard_normal((d_out, r)).astype(np.float32),
                                         scale=scale)
    return LoraAdapter(name="mixed", path="<memory>", modules=modules)


@pytest.fixture(scope="module")
def adapters(tiny_config, tmp_path_factory) -> dict[str, LoraAdapter]:
    """r16_0 .. r16_6 (rank 16, attention), r8 (rank 8, MLP only), r64 (rank 64, all seven
    projections) from PEFT files on disk, and the hand-built `mixed` (rank 20)."""
    root = tmp_path_factory.mktemp("pool_adapters")
    specs = {f"r16_{i}": (16, ("q_proj", "k_proj", "v_proj", "o_proj")) for i in range(7)}
    specs["r8"] = (8, ("gate_proj", "up_proj", "down_proj"))
    specs["r64"] = (64, TARGET_MODULES)
    out = {}
    for seed, (name, (rank, targets)) in enumerate(specs.items()):
        path = write_random_adapter(root / name, tiny_config, rank=rank, target_modules=targets,
                                    seed=seed)
        out[name] = load_adapter(path, tiny_config, max_rank=128, name=name)
    out["mixed"] = mixed_adapter(tiny_config)
    return out


@pytest.fixture
def make_pool(tiny_config, adapters):
    """make(pages, *names, **kw): a float32 pool of `pages` pages with those adapters registered."""
    pools = []

    def make(pages: int, *names: str, slack_bytes: int = 0, **kw) -> AdapterPool:
        kw = {"dtype": jnp.float32, "max_lora_rank": 64, **kw}
        pool = AdapterPool(tiny_config, device_budget_bytes=pages * PAGE_BYTES + slack_bytes, **kw)
        pools.append(pool)
        for n in names:
            pool.register(adapters[n])
        return pool

    yield make
    for pool in pools:
        pool.close()


def slot_layout(pool: AdapterPool, adapters, module: str, layer: int):
    """The slot layout `LoraAdapter.stacked` builds for the resident adapters, at their slots:
    a [S, r_max, d_in], b [S, d_out, r_max], ranks [S], scales [S]."""
    d_in, d_out = pool.config.projection_shape(module)
    S, r = pool.max_slots, pool.r_max
    a, b = np.zeros((S, r, d_in), pool.dtype), np.zeros((S, d_out, r), pool.dtype)
    ranks, scales = np.zeros(S, np.int32), np.zeros(S, np.float32)
    for name in pool.stats()["on_device"]:
        s = pool.slot(name)
        sa, sb, sr, ss = adapters[name].stacked(pool.config, module, r, pool.dtype)
        a[s], b[s], ranks[s], scales[s] = sa[layer], sb[layer], sr[layer], ss[layer]
    return a, b, ranks, scales


# ---------------------------------------------------------------------------------------------
# Contents: the pool reproduces every adapter exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pool_pages_reproduce_each_adapter(make_pool, adapters, dtype):
    names = ("r16_0", "r64", "r8", "mixed")
    pool = make_pool(12, *names, dtype=dtype, max_slots=6)
    pool.load_all()
    w = pool.weights
    table = np.asarray(w.page_table)
    for name in names:
        s, n = pool.slot(name), pool._table.entries[name].n_pages
        assert n == {"r16_0": 1, "r64": 4, "r8": 1, "mixed": 2}[name]
        for m in TARGET_MODULES:
            a, b, ranks, scales = adapters[name].stacked(pool.config, m, pool.r_max, pool.dtype)
            pa = np.asarray(w.a[m])[:, table[s, :n]]  # [L, n, pr, d_in]
            pb = np.asarray(w.b[m])[:, table[s, :n]]  # [L, n, d_out, pr]
            rows = n * pool.page_rank
            np.testing.assert_array_equal(pa.reshape(a.shape[0], rows, -1), a[:, :rows])
            np.testing.assert_array_equal(pb.transpose(0, 2, 1, 3).reshape(b.shape[0], -1, rows),
                                          b[:, :, :rows])
            assert not a[:, rows:].any() and not b[:, :, rows:].any()  # nothing lies past its pages
            np.testing.assert_array_equal(np.asarray(w.ranks[m])[:, s], ranks)
            np.testing.assert_array_equal(np.asarray(w.scales[m])[:, s], scales)

    # The kernels' paged reference over the pool == the reference over the slot layout.
    bgmv_ref, sgmv_ref = jax.jit(bgmv_reference), jax.jit(sgmv_reference)  # eager is slower here
    rng = np.random.default_rng(0)
    T = 12
    tok = rng.choice([-1, *[pool.slot(n) for n in names]], T).astype(np.int32)
    starts, lens = np.array([0, 3, 7, 9], np.int32), np.array([3, 4, 2, 3], np.int32)
    seg_slots = np.array([pool.slot("mixed"), pool.slot("r64"), -1, pool.slot("r8")], np.int32)
    for m, layer in (("q_proj", 0), ("v_proj", 1), ("down_proj", 1)):
        x = jnp.asarray(rng.standard_normal((T, pool.config.projection_shape(m)[0])), dtype)
        pages = (w.a[m][layer], w.b[m][layer])
        meta = (w.ranks[m][layer], w.scales[m][layer])
        ref_a, ref_b, ref_r, ref_s = slot_layout(pool, adapters, m, layer)
        want = bgmv_ref(x, ref_a, ref_b, tok, ref_r, ref_s)
        assert np.abs(np.asarray(want, np.float32)).max() > 0  # some token really has LoRA here
        np.testing.assert_array_equal(bgmv_ref(x, *pages, tok, *meta, page_table=w.page_table), want)
        np.testing.assert_array_equal(
            sgmv_ref(x, *pages, starts, lens, seg_slots, *meta, page_table=w.page_table),
            sgmv_ref(x, ref_a, ref_b, starts, lens, seg_slots, ref_r, ref_s))


def test_a_copy_moves_only_the_targeted_projections_and_stale_pages_stay_unread(make_pool, adapters):
    """r8 (MLP only) leaves its gate/up/down weights in the one page; r16_0 (attention only)
    then reuses that page and copies only q/k/v/o: its MLP pages still hold r8's weights, but
    its rank and scale there are 0, so every kernel gives exactly zero for it there."""
    pool = make_pool(1, "r8", "r16_0")
    assert pool.copy_bytes(adapters["r16_0"]) == ATTENTION_PAGE_BYTES
    assert pool.copy_bytes(adapters["r8"]) == PAGE_BYTES - ATTENTION_PAGE_BYTES
    pool.load_now("r8")
    pool.load_now("r16_0")  # evicts r8, takes its page
    w, s = pool.weights, pool.slot("r16_0")
    page = int(np.asarray(w.page_table)[s, 0])
    stale = np.asarray(w.a["down_proj"])[:, page]
    assert np.abs(stale).max() > 0  # r8's weights, never overwritten
    assert not np.asarray(w.ranks["down_proj"])[:, s].any()
    assert not np.asarray(w.scales["down_proj"])[:, s].any()
    rng = np.random.default_rng(1)
    starts, lens, slots = np.array([0], np.int32), np.array([4], np.int32), np.array([s], np.int32)
    impls = {"reference": sgmv_reference, "compact": jnp_ops.sgmv_compact,
             "blocked": jnp_ops.sgmv_blocked,
             "pallas": functools.partial(sgmv, interpret=True),
             "pallas padded": functools.partial(sgmv, interpret=True, pad_to_max_rank=True),
             "fused": functools.partial(sgmv_fused, interpret=True)}
    for m in ("down_proj", "q_proj"):
        x = jnp.asarray(rng.standard_normal((4, pool.config.projection_shape(m)[0])), jnp.float32)
        for name, op in impls.items():
            y = op(x, w.a[m][0], w.b[m][0], starts, lens, slots, w.ranks[m][0], w.scales[m][0],
                   page_table=w.page_table)
            assert (np.abs(np.asarray(y)).max() > 0) == (m == "q_proj"), (name, m)


# ---------------------------------------------------------------------------------------------
# Bytes: the budget buys pages, an adapter takes what its rank weighs
# ---------------------------------------------------------------------------------------------
def test_byte_budget_is_proportional_to_rank(make_pool, tiny_config, adapters):
    assert make_pool(1).page_bytes == PAGE_BYTES
    assert make_pool(1, dtype=jnp.bfloat16, slack_bytes=PAGE_BYTES).page_bytes == PAGE_BYTES // 2
    # Budget: 10 pages + 1000 bytes (less than a page: buys nothing) -> 10 pages.
    # r64 takes ceil(64 / 16) = 4 pages, each rank-16 adapter 1: r64 + 6 rank-16 = 4 + 6 = 10,
    # exactly full. (Slots padded to r_max = 64 would hold 10 // 4 = 2 adapters in these bytes.)
    names = ["r64"] + [f"r16_{i}" for i in range(7)]
    pool = make_pool(10, *names, slack_bytes=1000)
    assert pool.stats()["pages_total"] == 10
    pool.load_now("r64")
    assert pool.stats()["device_bytes_used"] == 4 * PAGE_BYTES
    for name in names[1:7]:
        pool.load_now(name)
    st = pool.stats()
    assert st["pages_free"] == 0 and st["device_bytes_used"] == 10 * PAGE_BYTES
    assert sorted(st["on_device"]) == sorted(names[:7]) and pool.where("r16_6") == "host"
    assert st["adapters"] == 8 and st["host_adapters"] == 8 and st["disk_only"] == 0
    # The 7th rank-16 adapter needs one page: the least recently used (r64) goes, freeing 4.
    pool.load_now("r16_6")
    st = pool.stats()
    assert pool.where("r64") == "host" and st["pages_free"] == 3
    assert st["device_bytes_used"] == 7 * PAGE_BYTES
    # one host copy each: the staged pages of the projections it targets (+ ranks and scales)
    assert st["host_bytes_used"] == sum(pool.host_bytes(pool.adapter(n)) for n in names)
    assert pool.host_bytes(adapters["r16_0"]) == ATTENTION_PAGE_BYTES + META_BYTES


# ---------------------------------------------------------------------------------------------
# Eviction: least recently used first; pinned and in-use adapters never
# ---------------------------------------------------------------------------------------------
def test_lru_eviction_respects_pins_and_references(make_pool):
    a, b, c, d, e = (f"r16_{i}" for i in range(5))
    pool = make_pool(3, a, b, c, d, e)  # 3 one-page adapters fill it
    for name in (a, b, c):
        pool.load_now(name)
    pool.touch(a)  # LRU order now b, c, a
    pool.load_now(d)
    assert pool.where(b) == "host"  # b was least recently used
    pool.load_now(e)
    assert pool.where(c) == "host"  # then c
    pool.pin(a)
    pool.acquire(d)  # resident: a (pinned), d (in use), e
    pool.load_now(b)
    assert pool.where(e) == "host"  # the only evictable one
    assert pool.stats()["on_device"] == [a, b, d]
    pool.acquire(b)  # now a pinned, b and d in use: nothing can go
    before = pool.stats()
    assert pool.prefetch(c) is False
    with pytest.raises(PoolFullError):
        pool.load_now(c)
    assert pool.stats() == before  # a failed prefetch evicts nothing
    pool.release(d)
    assert pool.prefetch(c) is True and pool.where(d) == "host"
    with pytest.raises(ValueError, match="released more often"):
        pool.release(d)


def test_wanted_adapters_are_not_evicted_until_unwanted(make_pool):
    """A queued request's adapter, copied before it is admitted, stays resident while other
    requests' copies look for room; once unwanted it is the LRU victim like any other."""
    a, b, c = "r16_0", "r16_1", "r16_2"
    pool = make_pool(2, a, b, c)
    pool.load_now(a)
    pool.want(a)
    pool.load_now(b)  # room for two: nothing evicted
    pool.touch(b)
    assert pool.prefetch(c) is True and pool.where(b) == "host"  # b went, not the older a
    assert pool.stats()["wanted"] == {a: 1}
    pool.load_now(c)
    pool.acquire(c)
    assert pool.prefetch(b) is False  # a wanted, c in use: no room, nothing evicted
    pool.unwant(a)
    pool.unwant(a)  # one too many: ignored (the request may have ended twice over)
    assert pool.prefetch(b) is True and pool.where(a) == "host"
    assert pool.stats()["wanted"] == {}


def test_prefetch_here_stages_on_the_calling_thread(make_pool):
    """No hand-off to the loader: the copy is staged when prefetch returns, so the next poll
    installs it (no emulated link: no deadline to wait for)."""
    pool = make_pool(4, "r16_0", "r64")
    pool.load_now("r16_0")  # compiles a one-page install
    assert pool.prefetch("r64", here=True)
    job = pool._table.entries["r64"].load
    assert job.done.is_set() and job.staged is not None
    jax.block_until_ready(job.staged[0])
    assert pool.poll() == ["r64"] and pool.where("r64") == "device"


def test_failed_prefetch_evicts_nothing(make_pool):
    # 4 pages: r16_0 pinned, r16_1 in use, r16_2 and r16_3 evictable. r64 needs 4 pages, but
    # evicting both evictable ones frees only 2: no room, and both stay resident.
    pool = make_pool(4, "r16_0", "r16_1", "r16_2", "r16_3", "r64")
    for i in range(4):
        pool.load_now(f"r16_{i}")
    pool.pin("r16_0")
    pool.acquire("r16_1")
    assert pool.prefetch("r64") is False
    assert sorted(pool.stats()["on_device"]) == [f"r16_{i}" for i in range(4)]
    pool.unpin("r16_0")
    pool.release("r16_1")
    assert pool.load_now("r64") >= 0 and pool.stats()["on_device"] == ["r64"]


def test_slots_bound_residency_too(make_pool):
    # Plenty of pages but two page-table rows: the third adapter evicts the LRU one.
    pool = make_pool(8, "r16_0", "r16_1", "r8", max_slots=2)
    pool.load_now("r16_0")
    pool.load_now("r16_1")
    pool.load_now("r8")
    st = pool.stats()
    assert st["on_device"] == ["r16_1", "r8"] and st["slots_free"] == 0 and st["pages_free"] == 6
    assert pool.slot("r8") == 0  # r16_0's row, reused


# ---------------------------------------------------------------------------------------------
# Asynchronous copies over the emulated link
# ---------------------------------------------------------------------------------------------
def poll_until(pool: AdapterPool, names: set[str], t0: float, timeout: float = 5.0) -> dict[str, float]:
    """Poll like the engine's step loop; when (seconds after t0) each name became resident."""
    seen: dict[str, float] = {}
    while set(seen) != names and time.monotonic() - t0 < timeout:
        for name in pool.poll():
            seen[name] = time.monotonic() - t0
        time.sleep(0.002)
    return seen


def test_prefetch_is_asynchronous_over_the_emulated_link(make_pool):
    pool = make_pool(4, "r16_0", "r16_1", "r16_2", "r16_3", **LINK)
    pool.load_now("r16_3")  # compiles the install of one page, outside the timed part
    t0 = time.monotonic()
    assert pool.prefetch("r16_0") and pool.prefetch("r16_1")  # r16_1 queues behind on the link
    assert pool.prefetch("r16_0")  # already loading: a no-op
    assert pool.where("r16_0") == "loading" and pool.slot("r16_0") is None
    assert pool.poll() == []  # far before the first deadline (0.107 s)
    st = pool.stats()
    assert st["loading"] == ["r16_0", "r16_1"]
    assert st["device_bytes_used"] == 3 * PAGE_BYTES  # reserved pages count
    seen = poll_until(pool, {"r16_0", "r16_1"}, t0)
    # poll never installs before a deadline: one copy, then the second after it on the link.
    assert ONE_PAGE_COPY_S <= seen["r16_0"] < ONE_PAGE_COPY_S + 1.0
    assert 2 * ONE_PAGE_COPY_S <= seen["r16_1"] < 2 * ONE_PAGE_COPY_S + 1.0
    assert pool.where("r16_0") == "device" and pool.slot("r16_0") is not None

    # Sleep just past the deadline, then one poll installs it.
    pool.unregister("r16_3")
    assert pool.prefetch("r16_2") and pool.poll() == []
    time.sleep(ONE_PAGE_COPY_S + 0.05)
    assert pool.poll() == ["r16_2"]


def test_load_now_blocks_for_the_emulated_copy(make_pool):
    pool = make_pool(6, "r16_0", "r64", **LINK)
    blocked = pool.load_now("r16_0")
    assert ONE_PAGE_COPY_S <= blocked < ONE_PAGE_COPY_S + 10.0  # + the first install's compile
    assert pool.where("r16_0") == "device"
    assert pool.load_now("r16_0") < 0.01  # resident: nothing to wait for
    # r64: 4 pages = 524288 bytes -> 0.524288 s + 0.05 s.
    blocked = pool.load_now("r64")
    assert 0.574288 <= blocked < 0.574288 + 10.0  # (upper bound: only that it ends; CI is noisy)


# ---------------------------------------------------------------------------------------------
# load_all, register / unregister errors, close
# ---------------------------------------------------------------------------------------------
def test_load_all_reports_bytes_needed_against_the_budget(make_pool):
    # r64 (4 pages) + two rank-16 (1 each) = 6 pages = 786432 bytes; the budget holds 5 = 655360.
    pool = make_pool(5, "r64", "r16_0", "r16_1")
    with pytest.raises(AdapterError, match=r"6 pages = 786432 bytes.*5 pages = 655360 bytes"):
        pool.load_all()
    assert pool.stats()["on_device"] == [] and pool.stats()["pages_free"] == 5
    pool.unregister("r16_1")
    pool.load_all()
    st = pool.stats()
    assert st["on_device"] == ["r64", "r16_0"] and st["pages_free"] == 0


def test_register_errors_leave_the_pool_unchanged(make_pool, adapters):
    nbytes = ATTENTION_PAGE_BYTES + META_BYTES  # its host copy
    r8 = PAGE_BYTES - ATTENTION_PAGE_BYTES + META_BYTES
    pool = make_pool(4, max_lora_rank=32, host_budget_bytes=nbytes + r8 - 1)
    pool.register(adapters["r16_0"])
    before = pool.stats()
    assert before["host_bytes_used"] == nbytes
    with pytest.raises(AdapterError, match="rank 64.*max_lora_rank is 32"):
        pool.register(adapters["r64"])
    with pytest.raises(AdapterError, match="already registered"):
        pool.register(adapters["r16_0"])
    with pytest.raises(AdapterError, match="host memory"):
        pool.register(adapters["r8"])  # one byte over the host budget
    assert pool.stats() == before
    with pytest.raises(AdapterError, match="unknown adapter"):
        pool.where("r8")


def test_unregister_frees_pages(make_pool):
    pool = make_pool(6, "r16_0", "r64")
    pool.load_all()
    assert pool.stats()["pages_free"] == 1
    pool.acquire("r64")
    with pytest.raises(AdapterError, match="in use"):
        pool.unregister("r64")
    pool.release("r64")
    pool.unregister("r64")
    st = pool.stats()
    assert st["pages_free"] == 5 and st["device_bytes_used"] == PAGE_BYTES
    assert st["host_bytes_used"] == pool.host_bytes(pool.adapter("r16_0"))
    with pytest.raises(AdapterError, match="unknown adapter"):
        pool.where("r64")


def test_unregister_while_loading_cancels_the_copy(make_pool):
    pool = make_pool(4, "r64", **LINK)
    assert pool.prefetch("r64") and pool.stats()["pages_free"] == 0
    pool.unregister("r64")
    assert pool.stats()["pages_free"] == 4 and pool.stats()["loading"] == []
    time.sleep(0.6)  # past its 0.57 s deadline: the staged copy is dropped, never installed
    assert pool.poll() == []
    assert all(not np.asarray(pool.weights.a[m]).any() for m in TARGET_MODULES)


def test_close_stops_the_loader(make_pool):
    pool = make_pool(2, "r16_0", "r16_1", **LINK)
    pool.load_now("r16_0")
    assert pool.prefetch("r16_1")
    pool.close()
    assert not pool.link.thread.is_alive()
    assert pool.where("r16_1") == "host"  # the copy in flight was dropped
    assert pool.where("r16_0") == "device" and pool.stats()["pages_free"] == 1
    with pytest.raises(RuntimeError, match="closed"):
        pool.prefetch("r16_1")
    pool.close()  # idempotent
