"""CarajaxRequestRouter: Ray Serve's request router, asking a `carajax.sched` policy.

Ray calls `choose_replicas(candidates, pending_request)` for each request and tries the returned
ranks in order (a replica whose queue is full refuses; Ray moves to the next rank). We return the
policy's choice alone in the first rank, then the other candidates one per rank (`rank_replicas`).
The policy prices each replica from its routing stats (`carajax.cluster.routing`) plus the requests
this router sent it since that snapshot, with the replica's own cost model when it reports one.

Falls back to Ray's default rule (power of two choices after its multiplex and locality
preferences) when the request has no route (a call that did not go through our ingress), when a
candidate has not published stats yet, or when the policy finds no candidate.

Only Ray's public request-router API (`ray.serve.request_router`) is used;
tests/test_ray_api.py fails when a name or hook this module relies on moves.

    CarajaxReplica.options(request_router_config=RequestRouterConfig(
        request_router_class=CarajaxRequestRouter,
        request_router_kwargs={"policy": "carajax", "slo_tpot": 0.1}))
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from carajax.cluster import routing
from carajax.sched import cost_model as cm
from carajax.sched import router as policies


class CarajaxRequestRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes by a carajax policy (no FIFOMixin: each request gets the replica chosen for it)."""

    def initialize_state(self, policy: str = "carajax", cost_model: str | None = None,
                         slo_tpot: float = 0.1, avg_output_len: float = 128.0, **policy_kw) -> None:
        """Ray passes `request_router_kwargs` here. cost_model: a JSON path for replicas that
        report none (default: the shipped model)."""
        default = cm.load(cost_model) if cost_model else cm.default_cost_model()
        self.policy_name = policy
        self.policy = policies.make_policy(policy, slo_tpot=slo_tpot, avg_output_len=avg_output_len,
                                           **policy_kw)
        self.costs = routing.CostModels(default, policy)
        self.inflight: dict[str, routing.Dispatch] = {}  # internal request id -> dispatch
        self._states: dict[str, tuple[dict, policies.WorkerState]] = {}  # replica -> (stats, state)
        self._seen: dict[str, int] = {}  # replica -> finished replies already learned from
        self.observe = getattr(self.policy, "observe_output", None) or (lambda tokens: None)
        self.routed = 0  # choose_replicas calls our policy answered
        self.fallbacks = 0  # answered by Ray's default (no route, no stats, or no candidate)
        routing.LIVE_ROUTERS.add(self)  # not a class attribute: Ray ships this class by value

    def summary(self) -> dict:
        return {"policy": self.policy_name, "routed": self.routed, "fallbacks": self.fallbacks,
                "inflight": len(self.inflight), "pricing": dict(self.costs.pricing),
                "inflight_by_replica": dict(Counter(d.replica for d in self.inflight.values()))}

    def states(self, replicas: list[RunningReplica]) -> list[policies.WorkerState] | None:
        """The policy's view of `replicas`, or None if one has published no stats yet."""
        if len(self._states) > 2 * len(replicas) + 8:  # forget replicas that are gone
            ids = {r.replica_id.unique_id for r in replicas}
            self._states = {k: v for k, v in self._states.items() if k in ids}
        out = []
        by_replica: dict[str, list[routing.Dispatch]] = {}
        for d in self.inflight.values():
            by_replica.setdefault(d.replica, []).append(d)
        for r in replicas:
            stats = r.routing_stats
            if not stats or "queue" not in stats:
                return None
            rid = r.replica_id.unique_id
            cached = self._states.get(rid)
            if cached is None or cached[0] is not stats:  # a new snapshot: parse it once
                cached = self._states[rid] = (stats, routing.worker_state(stats, self.costs.of(stats)))
                lengths, self._seen[rid] = routing.new_outputs(stats, self._seen.get(rid, 0))
                for n in lengths:  # the SLO-risk term learns reply lengths from every replica
                    self.observe(n)
            state = cached[1]
            late = [(d.prompt_tokens, d.rank) for d in by_replica.get(rid, ()) if d.routed_at > stats["time"]]
            out.append(dataclasses.replace(state, queue=state.queue + late) if late else state)
        return out

    def rank(self, replicas: list[RunningReplica],
             route: policies.RouteRequest) -> list[list[RunningReplica]] | None:
        """Our ranking of `replicas` for `route` (what `choose_replicas` returns), or None to
        fall back to Ray's default."""
        states = self.states(replicas)
        if not states:
            return None
        try:
            order = routing.rank_replicas(self.policy, route, states)
        except policies.NoWorkerError:
            return None
        return [[replicas[i]] for i in order]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = routing.route_of(pending_request.kwargs) if pending_request is not None else None
        ranked = self.rank(candidate_replicas, route) if route is not None else None
        if ranked is None:
            self.fallbacks += 1
            return self.power_of_two(candidate_replicas, pending_request)
        self.routed += 1
        # Counted against our first choice now: Ray calls on_request_routed only when replicas
        # may refuse requests (strict max_ongoing_requests), on_request_completed always.
        self._dispatched(pending_request, ranked[0][0].replica_id, route)
        return ranked

    def power_of_two(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        """Ray's default rule from its public mixins: the replicas holding the request's
        multiplexed model (else the co-located ones) are preferred, two of them are drawn at
        random and returned as one rank, whose queues Ray probes to take the shorter."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            preferred = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            preferred = self.apply_locality_routing(pending_request=pending_request)
        pool = [r for r in candidate_replicas if r.replica_id in preferred] or list(candidate_replicas)
        return [random.sample(pool, min(2, len(pool)))] if pool else []

    def _dispatched(self, pending_request: PendingRequest, replica_id: ReplicaID,
                    route: policies.RouteRequest) -> None:
        if len(self.inflight) > 4096:  # completions lost (a replica died): forget the oldest
            cutoff = time.time() - 600
            self.inflight = {k: d for k, d in self.inflight.items() if d.routed_at > cutoff}
        self.inflight[pending_request.metadata.internal_request_id] = routing.Dispatch(
            replica_id.unique_id, time.time(), route.prompt_tokens, route.rank)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Where the request went when a replica could refuse it (our first choice, or the
        next rank's after a refusal)."""
        route = routing.route_of(pending_request.kwargs)
        if route is not None:
            self._dispatched(pending_request, replica_id, route)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.inflight.pop(internal_request_id, None)
