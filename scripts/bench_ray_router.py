"""Router decision overhead on Ray Serve: our CarajaxRequestRouter vs Ray's default
PowerOfTwoChoicesRequestRouter, microseconds per `choose_replicas` call, in one process on the
same replicas and the same routing stats (no cluster: the routers are built offline and fed
stand-in replicas with the stats a busy carajax replica publishes).

    .venv/bin/python scripts/bench_ray_router.py [--replicas 2,8,32] [--calls 2000] [--json OUT]

Needs ray[serve] (the .[ray] extra). Prints a table; the time is the router's own decision only
(Ray's queue-length probes, which the default router adds on top, are not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import types

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest

from carajax.cluster import routing
from carajax.cluster.ray_router import CarajaxRequestRouter

DEPLOYMENT = DeploymentID(name="CarajaxReplica", app_name="carajax")


def replica_stats(i: int, rng: random.Random) -> dict:
    """What a replica in the middle of a busy trace publishes: a few queued prompts, a running
    batch of mixed ranks, some adapters resident."""
    ranks = [8, 16, 32, 64]
    batch = [[rng.randint(50, 1500), rng.choice(ranks)] for _ in range(rng.randint(4, 24))]
    return {"name": f"r{i}", "time": time.time() + 3600, "serving": True,
            "queue": [[rng.randint(20, 2000), rng.choice(ranks)] for _ in range(rng.randint(0, 4))],
            "batch": batch, "decode_ages": [rng.randint(1, 200) for _ in batch],
            "adapters": {f"a{k}": ranks[k % 4] for k in range(64)},
            "resident": [f"a{k}" for k in rng.sample(range(64), 12)], "loading": [],
            "pages_free": rng.randint(0, 40), "page_rank": 16, "kv_pages_free": rng.randint(10, 500),
            "kv_page_size": 16, "max_batch": 32, "max_seq_len": 4096, "cost_model": ""}


def stand_in(i: int, stats: dict):
    """The fields of Ray's RunningReplica that the two routers read."""
    return types.SimpleNamespace(replica_id=ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT),
                                 node_id="node", availability_zone=None, multiplexed_model_ids=set(),
                                 routing_stats=stats, max_ongoing_requests=64, get_queue_len=_zero)


async def _zero(*, deadline_s: float) -> int:
    return 0


def build(cls, replicas, **state):
    router = cls(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**state)
    router.update_replicas(replicas)
    return router


async def time_router(router, replicas, requests) -> float:
    """Median microseconds per choose_replicas over `requests` (5 rounds)."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for pr in requests:
            await router.choose_replicas(replicas, pr)
        rounds.append((time.perf_counter() - t0) / len(requests) * 1e6)
    return sorted(rounds)[2]


async def run(sizes: list[int], calls: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for n in sizes:
        replicas = [stand_in(i, replica_stats(i, rng)) for i in range(n)]
        requests = []
        for k in range(calls):
            a = rng.randrange(64)
            meta = RequestMetadata(request_id=str(k), internal_request_id=str(k))
            route = routing.request_route(f"a{a}", [8, 16, 32, 64][a % 4], rng.randint(20, 2000), 128)
            requests.append(PendingRequest(args=[], kwargs={"route": route}, metadata=meta,
                                           future=asyncio.get_running_loop().create_future()))
        row = {"replicas": n,
               "ray_pow2_us": await time_router(build(PowerOfTwoChoicesRequestRouter, replicas), replicas,
                                                requests)}
        for policy in ("carajax", "caraserve", "most_idle"):
            router = build(CarajaxRequestRouter, replicas, policy=policy)
            row[f"{policy}_us"] = await time_router(router, replicas, requests)
            assert router.fallbacks == 0
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="2,8,32")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = asyncio.run(run([int(x) for x in args.replicas.split(",")], args.calls))
    cols = list(rows[0])
    print(" | ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>13.1f}" if isinstance(r[c], float) else f"{r[c]:>13}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
