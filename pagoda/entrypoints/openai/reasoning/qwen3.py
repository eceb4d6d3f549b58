"""Qwen3: <think>...</think> before the answer. The model opens its thinking itself (or the
template does, Qwen3.5 on); with enable_thinking=false the template writes an empty thinking
into the prompt and the output is all answer. An output that does not open with <think> is
an answer."""

from __future__ import annotations

from pagoda.entrypoints.openai.reasoning.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
