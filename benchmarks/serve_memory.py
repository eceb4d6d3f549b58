"""Where a served model's resident memory goes: each process of `pagoda serve`, sampled under load.

    .venv/bin/python benchmarks/serve_memory.py --gguf FILE [--concurrency 32] [--num-prompts 32]
        [--env NAME=VALUE ...]

Starts `pagoda serve` on the file (as compare_servers.py does, with the environment
variables given), samples every process's resident memory (anonymous and file-backed,
from /proc) every 0.1 s from the start, loads it with section 4's workload (256 input /
128 output tokens, EOS ignored) at one concurrency, and prints each process's figures
when loaded (ready), at its own peak, and the whole tree's peak with its parts then.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_servers import bench_once, server_specs  # noqa: E402

MIB = 2**20


def memory(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of one process."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("RssAnon", 0), fields.get("RssFile", 0) + fields.get("RssShmem", 0)


class Sampler:
    """Per-process samples of a process tree: the tree's peak and each process's."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.names: dict[int, str] = {}
        self.peak: dict[int, tuple[int, int]] = {}
        self.tree_peak: tuple[int, dict[int, tuple[int, int]]] = (0, {})
        self.latest: dict[int, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            now = {}
            for p in procs:
                try:
                    now[p.pid] = memory(p.pid)
                    self.names.setdefault(p.pid, " ".join(p.cmdline()[:3])[-60:])
                except (OSError, psutil.Error):
                    pass
            for pid, m in now.items():
                if sum(m) > sum(self.peak.get(pid, (0, 0))):
                    self.peak[pid] = m
            total = sum(sum(m) for m in now.values())
            if total > self.tree_peak[0]:
                self.tree_peak = (total, now)
            self.latest = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def show(title: str, parts: dict[int, tuple[int, int]], names: dict[int, str]) -> None:
    total = sum(sum(m) for m in parts.values())
    print(f"{title}: {total / MIB:.0f} MiB")
    for pid, (anon, file) in sorted(parts.items()):
        print(f"  {pid:>7} anon {anon / MIB:6.0f}  file {file / MIB:6.0f}  {names.get(pid, '')}")


def main() -> None:
    from pagoda.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--out", type=Path, default=Path("/tmp/serve-memory"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = server_specs(args.gguf, "bench", [])["pagoda"]
    env = {**os.environ, **dict(e.split("=", 1) for e in args.env)}
    start = time.monotonic()
    log = (args.out / "server.log").open("w")
    process = subprocess.Popen(
        spec["command"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    sampler = Sampler(process.pid)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited early; see {log.name}")
            try:
                if httpx.get(spec["url"] + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        print(f"ready after {time.monotonic() - start:.1f} s")
        time.sleep(0.5)
        show("ready (idle)", dict(sampler.latest), sampler.names)
        show("loading peak per process", dict(sampler.peak), sampler.names)
        sampler.peak.clear()
        sampler.tree_peak = (0, {})
        tokenizer = Tokenizer.from_path(args.gguf)
        bench_once(
            spec["url"],
            "bench",
            tokenizer,
            args.concurrency,
            args.num_prompts,
            spec["extra"],
            "pagoda",
            args.out,
        )
        sampler.stop()
        show("under load, the tree's peak", sampler.tree_peak[1], sampler.names)
        show("under load, each process's own peak", sampler.peak, sampler.names)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


if __name__ == "__main__":
    main()
