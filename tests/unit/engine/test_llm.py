"""The offline engine on the default model: batching never changes greedy outputs."""

from __future__ import annotations

import pytest

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The three primary colours are",
    "Translate to French: good morning",
    "A list of fruits: apple, banana,",
    "In 1969, the first humans",
    "The quick brown fox",
    "Explain photosynthesis in one sentence. Photosynthesis is the process by which plants use "
    "sunlight, water and carbon dioxide to",
    "Hello",
    "My favourite programming language is Python because",
    "Roses are red, violets are blue,",
    "The largest planet in the solar system is Jupiter. The second largest is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory=256 << 20)


def reset_scheduler(
    llm: LLM,
    *,
    num_blocks: int | None = None,
    caching: bool = True,
    budget: int = 2048,
    max_num_seqs: int = 256,
) -> None:
    """A fresh scheduler (and block pool) over the same loaded model."""
    num_blocks = num_blocks or llm.engine.runner.num_blocks
    llm.engine.scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        CacheConfig(block_size=16, enable_prefix_caching=caching),
        num_blocks,
        min(llm.max_model_len, num_blocks * 16),  # a request fits the smaller pool alone
    )


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(llm: LLM) -> list[list[int]]:
    reset_scheduler(llm, caching=False)
    return [tokens(llm.generate(p, GREEDY))[0] for p in PROMPTS]


def test_demo_continuation_is_coherent(llm: LLM) -> None:
    (out,) = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out.outputs[0].text


@pytest.mark.parametrize(
    "setting",
    ["together", "chunked", "no-prefix-cache", "preempted"],
)
def test_batching_does_not_change_greedy_tokens(llm: LLM, alone, setting: str) -> None:
    kwargs = {
        "together": {},
        "chunked": {"budget": 7},
        "no-prefix-cache": {"caching": False},
        "preempted": {"num_blocks": 24},
    }[setting]
    reset_scheduler(llm, **kwargs)
    together = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert together == alone
    llm.engine.check_invariants()
    if setting == "preempted":
        assert llm.engine.scheduler.num_preemptions > 0


def test_shared_prefix_is_computed_once(llm: LLM) -> None:
    # The reuse shows in the prefix cache's counts and in what each request reports as
    # cached, not in wall-clock times (which a busy machine makes meaningless).
    reset_scheduler(llm)
    prefix = list(range(1000, 1256))  # 256 tokens: 16 full blocks
    one = SamplingParams(temperature=0, max_tokens=1)
    (first,) = llm.generate([prefix + [5, 6, 7]], one)
    assert first.num_cached_tokens == 0

    stats = llm.engine.scheduler.kv.prefix_stats
    hits_before = stats.hits
    (warm,) = llm.generate([prefix + [8, 9, 10, 11]], one)
    assert stats.hits - hits_before == 256 and warm.num_cached_tokens == 256
    hits_before = stats.hits
    (cold,) = llm.generate([list(range(3000, 3256)) + [8, 9, 10, 11]], one)
    assert stats.hits == hits_before and cold.num_cached_tokens == 0
    assert warm.outputs[0].token_ids and cold.outputs[0].token_ids


def test_seeded_sampling_ignores_batch_composition(llm: LLM) -> None:
    reset_scheduler(llm)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    (solo,) = llm.generate("Tell me a story", seeded)
    others = [SamplingParams(temperature=0.8, max_tokens=20), GREEDY]
    batch = llm.generate(
        ["Write a poem", "Tell me a story", "1, 2, 3"], [others[0], seeded, others[1]]
    )
    assert batch[1].outputs[0].token_ids == solo.outputs[0].token_ids


def test_n_samples_share_prompt_blocks(llm: LLM) -> None:
    reset_scheduler(llm)
    prompt = list(range(2000, 2040))  # 2 full blocks and 8 tokens
    hits_before = llm.engine.scheduler.kv.prefix_stats.hits
    (out,) = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8))
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    # the three later samples find the first one's two full blocks
    assert llm.engine.scheduler.kv.prefix_stats.hits - hits_before == 3 * 32


def test_stop_string_spanning_tokens(llm: LLM) -> None:
    reset_scheduler(llm)
    (free,) = llm.generate("The capital of France is", GREEDY)
    text = free.outputs[0].text  # " Paris.\n\nThe answer is: ..."
    stop = "\n\nThe answer"
    assert stop in text
    for include in (False, True):
        params = SamplingParams(
            temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=include
        )
        (out,) = llm.generate("The capital of France is", params)
        cut = text[: text.index(stop) + (len(stop) if include else 0)]
        assert out.outputs[0].text == cut
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    llm.engine.check_invariants()
    assert not llm.engine.scheduler.has_work  # the engine request was aborted


