"""Structured outputs with the default model (SmolLM2-135M): fifty JSON schemas, regexes,
choices and a Lark grammar, greedy and sampled; every output that ends with "stop" obeys
its constraint, checked by an independent validator (jsonschema, re, lark)."""

from __future__ import annotations

import json
import re
from functools import partial

import pytest
from json_schemas import SCHEMAS, constrained

from pagoda.config import StructuredOutputsConfig
from pagoda.core.request import FinishReason
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams

jsonschema = pytest.importorskip("jsonschema")
lark = pytest.importorskip("lark")
pytest.importorskip("llguidance")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_model_path) -> LLM:
    return LLM(str(default_model_path))


@pytest.fixture(scope="module")
def exact_llm(default_model_path) -> LLM:
    """In float32: bfloat16's quantized paths depend on the number of rows in a step, so
    only float32 gives the same greedy tokens whatever the batch (as tests/unit/engine)."""
    return LLM(str(default_model_path), dtype="float32", kv_cache_memory=256 << 20)


params = partial(constrained, max_tokens=120)  # room for the longest schema answers


def chat(llm: LLM, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.parametrize("seed", [None, 1234])
def test_fifty_schemas_give_valid_json(llm, seed) -> None:
    names = list(SCHEMAS)
    prompts = [chat(llm, f"Reply with a JSON value: an example of a {name}.") for name in names]
    outs = llm.generate(
        prompts,
        [params(None if seed is None else seed + i, json=SCHEMAS[n]) for i, n in enumerate(names)],
        use_tqdm=False,
    )
    stopped = 0
    for name, out in zip(names, outs):
        c = out.outputs[0]
        if c.finish_reason == FinishReason.STOP:
            stopped += 1
            validator = jsonschema.Draft202012Validator(
                SCHEMAS[name], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
            )
            validator.validate(json.loads(c.text))
    # The bounds in every schema let a model finish: nearly all do.
    assert stopped >= 0.9 * len(names), stopped


REGEXES = [
    r"[0-9]{3}-[0-9]{3}-[0-9]{4}",
    r"(yes|no), because [a-z ]{5,40}\.",
    r"[A-Z][a-z]{1,12} [A-Z][a-z]{1,12}",
    r"0x[0-9a-f]{8}",
    r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])",
]


@pytest.mark.parametrize("seed", [None, 99])
def test_regex_choice_and_grammar_outputs_obey(llm, seed) -> None:
    prompts = [chat(llm, "Answer in the required format.")] * len(REGEXES)
    outs = llm.generate(prompts, [params(seed, regex=r) for r in REGEXES], use_tqdm=False)
    for regex, out in zip(REGEXES, outs):
        assert out.outputs[0].finish_reason == FinishReason.STOP, (regex, out.outputs[0].text)
        assert re.fullmatch(regex, out.outputs[0].text), (regex, out.outputs[0].text)

    choices = ["Paris", "London", "Berlin", "Rome"]
    (out,) = llm.generate(
        [chat(llm, "What is the capital of France?")], params(seed, choice=choices), use_tqdm=False
    )
    assert out.outputs[0].text in choices

    grammar = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
    (out,) = llm.generate(
        [chat(llm, "Write an arithmetic expression.")],
        params(seed, max_tokens=60, grammar=grammar),
        use_tqdm=False,
    )
    if out.outputs[0].finish_reason == FinishReason.STOP:
        lark.Lark(grammar).parse(out.outputs[0].text)


def test_json_does_not_run_away_in_whitespace(llm) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,  # else a model may add keys without end
    }
    prompt = chat(llm, "Give me a JSON object.")
    outs = llm.generate(
        [prompt] * 100, [params(seed, json=schema) for seed in range(100)], use_tqdm=False
    )
    assert [o.outputs[0].finish_reason for o in outs] == [FinishReason.STOP] * 100
    # Any JSON object has no bound on its size, but neither runs away in whitespace: outside
    # strings there is none but the one space after ":" and ",".
    outs += llm.generate(
        [prompt] * 20, [params(seed, json_object=True) for seed in range(20)], use_tqdm=False
    )
    for o in outs:
        structure = STRING.sub('""', o.outputs[0].text)
        assert not re.search(r"[\n\r\t]", structure), o.outputs[0].text
        assert re.sub(r"[:,] ", "", structure).count(" ") == 0, o.outputs[0].text


STRING = re.compile(r'"(?:[^"\\]|\\.)*"?')


def test_unconstrained_requests_keep_their_greedy_tokens_beside_constrained_ones(
    exact_llm,
) -> None:
    llm = exact_llm
    plain = SamplingParams(temperature=0, max_tokens=40)
    prompts = [chat(llm, "Tell me about cats."), chat(llm, "What is 2+2?")]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    names = list(SCHEMAS)[:6]
    mixed = llm.generate(
        prompts + [chat(llm, f"A {n} as JSON.") for n in names],
        [plain, plain] + [params(None, json=SCHEMAS[n]) for n in names],
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone


def test_forced_tokens_change_nothing_but_the_step_count(exact_llm, default_model_path) -> None:
    llm = exact_llm
    off = LLM(
        str(default_model_path),
        dtype="float32",
        kv_cache_memory=256 << 20,
        structured_outputs_config=StructuredOutputsConfig(forced_tokens=False),
    )
    names = list(SCHEMAS)[:12]
    prompts = [chat(llm, f"Reply with a JSON value: an example of a {n}.") for n in names]
    for seed in (None, 5):
        ps = [params(seed, json=SCHEMAS[n]) for n in names]
        on_out = llm.generate(prompts, ps, use_tqdm=False)
        off_out = off.generate(prompts, ps, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in on_out] == [o.outputs[0].token_ids for o in off_out]
