"""Structured outputs in the engine, on the tiny model (one token per byte, so every byte
the grammar fixes is a forced token): outputs obey their constraint under greedy and seeded
sampling, batching, preemption and forced tokens, and leave unconstrained requests alone."""

from __future__ import annotations

import re

import pytest
from json_schemas import constrained

from pagoda.config import StructuredOutputsConfig
from pagoda.core.request import FinishReason
from pagoda.engine.llm import LLM
from pagoda.engine.messages import EngineRequest
from pagoda.sampling_params import SamplingParams
from pagoda.structured.grammar import StructuredOutputsError

pytest.importorskip("llguidance")

PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
PROMPTS = [[5, 6, 7], [30, 31, 32, 33, 34], [100, 90, 80, 70], list(range(40, 60))]


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir()), dtype="float32")


def texts(llm: LLM, prompts, params) -> list[str]:
    return [answer(o.outputs[0].text) for o in llm.generate(prompts, params, use_tqdm=False)]


def answer(text: str) -> str:
    """The tiny tokenizer's EOS is the byte "#", not a special token: it shows in the text."""
    return text.removesuffix("#")


def test_regex_and_choice_outputs_obey_greedy_and_sampled(llm) -> None:
    for seed in (None, 1, 2, 3):
        outs = llm.generate(PROMPTS, constrained(seed, regex=PHONE), use_tqdm=False)
        for out in outs:
            assert re.fullmatch(PHONE, answer(out.outputs[0].text)), out.outputs[0].text
            assert out.outputs[0].finish_reason == FinishReason.STOP
        choices = ["red", "green", "blue", "redder"]
        for text in texts(llm, PROMPTS, constrained(seed, choice=choices)):
            assert text in choices


def test_json_object_is_json(llm) -> None:
    import json

    params = constrained(
        None,
        json={
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 999}},
            "required": ["a"],
            "additionalProperties": False,
        },
    )
    for text in texts(llm, PROMPTS, params):
        assert -5 <= json.loads(text)["a"] <= 999


def test_forced_tokens_give_the_same_output_in_fewer_steps(tiny_model_dir, llm) -> None:
    off = LLM(
        str(tiny_model_dir()),
        dtype="float32",
        structured_outputs_config=StructuredOutputsConfig(forced_tokens=False),
    )
    regex = r"id-[a-z]{2}-fixed-suffix-[0-9]"
    for seed in (None, 7):
        params = constrained(seed, regex=regex)
        assert texts(llm, PROMPTS, params) == texts(off, PROMPTS, params)
        # Alone, a request takes one step per decoded token: forced ones take none.
        steps = []
        for engine in (llm, off):
            before = engine.engine.scheduler.num_steps
            texts(engine, PROMPTS[:1], params)
            steps.append(engine.engine.scheduler.num_steps - before)
        assert steps[0] < steps[1] - 10, steps  # "id-", "-fixed-suffix-" are forced


def test_unconstrained_requests_are_unaffected_by_constrained_neighbours(llm) -> None:
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    alone = texts(llm, PROMPTS, plain)
    mixed = llm.generate(
        PROMPTS + PROMPTS,
        [plain] * len(PROMPTS) + [constrained(None, regex=PHONE)] * len(PROMPTS),
        use_tqdm=False,
    )
    assert [o.outputs[0].text for o in mixed[: len(PROMPTS)]] == alone
    assert all(re.fullmatch(PHONE, answer(o.outputs[0].text)) for o in mixed[len(PROMPTS) :])


def test_constrained_outputs_survive_preemption(tiny_model_dir, llm) -> None:
    # 8 blocks of 16 tokens for 8 requests of ~25 tokens each: they preempt each other.
    small = LLM(str(tiny_model_dir()), dtype="float32", kv_cache_memory=64 << 10)
    prompts = [list(range(i, i + 10)) for i in range(8)]
    params = [constrained(None, regex=PHONE), constrained(5, regex=PHONE)] * 4
    got = texts(small, prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert got == texts(llm, prompts, params)
    assert all(re.fullmatch(PHONE, t) for t in got)


def test_n_samples_each_follow_the_grammar(llm) -> None:
    params = constrained(11, regex=r"[a-z]{3,8}")
    params.n = 4
    (out,) = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    samples = [answer(c.text) for c in out.outputs]
    assert len(samples) == 4 and all(re.fullmatch(r"[a-z]{3,8}", s) for s in samples)
    assert len(set(samples)) > 1  # seeds differ per sample


def test_max_tokens_ends_a_constrained_request_by_length(llm) -> None:
    params = constrained(None, regex=r"[a-z]{50}")
    params.max_tokens = 5
    (out,) = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert out.outputs[0].finish_reason == FinishReason.LENGTH
    assert len(out.outputs[0].token_ids) == 5


def test_a_bad_constraint_is_refused_before_the_engine(llm) -> None:
    with pytest.raises(StructuredOutputsError, match="regex"):
        llm.generate([PROMPTS[0]], constrained(None, regex="[a-"), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate([PROMPTS[0]], constrained(None, regex="a", choice=["a"]), use_tqdm=False)


def test_a_grammar_that_fails_in_the_engine_fails_that_request_alone(llm) -> None:
    core = llm.engine
    bad = constrained(None, regex="[a-")
    good = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    core.add_request(EngineRequest("bad", [1, 2, 3], bad, [], 0.0))
    core.add_request(EngineRequest("good", [1, 2, 3], good, [], 0.0))
    finished = {}
    while core.has_work:
        for out in core.step().outputs:
            if out.finish_reason is not None:
                finished[out.request_id] = out
    assert finished["bad"].finish_reason == FinishReason.ABORT
    assert "regex" in (finished["bad"].error or "")
    assert finished["good"].finish_reason == FinishReason.LENGTH
    assert len(finished["good"].new_token_ids) == 1 and finished["good"].error is None
