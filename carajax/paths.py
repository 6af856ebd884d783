"""Where carajax keeps what it makes once and reuses: `$CARAJAX_HOME`, default ~/.cache/carajax.

    models/       checkpoints `carajax pull` converted (carajax.models.hub)
    cost_models/  cost models workers fitted on their own engine (carajax.sched.local_cost_model)
    jax/          JAX's persistent compilation cache of the replay's workers (carajax.replay.cluster)
                  and of the replicas `carajax ray` starts
    adapters/     the replay's random adapters (carajax.replay.adapters)
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """`$CARAJAX_HOME`, default ~/.cache/carajax (read at each call: tests and users may set it
    after import)."""
    return Path(os.environ.get("CARAJAX_HOME") or Path.home() / ".cache" / "carajax")
