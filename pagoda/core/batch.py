"""The scheduler -> runner contract: what one step computes, and what it sampled.

The scheduler captures each request's part of the step when it decides it; the runner
reads that capture, never the live `Request` counters, which `update_from_output`
advances after the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.core.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_computed_tokens: int  # the request's computed tokens before this step
    num_new_tokens: int  # the request's own tokens, then its drafts
    block_ids: list[int]  # the request's whole block table after this step's allocation
    # Guesses at the tokens after the request's last one, computed after it this step.
    draft_token_ids: list[int] = field(default_factory=list)
    # True when this step computes the request's last token, so a token is sampled after
    # it (and one after each draft). False for a prompt chunk that leaves more to compute.
    samples: bool = False

    @classmethod
    def of(
        cls,
        request: Request,
        num_computed: int,
        num_own: int,
        block_ids: list[int],
        drafts: list[int],
    ) -> ScheduledRequest:
        return cls(
            request,
            num_computed,
            num_own + len(drafts),
            block_ids,
            drafts,
            samples=num_computed + num_own == request.num_tokens,
        )

    @property
    def num_own_tokens(self) -> int:
        return self.num_new_tokens - len(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class RunnerOutput:
    """What the model runner returns for each request that finished its prompt: the token
    sampled after its last token, then one after each of its drafts (1 + len(drafts)),
    and their logprobs where asked for."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[dict[int, tuple[float, int]]]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[dict[int, tuple[float, int]] | None]] = field(
        default_factory=dict
    )
