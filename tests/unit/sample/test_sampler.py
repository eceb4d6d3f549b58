from __future__ import annotations

import torch

from pagoda.core.request import Request
from pagoda.sample.sampler import SamplingMetadata, sample, uniform_from
from pagoda.sampling_params import SamplingParams

VOCAB = 10


def requests(*params: SamplingParams, outputs: list[list[int]] | None = None) -> list[Request]:
    out = []
    for i, p in enumerate(params):
        p = SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__}, "max_tokens": 50})
        r = Request(str(i), [1, 2, 3], p, eos_token_ids=(9,))
        r.sampling_seed = 1000 + i if p.seed is None else p.seed
        for t in (outputs or [[]] * len(params))[i]:
            r.append_token(t)
        out.append(r)
    return out


def run(logits: torch.Tensor, reqs: list[Request]):
    return sample(logits, SamplingMetadata.from_requests(reqs, VOCAB, "cpu"))


LOGITS = torch.tensor([[0.0, 1.0, 4.0, 3.9, 2.0, 0.5, 0.1, -1.0, 0.2, 5.0]])


def test_greedy_and_top_k_1_pick_the_maximum() -> None:
    assert run(LOGITS, requests(SamplingParams(temperature=0))).token_ids.tolist() == [9]
    for seed in range(20):
        r = requests(SamplingParams(temperature=1.5, top_k=1, seed=seed))
        assert run(LOGITS, r).token_ids.tolist() == [9]


def test_top_p_keeps_only_the_nucleus() -> None:
    seen = set()
    for seed in range(200):
        r = requests(SamplingParams(temperature=1.0, top_p=0.6, seed=seed))
        seen.add(run(LOGITS, r).token_ids.item())
    # softmax mass: token 9 ~ 0.49, token 2 ~ 0.18, token 3 ~ 0.16: 9 alone < 0.6, 9 + 2 >= 0.6
    assert seen == {9, 2}


def test_min_p_drops_unlikely_tokens() -> None:
    seen = set()
    for seed in range(200):
        r = requests(SamplingParams(temperature=1.0, min_p=0.3, seed=seed))
        seen.add(run(LOGITS, r).token_ids.item())
    assert seen == {9, 2, 3}  # exp(-1) and exp(-1.1) of the top probability pass 0.3


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0] + [-30.0] * 7])
    probs = logits.softmax(-1)[0, :3]
    reqs = requests(SamplingParams(temperature=1.0, seed=5))
    counts = torch.zeros(3)
    for position in range(3000):
        reqs[0].all_token_ids = [0] * position  # the noise depends on the position
        counts[run(logits, reqs).token_ids.item()] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_seeded_row_ignores_its_neighbours() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    alone = run(logits[2:3], requests(SamplingParams(temperature=1.0, seed=42)))
    batch = run(
        logits,
        requests(
            SamplingParams(temperature=0.7),
            SamplingParams(temperature=0),
            SamplingParams(temperature=1.0, seed=42),
            SamplingParams(temperature=1.0, top_p=0.5),
        ),
    )
    assert batch.token_ids[2] == alone.token_ids[0]


def test_uniform_is_a_function_of_seed_and_position() -> None:
    a = uniform_from(torch.tensor([1, 2, 1]), torch.tensor([5, 5, 6]))
    b = uniform_from(torch.tensor([1]), torch.tensor([5]))
    assert a[0] == b[0] and len(set(a.tolist())) == 3
    many = uniform_from(torch.arange(20000), torch.full((20000,), 7))
    assert (many > 0).all() and (many < 1).all()
    assert abs(many.mean().item() - 0.5) < 0.01
    assert torch.histc(many.float(), bins=10, min=0, max=1).min() > 1800  # roughly flat


