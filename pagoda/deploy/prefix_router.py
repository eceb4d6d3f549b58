"""PrefixAffinityRouter: Ray Serve's prefix-cache affinity, with the prefix tree in the router.

Ray's PrefixCacheAffinityRouter keeps its prefix tree in a Ray actor of its own and asks it
with a blocking ray.get() on the router's event loop: one call to match the prompt before
routing (two when the match is short), one to insert it after. Three Ray round trips per
request, on two cores shared with the engine, cost 3-4 ms of a one-token request
(SCALING.md). This router makes the same choices from the same tree class (Ray's
PrefixTree), kept in the router's own process:

    request -> imbalanced? (queue lengths differ by more than imbalanced_threshold)
                 yes -> the less loaded of two random replicas (power of two choices)
                 no  -> the replicas with the longest cached match of the prompt, or,
                        below match_rate_threshold, those holding the least cached text
            -> routed: the prompt is inserted under the chosen replica

The tree sees the requests of the process that routes them. `pagoda serve-ray` routes all of
them from its one server, as does pagoda_app()'s one ingress replica; several ingresses
would each learn from their own share of the traffic.

The tree is bounded: past max_chars_per_replica characters (tokens) under one replica, its
least recently routed prefixes are evicted, down to EVICT_TO of the bound. A replica's
engine evicts its own KV blocks long before the tree would, so an unbounded tree would only
grow with every prompt routed and claim prefixes that are no longer cached.

Ray internals this builds on (not public API; tests/unit/deploy/test_prefix_router.py pins
them): the PrefixTree class, PowerOfTwoChoicesRequestRouter.choose_replicas, and the
RequestRouter's _use_replica_queue_len_cache and _probe_queue_lens.
"""

from __future__ import annotations

import time
from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

# A replica's share of the tree after an eviction, as a fraction of max_chars_per_replica:
# evicting a tenth at a time keeps evictions rare (one per ~10 % of the bound routed).
EVICT_TO = 0.9


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes a request to the replica that already holds the longest prefix of its prompt
    (the `prompt` attribute of the request's first argument), while load allows."""

    def initialize_state(  # type: ignore[override]
        self,
        imbalanced_threshold: float = float("inf"),
        match_rate_threshold: float = 0.1,
        max_chars_per_replica: int = 400_000,
    ) -> None:
        """max_chars_per_replica: the prompt text (one character per token) the tree keeps
        for one replica, as Ray's router's eviction threshold (400,000)."""
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.max_chars_per_replica = max_chars_per_replica
        self.tree = PrefixTree()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_load = await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self,  # type: ignore[arg-type]
            candidate_replicas=candidate_replicas,
            pending_request=pending_request,
        )
        prompt = prompt_of(pending_request)
        if not prompt or not by_load or len(candidate_replicas) < 2:
            return by_load
        if await self._imbalanced(candidate_replicas):
            return by_load
        candidates = [r.replica_id.to_full_id_str() for r in candidate_replicas]
        matched, holders = self.tree.prefix_match(prompt, candidates)
        if len(matched) < self.match_rate_threshold * len(prompt):
            holders = self.tree.get_smallest_tenants() or []
        replicas = self.curr_replicas
        chosen = [
            replicas[rid]
            for rid in map(ReplicaID.from_full_id_str, holders or [])
            if rid in replicas
        ]
        return [chosen] if chosen else by_load

    async def _imbalanced(self, replicas: list[RunningReplica]) -> bool:
        """Whether the replicas' queue lengths (cached, or probed) differ by more than
        imbalanced_threshold."""
        lengths = []
        unknown = []
        for replica in replicas:
            length = (
                self.replica_queue_len_cache.get(replica.replica_id)
                if self._use_replica_queue_len_cache
                else None
            )
            if length is None or length >= replica.max_ongoing_requests:
                unknown.append(replica)
            else:
                lengths.append(length)
        if unknown:
            probed = await self._probe_queue_lens(unknown, 0)
            lengths += [length for _, length in probed if length is not None]
        return bool(lengths) and max(lengths) - min(lengths) > self.imbalanced_threshold

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        prompt = prompt_of(pending_request)
        if not prompt:
            return
        tenant = replica_id.to_full_id_str()
        self.tree.insert(prompt, tenant, time.time())
        held = self.tree.tenant_to_char_count.get(tenant, 0)
        if held > self.max_chars_per_replica:
            self.tree.evict_tenant_by_lru(tenant, held - int(EVICT_TO * self.max_chars_per_replica))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self.curr_replicas)
        super().update_replicas(replicas)
        after = set(self.curr_replicas)
        if after - before:
            self.tree.add_tenants([r.to_full_id_str() for r in after - before], time.time())
        if before - after:
            self.tree.remove_tenants([r.to_full_id_str() for r in before - after])

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.tree.remove_tenants([replica_id.to_full_id_str()])


def prompt_of(pending_request: PendingRequest | None) -> str | None:
    """The routed text: the `prompt` of the request's first argument (a ReplicaRequest's
    token ids as characters), or None for a call without one (serving_config, ...)."""
    if pending_request is None or not pending_request.args:
        return None
    prompt: Any = getattr(pending_request.args[0], "prompt", None)
    return prompt if isinstance(prompt, str) else None
