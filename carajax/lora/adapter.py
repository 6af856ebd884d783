"""PEFT LoRA adapter directories -> validated host weights (and `save_adapter`, the writer).

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, with keys
such as `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (older PEFT and some
tools keep the adapter name: `...q_proj.lora_A.default.weight`). Both are accepted.

Everything is checked against the base model before an adapter is accepted; anything carajax does
not serve exactly as PEFT computes it is rejected with an `AdapterError` naming the field.

Adapter files may come from clients (gRPC `LoadAdapter`, HTTP `load_lora_adapter`), so reading
one is bounded before it starts: safetensors only (a PEFT `adapter_model.bin` is a pickle, which
runs code when loaded: it is never opened), a size limit per adapter (`max_bytes`), and the
safetensors header (size, names, dtypes, shapes against the model, ranks) checked in full before
any tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from carajax import _safetensors
from carajax.config import ATTENTION_MODULES, TARGET_MODULES, ModelConfig


class AdapterError(ValueError):
    """An adapter that cannot be served: malformed, unsupported, or not fitting the base model."""


CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # every file `load_adapter` opens
# Generous: a rank-64 adapter on all seven projections of Llama-2-70B is 3.3 GB in float32 (1.7 GB
# in bfloat16); raise it for larger ones (load_adapter(max_bytes=...)).
MAX_ADAPTER_BYTES = 4 << 30
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json is a few hundred bytes; read whole, so bounded


_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$")

# Config fields that change the math away from plain LoRA (value that means "off").
_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "modules_to_save": None, "layer_replication": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "use_qalora": False,
    "target_parameters": None, "fan_in_fan_out": False, "use_bdlora": None,
}


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One projection's LoRA: delta = scale * (x @ a.T) @ b.T."""

    a: np.ndarray  # [r, d_in]
    b: np.ndarray  # [d_out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter in host memory, keyed by (layer, projection name)."""

    name: str
    path: str
    modules: dict[tuple[int, str], LoraModule]

    @property
    def rank(self) -> int:
        """The largest rank over its projections (what a padded slot must hold)."""
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> tuple[str, ...]:
        present = {name for _, name in self.modules}
        return tuple(m for m in TARGET_MODULES if m in present)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def stacked(self, config: ModelConfig, module: str, r_max: int, dtype) -> tuple:
        """Padded per-layer arrays of one projection for a device slot.

        Returns a [L, r_max, d_in], b [L, d_out, r_max], ranks int32 [L], scales float32 [L];
        layers this adapter does not touch get rank 0, scale 0 and zero weights.
        """
        d_in, d_out = config.projection_shape(module)
        L = config.num_layers
        a = np.zeros((L, r_max, d_in), dtype)
        b = np.zeros((L, d_out, r_max), dtype)
        ranks, scales = np.zeros(L, np.int32), np.zeros(L, np.float32)
        for layer in range(L):
            m = self.modules.get((layer, module))
            if m is not None:
                a[layer, :m.rank] = m.a
                b[layer, :, :m.rank] = m.b
                ranks[layer], scales[layer] = m.rank, m.scale
        return a, b, ranks, scales


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _is_targeted(target, key: str) -> bool:
    """PEFT's target matching: a regex on the whole key, or a list of (suffix) names."""
    if target == "all-linear":
        return True  # PEFT excludes lm_head; embeddings are never linear
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    return any(key == t or key.endswith("." + t) for t in target)


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if os.path.exists(file) and not os.path.isfile(file):  # a directory, a FIFO, a device
        raise AdapterError(f"{file}: not a regular file")
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{file}: over {MAX_CONFIG_BYTES} bytes; not an adapter config")
        cfg = json.loads(raw)
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{file}: peft_type is {peft_type!r}; only LORA is served")
    for field, off in _UNSUPPORTED.items():
        value = cfg.get(field, off)
        if value not in (off, None, False, [], {}):
            raise AdapterError(f"{file}: {field}={value!r} is not supported "
                               f"(carajax serves plain LoRA)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise AdapterError(f"{file}: {field} must be a positive number, got {cfg.get(field)!r}")
    return cfg


def open_adapter_dir(path: str, max_bytes: int) -> tuple[dict, str]:
    """(its adapter_config.json, its weights file) of a PEFT adapter directory: `AdapterError`
    if either is missing or unreadable, the weights are only a pickle, or over `max_bytes`."""
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: not a directory")
    cfg = _read_config(path)
    weights_file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_file):
        if os.path.exists(os.path.join(path, "adapter_model.bin")):
            raise AdapterError(f"{path}: only adapter_model.bin, a pickle, which carajax never loads "
                               f"(unpickling runs code): safetensors is required (convert it to "
                               f"{WEIGHTS_FILE})")
        raise AdapterError(f"{path}: missing {WEIGHTS_FILE}")
    size = os.path.getsize(weights_file)
    if size > max_bytes:
        raise AdapterError(f"{weights_file}: {size} bytes, over the limit of {max_bytes} bytes per "
                           "adapter")
    return cfg, weights_file


