"""Training a LoRA adapter on chat sequences of a real checkpoint (SmolLM2-135M-Instruct), on a CPU.

A training example is a chat prompt (the question as one user turn through the model's template,
tokenized as the server tokenizes it) followed by the answer and the end-of-turn token; the loss
is the answer's and the end-of-turn's next-token cross-entropy only, and the LM head (49,152 rows
of the vocabulary) runs only at those positions.

The forward pass is the serving model's own modules and code (the embedding, norms, rotary
embedding, every projection through the same LoRA hook point as in serving, the MLP, the head)
with one exception: attention is plain masked attention over dense arrays instead of the page
walk of `paged_attention`, and the prompts' common prefix is computed once per batch (`Examples`).
Both compute what the serving forward computes for whole sequences from position 0
(tests/test_smollm2_adapters.py checks it); they are what make training a 30-layer model
affordable here (measured on 4 of its layers, 8 x 96 tokens, 2 busy cores: a training step with
dense attention 1.4 s against 2.0 s with the page walk, its compile 10 s against 56 s).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from carajax.config import ModelConfig
from carajax.demo import train as D
from carajax.lora import adapter as lora_files
from carajax.models.llama import Llama, _project, apply_rope, output_logits


@dataclasses.dataclass(frozen=True)
class Training:
    """One adapter's optimisation: AdamW, warm-up then cosine decay to 5% of `lr`."""

    steps: int
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 10
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Examples:
    """Chat sequences as one shared prefix and per-example suffixes, and where the loss is taken.

    Every prompt starts with the same tokens (the template's system turn and `user` header:
    about 24 of SmolLM2's ~37 prompt tokens), so a training batch computes them once, as one
    sequence that every row attends to, not once per row. Example i is `prefix + suffixes[i]`,
    its suffix the rest of the prompt then the answer and end-of-turn; the token at suffix index
    `starts[i] + j` predicts `targets[i][j]`."""

    prefix: np.ndarray  # int32 [P]
    suffixes: list[np.ndarray]  # int32 [S_i] each
    starts: np.ndarray  # int32 [N]: suffix index of the last prompt token
    targets: list[np.ndarray]  # int32 [A_i] each: the answer's tokens and end-of-turn

    @classmethod
    def build(cls, prompts: list[list[int]], answers: list[list[int]]) -> Examples:
        P = 0  # the longest common prefix, leaving each prompt at least its last token
        while (P < min(map(len, prompts)) - 1
               and len({p[P] for p in prompts}) == 1):
            P += 1
        return cls(prefix=np.asarray(prompts[0][:P], np.int32),
                   suffixes=[np.asarray(p[P:] + a, np.int32) for p, a in zip(prompts, answers)],
                   starts=np.asarray([len(p) - P - 1 for p in prompts], np.int32),
                   targets=[np.asarray(a, np.int32) for a in answers])

    def __len__(self) -> int:
        return len(self.suffixes)

    def batches(self, rng: np.random.Generator, batch: int, pool: int = 8):
        """Index batches forever, epoch after epoch: each epoch shuffled, cut into pools of
        `pool` batches, each pool sorted by length before it is cut into batches (rows of a
        batch are then of similar length: less padding), the batches shuffled again."""
        lengths = np.asarray([len(t) for t in self.suffixes])
        while True:
            order = rng.permutation(len(self))
            out = []
            for i in range(0, len(order) - batch + 1, batch * pool):
                chunk = order[i:i + batch * pool]
                chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
                out += [chunk[j:j + batch] for j in range(0, len(chunk) - batch + 1, batch)]
            yield from (out[k] for k in rng.permutation(len(out)))

    def batch(self, idx: np.ndarray, multiple: int = 16) -> tuple[np.ndarray, ...]:
        """Rows `idx` as a step's arrays: prefix [P], tokens [B, S], rows [B * A] (flat indices
        into the P + B * S tokens of the step), targets [B * A], mask [B * A]. S is the longest
        suffix rounded up to a multiple of `multiple`, and A follows from S (the longest answer
        of any example that fits in S), so each S is one shape: one compile."""
        def up(n):
            return -(-n // multiple) * multiple

        S = up(max(len(self.suffixes[i]) for i in idx))
        A = up(max(len(t) for t, x in zip(self.targets, self.suffixes) if up(len(x)) <= S))
        P = len(self.prefix)
        tokens = np.zeros((len(idx), S), np.int32)
        rows = np.full((len(idx), A), P, np.int32)  # padding rows: any valid index, masked
        targets = np.zeros((len(idx), A), np.int32)
        mask = np.zeros((len(idx), A), np.float32)
        for b, i in enumerate(idx):
            suffix, target = self.suffixes[i], self.targets[i]
            tokens[b, :len(suffix)] = suffix
            rows[b, :len(target)] = P + b * S + self.starts[i] + np.arange(len(target))
            targets[b, :len(target)] = target
            mask[b, :len(target)] = 1.0
        return self.prefix, tokens, rows.reshape(-1), targets.reshape(-1), mask.reshape(-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [B, S, heads, D] at the last S of the K positions of k and v [B, K, kv_heads, D]
    -> [B, S, heads, D]: each query attends to every key up to its own position; grouped
    queries share their KV head."""
    B, S, H, Dh = q.shape
    K, kv = k.shape[1], k.shape[2]
    q = q.reshape(B, S, kv, H // kv, Dh)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / math.sqrt(Dh)
    visible = jnp.arange(K)[None, :] <= (K - S) + jnp.arange(S)[:, None]  # [S, K]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(B, S, H, Dh)


def forward(model: Llama, prefix: jax.Array, tokens: jax.Array, lora, rows: jax.Array
            ) -> jax.Array:
    """float32 logits [R, vocab] of the sequences `prefix + tokens[b]` (prefix [P], tokens
    [B, S], from position 0) at flat positions `rows` of the step's P + B * S tokens (the prefix
    first, then each row's), with the LoRA hook `lora` (None: the base)."""
    (P,), (B, S) = prefix.shape, tokens.shape
    x = model.embed_tokens.value[jnp.concatenate([prefix, tokens.reshape(-1)])]  # [P + B*S, d]
    positions = jnp.concatenate([jnp.arange(P, dtype=jnp.int32),
                                 jnp.tile(P + jnp.arange(S, dtype=jnp.int32), B)])
    inv_freq = model.inv_freq.value
    for layer, block in enumerate(model.layers):
        attn = block.self_attn
        q, k, v = _project((attn.q_proj, attn.k_proj, attn.v_proj), block.input_layernorm(x),
                           lora, layer, ("q_proj", "k_proj", "v_proj"))
        q = apply_rope(q.reshape(-1, attn.heads, attn.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(-1, attn.kv_heads, attn.head_dim), positions, inv_freq)
        v = v.reshape(-1, attn.kv_heads, attn.head_dim)
        # The prefix attends to itself; every row to the prefix's keys and its own.
        out_prefix = attention(q[None, :P], k[None, :P], v[None, :P])
        k_rows, v_rows = (jnp.concatenate([jnp.broadcast_to(t[None, :P], (B, *t[:P].shape)),
                                           t[P:].reshape(B, S, *t.shape[1:])], axis=1)
                          for t in (k, v))
        out_rows = attention(q[P:].reshape(B, S, *q.shape[1:]), k_rows, v_rows)
        out = jnp.concatenate([out_prefix.reshape(P, -1), out_rows.reshape(B * S, -1)])
        (out,) = _project((attn.o_proj,), out, lora, layer, ("o_proj",))
        x = x + out
        x = x + block.mlp(block.post_attention_layernorm(x), layer, lora)
    return output_logits(x[rows], model.norm.weight.value, model.norm.eps, *model.output_weight())


def train_adapter(model: Llama, data: Examples, rank: int, targets: tuple[str, ...], cfg: Training,
                  desc: str = "adapter") -> tuple[dict, float, list[float]]:
    """A LoRA of `rank` (alpha 2 * rank) on `targets`, the base frozen; PEFT's initialisation.
    Returns (params, alpha, loss per step)."""
    alpha = 2.0 * rank
    graphdef, base = nnx.split(model)
    lora = D.init_lora(model.config, rank, cfg.seed, targets)
    warmup = min(cfg.warmup, cfg.steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    state = opt.init(lora)

    def loss_fn(lora, base, prefix, tokens, rows, targets, mask):
        model = nnx.merge(graphdef, base)
        logits = forward(model, prefix, tokens, D.DenseLora(lora, alpha / rank), rows)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * mask) / jnp.sum(mask)

    # The base is an argument, not a closure: 135M parameters as compile-time constants would
    # make the compile slow and the program huge.
    @jax.jit
    def step(lora, state, base, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base, *batch)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    batches = data.batches(np.random.default_rng(cfg.seed), cfg.batch)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", mininterval=10.0)
    for _ in bar:
        lora, state, loss = step(lora, state, base, *data.batch(next(batches)))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return lora, alpha, losses


def save(path: str, config: ModelConfig, lora: dict, rank: int, alpha: float, base_name: str
         ) -> None:
    """The adapter in PEFT's format, in bfloat16 (half the bytes; PEFT and carajax upcast it)."""
    modules = {}
    for key, p in lora.items():
        layer, module = key.split(".")
        modules[(int(layer), module)] = (np.asarray(p["a"]), np.asarray(p["b"]))
    lora_files.save_adapter(path, config, modules, rank=rank, alpha=alpha, dtype=ml_dtypes.bfloat16,
                            extra_config={"base_model_name_or_path": base_name})
