"""The engine lock is not held across the wait for a step's tokens (issue 24, item 5).

Specification: while a step runs on the device and the engine's thread waits for its tokens,
`submit`, `cancel` and `stats` called from another thread return at once (median < 5 ms), and
what they did still holds when the tokens land: a request submitted meanwhile gets the same
greedy tokens as alone, and one cancelled meanwhile, even one whose step is in flight, ends
"cancelled" with every KV page back. Steps still never overlap: a second caller of `step()`
waits for the step in flight.

The slow step: the runner's `wait`, the engine's one sync with the device, is held until the
test lets it go, and then does the real wait. It is handed the step's tokens as a device array
(checked), so holding it holds exactly the engine's wait for the device.
"""

from __future__ import annotations

import statistics
import threading
import time

import jax
import numpy as np
import pytest

import carajax
from carajax.config import EngineConfig, ModelConfig
from carajax.engine.engine import Engine
from carajax.models import weights

CFG = ModelConfig.from_name("llama-test")
GREEDY = carajax.SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
LONG = carajax.SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=())
HOLD_S = 5.0  # the longest a held wait blocks: a call stuck behind the step would take this long
FAST_S = 5e-3  # the median latency each call must beat while the step is held
PAGES = 64


def _engine(async_scheduling: bool, background: bool = True) -> Engine:
    model = weights.random_model(CFG, seed=0, init_std=0.1)  # peaked logits: no greedy ties
    config = EngineConfig(max_batch_size=4, max_seq_len=64, prefill_chunk=8, max_step_tokens=32,
                          cold_start="cached", async_scheduling=async_scheduling,
                          kv_cache_bytes=PAGES * 16 * CFG.kv_bytes_per_token(4))
    return Engine(model, None, config, background=background)


def _prompt(seed: int, n: int) -> list[int]:
    return [2, *np.random.default_rng(seed).integers(4, 250, n - 1).tolist()]


class HeldWait:
    """Stands in for `engine.runner.wait`: while held, the engine's wait for a step's tokens
    blocks (up to HOLD_S) before doing the real wait. `entered`: the engine's thread is inside
    a held wait; `left`: a held wait has returned."""

    def __init__(self, engine: Engine):
        self._real = engine.runner.wait
        self._free = threading.Event()
        self._free.set()
        self.entered = threading.Event()
        self.left = threading.Event()
        self.got_device_arrays: list[bool] = []

    def __call__(self, tokens):
        self.got_device_arrays.append(isinstance(tokens, jax.Array))
        if not self._free.is_set():
            self.entered.set()
            self._free.wait(HOLD_S)
            out = self._real(tokens)
            self.left.set()
            return out
        return self._real(tokens)

    def hold(self) -> None:
        self.entered.clear()
        self.left.clear()
        self._free.clear()

    def release(self) -> None:
        self._free.set()


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_submit_cancel_and_stats_return_at_once_while_a_step_waits_for_the_device(
        async_scheduling, monkeypatch):
    with _engine(async_scheduling) as engine:
        held = HeldWait(engine)
        monkeypatch.setattr(engine.runner, "wait", held)
        prompt = _prompt(1, 11)
        alone = engine.generate([prompt], sampling=GREEDY)[0].token_ids

        held.hold()
        running = engine.submit(_prompt(2, 13), sampling=LONG)
        assert held.entered.wait(30), "the engine never waited for a step's tokens"

        # The engine's thread is now blocked on the device, its step in flight.
        submitted, submit_s = zip(*(_timed(engine.submit, prompt, sampling=GREEDY)
                                    for _ in range(5)))
        stats, stats_s = zip(*(_timed(engine.stats) for _ in range(5)))
        # The queued ones, then the running one: its step is on the device right now.
        cancelled, cancel_s = zip(*(_timed(engine.cancel, h.request_id)
                                    for h in (*submitted[1:], running)))
        in_flight = not held.left.is_set()
        held.release()

        for name, times in (("submit", submit_s), ("stats", stats_s), ("cancel", cancel_s)):
            ms = [round(1e3 * t, 3) for t in times]
            assert statistics.median(times) < FAST_S, f"{name} waited for the step: {ms} ms"
            assert max(times) < HOLD_S / 5, f"{name} waited for the step: {ms} ms"
        assert in_flight, "the step finished during the measurement"
        assert all(cancelled)
        assert stats[-1]["waiting"] == 5 and [r["request_id"] for r in stats[-1]["running"]] == [
            running.request_id]

        assert submitted[0].result(timeout=60).token_ids == alone
        out = running.result(timeout=60)
        assert out.finish_reason == "cancelled" and len(out.token_ids) < LONG.max_tokens
        for h in submitted[1:]:
            gone = h.result(timeout=0)
            assert gone.finish_reason == "cancelled" and gone.token_ids == []
        deadline = time.monotonic() + 30
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        s = engine.stats()
        assert s["running"] == [] and s["waiting"] == 0
        assert s["kv_cache"]["pages_free"] == s["kv_cache"]["pages_total"]
        assert held.got_device_arrays and all(held.got_device_arrays)


def test_a_second_caller_of_step_waits_for_the_step_in_flight(monkeypatch):
    with _engine(async_scheduling=False, background=False) as engine:
        held = HeldWait(engine)
        monkeypatch.setattr(engine.runner, "wait", held)
        prompt = _prompt(3, 9)
        alone = engine.generate([prompt], sampling=GREEDY)[0].token_ids

        handle = engine.submit(prompt, sampling=GREEDY)
        steps = engine.stats()["steps"]
        held.hold()
        first = threading.Thread(target=engine.step)
        first.start()
        assert held.entered.wait(30)
        second_done = threading.Event()
        second = threading.Thread(target=lambda: (engine.step(), second_done.set()))
        second.start()
        assert not second_done.wait(0.3), "two steps ran at once"
        assert engine.stats()["steps"] == steps  # (and the engine lock is free meanwhile)
        held.release()
        first.join(30)
        assert second_done.wait(30)
        second.join(30)
        while engine.step():
            pass
        assert handle.result(timeout=0).token_ids == alone
