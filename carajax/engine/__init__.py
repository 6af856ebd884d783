"""The serving engine on one device: requests, the batch planner, the model runner, sampling and
the paged KV cache. (`carajax.sched` is something else: routing across workers.)"""

from carajax.engine.engine import Engine
from carajax.engine.request import (
    QueueFullError,
    RequestError,
    RequestHandle,
    RequestMetrics,
    RequestOutput,
)
from carajax.engine.sampling import SamplingParams

__all__ = ["Engine", "QueueFullError", "RequestError", "RequestHandle", "RequestMetrics",
           "RequestOutput", "SamplingParams"]
