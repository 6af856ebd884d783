"""The adapters a replay needs: random PEFT adapters written once to a cache, or a given directory.

A random adapter is keyed by model shape, rank and seed, so a second replay (or the next policy
in the same replay) reuses the files. Workers started with `carajax serve --adapters DIR` register
every sub-directory of DIR by its folder name; `link_dir` builds such a DIR of symlinks named
after the trace's adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from carajax import paths
from carajax.config import ATTENTION_MODULES, ModelConfig
from carajax.testing import write_random_adapter


def default_cache() -> Path:
    """Where random adapters are written once: adapters/ under `carajax.paths.home()`."""
    return paths.home() / "adapters"


def model_key(config: ModelConfig) -> str:
    """A directory name for a model shape: its name plus a hash of the shape (two checkpoints
    both called "model" must not share adapters)."""
    shape = json.dumps(config.to_hf_dict(), sort_keys=True)
    return f"{config.name}-{hashlib.sha1(shape.encode()).hexdigest()[:8]}"


def adapter_seed(seed: int, name: str) -> int:
    """A stable per-adapter seed (Python's `hash` of a str changes between processes)."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{name}".encode()).digest()[:4], "little")


def ensure_random_adapter(cache: str | os.PathLike, config: ModelConfig, rank: int, seed: int) -> str:
    """The directory of a random PEFT adapter (q/k/v/o, rank `rank`) for `config` from `seed`,
    written on first use. Written to a temporary directory and renamed, so concurrent replays
    never read a half-written adapter."""
    path = Path(cache) / model_key(config) / f"r{rank}-s{seed}"
    if (path / "adapter_config.json").is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".r{rank}-s{seed}-", dir=path.parent)
    write_random_adapter(tmp, config, rank=rank, seed=seed, target_modules=ATTENTION_MODULES)
    try:
        os.rename(tmp, path)
    except OSError:  # another process got there first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def random_adapters(ranks: Mapping[str, int], config: ModelConfig, *, cache: str | os.PathLike,
                    seed: int = 0) -> dict[str, str]:
    """{adapter name: directory} for random adapters of the given ranks (see
    `ensure_random_adapter`); each name gets its own weights."""
    return {name: ensure_random_adapter(cache, config, rank, adapter_seed(seed, name))
            for name, rank in ranks.items()}


def scan_adapter_dir(root: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """{folder name: (path, rank)} for every PEFT adapter directory under `root` (the rank is
    the config's `r`; the engine validates the rest when it registers them)."""
    out = {}
    for d in sorted(Path(root).iterdir()):
        cfg = d / "adapter_config.json"
        if cfg.is_file():
            with open(cfg) as f:
                out[d.name] = (str(d), int(json.load(f).get("r", 8)))
    if not out:
        raise FileNotFoundError(f"no PEFT adapter directories (with adapter_config.json) in {root}")
    return out


def link_dir(paths: Mapping[str, str], root: str | os.PathLike) -> str:
    """A directory of symlinks `root/<name> -> path`, for `carajax serve --adapters root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        link = root / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.abspath(path), target_is_directory=True)
    return str(root)
