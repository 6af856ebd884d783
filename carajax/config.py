"""Frozen configuration dataclasses: the model's shape, the engine's budgets, the LoRA limits.

Presets are looked up by name (`ModelConfig.from_name("llama-test")`); real checkpoints are read
with `ModelConfig.from_hf(path)`, which accepts the `config.json` Hugging Face `transformers` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# The projections a LoRA adapter may target, in the order the model applies them.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

DTYPES = ("float32", "bfloat16", "float16")
LORA_KERNELS = ("unpadded", "padded")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 frequency-dependent rotary scaling (HF `rope_scaling={"rope_type": "llama3", ...}`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"invalid llama3 rope scaling: {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The shape of a Llama-family decoder. Weights live elsewhere (`carajax.models.weights`)."""

    name: str = "custom"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be a multiple of num_heads when head_dim is unset")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # -- derived shapes ---------------------------------------------------------------------
    def projection_shape(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a target projection, e.g. `q_proj` -> (hidden, heads * head_dim)."""
        d, q, kv, f = (self.hidden_size, self.num_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim, self.intermediate_size)
        shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                  "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
        if module not in shapes:
            raise KeyError(f"unknown projection {module!r}; expected one of {TARGET_MODULES}")
        return shapes[module]

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of keys and values one position takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def num_params(self) -> int:
        """Parameter count of the base model (embeddings, layers, final norm and untied head)."""
        per_layer = sum(a * b for a, b in map(self.projection_shape, TARGET_MODULES))
        per_layer += 2 * self.hidden_size  # the two RMSNorm weights
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (self.vocab_size * self.hidden_size + self.num_layers * per_layer
                + self.hidden_size + head)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset by name: see `PRESETS` (real shapes; weights are random unless loaded)."""
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a Hugging Face `config.json` (a file or the checkpoint directory holding it)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file) as f:
            hf: dict[str, Any] = json.load(f)
        return cls.from_hf_dict(hf, name=os.path.basename(os.path.dirname(os.path.abspath(file))))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json model_type is {model_type!r}; carajax serves 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json sets {flag}=true; carajax's Llama has no biases")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act is {act!r}; carajax's Llama uses 'silu'")
        scaling = None
        rs = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta")
        if rs:
            rope_theta = rs.get("rope_theta", rope_theta)
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind == "llama3":
                scaling = RopeScaling(
                    factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
            elif kind != "default":
                raise ValueError(f"config.json rope_scaling type {kind!r} is not supported "
                                 "(supported: default, llama3)")
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        num_heads = hf["num_attention_heads"]
        return cls(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` HF `LlamaConfig` would write for this shape."""
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
            "rope_scaling": None,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return d


def _llama2(name, hidden, inter, layers, heads, kv_heads) -> ModelConfig:
    return ModelConfig(name=name, vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_ids=(2,))


PRESETS: dict[str, ModelConfig] = {
    # Tiny, for tests and the demo; vocab 256 pairs with the byte-level tokenizer
    # (STX = 2 begins a text, ETX = 3 ends it).
    "llama-test": ModelConfig(name="llama-test", vocab_size=256, hidden_size=64,
                              intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              rms_norm_eps=1e-5, max_position_embeddings=1024,
                              bos_token_id=2, eos_token_ids=(3,)),
    # The built-in demo model's shape. `Engine.from_pretrained("carajax-demo")` loads its trained
    # weights (carajax/demo/model, made by scripts/train_demo.py); elsewhere a preset's weights
    # are random.
    "carajax-demo": ModelConfig(name="carajax-demo", vocab_size=256, hidden_size=128,
                                intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                                rms_norm_eps=1e-5, max_position_embeddings=1024,
                                bos_token_id=2, eos_token_ids=(3,)),
    # ~100M parameters (tied embeddings): big enough that CPU timings mean something.
    "llama-100m": ModelConfig(name="llama-100m", vocab_size=32000, hidden_size=768,
                              intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4,
                              tie_word_embeddings=True, max_position_embeddings=2048,
                              bos_token_id=1, eos_token_ids=(2,)),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M-Instruct): 30 layers, 9 query / 3 KV
    # heads, tied embeddings; random weights here (issue 25 brings the real ones).
    "smollm2-135m": ModelConfig(name="smollm2-135m", vocab_size=49152, hidden_size=576,
                                intermediate_size=1536, num_layers=30, num_heads=9,
                                num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192,
                                bos_token_id=1, eos_token_ids=(2,)),
    "llama2-7b": _llama2("llama2-7b", 4096, 11008, 32, 32, 32),
    "llama2-13b": _llama2("llama2-13b", 5120, 13824, 40, 40, 40),
    "llama2-70b": _llama2("llama2-70b", 8192, 28672, 80, 64, 8),
    "llama3-8b": ModelConfig(name="llama3-8b", vocab_size=128256, hidden_size=4096,
                             intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                             rms_norm_eps=1e-5, rope_theta=500000.0,
                             max_position_embeddings=8192, bos_token_id=128000,
                             eos_token_ids=(128001, 128009)),
    # Llama 3.1: same shapes, llama3 rope scaling to 128k context.
    "llama3.1-8b": ModelConfig(name="llama3.1-8b", vocab_size=128256, hidden_size=4096,
                               intermediate_size=14336, num_layers=32, num_heads=32,
                               num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192),
                               max_position_embeddings=131072, bos_token_id=128000,
                               eos_token_ids=(128001, 128008, 128009)),
}


# The built-in trained model (`carajax.demo`): the default of `carajax serve`, `demo`, `replay`.
DEMO_MODEL = "carajax-demo"
# Presets that ship trained weights inside the package: name -> checkpoint directory. Engines
# resolve a name here (no import of the demo package, which builds on the engine).
PRESET_CHECKPOINTS: dict[str, str] = {
    DEMO_MODEL: os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "model"),
}

COLD_START_POLICIES = ("auto", "cpu_assist", "async", "wait", "cached")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Budgets and policies of one serving engine (one base model on one device)."""

    dtype: str = "float32"  # compute and weight dtype of the base model
    max_seq_len: int | None = None  # longest context of one request; None: min(model max, 4096)
    max_batch_size: int = 8  # sequences that run at once (each holds KV pages)
    max_queue: int = 1024  # waiting requests beyond the batch; over it: QueueFullError
    # Paged KV cache: pages of `kv_page_size` positions in one pool whose size is a byte budget;
    # None: the bytes a fixed-row cache of max_batch_size x max_seq_len took (the old default).
    kv_page_size: int = 16
    kv_cache_bytes: int | None = None
    # One forward per step over every scheduled token (decodes first, then prefill chunks):
    max_step_tokens: int = 512  # the step's token budget (compiled variants: powers of two to it)
    prefill_chunk: int = 256  # prompt tokens per request per step (chunked prefill)
    max_prefill_tokens: int = 2048  # the prefill share of a step
    # Sarathi-Serve: while requests decode, cap the prefill share so a step's predicted time (a
    # line fitted to recent steps' token counts and times) stays under this; None: no target.
    tpot_target_s: float | None = None
    # Plan and launch step N + 1 while step N runs on the device (its tokens still there): the
    # host's planning hides under the device's work. False: every step waits for its tokens.
    async_scheduling: bool = True
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    min_prefill_bucket: int = 16  # smallest padded token count of a step (then powers of two)
    # Adapters.
    max_loras: int = 64  # device slots (adapters resident at once; metadata only)
    max_lora_rank: int = 64  # largest adapter rank accepted
    lora_page_rank: int = 16  # device pool granularity: an adapter of rank r takes ceil(r/16) pages
    device_lora_budget_bytes: int | None = None  # None: room for 8 adapters of max_lora_rank
    # Host memory for adapters' weights, least recently used out first; an adapter not in it is
    # read from disk when a request needs it (registration keeps only its spec). None: unlimited.
    host_lora_budget_bytes: int | None = None
    # Cold starts (a request whose adapter is not on the device): "auto" (per request, CPU assist
    # when the host would finish its prompt's LoRA before the copy lands, else async),
    # "cpu_assist" (CaraServe: start at once, LoRA on the CPU until the copy lands), "async"
    # (vLLM / S-LoRA: it waits in the queue while its copy runs; the batch goes on), "wait" (the
    # step that needs it blocks on the copy: the worst case), "cached" (every adapter resident).
    cold_start: str = "auto"
    cpu_threads: int | None = None  # CPU LoRA threads; None: all cores
    # Emulated host->device link (machines without an accelerator): readiness of a copy is
    # delayed to latency + bytes / bandwidth. Results from it are labelled emulated.
    emulated_link_gbps: float | None = None
    emulated_link_latency_ms: float = 0.0
    # `auto` where the device is this host's CPU: the host's LoRA would run on the very cores the
    # step runs on, and a "copy" is a memcpy, so CPU assist cannot win and is never picked (nor
    # its step variants compiled), unless this is True: experiments with an emulated link that
    # stand for a separate accelerator, and tests of the choice itself.
    auto_cpu_assist_on_host: bool = False
    # LoRA ops: "auto" (on GPU the shipped measured table's fastest per step shape, else the
    # fastest at warm-up of the forms verified compiled on the device kind, see carajax.autotune;
    # jnp references elsewhere or with neither), "pallas", "fused" (shrink + expand in one Pallas
    # call), "interpret", "reference"
    lora_impl: str = "auto"
    # How the Pallas kernels treat mixed ranks in a batch (CaraServe Fig. 5): "unpadded" (each
    # request does its own rank's work, S-LoRA MBGMV) or "padded" (every request does the batch's
    # max rank, Punica BGMV). The jnp references ignore it: they run every slot at the pool's
    # page-padded shape (max_lora_rank), so on CPU with references both settings cost the same.
    lora_kernel: str = "unpadded"
    # Tensor parallelism: shard the model over this many local devices (carajax.parallel);
    # 1: one device, no mesh.
    tp: int = 1

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for field in ("max_batch_size", "max_loras", "max_lora_rank", "min_prefill_bucket",
                      "max_queue", "prefill_chunk", "max_prefill_tokens", "max_tokens_limit",
                      "lora_page_rank", "tp", "kv_page_size", "max_step_tokens"):
            if getattr(self, field) <= 0:
                raise ValueError(f"EngineConfig.{field} must be positive")
        if self.cold_start not in COLD_START_POLICIES:
            raise ValueError(f"EngineConfig.cold_start must be one of {COLD_START_POLICIES}, "
                             f"got {self.cold_start!r}")
        if self.lora_impl not in ("auto", "pallas", "fused", "interpret", "reference"):
            raise ValueError(f"EngineConfig.lora_impl must be auto, pallas, fused, interpret or "
                             f"reference, got {self.lora_impl!r}")
        if self.lora_kernel not in LORA_KERNELS:
            raise ValueError(f"EngineConfig.lora_kernel must be one of {LORA_KERNELS}, "
                             f"got {self.lora_kernel!r}")
        if self.max_lora_rank % self.lora_page_rank:
            raise ValueError("max_lora_rank must be a multiple of lora_page_rank")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ValueError("EngineConfig.max_seq_len must be positive")
        if self.emulated_link_gbps is not None and self.emulated_link_gbps <= 0:
            raise ValueError("EngineConfig.emulated_link_gbps must be positive")
        if self.tpot_target_s is not None and self.tpot_target_s <= 0:
            raise ValueError("EngineConfig.tpot_target_s must be positive")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("EngineConfig.kv_cache_bytes must be positive")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(f"EngineConfig.max_step_tokens ({self.max_step_tokens}) must be at "
                             f"least max_batch_size ({self.max_batch_size}): every running "
                             "request decodes one token per step")

    @property
    def step_token_limit(self) -> int:
        """The most tokens a planned step can hold before its bucket's padding: every sequence
        of the batch contributes at most one prefill chunk (a decode, one token), and prefill
        at most `max_prefill_tokens`. Below `max_step_tokens` when the batch cannot fill it
        (4 sequences of 64-token chunks: 256), so the variants past it are never compiled."""
        return min(self.max_step_tokens, self.max_batch_size * self.prefill_chunk,
                   self.max_prefill_tokens + self.max_batch_size)

    def seq_len(self, model: ModelConfig) -> int:
        limit = min(model.max_position_embeddings, 4096)
        return limit if self.max_seq_len is None else min(self.max_seq_len, model.max_position_embeddings)

    def kv_budget_bytes(self, model: ModelConfig, itemsize: int) -> int:
        """Device bytes of the paged KV cache (default: max_batch_size x seq_len positions)."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        return self.max_batch_size * self.seq_len(model) * model.kv_bytes_per_token(itemsize)

    def lora_budget_bytes(self, model: ModelConfig, itemsize: int) -> int:
        """Device bytes for adapter pages (default: 8 adapters of max_lora_rank)."""
        if self.device_lora_budget_bytes is not None:
            return self.device_lora_budget_bytes
        per_rank = sum(sum(model.projection_shape(m)) for m in TARGET_MODULES) * model.num_layers
        return 8 * self.max_lora_rank * per_rank * itemsize
