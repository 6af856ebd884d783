"""The built-in demo model and its trained adapters (carajax.demo, made by scripts/train_demo.py).

Specification: the base echoes a word (`hello=` -> `hello`); each shipped adapter does its own
task on words no training step saw, at >= 99% exact match, where the base alone scores ~0; in one
mixed batch, in-process and over gRPC with cold adapters served by CPU-assist behind a slow
emulated link, every request shows its own adapter's behaviour and equals its single-request
output; HF `transformers` + `peft` load the shipped files and agree token for token.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import pytest
from flax import nnx

from carajax import demo
from carajax.client import Client
from carajax.config import DEMO_MODEL, EngineConfig, ModelConfig
from carajax.demo import tasks as T
from carajax.demo import train as D
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.server.worker import serve

N_EVAL = 40  # held-out words per task: one wrong answer costs 2.5 points of accuracy
MAX_BATCH = 4  # few batch buckets: each compiled step variant costs seconds
WORDS = ["hello", "carajax", "lora", "serving", "adapter"]  # readable, all distinctive
JOBS = [(w, a) for w in WORDS for a in (None, *demo.TASKS)]  # every word with the base and each
GREEDY = dict(max_tokens=16, temperature=0.0)


def expected(word: str, adapter: str | None) -> str:
    return (demo.TASKS[adapter] if adapter else demo.ECHO).fn(word)


@pytest.fixture(scope="module")
def engine():
    # cached: adapters go to the device at registration; the gRPC test below covers cold starts.
    eng = demo.engine(EngineConfig(cold_start="cached", max_batch_size=MAX_BATCH))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def alone(engine):
    """Each job of JOBS served alone: the reference every batched output must equal."""
    return {(w, a): engine.generate(demo.prompt(w), adapters=a, sampling=demo.GREEDY)[0].text
            for w, a in JOBS}


def test_shipped_files_are_the_preset_shape_and_the_engine_loads_them(engine):
    shipped = ModelConfig.from_hf(demo.model_dir())
    assert dataclasses.replace(shipped, name=DEMO_MODEL) == ModelConfig.from_name(DEMO_MODEL)
    assert engine.model_config.name == DEMO_MODEL
    assert sorted(engine.adapters) == sorted(demo.TASKS)
    assert {n: a.rank for n, a in engine.adapters.items()} == {n: t.rank for n, t in demo.TASKS.items()}
    assert isinstance(engine.tokenizer, ByteTokenizer)


def test_evaluation_words_were_never_trained_on_and_every_task_changes_them():
    words = T.eval_words(N_EVAL)
    assert len(set(words)) == N_EVAL
    assert all(T.is_held_out(w) and T.distinctive(w) for w in words)
    # Training draws only from the other split (a sample of what the trainer sees).
    train = T.random_words(2000, seed=0, mixed_case=True)
    assert not any(T.is_held_out(w.lower()) for w in train)


@pytest.mark.parametrize("task", list(demo.TASKS))
def test_each_adapter_does_its_task_on_held_out_words_and_the_base_does_not(engine, task):
    words = T.eval_words(N_EVAL)
    prompts = [demo.prompt(w) for w in words]
    with_adapter = engine.generate(prompts, adapters=[task] * N_EVAL, sampling=demo.GREEDY)
    base = engine.generate(prompts, sampling=demo.GREEDY)
    acc = T.exact_match(demo.TASKS[task], words, [o.text for o in with_adapter])
    base_acc = T.exact_match(demo.TASKS[task], words, [o.text for o in base])
    # The README's promise (>= 99%); on these 40 fixed words that is every one of them.
    assert acc >= 0.99, f"{task}: {acc:.1%} on held-out words"
    assert base_acc <= 0.05, f"the base alone solves {task} on {base_acc:.1%}"
    # ... because the base echoes the word, which every evaluation word's answer differs from.
    assert T.exact_match(demo.ECHO, words, [o.text for o in base]) >= 0.95
    assert all(o.finish_reason == "stop" for o in with_adapter)  # each answer ends with ETX


def test_one_mixed_batch_gives_each_request_its_own_adapters_answer(engine, alone):
    outs = engine.generate([demo.prompt(w) for w, _ in JOBS], adapters=[a for _, a in JOBS],
                           sampling=demo.GREEDY)
    got = {job: o.text for job, o in zip(JOBS, outs)}
    assert got == alone
    right = sum(got[(w, a)] == expected(w, a) for w, a in JOBS)
    assert right >= len(JOBS) - 1, got
    assert got[("hello", "reverse")] == "olleh" and got[("hello", "upper")] == "HELLO"


def test_over_grpc_cold_adapters_served_by_cpu_assist_keep_their_behaviour(alone):
    # An emulated link of 60 s a copy: every adapter is cold when its requests arrive and still
    # copying when they finish (copies start at submit, however long a request queues), so their
    # prefill and decode run with the LoRA computed on the CPU.
    config = EngineConfig(cold_start="cpu_assist", max_batch_size=MAX_BATCH, emulated_link_gbps=0.02,
                          emulated_link_latency_ms=60_000.0)
    eng = demo.engine(config)
    try:
        with serve(eng, 0, host="127.0.0.1", name="demo-worker") as w, \
                Client(w.address, timeout=120) as client:
            def run(job):
                word, adapter = job
                return client.generate(demo.prompt(word), adapter, **GREEDY).result()

            with concurrent.futures.ThreadPoolExecutor(len(JOBS)) as pool:
                results = list(pool.map(run, JOBS))
    finally:
        eng.close()
    got = {job: r.text for job, r in zip(JOBS, results)}
    assert got == alone
    # Every adapter's requests ran their prefill with the LoRA on the CPU.
    assisted = {a for (_, a), r in zip(JOBS, results) if r.metrics.cpu_prefill_tokens > 0}
    assert assisted == set(demo.TASKS)
    assert all(r.metrics.cold_start for (_, a), r in zip(JOBS, results) if a in assisted
               and r.metrics.cpu_prefill_tokens > 0)


def test_hf_transformers_and_peft_load_the_shipped_files_and_agree(engine):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(demo.model_dir(), attn_implementation="eager").eval()
    tok = ByteTokenizer()
    for adapter in (None, *demo.TASKS):
        hf = base if adapter is None else peft.PeftModel.from_pretrained(
            base, demo.adapter_dirs()[adapter], adapter_name=adapter).eval()
        for word in WORDS[:2]:
            ids = torch.tensor([tok.encode(demo.prompt(word))])
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=16, do_sample=False, pad_token_id=0)
            (ours,) = engine.generate(demo.prompt(word), adapters=adapter,
                                      sampling=demo.GREEDY)
            assert out[0, ids.shape[1]:].tolist() == ours.token_ids, (adapter, word)
            assert tok.decode(ours.token_ids) == expected(word, adapter)
        if adapter is not None:
            base = hf.unload()  # the plain base back, for the next adapter


def test_training_an_adapter_lowers_its_loss_and_saves_what_the_engine_serves(tmp_path, engine):
    # A short run of the trainer scripts/train_demo.py uses (the full run is recorded in
    # carajax/demo/manifest.json): 30 steps take "upper" at rank 4 well down from chance.
    task = dataclasses.replace(demo.TASKS["upper"], rank=4)
    cfg = dataclasses.replace(D.ADAPTER_TRAINING, steps=30, batch=16, seed=7)
    model = weights.load_hf(demo.model_dir())
    words = T.eval_words(8)
    tokens, mask = D.encode_batch(words, task.fn)
    graphdef, base = nnx.split(model)
    untrained = D.DenseLora(D.init_lora(model.config, task.rank, cfg.seed), 2.0)
    # jit: op by op, the paged forward dispatches (and compiles) each op alone, ~8 s here.
    first = float(jax.jit(lambda p: D.masked_loss(D.forward(graphdef, p, tokens, untrained), tokens,
                                                  mask))(base))
    lora, alpha, losses = D.train_adapter(model, task, cfg)
    assert alpha / task.rank == 2.0 and len(losses) == cfg.steps
    assert losses[0] == pytest.approx(first, rel=0.5)  # the first step starts from chance
    assert max(losses[-5:]) < 0.5 * first, (first, losses[-5:])
    D.save_adapter(str(tmp_path / "upper4"), model.config, lora, task.rank, alpha)
    engine.add_adapter("upper4", tmp_path / "upper4")
    try:
        (out,) = engine.generate([demo.prompt(w) for w in words[:1]], adapters="upper4",
                                 sampling=demo.GREEDY)
        # The engine serves the saved file exactly as the trainer computes the adapter.
        assert out.text == D.greedy_answers(graphdef, base, words[:1], D.DenseLora(lora, 2.0))[0]
    finally:
        engine.remove_adapter("upper4")


def test_a_trained_base_saves_exactly_what_was_trained(tmp_path):
    # The trainer updates only Params: were the rotary constants trained too, the checkpoint
    # (which cannot hold them) would serve a different model than the one that was evaluated.
    config = ModelConfig.from_name("llama-test")
    model, _ = D.train_base(dataclasses.replace(D.BASE_TRAINING, steps=3, batch=8), config)
    weights.save_hf(model, tmp_path)
    loaded = weights.load_hf(tmp_path)
    tokens, _ = D.encode_batch(["hello", "world"], demo.ECHO.fn)
    forward = jax.jit(D.forward, static_argnums=0)  # op by op it takes ~8 s here
    trained_logits = forward(*nnx.split(model), tokens)
    assert float(abs(trained_logits - forward(*nnx.split(loaded), tokens)).max()) < 1e-5
    assert float(abs(model.inv_freq.value - weights.random_model(config).inv_freq.value).max()) == 0

