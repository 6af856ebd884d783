"""Training the demo model and its adapters with optax, on the CPU, in minutes.

The base model is trained to echo a word (`hello=` -> `hello`); each adapter is then trained, with
the base frozen, to answer the same prompt with its task (`carajax.demo.tasks`). Training runs the
serving model's own forward pass (`Llama.__call__` over a KV cache as long as the sequence), so
what is trained is exactly what is served; the LoRA here is a plain dense `scale * x A^T B^T`,
saved in PEFT's format so that PEFT and carajax load the same files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from carajax.config import DEMO_MODEL, TARGET_MODULES, ModelConfig
from carajax.demo import tasks as T
from carajax.lora import adapter
from carajax.models import weights
from carajax.models.llama import Llama, PagedKVCache, dense_batch
from carajax.models.tokenizer import ByteTokenizer

# The demo base: llama-test's byte vocabulary, wide and deep enough to learn to copy.
DEMO_CONFIG = ModelConfig.from_name(DEMO_MODEL)
SEQ = 2 * T.MAX_LEN + 4  # STX word = answer ETX, padded
PAD = 0
PAGE = 16  # KV page size of the training forward (its cache is scratch)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    seed: int = 0


BASE_TRAINING = TrainConfig(steps=500, lr=3e-3, weight_decay=0.01)
ADAPTER_TRAINING = TrainConfig(steps=300, lr=5e-3)


def encode_batch(words: list[str], fn: Callable[[str], str]) -> tuple[np.ndarray, np.ndarray]:
    """Token rows `STX word = fn(word) ETX` padded to SEQ, and a mask over the answer's tokens
    (the positions whose next token is part of the answer)."""
    tok = ByteTokenizer()
    tokens = np.full((len(words), SEQ), PAD, np.int32)  # [B, SEQ]
    mask = np.zeros((len(words), SEQ), np.float32)  # [B, SEQ]: 1 where the target is scored
    for i, w in enumerate(words):
        p = tok.encode(T.prompt(w))
        a = list(fn(w).encode()) + [tok.eos_ids[0]]
        row = p + a
        tokens[i, :len(row)] = row
        mask[i, len(p) - 1:len(row) - 1] = 1.0  # predicting a[0] from the last prompt token, ...
    return tokens, mask


class DenseLora:
    """The LoRA hook for training: one adapter for every row, delta = scale * (x A^T) B^T."""

    def __init__(self, params: dict, scale: float):
        self.params, self.scale = params, scale  # params[f"{layer}.{module}"] = {"a", "b"}

    def __call__(self, layer: int, modules, x):
        out = []
        for m in modules:
            p = self.params.get(f"{layer}.{m}")
            if p is None:
                out.append(None)
                continue
            out.append(self.scale * (x @ p["a"].T) @ p["b"].T)  # a [r, d_in], b [d_out, r]
        return tuple(out)


def forward(graphdef, params, tokens, lora: DenseLora | None = None, consts=None):
    """Full-sequence logits [B, SEQ, vocab] through the serving forward pass. `params` are the
    model's `nnx.Param`s, `consts` the rest (the rotary frequencies; None: in `params`)."""
    model = nnx.merge(graphdef, params, *(() if consts is None else (consts,)))
    B, S = tokens.shape
    batch, pages = dense_batch(B, S, PAGE)
    batch = dataclasses.replace(batch, tokens=tokens.reshape(-1))
    cache = PagedKVCache.zeros(model.config, pages, PAGE, jnp.float32)
    logits, _ = model(batch, cache, lora)
    return logits.reshape(B, S, -1)


