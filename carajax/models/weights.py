"""Model weights: Hugging Face safetensors checkpoints, random init for presets, orbax snapshots.

Nothing here touches the network: a checkpoint is a local directory holding `config.json` and
either `model.safetensors` or a sharded `model.safetensors.index.json` with its shard files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from carajax import _safetensors
from carajax.config import ModelConfig
from carajax.models.llama import Llama, rope_inv_freq


class CheckpointError(ValueError):
    """A checkpoint that is missing files or tensors, or whose shapes do not fit its config."""


def _hf_name(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name, whether HF stores it transposed):
    ("layers", 3, "mlp", "up_proj", "kernel") -> "model.layers.3.mlp.up_proj.weight"."""
    parts = [str(p) for p in path]
    transpose = parts[-1] == "kernel"
    if transpose:
        parts[-1] = "weight"
    if parts[0] == "embed_tokens":
        parts.append("weight")
    name = ".".join(parts)
    return (name if parts[0] == "lm_head" else "model." + name), transpose


def _checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.exists(single):
        header, _ = _safetensors.read_header(single)
        return {name: single for name in header}
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are supported "
                              "(found pytorch_model.bin)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def abstract_model(config: ModelConfig, dtype) -> Llama:
    """The model's structure with shapes only (no memory allocated)."""
    return nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))


def random_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0,
                 init_std: float = 0.02) -> Llama:
    """A model with random weights (normal, std `init_std`) for a preset or any config."""
    return Llama(config, dtype=dtype, rngs=nnx.Rngs(seed), init_std=init_std)


def load_hf(path: str | os.PathLike, config: ModelConfig | None = None, *,
            dtype=jnp.float32) -> Llama:
    """Load a HF Llama safetensors checkpoint (single file or sharded) with weights cast to dtype."""
    path = os.fspath(path)
    config = config or ModelConfig.from_hf(path)
    files = _checkpoint_files(path)
    by_file: dict[str, dict[str, np.ndarray]] = {}

    def read(name: str) -> np.ndarray:
        file = files[name]
        if file not in by_file:
            by_file[file] = _safetensors.load(file)
        return by_file[file][name]

    try:
        return from_tensors(read, files, config, dtype=dtype, where=path)
    except _safetensors.SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def from_tensors(read: Callable[[str], np.ndarray], names: Collection[str], config: ModelConfig, *,
                 dtype=jnp.float32, where: str = "checkpoint") -> Llama:
    """A model from tensors named and laid out as HF Llama stores them (`read(name)`, once per
    parameter; `names` what the source holds), each checked against the config's shape and cast
    to dtype. `where` names the source in errors."""
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)

    def tensor(hf: str, transpose: bool, shape: tuple[int, ...]) -> np.ndarray:
        if hf not in names:
            raise CheckpointError(f"{where}: checkpoint has no tensor {hf!r}")
        arr = read(hf)
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {hf!r} has shape {tuple(arr.shape)}, "
                                  f"config expects {tuple(shape)}")
        return arr

    def fill(keypath, leaf):
        names = tuple(k.key if hasattr(k, "key") else k.idx for k in keypath)
        if names == ("inv_freq",):
            return jnp.asarray(rope_inv_freq(config))
        hf, transpose = _hf_name(names)
        arr = tensor(hf, transpose, leaf.shape)
        return jnp.asarray(np.asarray(arr, np.float32) if arr.dtype != leaf.dtype else arr,
                           dtype=leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def save_hf(model: Llama, path: str | os.PathLike) -> None:
    """Write the model as a HF checkpoint (`config.json` + `model.safetensors`)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(pure):
        names = tuple(k.key if hasattr(k, "key") else k.idx for k in keypath)
        hf, transpose = _hf_name(names)
        arr = np.asarray(leaf)
        tensors[hf] = arr.T if transpose else arr
    _safetensors.save(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)


def save_orbax(model: Llama, path: str | os.PathLike) -> None:
    """Snapshot the model's state with orbax (fast reload of a converted checkpoint)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(os.fspath(path)), nnx.to_pure_dict(nnx.state(model)))


def restore_orbax(path: str | os.PathLike, config: ModelConfig, *, dtype=jnp.float32) -> Llama:
    """Restore a model saved with `save_orbax`; dtype must match the saved one."""
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract_model(config, dtype))
    target = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.abspath(os.fspath(path)), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
