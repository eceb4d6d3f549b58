"""DeepSeek-R1 and its distills: <think>...</think> before the answer. The template may
open <think> in the prompt, and the model often leaves it out, so an output is thinking up
to </think> whether it opens with <think> or not."""

from __future__ import annotations

from pagoda.entrypoints.openai.reasoning.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    implicit_start = True