def masked_loss(logits, tokens, mask):
    """Mean next-token cross-entropy over the answer's tokens."""
    targets = jnp.roll(tokens, -1, axis=1)  # position t predicts token t + 1
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def _optimizer(cfg: TrainConfig):
    warmup = min(cfg.warmup, cfg.steps // 4)  # short runs (tests) still decay
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _fit(loss_fn, params, cfg: TrainConfig, fn: Callable[[str], str], progress: str,
         mixed_case: bool = False):
    """Adam over fresh random training words each step; returns (params, loss per step)."""
    from tqdm import tqdm

    opt = _optimizer(cfg)
    state = opt.init(params)

    @jax.jit
    def step(params, state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    bar = tqdm(range(cfg.steps), desc=progress, unit="step", mininterval=2.0)
    for i in bar:
        words = T.random_words(cfg.batch, seed=cfg.seed * 1_000_003 + i, mixed_case=mixed_case)
        tokens, mask = encode_batch(words, fn)
        params, state, loss = step(params, state, tokens, mask)
        losses.append(float(loss))
        if i % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return params, losses


def train_base(cfg: TrainConfig = BASE_TRAINING, config: ModelConfig = DEMO_CONFIG
               ) -> tuple[Llama, list[float]]:
    """The base model, trained to echo: `word=` -> `word`. Returns (model, loss per step)."""
    model = weights.random_model(config, seed=cfg.seed)
    # Only the Params train: the rotary frequencies are constants that checkpoints do not hold
    # (training them would make the saved model differ from the trained one).
    graphdef, params, consts = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, tokens, mask):
        return masked_loss(forward(graphdef, params, tokens, consts=consts), tokens, mask)

    params, losses = _fit(loss_fn, params, cfg, T.ECHO.fn, "base (echo)", mixed_case=True)
    return nnx.merge(graphdef, params, consts), losses


def init_lora(config: ModelConfig, rank: int, seed: int,
              modules: tuple[str, ...] = TARGET_MODULES) -> dict:
    """PEFT's initialisation: A uniform in +-1/sqrt(d_in) (Kaiming, a=sqrt(5)), B zero."""
    rng = np.random.default_rng(seed)
    params = {}
    for layer in range(config.num_layers):
        for m in modules:
            d_in, d_out = config.projection_shape(m)
            bound = 1.0 / math.sqrt(d_in)
            params[f"{layer}.{m}"] = {
                "a": jnp.asarray(rng.uniform(-bound, bound, (rank, d_in)), jnp.float32),
                "b": jnp.zeros((d_out, rank), jnp.float32)}
    return params


def train_adapter(model: Llama, task: T.Task, cfg: TrainConfig = ADAPTER_TRAINING,
                  alpha: float | None = None) -> tuple[dict, float, list[float]]:
    """A LoRA adapter of `task.rank` on every projection, base frozen.
    Returns (params, lora_alpha, loss per step)."""
    alpha = float(alpha if alpha is not None else 2 * task.rank)
    scale = alpha / task.rank
    graphdef, base = nnx.split(model)
    lora = init_lora(model.config, task.rank, cfg.seed)

    def loss_fn(lora, tokens, mask):
        return masked_loss(forward(graphdef, base, tokens, DenseLora(lora, scale)), tokens, mask)

    lora, losses = _fit(loss_fn, lora, cfg, task.fn, f"adapter {task.name} (r={task.rank})")
    return lora, alpha, losses


def save_adapter(path: str, config: ModelConfig, lora: dict, rank: int, alpha: float) -> None:
    """The trained LoRA in PEFT's on-disk format, all seven projections."""
    modules = {(int(layer), m): (p["a"], p["b"])
               for (layer, m), p in ((key.split("."), p) for key, p in lora.items())}
    adapter.save_adapter(path, config, modules, rank=rank, alpha=alpha)


def greedy_answers(graphdef, params, words: list[str], lora: DenseLora | None = None
                   ) -> list[str]:
    """Greedy answers by re-running the full forward per token (training-side check only; the
    tests measure accuracy through the serving engine)."""
    tok = ByteTokenizer()
    prompts = [tok.encode(T.prompt(w)) for w in words]
    tokens = np.full((len(words), SEQ), PAD, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    fwd = jax.jit(lambda p, t: forward(graphdef, p, t, lora))
    done = np.zeros(len(words), bool)
    answers: list[list[int]] = [[] for _ in words]
    for _ in range(T.MAX_LEN + 1):
        logits = np.asarray(fwd(params, tokens))
        nxt = logits[np.arange(len(words)), lengths - 1].argmax(-1)
        for i, t in enumerate(nxt):
            if done[i] or lengths[i] >= SEQ:
                done[i] = True
                continue
            if t in tok.eos_ids:
                done[i] = True
            else:
                answers[i].append(int(t))
                tokens[i, lengths[i]] = t
                lengths[i] += 1
    return [tok.decode(a) for a in answers]


def final_loss(losses: list[float]) -> float:
    """The mean of the last 50 steps' losses (one step's batch is noisy)."""
    return float(np.mean(losses[-50:]))


def plot_losses(curves: dict[str, list[float]], path: str, *,
                title: str = "carajax-demo: the base learns to echo, each adapter its task "
                             "(base frozen)",
                xlabel: str = "optimizer step (batch of 64 fresh words)") -> None:
    """Training loss per step of each model, log scale, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, losses in curves.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy on the answer tokens")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

