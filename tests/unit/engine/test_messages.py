"""The wire: what the engine process sends back is one tagged union, decoded by its tag."""

from __future__ import annotations

from pagoda.engine import messages as m


def test_engine_messages_decode_by_their_tag() -> None:
    ready = m.EngineReady(max_model_len=64, num_blocks=8, block_size=16, dtype="x", vocab_size=9)
    assert m.message_decoder.decode(m.encoder.encode(ready)) == ready
    failed = m.EngineOutputs([], engine_error="boom")
    assert m.message_decoder.decode(m.encoder.encode(failed)) == failed
    step = m.EngineOutputs([m.EngineOutput("r", [1, 2])], timestamp=1.5)
    assert m.message_decoder.decode(m.encoder.encode(step)) == step