def test_logit_bias_and_min_tokens() -> None:
    biased = requests(SamplingParams(temperature=0, logit_bias={4: 10.0}))
    assert run(LOGITS, biased).token_ids.tolist() == [4]
    # EOS (9) is banned until min_tokens outputs exist
    early = requests(SamplingParams(temperature=0, min_tokens=2), outputs=[[5]])
    assert run(LOGITS, early).token_ids.tolist() == [2]
    late = requests(SamplingParams(temperature=0, min_tokens=2), outputs=[[5, 5]])
    assert run(LOGITS, late).token_ids.tolist() == [9]


def test_penalties_match_their_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5] + [-9.0] * 6])
    reqs = requests(SamplingParams(temperature=0, repetition_penalty=2.0), outputs=[[0, 1]])
    meta = SamplingMetadata.from_requests(reqs, VOCAB, "cpu")
    from pagoda.sample.sampler import apply_penalties

    out = apply_penalties(logits.clone(), meta)
    # tokens 0, 1 (outputs) and 1, 2, 3 (prompt [1, 2, 3]) are seen
    assert out[0, :4].tolist() == [1.0, -4.0, 0.5, 0.25]
    reqs = requests(
        SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5),
        outputs=[[0, 0, 3]],
    )
    out = apply_penalties(logits.clone(), SamplingMetadata.from_requests(reqs, VOCAB, "cpu"))
    assert out[0, :4].tolist() == [2.0 - 1.0 - 1.0, -2.0, 1.0, 0.5 - 1.0 - 0.5]


def test_penalty_tensors_only_when_a_row_is_penalised() -> None:
    greedy = requests(SamplingParams(temperature=0), SamplingParams(temperature=0))
    meta = SamplingMetadata.from_requests(greedy, VOCAB, "cpu")
    assert meta.presence is None and meta.frequency is None and meta.repetition is None
    # One penalised row: every row gets its own value, the others neutral.
    mixed = requests(
        SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=1.5)
    )
    meta = SamplingMetadata.from_requests(mixed, VOCAB, "cpu")
    assert meta.presence is not None and meta.presence.tolist() == [0.0, 1.5]
    assert meta.repetition is not None and meta.repetition.tolist() == [1.0, 1.0]


def test_logprobs_and_ranks() -> None:
    reqs = requests(SamplingParams(temperature=0, logprobs=3))
    result = run(LOGITS, reqs)
    expected = LOGITS.log_softmax(-1)
    assert result.sampled_ranks.tolist() == [1]
    assert torch.allclose(result.sampled_logprobs, expected[:, 9])
    assert result.top_ids.tolist() == [[9, 2, 3]]


def test_tiny_temperatures_behave_as_their_limit_greedy() -> None:
    # logits / 1e-45 overflows float32 to infinity and softmax then gives NaN (nonsense
    # tokens); the limit of sampling as the temperature goes to 0 is the greedy token.
    logits = torch.cat([LOGITS, LOGITS.flip(1) * 7.0, LOGITS - 50.0])
    greedy = logits.argmax(dim=-1).tolist()
    for temperature in (1e-45, 1e-40, 1e-38, 1e-30, 1e-8):
        for seed in range(20):
            for extra in ({}, {"top_p": 0.5}, {"top_k": 3}, {"min_p": 0.1}):
                params = SamplingParams(temperature=temperature, seed=seed, **extra)
                reqs = requests(params, params, params)
                assert run(logits, reqs).token_ids.tolist() == greedy, (temperature, extra)


def test_allowed_token_ids_mask_every_other_token() -> None:
    # Greedy picks the best allowed token, not the best token (9).
    assert run(
        LOGITS, requests(SamplingParams(temperature=0, allowed_token_ids=[0, 4, 7]))
    ).token_ids.tolist() == [4]
    seen = set()
    for seed in range(100):
        r = requests(SamplingParams(temperature=2.0, seed=seed, allowed_token_ids=[1, 5, 6]))
        seen.add(run(LOGITS, r).token_ids.item())
    assert seen == {1, 5, 6}
    # Only the rows that ask are masked.
    both = requests(
        SamplingParams(temperature=0), SamplingParams(temperature=0, allowed_token_ids=[8])
    )
    assert run(LOGITS.repeat(2, 1), both).token_ids.tolist() == [9, 8]
