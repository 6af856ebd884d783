"""Cold starts beyond CPU assist: `async` (the cold request waits in the queue while its copy runs;
the batch goes on) and `auto` (per request, CPU assist iff the host finishes its prompt's LoRA
before the copy would land), with the predictions behind each choice and the copies' real times.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import carajax
from carajax.config import TARGET_MODULES, EngineConfig, ModelConfig
from carajax.engine import planner
from carajax.engine.cold_start import HostLoraCost, HostPath
from carajax.lora.adapter import LoraAdapter, LoraModule
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.testing import write_random_adapter

CFG = ModelConfig.from_name("llama-test")
GREEDY = carajax.SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
COLD_PROMPT = [2, *range(40, 80)]  # 41 tokens
WARM_PROMPT = [2, *range(100, 110)]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cold-adapters")
    return {name: write_random_adapter(root / name, CFG, rank=r, seed=i)
            for i, (name, r) in enumerate([("warm", 16), ("cold", 64)])}


def _engine(adapter_dirs, **kw) -> carajax.Engine:
    model = weights.random_model(CFG, seed=0, init_std=0.1)
    engine = carajax.Engine(model, ByteTokenizer(),
                            EngineConfig(max_batch_size=4, prefill_chunk=16, max_step_tokens=32,
                                         max_prefill_tokens=32, **kw), background=False)
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def reference(adapter_dirs):
    with _engine(adapter_dirs, cold_start="cached") as e:
        return [o.token_ids for o in e.generate([WARM_PROMPT, COLD_PROMPT],
                                                adapters=["warm", "cold"], sampling=GREEDY)]


def _drain(handle):
    """The tokens a handle has streamed so far (without waiting for more)."""
    seen = getattr(handle, "_seen", [])
    while not handle._tokens.empty():
        item = handle._tokens.get()
        if isinstance(item, int):
            seen.append(item)
    handle._seen = seen
    return seen


def test_async_cold_request_waits_in_the_queue_while_the_batch_goes_on(adapter_dirs, reference):
    """A 1 s copy: the warm request decodes meanwhile; the cold one is not admitted until its
    adapter is resident, then runs on the device only (no CPU tokens)."""
    with _engine(adapter_dirs, cold_start="async", emulated_link_gbps=1.0,
                 emulated_link_latency_ms=1000) as e:
        e.warmup()  # no compiles inside the copy's second
        e.pool.load_now("warm")
        warm = e.submit(WARM_PROMPT, adapter="warm", sampling=GREEDY)
        cold = e.submit(COLD_PROMPT, adapter="cold", sampling=GREEDY)
        e.step()
        assert e.pool.where("cold") == "loading"  # its copy started at once
        assert [r["request_id"] for r in e.stats()["running"]] == [warm.request_id]
        produced_while_copying = 0
        while e.step():
            if e.pool.where("cold") == "loading":
                assert cold.request_id not in [r["request_id"] for r in e.stats()["running"]]
                produced_while_copying = len(list(_drain(warm)))
        outs = [warm.result(), cold.result()]
    assert [o.token_ids for o in outs] == reference
    assert produced_while_copying >= 1  # the batch went on during the copy
    m = outs[1].metrics
    assert m.cold_start and m.cold_path == "async" and m.cpu_prefill_tokens == 0
    assert m.ttft_s >= 1.0
    assert e.stats()["cold_paths"] == {"async": 1}


@pytest.mark.parametrize("policy", ["async", "auto", "cpu_assist"])
def test_the_copy_starts_at_submit_and_its_claim_ends_with_the_request(adapter_dirs, policy):
    """Before any step runs the cold adapter is already on the link, and `want`ed so that other
    copies do not evict it while its request queues; admission (or a cancel, or a refused
    submit) drops the claim."""
    with _engine(adapter_dirs, cold_start=policy, emulated_link_gbps=1.0,
                 emulated_link_latency_ms=300, max_queue=2) as e:
        cold = e.submit(COLD_PROMPT, adapter="cold", sampling=GREEDY)
        assert e.pool.where("cold") == "loading"  # no step has run yet
        assert e.pool.stats()["wanted"] == {"cold": 1}
        # (auto on this host-only device: the copy, never CPU assist)
        assert e.stats()["cold_paths"] == {"cpu_assist" if policy == "cpu_assist" else "async": 1}
        with pytest.raises(carajax.QueueFullError):
            e.generate([COLD_PROMPT, COLD_PROMPT], adapters=["cold", "cold"], sampling=GREEDY)
        assert e.pool.stats()["wanted"] == {"cold": 1}  # the refused two released theirs
        second = e.submit(COLD_PROMPT, adapter="cold", sampling=GREEDY)
        assert e.pool.stats()["wanted"] == {"cold": 2}
        assert e.cancel(second.request_id)
        assert e.pool.stats()["wanted"] == {"cold": 1}
        while e.step():
            pass
        assert cold.result().metrics.cold_start and e.pool.stats()["wanted"] == {}


@pytest.mark.parametrize("latency_ms,path", [(2000, "cpu_assist"), (0, "async")])
def test_auto_takes_cpu_assist_only_when_the_copy_is_slower(adapter_dirs, reference, latency_ms,
                                                             path):
    """As if the device were separate (`auto_cpu_assist_on_host`): a 2 s copy: the host's LoRA
    for 41 tokens (well under a second, measured on the engine's own CPU-assisted step) wins, the
    request starts on the CPU path. A copy at 1000 GB/s with no latency: waiting for it wins."""
    with _engine(adapter_dirs, cold_start="auto", emulated_link_gbps=1000.0,
                 emulated_link_latency_ms=latency_ms, auto_cpu_assist_on_host=True) as e:
        e.pool.load_now("warm")
        outs = e.generate([WARM_PROMPT, COLD_PROMPT], adapters=["warm", "cold"], sampling=GREEDY)
        stats = e.stats()
    assert [o.token_ids for o in outs] == reference
    m = outs[1].metrics
    assert m.cold_path == path and stats["cold_paths"] == {path: 1}
    assert m.predicted_copy_s == pytest.approx(latency_ms / 1e3 + 64 * 4 * 2 * 2 * 64 * 4 / 1e12,
                                               rel=0.05, abs=1e-3)
    assert 0 < m.predicted_cpu_s < 1.0
    assert (m.cpu_prefill_tokens > 0) == (path == "cpu_assist")
    assert outs[0].metrics.cold_path is None  # warm: no choice to make


def _adapter(rank: int, d: int = 64, layers: int = 2) -> LoraAdapter:
    z = np.zeros
    return LoraAdapter("x", "<mem>", {(i, m): LoraModule(z((rank, d), np.float32),
                                                         z((d, rank), np.float32), 1.0)
                                      for i in range(layers) for m in TARGET_MODULES[:4]})


def test_choice_compares_the_host_path_time_with_the_copy_time():
    cost = HostLoraCost(seconds_per_mac=1e-9, step_fixed_s=2e-4, chunk=16)
    adapter = _adapter(8)  # 2 layers x 4 projections x 8 x (64 + 64) = 8192 MACs per token
    # 32 tokens: 262,144 MACs = 0.262 ms, + 2 chunk steps x 0.2 ms of fixed cost = 0.662 ms.
    assert cost.prefill_seconds(adapter, 32) == pytest.approx(0.662144e-3)
    path = HostPath(cost, host_only=False)
    assert path.choose(adapter, 32, copy_s=1e-3).path == "cpu_assist"
    assert path.choose(adapter, 32, copy_s=0.5e-3).path == "async"
    # A rank-64 adapter costs 8x the MACs: the same copy is no longer worth beating.
    assert path.choose(_adapter(64), 32, copy_s=1e-3).path == "async"
    # A host-only device never assists, however slow the copy.
    host_only = HostPath(cost, host_only=True).choose(adapter, 32, copy_s=100.0)
    assert host_only.path == "async" and host_only.cpu_s == float("inf")


def test_live_steps_refine_the_seconds_per_mac():
    path = HostPath(HostLoraCost(seconds_per_mac=1e-9, step_fixed_s=1e-4, chunk=16),
                    host_only=False)
    for _ in range(40):  # the host turns out 3x slower than measured
        path.observe(host_s=3e-9 * 1_000_000, macs=1_000_000)
    assert path.cost.seconds_per_mac == pytest.approx(3e-9, rel=1e-3)
    assert path.observations == 40
    path.observe(host_s=1.0, macs=0)  # nothing computed: nothing learnt
    assert path.observations == 40


def test_auto_on_a_host_only_device_waits_for_the_copy(adapter_dirs, reference):
    """On this CPU backend the "device" is the host: a 2 s copy still beats CPU assist there
    (the host's LoRA would take the step's own cores), so `auto` takes async, measures nothing,
    compiles no CPU-assist variant, and says so in its stats."""
    with _engine(adapter_dirs, cold_start="auto", emulated_link_gbps=1000.0,
                 emulated_link_latency_ms=300) as e:
        assert not e.uses_cpu_assist
        e.pool.load_now("warm")
        outs = e.generate([WARM_PROMPT, COLD_PROMPT], adapters=["warm", "cold"], sampling=GREEDY)
        stats = e.stats()
    assert [o.token_ids for o in outs] == reference
    assert outs[1].metrics.cold_path == "async" and outs[1].metrics.cpu_prefill_tokens == 0
    assert stats["auto_host_path"]["host_only"] is True
    assert "never picks cpu_assist" in stats["auto_host_path"]["note"]
    assert stats["cpu_assist"].calls == 0


@pytest.mark.parametrize("fraction", [0.0, 1e3])
def test_auto_lets_the_step_wait_for_a_copy_about_to_land(adapter_dirs, reference, monkeypatch,
                                                          fraction):
    """Under `auto` on this host (the copy path), a queued cold request joins the batch once its
    copy's time left is within JOIN_LANDING_FRACTION of a recent step, and the step waits for the
    copy. Whether a step's check falls in that window is timing, so the two ends are asserted: a
    window of 0 never joins (the warm row never stalls; the cold one starts after its copy), one
    of 1,000 steps joins at the first check with a step time known (the step then waits out the
    rest of the 300 ms copy). Tokens are `cached`'s either way."""
    monkeypatch.setattr(planner, "JOIN_LANDING_FRACTION", fraction)
    long = carajax.SamplingParams(max_tokens=400, temperature=0.0, stop_token_ids=())
    with _engine(adapter_dirs, cold_start="auto", emulated_link_gbps=1.0,
                 emulated_link_latency_ms=300) as e:
        e.warmup()
        e.pool.load_now("warm")
        warm = e.submit(WARM_PROMPT, adapter="warm", sampling=long)
        cold = e.submit(COLD_PROMPT, adapter="cold", sampling=GREEDY)
        while not cold.done and e.step():
            pass
        out = cold.result()
        joined = e.stats()["auto_joined_on_landing"]
        warm.cancel()
        while e.step():
            pass
    assert out.token_ids == reference[1]
    assert out.metrics.cold_path == "async" and out.metrics.cpu_prefill_tokens == 0
    assert out.metrics.ttft_s >= 0.3  # it waited for its copy either way
    assert warm.result().token_ids[:8] == reference[0]
    stalled = warm.result().metrics.stalled_s
    if fraction == 0.0:
        assert joined == 0 and stalled == 0.0
    else:
        assert joined == 1 and stalled >= 0.15  # most of the copy, waited inside a step


def test_auto_measures_the_host_path_on_its_own_step_and_refines_it(adapter_dirs):
    """Off a host-only device, the host path's costs come from the engine's CPU-assisted step
    (a chunk with no cold row over the plain step: the callbacks' fixed cost; every row cold
    at two ranks: seconds per MAC), and each CPU-assisted step refines them."""
    with _engine(adapter_dirs, cold_start="auto", emulated_link_gbps=1000.0,
                 emulated_link_latency_ms=2000, auto_cpu_assist_on_host=True) as e:
        measured = e.host_path.cost
        assert measured.step_fixed_s > 0 and 0 < measured.seconds_per_mac < 1e-6
        assert measured.chunk == 16
        out = e.generate([COLD_PROMPT], adapters=["cold"], sampling=GREEDY)[0]
        stats = e.stats()["auto_host_path"]
    assert out.metrics.cold_path == "cpu_assist" and out.metrics.cpu_prefill_tokens > 0
    assert stats["host_only"] is False and stats["observations"] >= 1


def test_pool_predicts_copies_from_the_link_and_they_take_that_long(adapter_dirs):
    """The prediction (latency + bytes / bandwidth, behind the copies already on the link)
    against the copies' real times, by this test's own clock: submit both, poll until each is
    resident."""
    with _engine(adapter_dirs, cold_start="async", emulated_link_gbps=0.5,
                 emulated_link_latency_ms=50) as e:
        pool = e.pool
        pool.warmup()  # the installs' compiles, not part of a copy
        # rank 64 = 4 pages of 16 rows, of which only q/k/v/o (448 of 1024 columns) are copied
        nbytes = pool.stats()["page_bytes"] * 4 * 448 // 1024
        one = 0.05 + nbytes / 0.5e9
        assert pool.copy_seconds("cold") == pytest.approx(one, rel=1e-3)
        t0 = time.monotonic()
        pool.prefetch("warm", here=True)  # on the link first: "cold" queues behind it
        pool.prefetch("cold", here=True)
        predicted = {"warm": pool.copy_seconds("warm") + (time.monotonic() - t0),
                     "cold": pool.copy_seconds("cold") + (time.monotonic() - t0)}
        real = {}
        while len(real) < 2:
            for name in pool.poll():
                real[name] = time.monotonic() - t0
            time.sleep(1e-3)
    warm_one = 0.05 + pool.stats()["page_bytes"] * 448 // 1024 / 0.5e9
    assert predicted["cold"] == pytest.approx(warm_one + one, abs=0.02)  # queued behind warm
    for name in ("warm", "cold"):
        # never early; late by at most a poll and a loaded machine's scheduling delay
        assert predicted[name] - 0.005 <= real[name] <= predicted[name] + 0.1, (name, real)


def test_an_adapter_added_after_warmup_never_compiles_inside_a_step(adapter_dirs, tmp_path):
    """Installs compile per (targeted projections, page count): a served engine compiles a new
    adapter's variant when it is added, so its first copy installs without compiling."""
    from carajax.lora import pages
    with _engine(adapter_dirs, cold_start="async") as e:
        e.warmup()
        path = write_random_adapter(tmp_path / "mlp", CFG, rank=8, seed=5,
                                    target_modules=("gate_proj", "up_proj", "down_proj"))
        e.add_adapter("mlp", path)
        variants = pages.install_flat._cache_size()
        e.pool.load_now("mlp")
        assert pages.install_flat._cache_size() == variants
        assert e.pool.where("mlp") == "device"
