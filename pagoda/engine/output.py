"""OutputProcessor: per-request state on the API-server side of the engine.

It turns the engine's token ids into RequestOutputs: detokenizes, finds stop
strings (and tells the caller which engine requests to abort because of them),
fans an n > 1 request out into n engine requests and gathers their samples
back, and honours cumulative, delta or final-only output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from pagoda.core.request import FinishReason
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.messages import EngineOutput, EngineRequest, WireLogprob
from pagoda.outputs import CompletionOutput, Logprobs, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.tokenizer import Tokenizer


@dataclass
class SampleState:
    """One of a request's n samples, i.e. one engine request."""

    index: int
    detokenizer: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # why the engine failed this sample alone
    checked_text: int = 0  # chars already searched for stop strings
    sent_text: int = 0  # chars already delivered (delta mode)
    sent_tokens: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    arrival_time: float
    engine_ids: list[str] = field(default_factory=list)  # one per sample, by index
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


def _logprobs(wire: list[WireLogprob]) -> Logprobs:
    return {token_id: (logprob, rank) for token_id, logprob, rank in wire}


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.engine_ids: dict[str, tuple[RequestState, SampleState]] = {}

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> list[EngineRequest]:
        """Registers a request; returns the engine requests to send (n of them)."""
        assert request_id not in self.requests, f"duplicate request id {request_id}"
        arrival = arrival_time if arrival_time is not None else time.time()
        state = RequestState(request_id, prompt, prompt_token_ids, params, [], arrival)
        self.requests[request_id] = state
        engine_requests = []
        for i in range(params.n):
            engine_id = request_id if params.n == 1 else f"{i}_{request_id}"
            child = params
            if params.n > 1:
                # Each sample is its own engine request; a seed still gives n different samples.
                seed = params.seed + i if params.seed is not None else None
                child = msgspec.structs.replace(params, n=1, seed=seed)
            sample = SampleState(
                i,
                IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                ),
            )
            if params.logprobs is not None:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
            state.samples.append(sample)
            state.engine_ids.append(engine_id)
            self.engine_ids[engine_id] = (state, sample)
            engine_requests.append(
                EngineRequest(
                    request_id=engine_id,
                    prompt_token_ids=prompt_token_ids,
                    sampling_params=child,
                    eos_token_ids=self.tokenizer.eos_token_ids,
                    arrival_time=arrival,
                    parent_id=request_id if params.n > 1 else None,
                )
            )
        return engine_requests

    def abort_request(self, request_id: str) -> list[str]:
        """Forgets a request; returns the engine ids of its unfinished samples.

        Touches only the request's own samples, so that aborting the many sub-requests
        of one large request costs time linear in their number.
        """
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        unfinished = []
        for engine_id, sample in zip(state.engine_ids, state.samples):
            self.engine_ids.pop(engine_id, None)
            if sample.finish_reason is None:
                unfinished.append(engine_id)
        return unfinished

    def process_outputs(
        self, engine_outputs: list[EngineOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Applies one step's outputs; returns what to deliver and engine ids to abort."""
        deliver: list[RequestOutput] = []
        to_abort: list[str] = []
        now = time.time()
        for eo in engine_outputs:
            entry = self.engine_ids.get(eo.request_id)
            if entry is None:
                continue  # aborted or finished by a stop string meanwhile
            state, sample = entry
            # Every sample of an n > 1 request scores the same prompt: keep the first's.
            if eo.prompt_logprobs is not None and sample.index == 0:
                if state.prompt_logprobs is None:
                    state.prompt_logprobs = [None]  # the first token has no context
                state.prompt_logprobs.extend(_logprobs(p) for p in eo.prompt_logprobs)
            if eo.new_token_ids and state.first_token_time is None:
                state.first_token_time = now
                state.num_cached_tokens = eo.num_cached_tokens
            self._append(sample, eo, state.params)
            stopped = self._check_stop_strings(sample, state.params)
            if stopped and eo.finish_reason is None:
                to_abort.append(eo.request_id)
            elif eo.finish_reason is not None and sample.finish_reason is None:
                sample.finish_reason = eo.finish_reason
                sample.stop_reason = eo.stop_reason
                sample.error = eo.error
            if sample.finish_reason is not None:
                del self.engine_ids[eo.request_id]
            output = self._make_output(state, sample)
            if output is not None:
                deliver.append(output)
            if state.finished:
                self.requests.pop(state.request_id, None)
        return deliver, to_abort

    def _append(self, sample: SampleState, eo: EngineOutput, params: SamplingParams) -> None:
        if sample.finish_reason is not None:
            return
        sample.token_ids.extend(eo.new_token_ids)
        text_ids = eo.new_token_ids
        if self._ended_by_token(eo) and not params.include_stop_str_in_output:
            # As vLLM: the EOS or stop token that ends a request is no text of the answer
            # (with skip_special_tokens off it would read "</s>" or the like).
            text_ids = text_ids[:-1]
        sample.text += sample.detokenizer.push(text_ids)
        if sample.logprobs is not None and eo.new_logprobs is not None:
            for token_id, wire in zip(eo.new_token_ids, eo.new_logprobs):
                entry = _logprobs(wire)
                sample.logprobs.append(entry)
                assert sample.cumulative_logprob is not None
                sample.cumulative_logprob += entry[token_id][0]

    def _ended_by_token(self, eo: EngineOutput) -> bool:
        """Whether the engine ended the request on its last token by EOS or a stop token id
        (a grammar that completes also ends it with STOP, on a token of the answer)."""
        if eo.finish_reason is not FinishReason.STOP or not eo.new_token_ids:
            return False
        last = eo.new_token_ids[-1]
        return eo.stop_reason == last or (
            eo.stop_reason is None and last in self.tokenizer.eos_token_ids
        )

    def _check_stop_strings(self, sample: SampleState, params: SamplingParams) -> bool:
        """Cuts the text at the first stop string, which may span several tokens."""
        if not params.stop or sample.finish_reason is not None:
            return False
        # Only the tail can hold a new match: the new text plus a stop string's length.
        longest = max(len(s) for s in params.stop)
        search_from = max(0, sample.checked_text - longest + 1)
        sample.checked_text = len(sample.text)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = sample.text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        sample.text = sample.text[: at + len(stop) if params.include_stop_str_in_output else at]
        sample.finish_reason, sample.stop_reason = FinishReason.STOP, stop
        return True

    def _make_output(self, state: RequestState, sample: SampleState) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not state.finished:
            return None
        if kind == RequestOutputKind.DELTA:
            completions = [self._delta(sample, state.params)]
        else:
            completions = [self._cumulative(s) for s in state.samples]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
            prompt_logprobs=state.prompt_logprobs,
            metrics={
                "arrival_time": state.arrival_time,
                "first_token_time": state.first_token_time or 0.0,
            },
        )

    @staticmethod
    def _cumulative(sample: SampleState) -> CompletionOutput:
        return CompletionOutput(
            index=sample.index,
            text=sample.text,
            token_ids=list(sample.token_ids),
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            logprobs=list(sample.logprobs) if sample.logprobs is not None else None,
            cumulative_logprob=sample.cumulative_logprob,
            error=sample.error,
        )

    @staticmethod
    def _delta(sample: SampleState, params: SamplingParams) -> CompletionOutput:
        """What is new since the last delta; text that may start a stop string is held back."""
        end = len(sample.text)
        if sample.finish_reason is None and params.stop:
            end = max(sample.sent_text, end - (max(len(s) for s in params.stop) - 1))
        text = sample.text[sample.sent_text : end]
        tokens = sample.token_ids[sample.sent_tokens :]
        logprobs = sample.logprobs[sample.sent_tokens :] if sample.logprobs is not None else None
        sample.sent_text, sample.sent_tokens = end, len(sample.token_ids)
        return CompletionOutput(
            index=sample.index,
            text=text,
            token_ids=tokens,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=sample.cumulative_logprob,
            error=sample.error,
        )
