"""Pagoda, vLLM's CPU build and llama.cpp, side by side: the same load, one after another.

    .venv/bin/python benchmarks/compare_servers.py [--servers pagoda vllm llamacpp]
        [--concurrency 1 8 32] [--out results/] [--gguf FILE --name NAME] [--model DIR]
        [--prompts-per-concurrency 4 --min-prompts 16]

Each server is started on 127.0.0.1 (the references with ../shared/anchors/serve-*.sh),
timed until /v1/models answers, loaded with `pagoda bench serve` (random dataset,
256 input / 128 output tokens, EOS ignored or banned, 4 x concurrency prompts with
at least 16 unless the last two flags say otherwise, a different seed per concurrency),
measured for resident memory of all its processes, and stopped. One JSON file per run,
a summary JSON and a plot.

The model is the embedded default unless --gguf names a file, which every server
but vLLM then serves (vLLM: --model, a Hugging Face directory of the same model);
the end tokens banned for llama-cpp-python's server (it has no ignore_eos) are the
model's own, as its tokenizer reads them. `pagoda-dense` is Pagoda on the file dequantized
to a dense float32 copy (--dtype float32), `llamacpp-2t` is that server with 2 decode
threads, `llamaserver` llama.cpp's C++ server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = Path(os.environ.get("ANCHOR_SCRIPTS", ROOT.parent / "shared" / "anchors"))


def server_specs(
    gguf: Path | None, name: str, end_tokens: list[int], hf_dir: Path | None = None
) -> dict[str, dict]:
    """How to start each server on the model, its URL, and what its requests carry to run
    to their full length."""
    model_env = {"GGUF": str(gguf), "NAME": name} if gguf else {}
    vllm_env = {"MODEL_DIR": str(hf_dir), "NAME": name} if hf_dir else {}
    llamacpp = {
        "command": [str(ANCHORS / "serve-llamacpp.sh")],
        "env": model_env,
        "url": "http://127.0.0.1:8200",
        "extra": {"ban_token_ids": ",".join(map(str, end_tokens))},  # no ignore_eos
    }
    pagoda = {
        "command": [
            str(Path(sys.executable).with_name("pagoda")),  # this interpreter's environment
            "serve",
            *([str(gguf)] if gguf else []),
            "--host",
            "127.0.0.1",
            "--port",
            "8300",
            "--served-model-name",
            name,
            "--disable-uvicorn-access-log",
        ],
        "env": {},
        "url": "http://127.0.0.1:8300",
        "extra": {"ignore_eos": True},
    }
    return {
        "pagoda": pagoda,
        # the file dequantized to a dense float32 copy: what --dtype auto ran on a CPU
        # without native bfloat16 before it computed from the file's blocks there too
        "pagoda-dense": {**pagoda, "command": [*pagoda["command"], "--dtype", "float32"]},
        "vllm": {
            "command": [str(ANCHORS / "serve-vllm.sh")],
            "env": vllm_env,
            "url": "http://127.0.0.1:8100",
            "extra": {"ignore_eos": True},
        },
        "llamacpp": llamacpp,
        "llamacpp-2t": {**llamacpp, "command": [*llamacpp["command"], "--n_threads", "2"]},
        "llamaserver": {
            "command": [str(ANCHORS / "serve-llamaserver.sh")],
            "env": model_env,
            "url": "http://127.0.0.1:8202",
            # It drops some kept-alive connections as a request goes out on them.
            "extra": {"ignore_eos": True, "no_keep_alive": True},
        },
    }


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


class MemorySampler:
    """Samples the resident memory of a process tree; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def bench_once(
    url: str,
    name: str,
    tokenizer,
    concurrency: int,
    num_prompts: int,
    extra: dict,
    label: str,
    out: Path,
) -> dict:
    from pagoda.bench import serve as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = [
        "--base-url",
        url,
        "--model",
        name,
        "--random-input-len",
        "256",
        "--random-output-len",
        "128",
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--seed",
        str(1000 + concurrency),
        "--label",
        f"{label}-c{concurrency}",
        "--disable-tqdm",
        "--result-filename",
        str(out / f"{label}-c{concurrency}.json"),
    ]
    if extra.get("ignore_eos"):
        argv.append("--ignore-eos")
    if extra.get("no_keep_alive"):
        argv.append("--no-keep-alive")
    if extra.get("ban_token_ids"):
        argv += ["--ban-token-ids", extra["ban_token_ids"]]
    args = parser.parse_args(argv)
    requests = bench.random_dataset(tokenizer, num_prompts + 1, 256, 128, args.seed)
    summary = asyncio.run(bench.run(args, requests[:1], requests[1:], tokenizer))
    bench.report(summary, args)
    return summary


