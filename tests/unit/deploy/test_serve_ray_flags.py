"""`pagoda serve-ray` takes the flags of `pagoda serve`'s launcher: its own server listens."""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest

import pagoda.deploy.ray
from pagoda import cli
from pagoda.deploy.config import SERVE_DEFAULTS


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[argparse.Namespace, dict[str, Any]]]:
    """serve_ray replaced: the arguments and launcher options it would have started with."""
    calls: list[tuple[argparse.Namespace, dict[str, Any]]] = []
    for name in SERVE_DEFAULTS:  # unset here, and as before after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def fake_serve_ray(args: argparse.Namespace, _e: object, _s: object, options: Any) -> int:
        calls.append((args, options))
        return 0

    monkeypatch.setattr(pagoda.deploy.ray, "serve_ray", fake_serve_ray)
    return calls


def test_the_launcher_flags_reach_serve_ray_as_for_pagoda_serve(started) -> None:
    argv = ["serve-ray", "--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem",
            "--enable-ssl-refresh", "--shutdown-timeout", "7", "--uvicorn-log-level", "debug",
            "--disable-uvicorn-access-log", "--port", "8123"]  # fmt: skip
    assert cli.main(argv) == 0
    ((args, options),) = started
    assert options["ssl_keyfile"] == "key.pem" and options["ssl_certfile"] == "cert.pem"
    assert options["enable_ssl_refresh"] is True
    assert options["shutdown_timeout"] == 7
    assert options["log_level"] == "debug" and options["access_log"] is False
    assert options["port"] == 8123
    # The same options `pagoda serve` would give its launcher.
    assert options == cli._launcher_options(cli.build_parser().parse_args(argv[:1] + argv[1:]))


def test_the_flags_serve_ray_applies_start_it(started) -> None:
    argv = ["serve-ray", "--root-path", "/llm", "--num-replicas", "2", "--api-key", "k",
            "--uds", "/tmp/pagoda.sock", "--max-connections", "10"]  # fmt: skip
    assert cli.main(argv) == 0
    ((args, _),) = started
    assert args.root_path == "/llm" and args.num_replicas == 2
    assert args.uds == "/tmp/pagoda.sock" and args.max_connections == 10


def test_serve_ray_slows_serve_background_loops_unless_set(
    started, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "250")
    assert cli.main(["serve-ray"]) == 0
    assert os.environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "1"
    assert os.environ["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "250"  # the user's


def test_serve_ray_calls_its_replicas_over_grpc_unless_set(
    started, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["serve-ray"]) == 0
    # Handles send requests and outputs by value over the replicas' gRPC servers.
    assert os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    assert cli.main(["serve-ray"]) == 0
    assert os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"  # the user's
