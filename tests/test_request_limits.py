"""Request sizes at the server boundary (codec.RequestLimits): an empty prompt, a prompt over the
byte or token limit, too many or too long stop sequences are refused with a `RequestError` naming
the field before the worker tokenizes or queues anything (gRPC maps it to INVALID_ARGUMENT)."""

from __future__ import annotations

import pytest

import carajax
from carajax.engine.request import RequestError
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.server import carajax_pb2 as pb
from carajax.server.codec import RequestLimits, check_prompt, check_stops, parse_generate

SMALL = RequestLimits(max_prompt_bytes=8, max_prompt_tokens=4, max_stop_token_ids=2,
                      max_stop_strings=2, max_stop_string_bytes=3)


@pytest.mark.parametrize("msg, needle", [
    (pb.GenerateRequest(text=""), "empty prompt (GenerateRequest.text)"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "empty prompt (GenerateRequest.token_ids)"),
    (pb.GenerateRequest(text="123456789"), "prompt is over the limit of 8 bytes (GenerateRequest.text)"),
    # 5 characters, 10 bytes: the limit counts UTF-8 bytes, not characters
    (pb.GenerateRequest(text="\u00e9" * 5), "over the limit of 8 bytes"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 3, 4, 5, 6])),
     "prompt has 5 token ids; at most 4 (GenerateRequest.token_ids)"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop_token_ids=[3, 4, 5])),
     "3 stop token ids; at most 2"),
])
def test_parse_generate_refuses_what_is_over_the_limits(msg, needle):
    with pytest.raises(RequestError) as err:
        parse_generate(msg, SMALL)
    assert needle in str(err.value)


def test_requests_at_the_limits_pass():
    args = parse_generate(pb.GenerateRequest(text="12345678", sampling=pb.SamplingParams(
        stop_token_ids=[3, 4])), SMALL)
    assert (args.prompt, args.sampling.stop_token_ids) == ("12345678", (3, 4))
    ids = pb.TokenIds(ids=[2, 3, 4, 5])
    assert parse_generate(pb.GenerateRequest(token_ids=ids), SMALL).prompt == [2, 3, 4, 5]
    check_stops((), ["abc", "xy"], SMALL)  # 2 strings of at most 3 bytes
    check_prompt("x" * (1 << 20))  # the default: a MiB of text


@pytest.mark.parametrize("strings, needle", [
    (["a", "b", "c"], "3 stop strings; at most 2"),
    (["abcd"], "stop string of 4 bytes; at most 3"),
    ([""], "empty stop string"),
])
def test_stop_strings_are_bounded(strings, needle):
    with pytest.raises(RequestError, match=needle):
        check_stops((), strings, SMALL)


def test_the_engine_refuses_an_empty_text_prompt(tiny_config):
    # The byte tokenizer encodes "" as [BOS]: without the check, "" would generate.
    engine = carajax.Engine(weights.random_model(tiny_config, seed=0), ByteTokenizer(),
                            carajax.EngineConfig(max_batch_size=1, cold_start="cached"))
    try:
        for prompt in ("", []):
            with pytest.raises(carajax.RequestError, match="empty prompt"):
                engine.submit(prompt)
        assert engine.stats()["waiting"] == 0
    finally:
        engine.close()
