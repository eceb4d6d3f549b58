"""Detokenization and stop strings on the API-server side, without an engine."""

from __future__ import annotations

import pytest

from pagoda.core.request import FinishReason, RequestStatus
from pagoda.engine import messages as m
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.messages import EngineOutput
from pagoda.engine.output import OutputProcessor
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.tokenizer import Tokenizer

TEXT = " Tōkyō 東京 🙂🙂 naïve café, ü — done"


@pytest.fixture(scope="module")
def tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer.from_path(default_model_path)


def test_multibyte_text_streams_without_broken_characters(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split())  # some characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT
    assert "" in pieces  # some tokens completed no character on their own


def feed(processor: OutputProcessor, engine_id: str, token_ids: list[int], finish=None):
    outputs = []
    to_abort = []
    for i, t in enumerate(token_ids):
        last = finish if i == len(token_ids) - 1 else None
        out, abort = processor.process_outputs([EngineOutput(engine_id, [t], finish_reason=last)])
        outputs += out
        to_abort += abort
    return outputs, to_abort


def test_delta_stream_holds_back_a_possible_stop_string(tokenizer: Tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=50, stop=["café,"], output_kind=RequestOutputKind.DELTA)
    processor.add_request("r", None, [1], params)
    outputs, to_abort = feed(processor, "r", tokenizer.encode(TEXT, add_special_tokens=False))
    streamed = "".join(o.outputs[0].text for o in outputs)
    assert streamed == TEXT[: TEXT.index("café,")]
    assert outputs[-1].finished and outputs[-1].outputs[0].stop_reason == "café,"
    assert to_abort == ["r"]  # the engine is told to stop the request
    assert not processor.has_unfinished()


def test_n_samples_are_gathered(tokenizer: Tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, max_tokens=3, seed=5)
    engine_requests = processor.add_request("r", "x", [1], params)
    assert [e.request_id for e in engine_requests] == ["0_r", "1_r"]
    assert [e.sampling_params.seed for e in engine_requests] == [5, 6]
    ids = tokenizer.encode(" a b c", add_special_tokens=False)
    feed(processor, "0_r", ids, finish=FinishReason.LENGTH)
    outputs, _ = feed(processor, "1_r", ids[:2], finish=FinishReason.STOP)
    final = outputs[-1]
    assert final.finished
    assert [c.text for c in final.outputs] == [" a b c", " a b"]
    assert [c.finish_reason for c in final.outputs] == ["length", "stop"]


def test_abort_returns_the_unfinished_samples_of_an_id_with_underscores(
    tokenizer: Tokenizer,
) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=3, max_tokens=4)
    ids = [er.request_id for er in processor.add_request("cmpl_1_x", None, [1, 2], params)]
    assert len(set(ids)) == 3
    feed(processor, ids[1], [5, 6], finish=FinishReason.LENGTH)
    assert sorted(processor.abort_request("cmpl_1_x")) == sorted([ids[0], ids[2]])
    assert not processor.engine_ids and not processor.has_unfinished()


def test_finish_reason_is_one_enum_from_the_request_to_the_output(tokenizer: Tokenizer) -> None:
    assert RequestStatus.FINISHED_LENGTH.finish_reason is FinishReason.LENGTH
    assert RequestStatus.RUNNING.finish_reason is None
    step = m.EngineOutputs([EngineOutput("r", [5], finish_reason=FinishReason.LENGTH)])
    (eo,) = m.message_decoder.decode(m.encoder.encode(step)).outputs
    assert eo.finish_reason is FinishReason.LENGTH
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1, 2], SamplingParams(max_tokens=1))
    (out,), _ = processor.process_outputs([eo])
    assert out.outputs[0].finish_reason is FinishReason.LENGTH
    assert f"{out.outputs[0].finish_reason}" == "length"  # the word the HTTP layer sends

    processor.add_request("s", None, [1, 2], SamplingParams(max_tokens=9, stop=["two"]))
    ids = tokenizer.encode(" one two three", add_special_tokens=False)
    outputs, _ = feed(processor, "s", ids)
    assert outputs[-1].outputs[0].finish_reason is FinishReason.STOP