def run_server(
    name: str,
    spec: dict,
    model: str,
    tokenizer,
    prompts: dict[int, int],
    out: Path,
    ready_timeout: float = 300,
) -> dict:
    """Starts one server, loads it at each concurrency (-> number of prompts), stops it."""
    start = time.monotonic()
    log = (out / f"{name}-server.log").open("w")
    process = subprocess.Popen(
        spec["command"],
        env={**os.environ, **spec["env"]},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited early; see {log.name}")
            try:
                if httpx.get(spec["url"] + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > ready_timeout:
                raise RuntimeError(f"{name} not ready in {ready_timeout:.0f} s")
            time.sleep(0.1)
        ready_s = time.monotonic() - start
        idle_rss = tree_rss(process.pid)
        sampler = MemorySampler(process.pid)
        runs = {
            str(c): bench_once(spec["url"], model, tokenizer, c, n, spec["extra"], name, out)
            for c, n in prompts.items()
        }
        peak = sampler.stop()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return {
        "ready_s": ready_s,
        "idle_rss_mib": idle_rss / 2**20,
        "peak_rss_mib": peak / 2**20,
        "runs": runs,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        cs = sorted(int(c) for c in r["runs"])
        left.plot(cs, [r["runs"][str(c)]["output_throughput"] for c in cs], "o-", label=name)
        right.plot(cs, [r["runs"][str(c)]["ttft_ms"]["median"] for c in cs], "o-", label=name)
    left.set(
        xlabel="max concurrency", ylabel="output tokens/s", xscale="log", title="Output throughput"
    )
    right.set(
        xlabel="max concurrency",
        ylabel="TTFT p50 (ms)",
        xscale="log",
        yscale="log",
        title="Time to first token",
    )
    for ax in (left, right):
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from pagoda.model_files import default_model_path
    from pagoda.tokenizer import Tokenizer

    names = list(server_specs(None, "", []))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--servers", nargs="+", default=["pagoda", "vllm", "llamacpp"], choices=names
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--gguf", type=Path, default=None, help="default: the embedded model")
    parser.add_argument("--name", default="smollm2", help="the model's name on every server")
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face dir for vLLM")
    parser.add_argument("--prompts-per-concurrency", type=int, default=4)
    parser.add_argument("--min-prompts", type=int, default=16)
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=300,
        help="seconds a server may take to answer /v1/models (vLLM compiles its model first: "
        "over 5 min on an AVX2-only CPU)",
    )
    args = parser.parse_args()
    if args.gguf and "vllm" in args.servers and not args.model:
        parser.error("vLLM serves Hugging Face directories here: name one with --model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_path(args.gguf or default_model_path())
    specs = server_specs(args.gguf, args.name, tokenizer.eos_token_ids, args.model)
    prompts = {c: max(args.min_prompts, args.prompts_per_concurrency * c) for c in args.concurrency}
    for name in args.servers:
        result = run_server(
            name, specs[name], args.name, tokenizer, prompts, out, args.ready_timeout
        )
        (out / f"{name}-server.json").write_text(json.dumps(result, indent=2))
    # The summary and the plot take every server measured into this folder so far.
    results = {
        path.name.removesuffix("-server.json"): json.loads(path.read_text())
        for path in sorted(out.glob("*-server.json"))
    }
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    try:
        plot(results, out / "comparison.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
