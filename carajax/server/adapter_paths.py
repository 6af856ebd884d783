"""Where a server may read adapters from at run time (gRPC LoadAdapter, HTTP load_lora_adapter).

A client names a directory on the worker's disk; without a rule, that is a read of any file the
server can read. The rule: every run-time path must resolve, symlinks followed, inside the
adapter root (`--adapter-root`); with no root, run-time loading is off unless the operator says
`--allow-any-adapter-path`. Adapters given at start-up (`carajax serve --adapters`) are the
operator's own and are not checked here.

    policy = AdapterPathPolicy(root="/srv/adapters")
    real = policy.resolve("team-a/legal")      # /srv/adapters/team-a/legal, or AdapterPathError
    engine.add_adapter("legal", real)          # the resolved path: no second lookup of the name

With a root, a request may also name an adapter that is not registered: `AdapterStore` finds
`root/<name>` (a plain directory name only: no separator, no leading dot, checked before any disk
access), registers it on first use through this same policy (so links out of the root are
refused), and lists the names under the root for /v1/models.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from carajax.lora.adapter import ADAPTER_FILES, CONFIG_FILE, AdapterError, _read_config


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


class AdapterNameError(AdapterError):
    """A requested adapter name that cannot be a directory under the root (a separator, `..`, a
    leading dot, ...): a malformed request (gRPC INVALID_ARGUMENT, HTTP 400)."""


MAX_NAME_CHARS = 255  # NAME_MAX of common file systems


def check_adapter_name(name: str) -> str:
    """`name` if it is one plain path component, what `root/<name>` may be; `AdapterNameError`
    otherwise. Reads nothing from disk."""
    why = ("empty" if not name else
           f"over {MAX_NAME_CHARS} characters" if len(name) > MAX_NAME_CHARS else
           "a control character" if any(ord(c) < 32 for c in name) else  # NUL included
           "a path separator" if "/" in name or "\\" in name else
           "a leading '.'" if name.startswith(".") else None)  # '.', '..', hidden entries
    if why is not None:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise AdapterNameError(f"adapter name {shown!r} is not a plain directory name ({why})")
    return name


class AdapterStore:
    """The adapters a server finds by name under its adapter root: `root/<name>`, a PEFT
    directory, registered in the engine on the first request that names it (`register`).
    Registration reads the config and the safetensors header; the weights go to the engine's host
    tier (LRU within its budget) when a request needs them, as for any registered adapter."""

    def __init__(self, policy: AdapterPathPolicy, *, listing_ttl_s: float = 5.0):
        if policy.root is None:
            raise ValueError("an AdapterStore needs a policy with a root")
        self.policy, self.root = policy, Path(policy.root).resolve()
        self.listing_ttl_s = listing_ttl_s
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}  # one per name found (bounded by the root)
        self._listing: tuple[float, tuple[str, ...]] = (-float("inf"), ())
        self._ranks: dict[str, tuple[float, int | None]] = {}

    def path(self, name: str) -> Path | None:
        """The real directory of adapter `name`, or None if `root/<name>` is no directory.
        `AdapterNameError` for a malformed name (before any disk access), `AdapterPathError` if it
        resolves (links followed) outside the root."""
        check_adapter_name(name)
        if not (self.root / name).is_dir():
            return None
        return self.policy.resolve(name)

    def register(self, engine, name: str):
        """The spec of adapter `name` in `engine`, registered now from `root/<name>` if the engine
        does not hold it yet (once, however many requests ask at the same time); None if there is
        no such directory. Raises `AdapterNameError`, `AdapterPathError`, `AdapterError` (a broken
        adapter: the message names it and what is wrong, paths relative to the root) and the
        engine's `PoolFullError`; nothing is registered then."""
        if (spec := engine.get_adapter(name)) is not None:
            return spec
        path = self.path(name)
        if path is None:
            return None
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # the others wait, then find it registered
            if (spec := engine.get_adapter(name)) is None:
                try:
                    spec = engine.add_adapter(name, path)
                except AdapterError as e:
                    if (spec := engine.get_adapter(name)) is not None:  # a LoadAdapter came first
                        return spec
                    raise AdapterError(f"adapter {name!r} under the adapter root cannot be served: "
                                       f"{self._relative(e)}") from None
        return spec

    def names(self) -> tuple[str, ...]:
        """The adapter names under the root, sorted: plain-named directories holding an
        adapter_config.json (links out of the root left out). Kept for `listing_ttl_s`, so a root
        of thousands of directories costs one scandir and one stat per directory every few
        seconds at most, however often /v1/models is asked; no file is read (a broken adapter is
        listed, and refused when a request names it)."""
        now = time.monotonic()
        at, names = self._listing
        if now - at < self.listing_ttl_s:
            return names
        found = []
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if self._listed(entry):
                        found.append(entry.name)
        except OSError:  # the root went away: nothing to list
            pass
        self._listing = (now, tuple(sorted(found)))
        return self._listing[1]

    def _listed(self, entry: os.DirEntry) -> bool:
        try:
            check_adapter_name(entry.name)
            if not (entry.is_dir() and os.path.isfile(os.path.join(entry.path, CONFIG_FILE))):
                return False
            if entry.is_symlink():
                self.policy.resolve(entry.name)  # a link out of the root: not listed
            return True
        except (AdapterError, OSError):
            return False

    def rank(self, name: str) -> int | None:
        """The rank of adapter `name` from its adapter_config.json alone (`r`, or the largest in
        its `rank_pattern`), for a router pricing a cold start of an adapter no worker holds yet;
        None if there is no `root/<name>`; 0 if its config cannot be read (the worker that gets
        the request says what is wrong). Raises as `path`. Kept for `listing_ttl_s`."""
        check_adapter_name(name)
        now = time.monotonic()
        if (cached := self._ranks.get(name)) is not None and now - cached[0] < self.listing_ttl_s:
            return cached[1]
        path = self.path(name)
        rank = None
        if path is not None:
            try:
                cfg = _read_config(str(path))
                pattern = cfg.get("rank_pattern") or {}
                rank = int(max([cfg["r"], *pattern.values()]))
            except (AdapterError, TypeError, ValueError, AttributeError):
                rank = 0
        if len(self._ranks) > 4096:
            self._ranks.clear()
        self._ranks[name] = (now, rank)
        return rank

    def _relative(self, e: Exception) -> str:
        """An error's message with the root's own path left out (clients name adapters, not
        paths on this server's disk)."""
        return str(e).replace(str(self.root) + os.sep, "")


def _real(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> Path:
    """`Path.resolve()`, with a symlink loop (RuntimeError on Python < 3.13, OSError after) as
    AdapterPathError naming the path as the client gave it."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:
        raise AdapterPathError(f"adapter path {str(shown or path)!r} cannot be resolved "
                               f"({type(e).__name__})") from None
