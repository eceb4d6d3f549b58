"""Speculative decoding through the offline engine: the same tokens, fewer steps.

Greedy outputs with drafts are token for token those without, over the engine's test
prompts and prompts whose answers copy their input, in batches, in chunks, under
preemption; seeded sampling gives the same tokens with drafts as without (the random
number of a position does not depend on how the token was verified); logprobs, stop
strings, max_tokens and n > 1 stay as they were.
"""

from __future__ import annotations

import json

import pytest
from test_llm import PROMPTS

from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4)

PASSAGE = (
    "The Pagoda engine keeps a paged cache of keys and values. Each request owns a list of "
    "blocks, and blocks that hold the same prompt prefix are shared between requests."
)
JSON = '{"name": "Ada Lovelace", "born": 1815, "field": "mathematics", "city": "London"}'
COPY_PROMPTS = [
    f"Repeat this sentence exactly.\n{PASSAGE}\nRepeated:\n",
    f"Copy the JSON below, then stop.\n{JSON}\nCopy:\n",
    f"{PASSAGE}\nQuestion: what does each request own?\nAnswer (quote the text):",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
]


def chat_copies(llm: LLM) -> list[list[int]]:
    """Chat requests of `pagoda bench serve --dataset-name copy` (code to repeat with one
    change, passages to quote), as token ids: the instructed model copies, drafts hold."""
    from importlib import resources

    text = resources.files("pagoda.bench").joinpath("copy.jsonl").read_text()
    items = [json.loads(line) for line in text.splitlines()]
    tok = llm.tokenizer
    return [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": item["prompt"]}]),
            add_special_tokens=False,
        )
        for item in items[:3]
    ]


GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory=256 << 20, speculative_config=SPEC)


def reset_scheduler(
    llm: LLM,
    *,
    speculative: SpeculativeConfig | None = SPEC,
    num_blocks: int | None = None,
    caching: bool = True,
    budget: int = 2048,
) -> Scheduler:
    """A fresh scheduler (and block pool) over the same loaded model."""
    num_blocks = num_blocks or llm.engine.runner.num_blocks
    llm.engine.scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=budget),
        CacheConfig(block_size=16, enable_prefix_caching=caching),
        num_blocks,
        min(llm.max_model_len, num_blocks * 16),
        speculative=speculative,
    )
    return llm.engine.scheduler


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(llm: LLM) -> list[list[int]]:
    """Each prompt alone, without drafts."""
    reset_scheduler(llm, speculative=None, caching=False)
    prompts = PROMPTS + COPY_PROMPTS + chat_copies(llm)
    return [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]


@pytest.mark.parametrize(
    "setting", ["alone", "together", "chunked", "no-prefix-cache", "preempted"]
)
def test_drafts_do_not_change_greedy_tokens(llm: LLM, alone, setting: str) -> None:
    kwargs = {
        "alone": {},
        "together": {},
        "chunked": {"budget": 7},
        "no-prefix-cache": {"caching": False},
        "preempted": {"num_blocks": 40},  # 640 tokens: room for the longest prompt
    }[setting]
    scheduler = reset_scheduler(llm, **kwargs)
    prompts = PROMPTS + COPY_PROMPTS + chat_copies(llm)
    if setting == "alone":
        got = [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    else:
        got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == alone
    llm.engine.check_invariants()
    stats = scheduler.spec_stats
    assert stats.num_accepted_tokens > 0.25 * stats.num_draft_tokens
    if setting == "preempted":
        assert scheduler.num_preemptions > 0


def test_copying_takes_fewer_steps(llm: LLM, alone) -> None:
    scheduler = reset_scheduler(llm)
    copies = chat_copies(llm)
    for prompt, expected in zip(copies, alone[-len(copies) :]):
        steps = scheduler.num_steps
        assert tokens(llm.generate([prompt], GREEDY, use_tqdm=False))[0] == expected
        assert scheduler.num_steps - steps < 0.6 * len(expected)


def test_seeded_samples_are_the_same_with_and_without_drafts(llm: LLM) -> None:
    params = [
        SamplingParams(temperature=t, top_p=p, seed=s, max_tokens=24)
        for s in range(4)
        for t, p in ((1.0, 1.0), (0.5, 0.9))
    ]
    prompts = [COPY_PROMPTS[i % len(COPY_PROMPTS)] for i in range(len(params))]
    reset_scheduler(llm, speculative=None)
    without = tokens(llm.generate(prompts, params, use_tqdm=False))
    scheduler = reset_scheduler(llm)
    with_drafts = tokens(llm.generate(prompts, params, use_tqdm=False))
    assert with_drafts == without
    assert scheduler.spec_stats.num_accepted_tokens > 0


def test_logprobs_penalties_and_min_tokens_are_those_without_drafts(llm: LLM) -> None:
    params = [
        SamplingParams(temperature=0, max_tokens=20, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=20, frequency_penalty=0.5, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=18, logit_bias={28: 2.0}),
    ]
    prompts = COPY_PROMPTS[:4]
    reset_scheduler(llm, speculative=None)
    without = llm.generate(prompts, params, use_tqdm=False)
    reset_scheduler(llm)
    with_drafts = llm.generate(prompts, params, use_tqdm=False)
    assert tokens(with_drafts) == tokens(without)
    a, b = with_drafts[0].outputs[0].logprobs, without[0].outputs[0].logprobs
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for t in x:
            assert x[t][0] == pytest.approx(y[t][0], abs=1e-4) and x[t][1] == y[t][1]


def test_stop_strings_and_max_tokens_inside_accepted_drafts(llm: LLM) -> None:
    reset_scheduler(llm)
    prompt = chat_copies(llm)[2]  # "The lighthouse at Cape Verrin was built in 1872 from ..."
    (free,) = llm.generate([prompt], GREEDY, use_tqdm=False)
    text = free.outputs[0].text
    stop = "from granite"
    assert stop in text
    params = SamplingParams(temperature=0, max_tokens=32, stop=[stop])
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    assert out.outputs[0].text == text[: text.index(stop)]
    assert out.outputs[0].finish_reason == "stop"
    for n in (1, 2, 5, 11):
        params = SamplingParams(temperature=0, max_tokens=n)
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        assert out.outputs[0].token_ids == free.outputs[0].token_ids[:n]
        assert out.outputs[0].finish_reason == "length"
    llm.engine.check_invariants()
    assert not llm.engine.scheduler.has_work


def test_n_samples_draft_each_on_their_own(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=16)
    reset_scheduler(llm, speculative=None)
    (without,) = llm.generate(COPY_PROMPTS[0], params, use_tqdm=False)
    reset_scheduler(llm)
    (with_drafts,) = llm.generate(COPY_PROMPTS[0], params, use_tqdm=False)
    assert [c.token_ids for c in with_drafts.outputs] == [c.token_ids for c in without.outputs]


RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "born": {"type": "integer"},
        "field": {"type": "string"},
        "city": {"type": "string"},
    },
    "required": ["name", "born", "field", "city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
}


