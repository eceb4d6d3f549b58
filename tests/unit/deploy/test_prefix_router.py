"""Ray's prefix-affinity router: found where this Ray keeps it, or a startup error that says
what to do."""

from __future__ import annotations

import pytest
import ray
from ray.serve.request_router import RequestRouter

import pagoda.deploy.ray as deploy_ray
from pagoda import cli
from pagoda.config import ConfigError


def test_the_router_is_rays_prefix_cache_affinity_router() -> None:
    router = deploy_ray.prefix_affinity_router()
    assert issubclass(router, RequestRouter)
    assert router.__name__ == "PrefixCacheAffinityRouter"


def test_a_ray_without_the_router_is_an_error_naming_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = ("ray.serve.no_such_module.PrefixCacheAffinityRouter", "ray.serve.config.NoRouter")
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
