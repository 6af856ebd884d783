"""Trace parsing (JSONL and the Azure CSV, malformed lines), windows, scaling, clipping, Zipf
adapters, determinism; the simulator's workloads come from the same module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from carajax import trace as T
from carajax.sched import simulator
from carajax.trace import TraceError, TraceOptions, TraceRequest

DATA = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure_llm_2023"
CSV_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_jsonl_fields_optional_adapter_and_sorting(tmp_path):
    path = _write(tmp_path, "t.jsonl", "\n".join([
        json.dumps({"arrival_s": 2.5, "prompt_tokens": 7, "output_tokens": 3}),
        "",  # blank lines are not requests
        json.dumps({"arrival_s": 1.0, "prompt_tokens": 5.0, "output_tokens": 0, "adapter": "legal",
                    "rank": 32}),
        json.dumps({"arrival_s": 2.5, "prompt_tokens": 9, "output_tokens": 4, "adapter": "x"}),
    ]) + "\n")
    tr = T.read_trace(path)
    assert tr.format == "jsonl" and tr.skipped == 0
    # Sorted by arrival, ties in file order; an adapter without a rank gets 8, none gets ("", 0).
    assert tr.requests == (TraceRequest(1.0, 5, 0, "legal", 32), TraceRequest(2.5, 7, 3),
                           TraceRequest(2.5, 9, 4, "x", 8))


@pytest.mark.parametrize("bad, why", [
    ('{"arrival_s": 1.0, "prompt_tokens": 5', "Expecting"),            # truncated JSON
    ('{"arrival_s": 1.0, "prompt_tokens": 5}', "missing field"),        # no output_tokens
    ('{"arrival_s": "soon", "prompt_tokens": 5, "output_tokens": 1}', "arrival_s"),
    ('{"arrival_s": 1.0, "prompt_tokens": -5, "output_tokens": 1}', "prompt_tokens"),
    ('{"arrival_s": 1.0, "prompt_tokens": 5, "output_tokens": 2.5}', "output_tokens"),
    ('{"arrival_s": NaN, "prompt_tokens": 5, "output_tokens": 1}', "finite"),
    ('[1, 2, 3]', "JSON object"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad, why):
    good = json.dumps({"arrival_s": 0.0, "prompt_tokens": 3, "output_tokens": 2})
    path = _write(tmp_path, "bad.jsonl", "\n".join([good, good, bad, good]) + "\n")
    with pytest.raises(TraceError, match=why) as e:
        T.read_trace(path)
    assert e.value.line == 3 and e.value.path == path
    assert str(e.value).startswith(f"{path}:3: ")
    tr = T.read_trace(path, skip_bad=True)  # skipped and counted instead
    assert len(tr.requests) == 3 and tr.skipped == 1 and tr.skipped_lines == (3,)


def test_azure_csv_parses_timestamps_and_malformed_rows(tmp_path):
    path = _write(tmp_path, "t.csv", CSV_HEAD + "\n".join([
        "2023-11-16 18:15:50.9951690,396,109",
        "2023-11-16 18:15:46.6805900,374,44",   # earliest: arrival 0
        "2023-11-16 18:15:46.6805900,oops,44",  # line 4
        "2023-11-16 18:16:46.6805901,10,1",
        "2023-11-16 18:16:47,11",               # line 6: two fields
        "yesterday,1,1",                        # line 7: not a timestamp
    ]) + "\n")
    with pytest.raises(TraceError, match="ContextTokens") as e:
        T.read_trace(path)
    assert e.value.line == 4
    tr = T.read_trace(path, skip_bad=True)
    assert tr.format == "azure_csv" and tr.skipped == 3 and tr.skipped_lines == (4, 6, 7)
    # 18:15:50.9951690 - 18:15:46.6805900 = 4.314579 s; the 7th fractional digit survives.
    assert [r.arrival_s for r in tr.requests] == pytest.approx([0.0, 4.314579, 60.0000001], abs=1e-9)
    assert [(r.prompt_tokens, r.output_tokens) for r in tr.requests] == [(374, 44), (396, 109), (10, 1)]


def test_azure_csv_needs_its_header(tmp_path):
    path = _write(tmp_path, "t.csv", "time,prompt,output\n2023-11-16 18:15:50,1,1\n")
    with pytest.raises(TraceError, match="header") as e:
        T.read_trace(path, skip_bad=True)  # nothing else could be read: never skipped
    assert e.value.line == 1


def test_shipped_csv_and_jsonl_agree():
    for kind in ("conv", "code"):
        csv_ = T.read_trace(DATA / f"AzureLLMInferenceTrace_{kind}.csv").requests
        jsonl = T.read_trace(DATA / f"azure2023_{kind}.jsonl").requests
        assert len(csv_) == len(jsonl) > 8000
        assert np.allclose([r.arrival_s for r in csv_], [r.arrival_s for r in jsonl], atol=1e-6)
        assert [(r.prompt_tokens, r.output_tokens) for r in csv_] == \
            [(r.prompt_tokens, r.output_tokens) for r in jsonl]


def test_window_scale_clip():
    reqs = [TraceRequest(10.0 + i, 100 * (i + 1), 50 * (i + 1)) for i in range(6)]
    win = T.time_window(reqs, start_s=1.0, duration_s=3.0)  # [11, 14) -> re-based to 0
    assert [r.arrival_s for r in win] == [0.0, 1.0, 2.0]
    assert T.time_window(reqs, 1.0, 3.0, max_requests=2) == win[:2]
    assert [r.arrival_s for r in T.scale_time(win, 4.0)] == [0.0, 0.25, 0.5]  # 4x the rate
    with pytest.raises(ValueError):
        T.scale_time(win, 0.0)
    clipped, n = T.clip_lengths(reqs, context_len=400, max_prompt=250, max_output=120)
    # (100, 50) fits; (200, 100) fits; (300 -> 250, 150 -> 120) = 370 fits; then 250 + 120 fits.
    assert [(r.prompt_tokens, r.output_tokens) for r in clipped[:3]] == [(100, 50), (200, 100), (250, 120)]
    assert all(r.prompt_tokens + r.output_tokens <= 400 for r in clipped) and n == 4
    # The prompt gives way first; outputs keep their length while they fit the context.
    tight, _ = T.clip_lengths([TraceRequest(0.0, 900, 300), TraceRequest(0.0, 0, 5000)], context_len=1024)
    assert [(r.prompt_tokens, r.output_tokens) for r in tight] == [(724, 300), (1, 1023)]


def test_zipf_share_of_the_top_adapter():
    n_adapters, s, n = 128, 1.8, 40_000
    p = T.zipf_probabilities(n_adapters, s)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    assert p[1] / p[0] == pytest.approx(2 ** -s)
    reqs = [TraceRequest(float(i), 10, 10) for i in range(n)]
    out = T.with_adapters(reqs, n_adapters, s, seed=3)
    counts = {f"a{k}": 0 for k in range(n_adapters)}
    for r in out:
        counts[r.adapter] += 1
    # Binomial std of the top share: sqrt(p (1 - p) / n) ~ 0.0025; 0.015 is 6 std, which a
    # correct sampler misses with probability ~1e-9, while a uniform draw (share 0.008) or a
    # wrong exponent (1.5: 0.42) fails it by far.
    assert abs(counts["a0"] / n - p[0]) < 0.015
    assert abs(counts["a1"] / n - p[1]) < 0.015
    assert counts["a0"] > counts["a1"] > counts["a2"]


def test_ranks_one_per_adapter_weights_and_independent_of_request_count():
    ids, table = T.draw_adapters(5000, 400, ranks=(8, 64), rank_weights=(3, 1), seed=1)
    assert set(table.tolist()) == {8, 64}
    # 400 adapters, P(8) = 0.75: std of the share ~0.022; 0.12 is over 5 std.
    assert abs(np.mean(table == 8) - 0.75) < 0.12
    assert np.array_equal(T.draw_adapters(7, 400, ranks=(8, 64), rank_weights=(3, 1), seed=1)[1], table)
    reqs = T.with_adapters([TraceRequest(0.0, 1, 1)] * 2000, 50, seed=4)
    by_adapter: dict[str, set[int]] = {}
    for r in reqs:
        by_adapter.setdefault(r.adapter, set()).add(r.rank)
    assert all(len(v) == 1 for v in by_adapter.values())  # an adapter has one rank
    with pytest.raises(ValueError, match="rank_weights"):
        T.draw_adapters(10, 10, ranks=(8, 16), rank_weights=(1,))


def test_prepare_is_deterministic_for_a_seed_and_keeps_named_adapters():
    base = list(T.read_trace(DATA / "azure2023_conv.jsonl").requests[:400])
    base[5] = TraceRequest(base[5].arrival_s, 12, 3, "mine", 16)
    opts = TraceOptions(start_s=10.0, duration_s=30.0, rate_scale=3.0, context_len=1024, max_prompt=512,
                        max_output=128, n_adapters=128, seed=7)
    a, b = T.prepare(base, opts), T.prepare(base, opts)
    assert a == b  # same seed: same requests, adapters, ranks
    other = T.prepare(base, TraceOptions(**{**opts.__dict__, "seed": 8}))
    assert [r.adapter for r in other.requests] != [r.adapter for r in a.requests]
    reqs = a.requests
    assert reqs and all(0 <= r.arrival_s < 10.0 for r in reqs)  # 30 trace s at 3x
    assert all(r.prompt_tokens <= 512 and 1 <= r.output_tokens <= 128 for r in reqs)
    assert all(a.adapters[r.adapter] == r.rank for r in reqs)
    assert len(a.adapters) == 128 and a.source_requests == len(reqs)
    whole = T.prepare(base, TraceOptions(context_len=1024, n_adapters=128, seed=7))
    assert ("mine", 16) in [(r.adapter, r.rank) for r in whole.requests]  # the trace's own adapter
    assert whole.adapters["mine"] == 16


def test_simulator_workloads_come_from_trace():
    assert simulator.SimRequest is TraceRequest
    assert simulator.load_trace is T.load_trace and simulator.zipf_probabilities is T.zipf_probabilities
    reqs = simulator.load_trace(str(DATA / "AzureLLMInferenceTrace_conv.csv"), n_requests=50, rate_scale=2.0)
    assert len(reqs) == 50 and reqs[0].arrival_s == 0.0
    assert all(r.output_tokens >= 1 and r.adapter.startswith("a") for r in reqs)
    assert not math.isnan(sum(r.arrival_s for r in reqs))