def load_adapter(path: str | os.PathLike, config: ModelConfig, *, max_rank: int,
                 name: str | None = None, max_bytes: int = MAX_ADAPTER_BYTES) -> LoraAdapter:
    """Parse and validate a PEFT LoRA adapter directory against a base model.

    Raises `AdapterError` naming the cause: a missing or corrupt file, a pickle-only adapter
    (`adapter_model.bin`, never unpickled), a weights file over `max_bytes`, an unsupported
    feature (DoRA, modules_to_save, bias, LoRA on embeddings or lm_head, ...), a tensor whose shape
    does not fit the base model, a rank over `max_rank`, a non-float or non-finite tensor. All but
    the last are found from the file's header, before any tensor is read.
    """
    path = os.fspath(path)
    cfg, weights_file = open_adapter_dir(path, max_bytes)
    try:
        header = _safetensors.read_header(weights_file)
    except _safetensors.SafetensorsError as e:
        raise AdapterError(f"corrupt adapter weights: {e}") from None
    pairs = _check_header(weights_file, header[0], cfg, config, max_rank)

    tensors = _safetensors.load(weights_file, header=header)  # memory-mapped: read from here on
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, module), keys in pairs.items():
        a32, b32 = (np.asarray(tensors[keys[ab]], np.float32) for ab in "AB")
        if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
            raise AdapterError(f"{weights_file}: {_module_key(layer, module)} has non-finite values "
                               "(NaN or Inf)")
        key, r = _module_key(layer, module), a32.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, key, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[(layer, module)] = LoraModule(a=a32, b=b32, scale=float(scale))
    return LoraAdapter(name=name or os.path.basename(os.path.normpath(path)), path=path,
                       modules=modules)


def _module_key(layer: int, module: str) -> str:
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


def _check_header(weights_file: str, header: dict, cfg: dict, config: ModelConfig, max_rank: int
                  ) -> dict[tuple[int, str], dict[str, str]]:
    """Every check that needs only the safetensors header (names, dtypes, shapes against the
    model, ranks against the config and `max_rank`); {(layer, projection): {"A": key, "B": key}},
    sorted."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key, info in header.items():
        m = _KEY.match(key)
        if m is None:
            if "embed_tokens" in key or "lora_embedding" in key:
                raise AdapterError(f"{weights_file}: LoRA on embeddings is not supported ({key})")
            if "lm_head" in key:
                raise AdapterError(f"{weights_file}: LoRA on lm_head is not supported ({key})")
            if "magnitude" in key:
                raise AdapterError(f"{weights_file}: DoRA weights are not supported ({key})")
            raise AdapterError(f"{weights_file}: unexpected tensor {key!r}")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGET_MODULES:
            raise AdapterError(f"{weights_file}: LoRA on {module!r} is not supported "
                               f"(targets: {', '.join(TARGET_MODULES)})")
        if layer >= config.num_layers:
            raise AdapterError(f"{weights_file}: tensor {key!r} is for layer {layer}, but the "
                               f"base model has {config.num_layers} layers")
        dtype = _safetensors.dtype_of(info)
        if dtype.kind != "f" and dtype.name != "bfloat16":
            raise AdapterError(f"{weights_file}: tensor {key!r} has dtype {dtype}; "
                               "expected a float type")
        pairs.setdefault((layer, module), {})[ab] = key
    if not pairs:
        raise AdapterError(f"{weights_file}: no LoRA tensors found")

    target = cfg.get("target_modules")
    layers_to_transform = cfg.get("layers_to_transform")
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    for (layer, module), ab in pairs.items():
        key = _module_key(layer, module)
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: {key} has lora_{''.join(ab)} but not its pair")
        if target is not None and not _is_targeted(target, key):
            raise AdapterError(f"{weights_file}: {key} has LoRA weights but is not in "
                               f"target_modules={target!r}")
        if layers_to_transform is not None and layer not in layers_to_transform:
            raise AdapterError(f"{weights_file}: {key} is outside layers_to_transform")
        a, b = (tuple(header[ab[x]]["shape"]) for x in "AB")
        d_in, d_out = config.projection_shape(module)
        r = a[0] if a else 0
        if len(a) != 2 or len(b) != 2 or a[1] != d_in or b != (d_out, r):
            raise AdapterError(
                f"{weights_file}: {key} has lora_A {a} and lora_B {b}; "
                f"the base model needs lora_A [r, {d_in}] and lora_B [{d_out}, r]")
        want_r = _pattern_value(cfg.get("rank_pattern") or {}, key, cfg["r"])
        if r != want_r:
            raise AdapterError(f"{weights_file}: {key} has rank {r} but the config "
                               f"(r / rank_pattern) says {want_r}")
        if r > max_rank:
            raise AdapterError(f"{os.path.dirname(weights_file)}: rank {r} of {key} exceeds the "
                               f"limit max_lora_rank={max_rank}")
    return dict(sorted(pairs.items()))


def save_adapter(path: str | os.PathLike, config: ModelConfig,
                 modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], *, rank: int,
                 alpha: float, use_rslora: bool = False, extra_config: dict | None = None,
                 dtype=np.float32) -> str:
    """Write `modules[(layer, projection)] = (A [r, d_in], B [d_out, r])` as PEFT's
    `save_pretrained` does (`adapter_config.json` + `adapter_model.safetensors`, keys without the
    adapter name), tensors in `dtype` (float32, or e.g. `ml_dtypes.bfloat16` for half the bytes);
    `load_adapter` and PEFT read it back."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for (layer, module), (a, b) in modules.items():
        group = "self_attn" if module in ATTENTION_MODULES else "mlp"
        key = f"base_model.model.model.layers.{layer}.{group}.{module}"
        tensors[f"{key}.lora_A.weight"] = np.asarray(a, np.float32).astype(dtype)
        tensors[f"{key}.lora_B.weight"] = np.asarray(b, np.float32).astype(dtype)
    _safetensors.save(os.path.join(path, "adapter_model.safetensors"), tensors)
    present = {m for _, m in modules}
    targets = [m for m in TARGET_MODULES if m in present]  # the model's order, as PEFT lists them
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": float(alpha),
        "target_modules": targets, "bias": "none", "use_rslora": use_rslora, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0,
        "fan_in_fan_out": False, "base_model_name_or_path": config.name,
    }
    cfg.update(extra_config or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path