class NoScanDict(dict):
    """A dict that fails the test when iterated whole."""

    def _scan(self, *args, **kwargs):
        raise AssertionError("the whole table of engine ids was scanned")

    __iter__ = items = keys = values = _scan  # type: ignore[assignment]


def test_abort_touches_only_the_requests_own_samples(tokenizer: Tokenizer) -> None:
    # Aborting each of a large request's sub-requests must not scan every engine id
    # (that made aborting 100,000 prompts quadratic and stalled the event loop for minutes).
    processor = OutputProcessor(tokenizer)
    for i in range(50):
        processor.add_request(f"r-{i}", None, [1], SamplingParams(n=1 + i % 3))
    feed(processor, "1_r-2", [5], finish=FinishReason.LENGTH)  # one sample of r-2 has finished
    processor.engine_ids = NoScanDict(processor.engine_ids)
    assert processor.abort_request("r-2") == ["0_r-2", "2_r-2"]
    assert processor.abort_request("r-0") == ["r-0"]
    assert processor.abort_request("r-0") == []
    for i in range(1, 50):
        if i != 2:
            processor.abort_request(f"r-{i}")
    assert not processor.has_unfinished() and not processor.engine_ids


@pytest.mark.parametrize(
    "kind", [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY, RequestOutputKind.CUMULATIVE]
)
def test_an_engine_error_reaches_the_sample_it_ended(tokenizer: Tokenizer, kind) -> None:
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1], SamplingParams(n=2, max_tokens=5, output_kind=kind))
    outputs, _ = feed(processor, "0_r", [5, 6], finish=FinishReason.LENGTH)
    error = EngineOutput("1_r", [7], finish_reason=FinishReason.ABORT, error="regex: no good")
    step = m.message_decoder.decode(m.encoder.encode(m.EngineOutputs([error])))
    (out,), _ = processor.process_outputs(step.outputs)
    assert out.finished and not processor.has_unfinished()
    by_index = {c.index: c for c in out.outputs}
    assert by_index[1].error == "regex: no good" and by_index[1].finish_reason == "abort"
    if kind != RequestOutputKind.DELTA:  # a delta carries only the sample that changed
        assert by_index[0].error is None and by_index[0].finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_the_token_that_ends_a_request_is_not_text(tokenizer: Tokenizer, include: bool) -> None:
    """As in vLLM: EOS or a stop token id that ends a request stays in token_ids but not in
    the text, even with skip_special_tokens off (where it would decode to "</s>" or the
    like), unless include_stop_str_in_output asks for it."""
    eos = tokenizer.eos_token_ids[0]
    eos_text = tokenizer.decode([eos], skip_special_tokens=False)
    assert eos_text  # the model's EOS has a text of its own
    ids = tokenizer.encode(" one two", add_special_tokens=False)
    stop_id = tokenizer.encode(" three", add_special_tokens=False)[-1]
    for kind in (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA):
        processor = OutputProcessor(tokenizer)
        params = dict(max_tokens=9, skip_special_tokens=False, output_kind=kind)
        params["include_stop_str_in_output"] = include
        processor.add_request("eos", None, [1], SamplingParams(**params))
        processor.add_request("stop", None, [1], SamplingParams(**params, stop_token_ids=[stop_id]))
        processor.add_request("grammar", None, [1], SamplingParams(**params))
        by_eos, _ = feed(processor, "eos", [*ids, eos], finish=FinishReason.STOP)
        stop = EngineOutput("stop", [stop_id], finish_reason=FinishReason.STOP, stop_reason=stop_id)
        by_stop_id = feed(processor, "stop", ids)[0] + processor.process_outputs([stop])[0]
        # A grammar that completes ends the request with its own last token: that is text.
        by_grammar, _ = feed(processor, "grammar", ids, finish=FinishReason.STOP)
        for outputs, last in ((by_eos, eos), (by_stop_id, stop_id), (by_grammar, None)):
            text = "".join(o.outputs[0].text for o in outputs)
            if last is None:
                assert text == " one two"
                continue
            kept = tokenizer.decode([last], skip_special_tokens=False) if include else ""
            assert text == " one two" + kept
            assert outputs[-1].outputs[0].token_ids[-1] == last  # still among the tokens
