"""What the thinking formats share: where an output starts (read from the prompt's end), the
split of its text into reasoning and content, and the stream that turns successive splits
into deltas.

A format only names its markers and whether an output that does not open with the start
marker thinks all the same. `split(text)` is the whole reading; the stream sends what each
new split adds, so a streamed answer's pieces add up to the unstreamed one by construction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from pagoda.entrypoints.openai.tool_parsers.base import held_back


class Phase(enum.Enum):
    """Where the output starts, as the prompt leaves it."""

    MAY_THINK = "may_think"  # the output may open its thinking with the start marker
    THINKING = "thinking"  # the prompt opened the thinking: the output starts inside it
    ANSWERING = "answering"  # the prompt closed it (thinking switched off): all is content


@dataclass(frozen=True)
class Split:
    reasoning: str  # the text inside the markers (without them)
    content: str  # the answer: the text after the end marker


class ReasoningParser:
    """One thinking format; subclasses name it and may change the markers."""

    name: ClassVar[str]
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    # Whether an output that does not open with the start marker is thinking all the same,
    # up to the end marker (DeepSeek-R1 often leaves <think> out).
    implicit_start: ClassVar[bool] = False

    def phase(self, prompt: str) -> Phase:
        """Where the output of this prompt starts: inside the thinking when the prompt ends
        with the start marker (the template opened it), in the answer when it ends with the
        end marker (Qwen3's enable_thinking=false writes an empty thinking)."""
        tail = prompt.rstrip()
        if tail.endswith(self.start):
            return Phase.THINKING
        if tail.endswith(self.end):
            return Phase.ANSWERING
        return Phase.MAY_THINK

    def thinking_markers(self, phase: Phase) -> tuple[str | None, str] | None:
        """(start, end) for a constraint that must hold after the thinking (start None: the
        output begins inside it); None when the output is all answer."""
        if phase is Phase.ANSWERING:
            return None
        if phase is Phase.THINKING or self.implicit_start:
            return None, self.end
        return self.start, self.end

    def split(self, text: str, phase: Phase, final: bool = True) -> Split:
        """The reasoning and content of the output so far. final=False holds back what may
        still turn into a marker, so that every later split only adds to this one."""
        if phase is Phase.ANSWERING:
            return Split("", text)
        body = text
        if phase is Phase.MAY_THINK:
            rest = text.lstrip()
            if rest.startswith(self.start):
                body = rest[len(self.start) :]
            elif not final and self.start.startswith(rest):
                return Split("", "")  # it may yet open with the marker
            elif not self.implicit_start:
                return Split("", text)
        end = body.find(self.end)
        if end >= 0:
            return Split(body[:end], body[end + len(self.end) :])
        keep = 0 if final else held_back(body, self.end)
        return Split(body[: len(body) - keep], "")


class ReasoningStream:
    """One streamed choice: push() each text delta, get the reasoning and content it adds."""

    def __init__(self, parser: ReasoningParser, phase: Phase) -> None:
        self.parser = parser
        self.phase = phase
        self.text = ""
        self.reasoning_sent = 0  # characters of the reasoning sent
        self.content_sent = 0  # characters of the content sent
        self.content_at: int | None = None  # where the content starts in the text, once known

    def push(self, delta_text: str, final: bool = False) -> Split:
        """The reasoning and content delta_text adds; final: the output ends here."""
        self.text += delta_text
        if self.content_at is not None:  # past the thinking: the rest is content
            content = self.text[self.content_at + self.content_sent :]
            self.content_sent += len(content)
            return Split("", content)
        split = self.parser.split(self.text, self.phase, final)
        reasoning = split.reasoning[self.reasoning_sent :]
        content = split.content[self.content_sent :]
        self.reasoning_sent, self.content_sent = len(split.reasoning), len(split.content)
        if split.content:
            self.content_at = len(self.text) - len(split.content)
        return Split(reasoning, content)
