"""Speculative decoding of constrained requests, on the tiny model (one token per byte): a
draft is cut at the first token its grammar refuses, each draft position samples under the
grammar state it would have without drafts, and so greedy outputs are token for token those
without drafts, alone and batched with unconstrained requests, with forced tokens."""

from __future__ import annotations

import pytest
from json_schemas import constrained

from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.core.request import Request
from pagoda.core.scheduler import RunnerOutput, Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams
from pagoda.structured.matcher import GrammarCompiler
from pagoda.tokenizer import Tokenizer

pytest.importorskip("llguidance")

# Drafts in every step, however often the random model disagrees with them.
SPEC = SpeculativeConfig(
    num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4, min_acceptance_rate=0
)
EOS = 2

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
# Prompts that hold answers of their constraint, so that the lookup finds drafts the
# grammar takes, and some it refuses (the prompt goes on past what the grammar allows).
CASES = [
    ("abcabc abcabc abcab", dict(regex="[abc]{24}")),
    ("abacabab acabacab ab", dict(regex="(a[bc]){12}")),  # a draft's masks differ
    (
        "id-ab-fixed-suffix-1 id-cd-fixed-suffix-2 id-",
        dict(regex=r"id-[a-z]{2}-fixed-suffix-[0-9]"),
    ),
    ('{"a": 12, "b": 345} {"a": 12, "b": 3', dict(json=SCHEMA)),
    ("green redder reddish red redder green ", dict(choice=["red", "redder", "green"])),
]
PLAIN = ["abcabc abcabc abc", "hello hello hello", "x y z x y z x y"]


@pytest.fixture(scope="module")
def engines(tiny_model_dir) -> tuple[LLM, LLM]:
    """The same model without and with drafts."""
    path = str(tiny_model_dir())
    return LLM(path, dtype="float32"), LLM(path, dtype="float32", speculative_config=SPEC)


def token_ids(llm: LLM, prompts: list[str], params_list: list[SamplingParams]) -> list[list[int]]:
    outs = llm.generate(prompts, params_list, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("seed", [None, 3])
def test_constrained_outputs_are_the_same_with_drafts_alone_and_batched(engines, seed) -> None:
    off, on = engines
    prompts = [p for p, _ in CASES]
    param_list = [constrained(seed, 32, **c) for _, c in CASES]
    alone = [token_ids(off, [p], [sp])[0] for p, sp in zip(prompts, param_list)]
    stats = on.engine.scheduler.spec_stats
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    assert [token_ids(on, [p], [sp])[0] for p, sp in zip(prompts, param_list)] == alone
    assert stats.num_draft_tokens > drafted and stats.num_accepted_tokens > accepted
    assert token_ids(on, prompts, param_list) == alone
    # Batched with unconstrained requests, which draft as before.
    plain = SamplingParams(temperature=0 if seed is None else 1.0, seed=seed, max_tokens=24)
    mixed = token_ids(on, PLAIN + prompts, [plain] * len(PLAIN) + param_list)
    assert mixed[len(PLAIN) :] == alone
    assert mixed[: len(PLAIN)] == token_ids(off, PLAIN, [plain] * len(PLAIN))
    on.engine.check_invariants()


def test_a_chunked_prompt_and_a_tight_budget_keep_the_outputs(engines, tiny_model_dir) -> None:
    """A budget of 5 tokens: prompts in chunks, forced tokens and drafts cut to fit."""
    off, _ = engines
    small = LLM(
        str(tiny_model_dir()),
        dtype="float32",
        speculative_config=SPEC,
        max_num_batched_tokens=5,
    )
    prompts = [p for p, _ in CASES]
    param_list = [constrained(None, 32, **c) for _, c in CASES]
    assert token_ids(small, prompts, param_list) == token_ids(off, prompts, param_list)
    assert small.engine.scheduler.spec_stats.num_accepted_tokens > 0


@pytest.fixture(scope="module")
def compiler(tiny_model_dir) -> tuple[GrammarCompiler, Tokenizer]:
    path = tiny_model_dir()
    return GrammarCompiler(path, 300), Tokenizer.from_path(path)


def drafting_scheduler(
    num_speculative_tokens: int, lookup: int, forced_tokens: bool = True
) -> Scheduler:
    """A small scheduler that drafts by looking up exactly `lookup` tokens."""
    return Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
        CacheConfig(block_size=4, enable_prefix_caching=True),
        16,
        64,
        forced_tokens=forced_tokens,
        speculative=SpeculativeConfig(
            num_speculative_tokens=num_speculative_tokens,
            prompt_lookup_min=lookup,
            prompt_lookup_max=lookup,
        ),
    )


def test_a_draft_the_grammar_refuses_is_cut_and_never_reaches_the_output(compiler) -> None:
    """The lookup drafts "bbbbc" after "ab"; the grammar takes two more b's only. A model
    that agreed with every draft token still appends only what the grammar allows."""
    grammars, tokenizer = compiler
    text = tokenizer.encode("abbbbc ab", add_special_tokens=False)
    b, c = tokenizer.encode("bc", add_special_tokens=False)
    scheduler = drafting_scheduler(num_speculative_tokens=5, lookup=2)
    request = Request("r", text, constrained(None, 32, regex="b{0,2}c"), eos_token_ids=(EOS,))
    request.grammar = grammars.compile(request.sampling_params.structured_outputs, (EOS,))
    assert request.grammar.matcher is not None  # built
    scheduler.add_request(request)
    out = scheduler.schedule()
    (s,) = out.scheduled
    assert s.draft_token_ids == [b, b]
    assert s.num_new_tokens == len(text) + 2
    # The model agrees with both drafts, then says c.
    scheduler.update_from_output(out, RunnerOutput(sampled={"r": [b, b, c]}))
    assert request.output_token_ids == [b, b, c]
    assert request.is_finished and request.error is None  # "bbc" completes the grammar
    scheduler.kv.check_invariants()


def test_a_grammar_that_ends_inside_the_accepted_drafts_ends_the_request_there(compiler) -> None:
    """Without drafts the request stops as the grammar completes; with drafts, the tokens
    sampled after that point (an EOS here) are not appended."""
    grammars, tokenizer = compiler
    text = tokenizer.encode("xd. x", add_special_tokens=False)
    scheduler = drafting_scheduler(num_speculative_tokens=4, lookup=1, forced_tokens=False)
    request = Request("r", text, constrained(None, 32, regex="d"), eos_token_ids=(EOS,))
    request.grammar = grammars.compile(request.sampling_params.structured_outputs, (EOS,))
    assert request.grammar.matcher is not None
    scheduler.add_request(request)
    out = scheduler.schedule()
    (s,) = out.scheduled
    (d,) = tokenizer.encode("d", add_special_tokens=False)
    assert s.draft_token_ids == [d]  # "d. x" is cut after the d the grammar wants
    scheduler.update_from_output(out, RunnerOutput(sampled={"r": [d, EOS]}))
    assert request.output_token_ids == [d] and request.is_finished
