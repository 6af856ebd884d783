"""What `auto` runs on this device, for the paged attention and for the LoRA ops (issue 24, item
7: GPU defaults that cannot hurt).

A compiled kernel form runs by default only where it has passed the compiled correctness run on
this device kind. Per op ("attention": `models.attention.paged_attention`, "lora": the hook's
SGMV) the rule is, in order (`decide` is the pure rule for one shape class):

1. off a GPU: the jnp reference (on CPU Pallas only interprets, several times slower);
2. a measured kernel table for the device kind ships (`lora.kernel_table`; its `entries` for
   LoRA, its `attention` for the attention): the table;
3. some forms are recorded verified for the device kind (`verified_forms`, from the shipped
   record `carajax/data/kernel_tables/verified.json`) and the engine's warm-up has measured
   them: per shape class ("decode", "prefill") the fastest of those forms and the reference,
   timed on the engine's own shapes (`engine.kernel_timing`: median of a few calls after a
   compiling one; a form that raises or disagrees with the reference is left out);
4. otherwise the jnp reference: never an untested kernel by default.

The record is written by the GPU run (`scripts/gpu_check.sh`: `scripts/record_verified.py` adds
the forms whose compiled test classes all passed; `scripts/bench_kernels.py --verified` removes
a LoRA form that disagrees with its reference). It ships empty until a GPU has run them.

This module is the rule, the record and what `auto` reads (`attention_impl`, `lora_impl`,
`lora_table`), below the attention and the LoRA hook that read it; the timing, which calls
them, is `engine.kernel_timing.warm_up`, run once per engine (`ModelRunner.__init__`, before
anything is traced). Its results are kept here (`measured_once`), process-wide, per device kind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax

from carajax import data
from carajax.lora import kernel_table

OPS = ("attention", "lora")
# The compiled kernel forms of each op (the jnp "reference" is always allowed): attention's Pallas
# kernel; LoRA's two-call Pallas SGMV unpadded ("pallas") or padded to the batch's max rank
# ("padded"), and the fused one-call SGMV ("fused"): `hook._ops` runs each.
FORMS = {"attention": ("pallas",), "lora": ("pallas", "padded", "fused")}
SHAPE_CLASSES = ("decode", "prefill")
RECORD_PATH = data.KERNEL_TABLES / "verified.json"
ENV_RECORD = "CARAJAX_VERIFIED_KERNELS"  # a record file to read instead of the shipped one


def device() -> tuple[str, str]:
    """(platform, device kind) of JAX's default device, e.g. ("gpu", "NVIDIA H200"), ("cpu",
    "cpu"). Tests replace this to simulate a GPU."""
    return jax.default_backend(), jax.devices()[0].device_kind


# -- the record of verified forms ---------------------------------------------------------------
def record_path() -> Path:
    return Path(os.environ.get(ENV_RECORD) or RECORD_PATH)


@functools.cache
def _read_record(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {"devices": {}}


def load_record(path: str | os.PathLike | None = None) -> dict:
    """The record document: {"about": ..., "devices": {device kind: {op: {form: provenance}}}}."""
    return _read_record(str(path or record_path()))


def verified_forms(device_kind: str, record: Mapping | None = None) -> dict[str, frozenset[str]]:
    """Per op, the forms recorded as passing the compiled correctness run on this device kind
    (only known forms of known ops count)."""
    entry = (load_record() if record is None else record).get("devices", {}).get(device_kind, {})
    return {op: frozenset(f for f in entry.get(op, {}) if f in FORMS[op]) for op in OPS}


def update_record(doc: Mapping, device_kind: str, op: str, *, passed: Iterable[str] = (),
                  failed: Iterable[str] = (), provenance: Mapping | None = None) -> dict:
    """A copy of the record with this device kind's `passed` forms of `op` added (with their
    provenance: date, commit, jax, check) and its `failed` ones removed; other entries kept."""
    if op not in FORMS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    passed, failed = list(passed), set(failed)
    unknown = sorted({*passed, *failed} - set(FORMS[op]))
    if unknown:
        raise ValueError(f"unknown {op} forms {unknown}; expected some of {FORMS[op]}")
    out = json.loads(json.dumps(dict(doc)))  # a deep copy
    devices = out.setdefault("devices", {})
    forms = devices.setdefault(device_kind, {}).setdefault(op, {})
    for f in passed:
        if f not in failed:
            forms[f] = dict(provenance or {})
    for f in failed:
        forms.pop(f, None)
    if not forms:
        devices[device_kind].pop(op)
    if not devices[device_kind]:
        devices.pop(device_kind)
    return out


# -- the decision -------------------------------------------------------------------------------
def decide(platform: str, *, table: bool = False, verified: Iterable[str] = (),
           timings: Mapping[str, float] | None = None) -> str:
    """What `auto` runs for one op and shape class: "reference" (the jnp path), "table" (the
    shipped measured table decides) or a verified form.

    Off a GPU: "reference". With a table: "table". With verified forms and their `timings`
    (seconds per call, e.g. from `kernel_timing.measure`, the reference's included): the fastest of the
    verified forms and the reference (a tie goes to the reference; a form not verified is never
    chosen, however fast). Otherwise (nothing verified, or not measured): "reference"."""
    if platform != "gpu":
        return "reference"
    if table:
        return "table"
    allowed = set(verified) | {"reference"}
    timed = {f: t for f, t in (timings or {}).items() if f in allowed and math.isfinite(t)}
    if len(allowed) == 1 or not timed:
        return "reference"
    return min(timed, key=lambda f: (timed[f], f != "reference"))


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `auto` runs for one op on one device kind, and why."""

    op: str
    source: str  # "reference" | "table" (the shipped table decides) | "measured" (by `warm_up`)
    forms: Mapping[str, str]  # shape class -> form; empty under "table"
    timings: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    shapes: Any = None  # what was timed ("measured"): an `engine.kernel_timing.EngineShapes`

    @classmethod
    def reference(cls, op: str) -> Choice:
        return cls(op, "reference", {c: "reference" for c in SHAPE_CLASSES})


_LOCK = threading.Lock()
_MEASURED: dict[str, dict[str, Choice]] = {}  # device kind -> op -> the Choice warm_up measured
_DONE: dict[tuple, dict[str, Choice]] = {}  # what warm_up already measured, by its inputs


def reset() -> None:
    """Forget every measured choice (tests)."""
    with _LOCK:
        _MEASURED.clear()
        _DONE.clear()


def measured_once(key: tuple, device_kind: str,
                  measure: Callable[[], dict[str, Choice]]) -> dict[str, Choice]:
    """`measure()`'s choices for `key` (what `engine.kernel_timing.warm_up` was asked), measured
    once per process, under a lock (engines starting together measure once); its measured
    choices become what `auto` reads on `device_kind`."""
    with _LOCK:
        if key in _DONE:
            return _DONE[key]
        choices = measure()
        for op, choice in choices.items():
            if choice.source == "measured":
                _MEASURED.setdefault(device_kind, {})[op] = choice
        _DONE[key] = choices
        return choices


def current(device_kind: str | None = None) -> dict[str, Choice]:
    """The choices `warm_up` measured on this device kind (default: JAX's device), by op."""
    return dict(_MEASURED.get(device_kind or device()[1], {}))


# -- what `auto` reads ----------------------------------------------------------------------------
def attention_impl(decode: bool) -> str:
    """`paged_attention(impl="auto")`'s form for a decode-shaped (query block 1) or a prefill
    step, read at trace time: the shipped table's, else the measured one, else "reference"."""
    plat, kind = device()
    if plat != "gpu":
        return "reference"
    cls = "decode" if decode else "prefill"
    table = kernel_table.load(kind)
    if table is not None and table.attention:
        return table.attention.get(cls, "reference")
    chosen = _MEASURED.get(kind, {}).get("attention")
    return chosen.forms.get(cls, "reference") if chosen is not None else "reference"


def lora_table(device_kind: str | None = None) -> kernel_table.KernelTable | None:
    """The per-shape LoRA table `lora_impl="table"` reads: the shipped one, else one made from
    the measured choices (an entry for the decode and for the prefill step), else None."""
    kind = device_kind or device()[1]
    table = kernel_table.load(kind)
    if table is not None and table.entries:
        return table
    chosen = _MEASURED.get(kind, {}).get("lora")
    if chosen is None or chosen.source != "measured":
        return None
    s = chosen.shapes
    # The hook asks per step (T tokens, G = seqs segments, the pool's max rank): the nearest of
    # the decode step's and the prefill step's entries.
    return kernel_table.KernelTable(kernel_table.device_name(kind), {
        (kernel_table.bucket(s.segments(c)[0]), kernel_table.bucket(s.seqs), s.max_rank):
            chosen.forms[c] for c in SHAPE_CLASSES})


def lora_impl(platform: str | None = None) -> str:
    """`lora_impl="auto"` resolved for this device: "reference" off a GPU or with nothing
    shipped or measured; "table" with a shipped table (or measured choices that differ between
    decode and prefill: `lora_table` holds them); else the one measured form."""
    plat, kind = device()
    if (platform or plat) != "gpu":
        return "reference"
    table = kernel_table.load(kind)
    if table is not None and table.entries:
        return "table"
    chosen = _MEASURED.get(kind, {}).get("lora")
    if chosen is None:
        return "reference"
    forms = set(chosen.forms.values())
    return forms.pop() if len(forms) == 1 else "table"
