"""RayDeployConfig and the flags `pagoda serve-ray` adds to those of `pagoda serve`.

Importable without Ray, so that `pagoda --help` works without the extra.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RayDeployConfig:
    """How many replicas, how they scale, and how requests find them."""

    num_replicas: int = 1
    min_replicas: int | None = None  # set both min and max to autoscale
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica, when autoscaling
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    max_ongoing_requests: int = 256  # per replica; Ray's default (5) would cap batching
    # Ray's CPUs per replica, which are also its engine's threads (Ray sets OMP_NUM_THREADS
    # to them in every worker, where the engine runs). None: this machine's
    # cores shared among the replicas (at most max_replicas), at least one each.
    replica_num_cpus: float | None = None
    # Prefix affinity holds while replicas' queue lengths differ by at most this many
    # requests; past it, the less loaded of two random replicas takes the request.
    imbalanced_threshold: float = 16.0
    prefix_affinity: bool = True
    health_check_period_s: float = 5.0
    metrics_period_s: float = 5.0  # how often each replica sends its metrics to the ingress
    shutdown_timeout: float = 0.0  # as `pagoda serve --shutdown-timeout`: drain this long

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        if not self.autoscaling:
            return self.num_replicas
        return self.max_replicas or max(self.min_replicas or 1, 1)

    def cpus_per_replica(self) -> float:
        """replica_num_cpus, or this machine's cores shared among the most replicas."""
        if self.replica_num_cpus is not None:
            return self.replica_num_cpus
        return float(max(1, (os.cpu_count() or 1) // self.most_replicas))


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    """The flags serve-ray adds to those of `pagoda serve`."""
    d = RayDeployConfig()
    p.add_argument("--num-replicas", type=int, default=d.num_replicas)
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many")
    p.add_argument("--target-ongoing-requests", type=float, default=d.target_ongoing_requests)
    p.add_argument("--upscale-delay", type=float, default=d.upscale_delay_s, metavar="S")
    p.add_argument("--downscale-delay", type=float, default=d.downscale_delay_s, metavar="S")
    p.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests)
    p.add_argument(
        "--replica-num-cpus",
        type=float,
        default=d.replica_num_cpus,
        help="Ray CPUs per replica, also its engine's threads "
        "(default: this machine's cores / the replicas)",
    )
    p.add_argument("--imbalanced-threshold", type=float, default=d.imbalanced_threshold)
    p.add_argument(
        "--no-prefix-affinity",
        dest="prefix_affinity",
        action="store_false",
        help="route with Ray's default (the less loaded of two random replicas)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to join (e.g. 10.0.0.1:6379, or auto); default: a local one",
    )


def deploy_config_of(args: argparse.Namespace) -> RayDeployConfig:
    return RayDeployConfig(
        num_replicas=args.num_replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay,
        max_ongoing_requests=args.max_ongoing_requests,
        replica_num_cpus=args.replica_num_cpus,
        imbalanced_threshold=args.imbalanced_threshold,
        prefix_affinity=args.prefix_affinity,
        shutdown_timeout=args.shutdown_timeout,
    )


# Ray Serve settings for serve-ray's Ray cluster (its processes inherit this environment):
# - the controller's control loop and the replicas' and handles' metrics export each wake
#   every 0.1 s by default. At 1 s, a one-replica serve-ray idles at 6.8 % of one core
#   instead of 12.6 % (SCALING.md);
# - a handle sends a request and gets its outputs by value over the replica's gRPC server,
#   not as a Ray actor call: a one-token request's p50 1-3 ms lower, its p90 2-4 ms
#   (SCALING.md, "Ingress latency").
# A variable already set keeps its value; a cluster joined with --ray-address keeps the
# settings it was started with (set these before `ray start`).
SERVE_DEFAULTS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def set_serve_defaults() -> None:
    """SERVE_DEFAULTS into this process's environment, where not set: Ray reads them when
    ray.serve is first imported, and the local cluster's processes inherit them."""
    for name, value in SERVE_DEFAULTS.items():
        os.environ.setdefault(name, value)