def constrained_copies(llm: LLM) -> list[tuple[str, StructuredOutputsParams]]:
    """Chat prompts whose constrained answers copy their input: a JSON record, a phone
    number, a choice, and a required tool call (the schema the chat server builds)."""
    from pagoda.config import StructuredOutputsConfig
    from pagoda.entrypoints.openai.tools import ToolUse

    def chat(text: str) -> str:
        return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])

    tool_call = ToolUse("required", (WEATHER_TOOL,)).constraint(StructuredOutputsConfig())
    assert tool_call is not None
    return [
        (
            chat(f"Copy this JSON record exactly.\n{JSON}"),
            StructuredOutputsParams(json=RECORD_SCHEMA),
        ),
        (
            chat("Write the phone number (555) 123-4567 again: (555) 123-4567"),
            StructuredOutputsParams(regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"),
        ),
        (
            chat("Which colour comes first: violet, indigo or ultramarine? violet"),
            StructuredOutputsParams(choice=["violet", "indigo", "ultramarine"]),
        ),
        (
            chat(
                'Call get_weather for London in celsius: [{"name": "get_weather", "arguments": '
                '{"city": "London", "unit": "celsius"}}]'
            ),
            tool_call,
        ),
    ]


@pytest.mark.parametrize("seed", [None, 5])
def test_constrained_outputs_are_the_same_with_drafts(llm: LLM, seed) -> None:
    """json_schema, regex, choice and a required tool call: drafts are cut where the grammar
    refuses them and each draft position samples under its own grammar state, so the tokens
    are those without drafts, alone and batched with unconstrained requests."""
    cases = constrained_copies(llm)
    prompts = [p for p, _ in cases]
    params = [
        SamplingParams(
            temperature=0 if seed is None else 1.0,
            seed=seed,
            max_tokens=64,
            structured_outputs=constraint,
        )
        for _, constraint in cases
    ]
    reset_scheduler(llm, speculative=None)
    alone = [tokens(llm.generate([p], sp, use_tqdm=False))[0] for p, sp in zip(prompts, params)]
    scheduler = reset_scheduler(llm)
    assert [
        tokens(llm.generate([p], sp, use_tqdm=False))[0] for p, sp in zip(prompts, params)
    ] == alone
    stats = scheduler.spec_stats
    assert stats.num_accepted_tokens > 0.25 * stats.num_draft_tokens > 0
    mixed = tokens(llm.generate(COPY_PROMPTS + prompts, [GREEDY] * 4 + params, use_tqdm=False))
    assert mixed[4:] == alone
    reset_scheduler(llm, speculative=None)
    assert mixed[:4] == tokens(llm.generate(COPY_PROMPTS, GREEDY, use_tqdm=False))
    if seed is None:
        record = json.loads(llm.tokenizer.decode(alone[0]))
        assert record == json.loads(JSON)  # the copy the drafts were taken from
    llm.engine.check_invariants()
