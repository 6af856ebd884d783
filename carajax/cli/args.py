"""Argument types, checks and flags shared by the commands.

A check reads a parsed value and raises `UsageError` (one line naming the flag) before anything
is built or started; an `add_*` function adds flags that several commands take alike.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from carajax.config import COLD_START_POLICIES, ModelConfig
from carajax.errors import UsageError

DTYPES = ("float32", "bfloat16")


def existing_file(flag: str, path: str | os.PathLike) -> str:
    """`path` if it is a file, else `UsageError` naming the flag (one line, the path once)."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: not a file")
    return os.fspath(path)


def model_config_arg(model: str, flag: str = "--model") -> ModelConfig:
    """The ModelConfig of a --model value (an HF checkpoint directory, a GGUF file, a model carajax
    pulls by name, pulled now if need be, or a preset name), read without building anything;
    `UsageError` saying what it is not."""
    from carajax.models import hub

    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        raise UsageError(f"{flag} {model}: no config.json in this directory")
    try:
        return hub.model_config(model)
    except KeyError as e:
        if os.path.isdir(model):
            raise UsageError(f"{flag} {model}: config.json has no {e}") from None
        from carajax.config import PRESETS

        if os.path.exists(model):
            what = "not a checkpoint directory nor a .gguf file"
        elif os.sep in model or model.startswith("."):
            what = "no such file or directory"
        else:
            what = (f"not a checkpoint directory, GGUF file, model to pull "
                    f"({', '.join(sorted(hub.MODELS))}) nor a preset ({', '.join(sorted(PRESETS))})")
        raise UsageError(f"{flag} {model}: {what}") from None
    except (ValueError, TypeError) as e:  # a checkpoint carajax cannot serve, a failed pull
        raise UsageError(f"{flag} {model}: {e}") from None


def int_list(flag: str, text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, or `UsageError`."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: expected integers >= 1")
    return values


def cost_model_arg(path: str | os.PathLike):
    """A cost model file, read; `UsageError` if it is missing or not one."""
    from carajax.sched import cost_model as cm

    existing_file("--cost-model", path)
    try:
        return cm.load(path)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"--cost-model {path}: not a cost model ({type(e).__name__}: {e})") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def adapter_dirs_arg(root: str) -> list[Path]:
    """The adapter directories (with adapter_config.json) under --adapters, sorted; `UsageError`
    if there is no such directory or it holds none (a typo must not start an empty server)."""
    if not os.path.exists(root):
        raise UsageError(f"--adapters {root}: no such directory")
    if not os.path.isdir(root):
        raise UsageError(f"--adapters {root}: not a directory")
    dirs = sorted(d for d in Path(root).iterdir() if (d / "adapter_config.json").is_file())
    if not dirs:
        raise UsageError(f"--adapters {root}: no adapter directories in it (folders holding "
                         "adapter_config.json and adapter_model.safetensors)")
    return dirs


def adapter_root_arg(root: str) -> str:
    """--adapter-root's directory; `UsageError` if there is none. It may be empty: adapters copied
    into it later are found by name."""
    if not os.path.isdir(root):
        raise UsageError(f"--adapter-root {root}: "
                         + ("not a directory" if os.path.exists(root) else "no such directory"))
    return root


ADAPTER_ROOT_HELP = ("a request naming an adapter that is not registered gets DIR/<name> (a PEFT "
                     "directory), registered on first use and listed by /v1/models; a name with a "
                     "path separator or a leading '.' is refused (400), one not under DIR is 404, "
                     "a broken adapter 400")


def check_tp(model: str, tp: int) -> None:
    """Exit with a message (not a traceback) if the model is unknown or `tp` does not fit this
    machine's devices or the model's heads; checked before any weights are built or read."""
    from carajax import parallel

    config = model_config_arg(model)
    try:
        parallel.check_tp(config, tp)
        parallel.check_devices(tp)
    except ValueError as e:
        raise UsageError(f"--tp {tp}: {e}") from None


def add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor parallelism: shard the model over N local devices (must divide the "
                        "attention heads, KV heads and MLP width; default: %(default)s, no sharding)")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the base model's weights and computation (default: %(default)s)")


def add_cold_start_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cold-start", default="auto", choices=COLD_START_POLICIES,
                   help="what a request does whose adapter is not on the device yet: cpu_assist starts "
                        "at once with its LoRA computed on the CPU until the adapter's copy lands; "
                        "async waits in the queue while the copy runs (the batch goes on); wait makes "
                        "the step that needs it block on the copy; auto picks cpu_assist per request "
                        "when the host would finish its prompt's LoRA before the copy lands, else "
                        "async; cached loads every adapter onto the device when it is registered "
                        "(default: %(default)s)")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(text: str) -> int:
    """Bytes from "268435456", "256MiB", "1.5GB" (decimal and binary units, any case); an
    argparse type (a bad value is one line naming the flag)."""
    t = text.strip().replace(" ", "").upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: not a size (bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return int(value)


def add_host_budget_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-lora-budget", type=byte_size, default=None, metavar="SIZE",
                   help="host memory for adapters' weights, e.g. 256MiB or 4GB: beyond it the least "
                        "recently used adapters leave host memory (their files stay registered and "
                        "are read again on their next request; pinned and running ones stay) "
                        "(default: no limit)")


def add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link-gbps", type=float, default=None, metavar="GBPS",
                   help="emulate a host->device link of GBPS GB/s: an adapter copy becomes usable only "
                        "after --link-latency-ms + its bytes / GBPS (for machines without an "
                        "accelerator, whose copies are memcpys; default: no emulation)")
    p.add_argument("--link-latency-ms", type=float, default=0.0, metavar="MS",
                   help="fixed latency of each emulated adapter copy, in milliseconds; only with "
                        "--link-gbps (default: %(default)s)")


__all__ = [
    "ADAPTER_ROOT_HELP", "DTYPES", "UsageError", "adapter_dirs_arg", "adapter_root_arg",
    "add_cold_start_arg", "add_dtype_arg", "add_host_budget_arg", "add_link_args", "add_tp_arg", "byte_size",
    "check_tp", "cost_model_arg", "existing_file", "int_list", "model_config_arg", "positive_int",
]
