"""`lora_impl="auto"` by measurement (issue 17, item 3): a per-device table of the fastest SGMV
implementation per shape bucket, written by `scripts/bench_kernels.py --write-table`.

A table is JSON:

    {"device": "nvidia_h200", "date": "...", "command": "...", "dtype": "bfloat16", "d": 4096,
     "entries": [{"tokens": 64, "segments": 8, "max_rank": 64, "best": "fused",
                  "ms": {"fused": 0.01, "pallas": 0.02, "padded": 0.02, "reference": 0.03}}, ...]}

`tokens` and `segments` are power-of-two buckets (`bucket`) of a step's T tokens and G segments
(static shapes in the jitted step), `max_rank` the pool's r_max (the step's static rank bound).
`best` is one of CHOICES: "fused" (`fused_kernels.sgmv_fused`), "pallas" (`kernels.sgmv`
unpadded), "padded" (`kernels.sgmv`, pad_to_max_rank) or "reference" (the jnp path). A step takes
the entry nearest its shape (`KernelTable.choose`); the hook reads the table once per process
(`load` is cached). Where no table exists for the device, or off GPU, "auto" does what
`carajax.autotune` says: a short measurement of the forms verified on the device, else the
reference.

A table may also hold the attention's choice per shape class, `"attention": {"decode":
"pallas", "prefill": "reference"}` (`paged_attention(impl="auto")` reads it through
`carajax.autotune`); a table may hold either part or both.

Tables ship inside the package (`carajax/data/kernel_tables/<device>.json`, package data), copies
of the repository's `data/kernel_tables/` (`tests/test_packaging.py` keeps them equal; the
benchmark's default writes both).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from carajax import data

CHOICES = ("fused", "pallas", "padded", "reference")
ATTENTION_CHOICES = ("pallas", "reference")  # per shape class: "decode" / "prefill"
ENV_TABLE = "CARAJAX_KERNEL_TABLE"  # a table file to use instead of the device's own
# Where tables are read from: inside the installed package.
TABLE_DIR = data.KERNEL_TABLES
# The repository's copy (a clone only), which the benchmark writes beside the shipped one.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "data" / "kernel_tables"


def device_name(device_kind: str) -> str:
    """A file-name form of a device kind: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"


def bucket(n: int) -> int:
    """The power-of-two bucket of a count: the smallest power of two >= n (>= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class KernelTable:
    device: str
    entries: dict[tuple[int, int, int], str]  # (tokens, segments, max_rank) -> a CHOICES name
    # The attention's choice per shape class ("decode", "prefill") -> an ATTENTION_CHOICES name.
    attention: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        bad = {v for v in self.entries.values() if v not in CHOICES}
        if bad:
            raise ValueError(f"kernel table {self.device}: unknown choices {sorted(bad)}; "
                             f"expected one of {CHOICES}")
        bad = {f"{k}: {v}" for k, v in self.attention.items()
               if k not in ("decode", "prefill") or v not in ATTENTION_CHOICES}
        if bad:
            raise ValueError(f"kernel table {self.device}: bad attention choices {sorted(bad)}; "
                             f"expected decode / prefill -> one of {ATTENTION_CHOICES}")
        if not self.entries and not self.attention:
            raise ValueError(f"kernel table {self.device} has no entries")

    def choose(self, tokens: int, segments: int, max_rank: int) -> str:
        """The entry nearest (tokens, segments, max_rank): nearest max rank first, then the
        smallest distance in log2 tokens + log2 segments (ties: the larger bucket)."""
        lt, ls, lr = (math.log2(max(v, 1)) for v in (bucket(tokens), bucket(segments), max_rank))

        def distance(key):
            t, s, r = key
            return (abs(math.log2(r) - lr), abs(math.log2(t) - lt) + abs(math.log2(s) - ls),
                    -t, -s)

        return self.entries[min(self.entries, key=distance)]

    @classmethod
    def from_json(cls, doc: dict) -> KernelTable:
        return cls(str(doc.get("device", "unknown")),
                   {(int(e["tokens"]), int(e["segments"]), int(e["max_rank"])): str(e["best"])
                    for e in doc.get("entries", [])},
                   {str(k): str(v) for k, v in doc.get("attention", {}).items()})


def table_from_rows(rows: Iterable[dict], **meta) -> dict:
    """A table document from benchmark rows, each with `tokens`, `segments`, `max_rank` and
    `choice_ms` ({choice: median ms}). Rows falling in one bucket (e.g. rank mixes with the same
    max rank) add up: `best` is the choice with the least total time over them."""
    totals: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in rows:
        key = (bucket(r["tokens"]), bucket(r["segments"]), int(r["max_rank"]))
        acc = totals.setdefault(key, {})
        for name, ms in r["choice_ms"].items():
            if name not in CHOICES:
                raise ValueError(f"unknown choice {name!r} in a benchmark row")
            acc[name] = acc.get(name, 0.0) + float(ms)
    entries = [{"tokens": t, "segments": s, "max_rank": m, "best": min(ms, key=ms.get), "ms": ms}
               for (t, s, m), ms in sorted(totals.items())]
    return {**meta, "entries": entries}


def table_path(device_kind: str) -> Path:
    """The table file for a device: $CARAJAX_KERNEL_TABLE, else the package's
    carajax/data/kernel_tables/<device>.json."""
    return Path(os.environ.get(ENV_TABLE) or TABLE_DIR / f"{device_name(device_kind)}.json")


@functools.cache
def load(device_kind: str) -> KernelTable | None:
    """The device's table, read once per process; None when there is none."""
    path = table_path(device_kind)
    if not path.is_file():
        return None
    return KernelTable.from_json(json.loads(path.read_text()))
