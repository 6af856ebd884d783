"""The padded shapes of an engine step: token buckets and the attention's query block.

Every step is compiled per shape, so the runner pads a step's tokens to a power of two (`bucket`)
and picks the attention's query block from the bucketed count (`query_block`). Kept apart from the
runner so that what times kernels on the engine's shapes (`engine/kernel_timing.py`, which the
runner calls at start) computes the very shapes the runner will run, without importing it.
"""

from __future__ import annotations

# The attention's query block in steps with prefill chunks: T / max_batch_size, within these
# bounds (each block gathers its sequence's whole context: long chunks want few blocks, mixed
# steps of many decodes want small ones); decode-only steps: 1.
PREFILL_BLOCK = 16
MAX_PREFILL_BLOCK = 64


def bucket(n: int, minimum: int) -> int:
    """The padded size for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def query_block(T: int, max_batch_size: int, decode_only: bool) -> int:
    """The attention's query block for a step of T (bucketed) tokens; static per variant."""
    if decode_only:
        return 1
    return min(MAX_PREFILL_BLOCK, max(PREFILL_BLOCK, bucket(T // max_batch_size, 1)))


__all__ = ["MAX_PREFILL_BLOCK", "PREFILL_BLOCK", "bucket", "query_block"]
