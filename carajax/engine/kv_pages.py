"""The KV cache's page bookkeeping, on the host: which pages are free, which a sequence owns.

The device holds one pool of `num_pages` pages of `page_size` positions per layer
(`carajax.models.llama.PagedKVCache`); a sequence's block table lists its pages in position
order, so position p lives in page `table[p // page_size]` at offset `p % page_size`. Memory
follows the tokens requests really hold: a 70-token request takes 5 pages of 16, not a row of the
longest context. Nothing here touches the device.
"""

from __future__ import annotations

import dataclasses

from carajax.config import EngineConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The page pool's shape, from the engine's KV budget in bytes."""

    num_pages: int
    page_size: int
    max_pages_per_seq: int  # ceil(max context / page_size)

    @classmethod
    def for_engine(cls, config: EngineConfig, model: ModelConfig, itemsize: int) -> KVLayout:
        seq_len = config.seq_len(model)
        budget = config.kv_budget_bytes(model, itemsize)
        page_bytes = config.kv_page_size * model.kv_bytes_per_token(itemsize)
        num_pages = budget // page_bytes
        max_pages = -(-seq_len // config.kv_page_size)
        if num_pages < 1:
            raise ValueError(f"the KV budget ({budget} bytes) holds no page of {page_bytes} bytes; "
                             "raise EngineConfig.kv_cache_bytes")
        return cls(num_pages=num_pages, page_size=config.kv_page_size, max_pages_per_seq=max_pages)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


class PageAllocator:
    """A free list of pages and the block table of every sequence that holds some.

    Owners are any hashable (the engine uses its `Request` objects). `grow` is all or nothing:
    a sequence either gets every page it asked for or none, so a failed allocation leaves the
    state as it was and the planner can preempt someone and retry.
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        # Pop from the end: low page ids first (deterministic, and tests read well).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._tables: dict[object, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def table(self, owner) -> list[int]:
        """The owner's pages in position order (empty if it holds none). Do not mutate."""
        return self._tables.get(owner, [])

    def owners(self) -> list:
        return list(self._tables)

    def grow(self, owner, num_pages: int) -> bool:
        """Make `owner` hold at least `num_pages` pages. False (and nothing changes) if that
        needs more pages than are free."""
        table = self._tables.get(owner, [])
        need = num_pages - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        new = [self._free.pop() for _ in range(need)]
        self._tables[owner] = table + new
        return True

    def free(self, owner) -> int:
        """Return every page `owner` holds to the free list; how many (0 if none)."""
        table = self._tables.pop(owner, [])
        self._free.extend(reversed(table))
        return len(table)

    def check(self) -> None:
        """Invariant (tests): every page is either free or owned by exactly one sequence."""
        owned = [p for t in self._tables.values() for p in t]
        everything = sorted(owned + self._free)
        if everything != list(range(self.num_pages)):
            raise AssertionError(f"page accounting broken: {len(owned)} owned + {len(self._free)} "
                                 f"free over {self.num_pages} pages (duplicates or leaks)")
