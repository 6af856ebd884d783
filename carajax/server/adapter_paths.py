"""Where a server may read adapters from at run time (gRPC LoadAdapter, HTTP load_lora_adapter).

A client names a directory on the worker's disk; without a rule, that is a read of any file the
server can read. The rule: every run-time path must resolve, symlinks followed, inside the
adapter root (`--adapter-root`); with no root, run-time loading is off unless the operator says
`--allow-any-adapter-path`. Adapters given at start-up (`carajax serve --adapters`) are the
operator's own and are not checked here.

    policy = AdapterPathPolicy(root="/srv/adapters")
    real = policy.resolve("team-a/legal")      # /srv/adapters/team-a/legal, or AdapterPathError
    engine.add_adapter("legal", real)          # the resolved path: no second lookup of the name
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from carajax.lora.adapter import ADAPTER_FILES, AdapterError


class AdapterPathError(AdapterError):
    """A run-time adapter path this server refuses to read (outside the root, or loading off):
    a permission problem (gRPC PERMISSION_DENIED, HTTP 403), not a malformed adapter."""


@dataclasses.dataclass(frozen=True)
class AdapterPathPolicy:
    """`root`: the directory run-time adapter paths must resolve inside (None: no root).
    `allow_any`: with no root, accept any path (the operator's explicit choice).
    The default policy refuses every run-time path."""

    root: str | None = None
    allow_any: bool = False

    def __post_init__(self):
        if self.root is not None and not os.path.isdir(self.root):
            raise ValueError(f"adapter root {self.root!r} is not a directory")

    @property
    def enabled(self) -> bool:
        """Whether run-time loading is allowed at all."""
        return self.root is not None or self.allow_any

    def describe(self) -> str:
        """One phrase for a start-up line."""
        if self.root is not None:
            return f"run-time adapter loading under {Path(self.root).resolve()}"
        return "run-time adapter loading from any path" if self.allow_any else \
            "run-time adapter loading off"

    def resolve(self, path: str | os.PathLike) -> Path:
        """The real path of `path` (relative paths are taken under the root), or
        `AdapterPathError` saying why it is refused. Symlinks are followed before the check, so a
        link inside the root that points out of it is refused; so is an adapter directory inside
        the root whose files are links to files outside it. Load from the returned path, never
        from `path` again."""
        if not str(path) or "\0" in str(path):
            raise AdapterPathError("empty or malformed adapter path")
        if self.root is None:
            if not self.allow_any:
                raise AdapterPathError(
                    "loading adapters at run time is off on this server (start it with "
                    "--adapter-root DIR, or --allow-any-adapter-path)")
            return _real(path)
        root = Path(self.root).resolve()
        p = Path(path)
        real = _real(p if p.is_absolute() else root / p, shown=path)
        inside = lambda q: q == root or root in q.parents  # noqa: E731
        if not inside(real):
            raise AdapterPathError(f"adapter path {str(path)!r} is outside the adapter root")
        # The loader opens these files by name: each must be inside the root too.
        for name in ADAPTER_FILES:
            if not inside(_real(real / name, shown=path)):
                raise AdapterPathError(f"adapter path {str(path)!r}: {name} links outside the "
                                       "adapter root")
        return real


def _real(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> Path:
    """`Path.resolve()`, with a symlink loop (RuntimeError on Python < 3.13, OSError after) as
    AdapterPathError naming the path as the client gave it."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:
        raise AdapterPathError(f"adapter path {str(shown or path)!r} cannot be resolved "
                               f"({type(e).__name__})") from None
