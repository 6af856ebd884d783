"""The serving engine's public face: load a model, register adapters, score and generate.

In this version `generate` runs requests one after another with the KV cache (prefill, then one
decode step per token); the continuous-batching loop replaces its inside without changing the API.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from carajax.config import EngineConfig, ModelConfig
from carajax.lora.adapter import AdapterError, LoraAdapter, load_adapter
from carajax.models import weights
from carajax.models.llama import Llama
from carajax.models.tokenizer import Tokenizer, load_tokenizer
from carajax.runner import ModelRunner
from carajax.sampling import SamplingParams, sample, sampling_arrays

Prompt = str | Sequence[int]


class RequestError(ValueError):
    """A request that cannot be served as given (empty or too long prompt, bad token ids)."""


@dataclasses.dataclass
class RequestOutput:
    """The result of one request."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop token, if hit, is the last)
    text: str  # generated text, special tokens left out ("" without a tokenizer)
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context is full)
    adapter: str | None


class Engine:
    """One base model with many LoRA adapters on one device."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, self.config)
        self._adapters: dict[str, LoraAdapter] = {}
        self._rng = np.random.default_rng()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "float32",
                        config: EngineConfig | None = None, seed: int = 0) -> Engine:
        """A preset name (random weights from `seed`) or a local HF checkpoint directory."""
        config = dataclasses.replace(config or EngineConfig(), dtype=dtype)
        jdtype = jnp.dtype(dtype)
        if os.path.isdir(name_or_path):
            model_config = ModelConfig.from_hf(name_or_path)
            model = weights.load_hf(name_or_path, model_config, dtype=jdtype)
            tokenizer = load_tokenizer(name_or_path, model_config)
        else:
            model_config = ModelConfig.from_name(name_or_path)
            model = weights.random_model(model_config, dtype=jdtype, seed=seed)
            tokenizer = load_tokenizer(None, model_config)
        return cls(model, tokenizer, config)

    @staticmethod
    def compiled_variants() -> dict[str, int]:
        """Compiled variants of each jitted forward in this process ("score", "step")."""
        return ModelRunner.compiled_variants()

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | os.PathLike) -> LoraAdapter:
        """Parse, validate and register a PEFT adapter directory under `name`.

        Raises `AdapterError` (nothing is registered) if it is malformed, unsupported, does not
        fit the base model, has a rank over `max_lora_rank`, or the name is taken.
        """
        if not name:
            raise AdapterError("adapter name must be a non-empty string")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered; remove it first")
        adapter = load_adapter(path, self.model_config, max_rank=self.config.max_lora_rank,
                               name=name)
        self._adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        self._adapter(name)
        self.runner.slots.evict(name)
        del self._adapters[name]

    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        return dict(self._adapters)

    def _adapter(self, name: str) -> LoraAdapter:
        if name not in self._adapters:
            raise AdapterError(f"unknown adapter {name!r}; registered: {sorted(self._adapters)}")
        return self._adapters[name]

    def _slot(self, name: str | None) -> int:
        return -1 if name is None else self.runner.slots.slot_for(self._adapter(name))

    # -- requests ---------------------------------------------------------------------------
    def _token_ids(self, prompt: Prompt, limit: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("empty prompt")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary "
                               f"[0, {self.model_config.vocab_size})")
        if len(ids) > limit:
            raise RequestError(f"prompt has {len(ids)} tokens; the context length is {limit}")
        return ids

    def logits(self, token_ids: Prompt, adapter: str | None = None) -> np.ndarray:
        """float32 [len(token_ids), vocab]: next-token logits at every position of the sequence."""
        ids = self._token_ids(token_ids, self.model_config.max_position_embeddings)
        return self.runner.score(ids, self._slot(adapter))

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 adapters: str | None | Sequence[str | None] = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Generate a completion for each prompt with its adapter (None: the base model)."""
        if isinstance(prompts, str) or (prompts and all(isinstance(t, (int, np.integer))
                                                        for t in prompts)):
            prompts = [prompts]
        n = len(prompts)
        adapters = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        sampling = [sampling or SamplingParams()] * n if not isinstance(sampling, Sequence) \
            else list(sampling)
        if len(adapters) != n or len(sampling) != n:
            raise RequestError(f"{n} prompts but {len(adapters)} adapters and "
                               f"{len(sampling)} sampling params")
        # Validate everything before running anything, so a bad request costs no work.
        ids = [self._token_ids(p, self.runner.seq_len - 1) for p in prompts]
        for a in adapters:
            if a is not None:
                self._adapter(a)
        return [self._generate_one(i, a, s) for i, a, s in zip(ids, adapters, sampling)]

    def _generate_one(self, prompt_ids: list[int], adapter: str | None,
                      params: SamplingParams) -> RequestOutput:
        slot = self._slot(adapter)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        stop = set(params.stop_token_ids if params.stop_token_ids is not None
                   else self.model_config.eos_token_ids)
        logits = self.runner.prefill(0, prompt_ids, slot)
        out: list[int] = []
        finish = "length"
        while True:
            tok = int(sample(logits, *sampling_arrays([params], [seed], [len(out)]))[0])
            out.append(tok)
            if tok in stop:
                finish = "stop"
                break
            pos = len(prompt_ids) + len(out) - 1  # where `tok` goes in the cache
            if len(out) >= params.max_tokens or pos >= self.runner.seq_len:
                break
            logits = self.runner.decode([0], [tok], [pos], [slot])
        text = self.tokenizer.decode(out) if self.tokenizer is not None else ""
        return RequestOutput(prompt_token_ids=prompt_ids, token_ids=out, text=text,
                             finish_reason=finish, adapter=adapter)

