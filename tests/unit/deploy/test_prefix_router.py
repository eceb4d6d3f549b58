"""PrefixAffinityRouter: Ray Serve's prefix-cache affinity with the prefix tree in the router's
own process (no Ray call per request), and the startup error when this Ray lacks what it
needs."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field

import pytest
import ray
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter

import pagoda.deploy.ray as deploy_ray
from pagoda import cli
from pagoda.config import ConfigError
from pagoda.deploy.config import RayDeployConfig
from pagoda.deploy.prefix_router import PrefixAffinityRouter
from pagoda.deploy.replica_client import ReplicaRequest
from pagoda.sampling_params import SamplingParams

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="pagoda")


@dataclass
class FakeReplica:
    """What the router reads of a running replica."""

    replica_id: ReplicaID
    node_id: str = "node"
    availability_zone: str | None = None
    multiplexed_model_ids: set[str] = field(default_factory=set)
    max_ongoing_requests: int = 256


def make_router(
    *names: str, queue_lens: dict[str, int] | None = None, max_chars_per_replica: int = 400_000
) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
    )
    router.initialize_state(imbalanced_threshold=16, max_chars_per_replica=max_chars_per_replica)
    replicas = [FakeReplica(ReplicaID(name, DEPLOYMENT)) for name in names]
    router.update_replicas(replicas)  # type: ignore[arg-type]
    for replica in replicas:
        length = (queue_lens or {}).get(replica.replica_id.unique_id, 0)
        router._replica_queue_len_cache.update(replica.replica_id, length)
    return router


def pending(token_ids: list[int]) -> PendingRequest:
    request = ReplicaRequest("r", token_ids, None, SamplingParams())
    return PendingRequest(args=[request], kwargs={}, metadata=RequestMetadata("r", "r"))


async def chosen(router: PrefixAffinityRouter, token_ids: list[int]) -> set[str]:
    candidates = list(router._replicas.values())
    (replicas,) = await router.choose_replicas(candidates, pending(token_ids))
    return {r.replica_id.unique_id for r in replicas}


def routed(router: PrefixAffinityRouter, token_ids: list[int], name: str) -> None:
    router.on_request_routed(pending(token_ids), ReplicaID(name, DEPLOYMENT), None)  # type: ignore[arg-type]


SYSTEM_A = list(range(100, 400))
SYSTEM_B = list(range(1000, 1300))


def test_a_prompt_goes_to_the_replica_that_holds_its_prefix() -> None:
    async def scenario() -> None:
        router = make_router("a", "b")
        routed(router, SYSTEM_A + [1, 2], "a")
        routed(router, SYSTEM_B + [1, 2], "b")
        assert await chosen(router, SYSTEM_A + [7, 8, 9]) == {"a"}
        assert await chosen(router, SYSTEM_B + [7]) == {"b"}

    asyncio.run(scenario())


def test_a_new_prefix_goes_to_the_replica_holding_the_least_text() -> None:
    async def scenario() -> None:
        router = make_router("a", "b")
        routed(router, SYSTEM_A, "a")
        assert await chosen(router, SYSTEM_B) == {"b"}

    asyncio.run(scenario())


def test_imbalanced_queues_route_by_load_not_by_prefix() -> None:
    async def scenario() -> None:
        router = make_router("a", "b", queue_lens={"a": 20, "b": 0})
        routed(router, SYSTEM_A, "a")
        assert await chosen(router, SYSTEM_A + [5]) == {
            "a",
            "b",
        }  # the two choices; the shorter queue wins

    asyncio.run(scenario())


def test_a_removed_replica_is_no_longer_chosen() -> None:
    async def scenario() -> None:
        router = make_router("a", "b")
        routed(router, SYSTEM_A, "a")
        b, c = router._replicas[ReplicaID("b", DEPLOYMENT)], FakeReplica(ReplicaID("c", DEPLOYMENT))
        router.update_replicas([b, c])  # type: ignore[list-item]
        router._replica_queue_len_cache.update(c.replica_id, 0)
        assert ReplicaID("a", DEPLOYMENT).to_full_id_str() not in router.tree.tenant_to_char_count
        assert "a" not in await chosen(router, SYSTEM_A)

    asyncio.run(scenario())


def test_the_tree_keeps_a_bounded_share_per_replica_and_forgets_the_oldest_prefixes() -> None:
    async def scenario() -> None:
        router = make_router("a", "b", max_chars_per_replica=1000)
        prompts = [list(range(10_000 * i, 10_000 * i + 300)) for i in range(1, 11)]
        for prompt in prompts:  # 3,000 characters, all to a
            routed(router, prompt, "a")
            held = router.tree.tenant_to_char_count[ReplicaID("a", DEPLOYMENT).to_full_id_str()]
            assert held <= 1000
        # The newest prefixes are still a's (a's is the longest match)...
        assert await chosen(router, prompts[-1] + [5]) == {"a"}
        assert await chosen(router, prompts[-2] + [5]) == {"a"}
        # ...the oldest are forgotten: a new prefix there goes where the least text is held.
        assert await chosen(router, prompts[0] + [5]) == {"b"}

    asyncio.run(scenario())


def test_the_ray_internals_the_router_relies_on_are_where_it_expects() -> None:
    """Ray's PrefixTree, its power-of-two-choices router and two RequestRouter members are not
    public API: a Ray that moves or changes them fails here, by name."""
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree
    from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

    def parameters(function: object) -> list[str]:
        return list(inspect.signature(function).parameters)[1:]  # type: ignore[arg-type]

    tree_api = {
        "prefix_match": ["text", "available_tenants"],
        "insert": ["text", "tenant", "time_s"],
        "add_tenants": ["tenants", "time_s"],
        "remove_tenants": ["tenants"],
        "get_smallest_tenants": [],
        "evict_tenant_by_lru": ["tenant", "min_remove_size"],
    }
    for name, expected in tree_api.items():
        assert parameters(getattr(PrefixTree, name))[: len(expected)] == expected, name
    assert PrefixTree().tenant_to_char_count == {}
    choose = PowerOfTwoChoicesRequestRouter.choose_replicas
    assert inspect.iscoroutinefunction(choose)
    assert parameters(choose)[:2] == ["candidate_replicas", "pending_request"]
    probe = RequestRouter._probe_queue_lens
    assert inspect.iscoroutinefunction(probe)
    assert parameters(probe)[:2] == ["replicas", "backoff_index"]

    async def built() -> PrefixAffinityRouter:  # a router wants a running event loop
        return make_router("a")

    assert asyncio.run(built())._use_replica_queue_len_cache is True


def test_serve_ray_routes_with_the_in_process_router() -> None:
    deployment = deploy_ray.engine_deployment(RayDeployConfig(imbalanced_threshold=4.0))
    config = deployment._deployment_config.request_router_config
    assert config.request_router_class.endswith("prefix_router.PrefixAffinityRouter")
    assert config.request_router_kwargs == {"imbalanced_threshold": 4.0}


def test_the_router_is_a_ray_serve_request_router() -> None:
    router = deploy_ray.prefix_affinity_router()
    assert issubclass(router, RequestRouter)
    assert router is PrefixAffinityRouter


def test_a_ray_without_the_router_is_an_error_naming_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = ("ray.serve.no_such_module.PrefixAffinityRouter",)
    monkeypatch.setattr(deploy_ray, "PREFIX_AFFINITY_ROUTERS", missing)
    with pytest.raises(ConfigError) as error:
        deploy_ray.prefix_affinity_router()
    message = str(error.value)
    assert "--no-prefix-affinity" in message
    assert ray.__version__ in message
    assert all(path in message for path in missing)


def test_serve_ray_fails_before_starting_ray_when_the_router_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(deploy_ray, "PREFIX_AFFINITY_ROUTERS", ("ray.serve.config.NoRouter",))

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve-ray"])
    assert exit_info.value.code == 2
    assert "--no-prefix-affinity" in capsys.readouterr().err
