"""Trace replay: send a trace's requests at their arrival times (open loop) to an in-process engine,
a gRPC worker or router, or a local cluster of `carajax serve` workers behind a router, under
several policies, and report TTFT, time per token, latency, SLO attainment and cold starts.

    carajax replay                                  # the README's main job (carajax.cli.replay)
    rows = replay_engine(engine, reqs, synth_prompts(reqs, engine.model_config))
    rows = replay_grpc("127.0.0.1:50050", reqs, prompts)
    rows = replay_http("http://127.0.0.1:8000", reqs, prompts)   # OpenAI HTTP, e.g. `carajax ray`
    summary = summarize(rows, Slo(ttft_s=1.0, tpot_s=0.05))
"""

from carajax.replay.driver import replay_engine, replay_grpc, replay_http, synth_prompts
from carajax.replay.report import Slo, format_summary, format_table, plot_results, slo_verdict, summarize

__all__ = ["Slo", "format_summary", "format_table", "plot_results", "replay_engine", "replay_grpc",
           "replay_http", "slo_verdict", "summarize", "synth_prompts"]
