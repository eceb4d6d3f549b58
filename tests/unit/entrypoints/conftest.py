"""What the HTTP-layer tests share: the default model's tokenizer and a fake engine over it."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngineClient

from pagoda.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer.from_path(default_model_path)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngineClient:
    return FakeEngineClient(tokenizer)