def test_logprobs_are_reported(llm: LLM) -> None:
    reset_scheduler(llm)
    (out,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3))
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for token_id, entry in zip(c.token_ids, c.logprobs):
        assert entry[token_id][1] == 1  # greedy: rank 1
        assert len(entry) == 3
    assert c.cumulative_logprob == pytest.approx(
        sum(e[t][0] for t, e in zip(c.token_ids, c.logprobs))
    )


def test_prompt_logprobs_match_a_full_forward(llm: LLM) -> None:
    import torch

    reset_scheduler(llm, budget=7)  # several chunks, so the pieces must join up
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    (out,) = llm.generate([prompt], params)
    entries = out.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None

    from pagoda.model.attention_metadata import AttentionMetadata

    model = llm.engine.runner.model
    table = list(range(llm.engine.runner.num_blocks - 4, llm.engine.runner.num_blocks))
    attn, positions = AttentionMetadata.build([0], [len(prompt)], [table], 16)
    with torch.inference_mode():
        reference = model.compute_logits(model(torch.tensor(prompt), positions, attn))
    reference = reference.log_softmax(-1)
    for i in range(1, len(prompt)):
        logprob, rank = entries[i][prompt[i]]
        assert logprob == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)
        assert rank == int((reference[i - 1] > reference[i - 1, prompt[i]]).sum()) + 1
        assert len(entries[i]) in (2, 3)  # the prompt token and the top 2


def test_allowed_token_ids_bound_what_the_model_says(llm: LLM) -> None:
    reset_scheduler(llm)
    allowed = llm.tokenizer.encode(" yes no maybe", add_special_tokens=False)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=12, allowed_token_ids=allowed)
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=12)
    bound, unbound = llm.generate(["The weather today is", "The weather today is"], [params, free])
    assert set(bound.outputs[0].token_ids) <= set(allowed)
    assert not set(unbound.outputs[0].token_ids) <= set(allowed)


def test_logprob_token_ids_are_the_logprobs_of_those_tokens(llm: LLM) -> None:
    reset_scheduler(llm)
    prompt = "The capital of France is"
    (top,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=3))
    # Ask, at each position, for the tokens that were second and third there.
    firsts = [sorted(e.items(), key=lambda kv: kv[1][1]) for e in top.outputs[0].logprobs]
    wanted = [t for t, _ in firsts[0][1:3]]
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=0, logprob_token_ids=wanted)
    (out,) = llm.generate(prompt, params)
    assert out.outputs[0].token_ids == top.outputs[0].token_ids
    first = out.outputs[0].logprobs[0]
    assert list(first)[0] == out.outputs[0].token_ids[0]  # the sampled token first
    for t in wanted:
        assert first[t][0] == pytest.approx(top.outputs[0].logprobs[0][t][0], abs=1e-5)
        assert first[t][1] == top.outputs[0].logprobs[0][t][1]
    for entry in out.outputs[0].logprobs[1:]:
        assert set(wanted) <= set(entry) and len(entry) <= 3


CONVERSATION = [{"role": "user", "content": "Name three primary colours."}]


def test_chat_renders_the_template_and_generates_from_its_tokens(llm: LLM) -> None:
    rendered = llm.tokenizer.apply_chat_template(CONVERSATION)
    (chat,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    (plain,) = llm.generate(
        [llm.tokenizer.encode(rendered, add_special_tokens=False)], GREEDY, use_tqdm=False
    )
    assert chat.prompt == rendered
    assert chat.prompt_token_ids == plain.prompt_token_ids
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
    other = [{"role": "user", "content": "Hello"}]
    both = llm.chat([CONVERSATION, other], GREEDY, use_tqdm=False)
    assert [o.prompt for o in both] == [rendered, llm.tokenizer.apply_chat_template(other)]
    assert both[0].outputs[0].token_ids == chat.outputs[0].token_ids


def test_chat_keeps_one_bos_where_the_template_writes_it(gemma3_gguf_path) -> None:
    """Gemma's template starts with {{ bos_token }} and its tokenizer adds <bos> too: chat
    tokenizes the rendered text without the tokenizer's own, so the prompt holds one."""
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
    )
    gemma = LLM(str(gemma3_gguf_path), kv_cache_memory=16 << 20, max_model_len=256)
    one_token = SamplingParams(temperature=0, max_tokens=1)
    (chat,) = gemma.chat(CONVERSATION, one_token, use_tqdm=False, chat_template=template)
    bos = gemma.tokenizer.bos_token_id
    assert chat.prompt_token_ids[0] == bos and chat.prompt_token_ids.count(bos) == 1
    # generate() adds the tokenizer's special tokens to text, as vLLM's does: a second <bos>.
    (plain,) = gemma.generate(chat.prompt, one_token, use_tqdm=False)
    assert plain.prompt_token_ids[:2] == [bos, bos]
