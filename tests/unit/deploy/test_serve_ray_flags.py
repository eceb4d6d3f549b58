"""`pagoda serve-ray` refuses the flags of `pagoda serve` that only its launcher applies."""

from __future__ import annotations

import argparse

import pytest

import pagoda.deploy.ray
from pagoda import cli
from pagoda.deploy.config import LAUNCHER_FLAGS


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """serve_ray replaced: the arguments it would have started Ray with."""
    calls: list[argparse.Namespace] = []

    def fake_serve_ray(args: argparse.Namespace, *_: object) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(pagoda.deploy.ray, "serve_ray", fake_serve_ray)
    return calls


@pytest.mark.parametrize(
    "flags",
    [
        ["--uds", "/tmp/pagoda.sock"],
        ["--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem"],
        ["--enable-ssl-refresh"],
        ["--h11-max-header-count", "50"],
        ["--max-connections", "10"],
        ["--uvicorn-log-level", "debug"],
    ],
)
def test_a_launcher_flag_is_a_startup_error_naming_it(
    flags: list[str], started: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve-ray", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    for flag in flags:
        if flag.startswith("--"):
            assert flag in error
    assert "not supported by serve-ray" in error
    assert started == []


def test_every_launcher_flag_is_one_of_serve_ray(started: list[argparse.Namespace]) -> None:
    defaults = cli.build_parser().parse_args(["serve-ray"])
    for dest in LAUNCHER_FLAGS:
        assert hasattr(defaults, dest), dest


def test_the_flags_serve_ray_applies_start_it(started: list[argparse.Namespace]) -> None:
    argv = ["serve-ray", "--root-path", "/llm", "--num-replicas", "2", "--api-key", "k"]
    assert cli.main(argv) == 0
    (args,) = started
    assert args.root_path == "/llm" and args.num_replicas == 2
