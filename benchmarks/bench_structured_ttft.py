"""Time to first content of the structured workload's requests, with and without their schemas.

    .venv/bin/python benchmarks/bench_structured_ttft.py [--base-url URL] [--max-tokens N]

Against a running server (`pagoda serve`), one request at a time: each of the sixteen
requests of `pagoda bench serve --dataset-name structured`, --reps times, without and with
its schema, streamed and not. Prints the median milliseconds until the response (not
streamed) or until the first chunk with content (streamed) for each of the four, twice
(the first round also warms the prefix cache), and one JSON record of the second round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources

import httpx


def median_ms(client: httpx.Client, args: argparse.Namespace, items, schema: bool, stream: bool):
    times = []
    for _ in range(args.reps):
        for item in items:
            body: dict = {
                "messages": [{"role": "user", "content": item["prompt"]}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": stream,
            }
            if args.model:
                body["model"] = args.model
            if schema:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": item["name"], "schema": item["schema"]},
                }
            start = time.perf_counter()
            url = args.base_url + "/v1/chat/completions"
            if stream:
                with client.stream("POST", url, json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                            if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                                break
            else:
                client.post(url, json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    text = resources.files("pagoda.bench").joinpath("structured.jsonl").read_text()
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    with httpx.Client(timeout=120) as client:
        for _ in range(2):
            record = {
                f"{'schema' if schema else 'free'}{'_stream' if stream else ''}_ms": median_ms(
                    client, args, items, schema, stream
                )
                for stream in (False, True)
                for schema in (False, True)
            }
            print("  ".join(f"{k} {v:.1f}" for k, v in record.items()))
    print(json.dumps({"max_tokens": args.max_tokens, **record}))


if __name__ == "__main__":
    main()
