"""What every tool-call format shares: a parser's scan of the text so far, and the stream that
turns successive scans into deltas.

A format only writes `scan(text)`: the content it is sure of (a prefix of the text, holding
back a half-written call marker), the calls begun so far (a name once it is complete, the
arguments' JSON text as far as it has come) and whether the text parses as it stands, may
still parse once more arrives, or cannot. Both the whole-answer `extract` and the streaming
`ToolCallStream` read the same scan, so a streamed answer's pieces add up to the unstreamed
one by construction.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import ClassVar


class Status(enum.Enum):
    COMPLETE = "complete"  # the text parses as it stands
    PARTIAL = "partial"  # it may parse once more text arrives
    MALFORMED = "malformed"  # no continuation parses: the whole text is content


class Malformed(Exception):
    """Raised inside a scan when the text cannot be a call in this format."""


@dataclass
class PartialCall:
    name: str | None = None  # None until the name is complete
    arguments: str = ""  # the arguments' JSON text so far; grows only


@dataclass
class Scan:
    content: str  # text that is content for sure: a prefix of the text
    calls: list[PartialCall] = field(default_factory=list)
    status: Status = Status.COMPLETE


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str  # the next piece of the arguments' text
    id: str | None = None  # id and name: only in a call's first delta
    name: str | None = None


@dataclass(frozen=True)
class ToolDelta:
    content: str = ""
    calls: tuple[ToolCallDelta, ...] = ()


class ToolParser:
    """One tool-call format; subclasses write scan()."""

    name: ClassVar[str]
    # False where the format's markers are special tokens that decoding would otherwise drop
    # (the EOS or stop token that ends the answer is left out of the text all the same).
    skip_special_tokens: ClassVar[bool] = True

    def scan(self, text: str) -> Scan:
        raise NotImplementedError

    def new_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished answer; text that is not well-formed calls is all
        content."""
        scan = self._safe_scan(text)
        if scan.status is not Status.COMPLETE or not scan.calls:
            return text, []
        calls = [ToolCall(self.new_id(), c.name or "", c.arguments) for c in scan.calls]
        return scan.content, calls

    def _safe_scan(self, text: str) -> Scan:
        try:
            return self.scan(text)
        except Malformed:
            return Scan(text, [], Status.MALFORMED)


class ToolCallStream:
    """One streamed choice: push() each text delta, get the content and call pieces it adds.

    Content is sent only once it is sure (a half-written marker is held back); a call's first
    delta carries its index, id and name, later ones pieces of its arguments. Text that turns
    out malformed before any call was sent goes out as content; after one was, it is dropped.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0  # characters of the text sent as content
        self.ids: list[str] = []  # the calls whose header went out
        self.arguments_sent: list[int] = []  # characters of each call's arguments sent
        self.as_text = False  # the answer turned out not to be calls

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def push(self, delta_text: str, final: bool = False) -> ToolDelta:
        """The content and call pieces delta_text adds; final: the answer ends here."""
        self.text += delta_text
        scan = self.parser._safe_scan(self.text)
        if not self.as_text and (
            scan.status is Status.MALFORMED or (final and scan.status is Status.PARTIAL)
        ):
            if self.called:
                return ToolDelta()
            self.as_text = True
        if self.as_text:
            content = self.text[self.content_sent :]
            self.content_sent = len(self.text)
            return ToolDelta(content=content)
        content = scan.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(scan.content))
        pieces = []
        for index, call in enumerate(scan.calls):
            if call.name is None:
                break
            if index == len(self.ids):
                self.ids.append(self.parser.new_id())
                self.arguments_sent.append(0)
                pieces.append(ToolCallDelta(index, "", self.ids[index], call.name))
            new = call.arguments[self.arguments_sent[index] :]
            if new:
                self.arguments_sent[index] = len(call.arguments)
                pieces.append(ToolCallDelta(index, new))
        return ToolDelta(content, tuple(_merge(pieces)))


def _merge(pieces: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Arguments that follow their call's header in the same delta join it."""
    out: list[ToolCallDelta] = []
    for piece in pieces:
        if out and out[-1].index == piece.index and piece.id is None:
            last = out[-1]
            arguments = last.arguments + piece.arguments
            out[-1] = ToolCallDelta(last.index, arguments, last.id, last.name)
        else:
            out.append(piece)
    return out


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of text could begin marker (and so wait for more)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def plain(text: str, marker: str) -> Scan:
    """Text with no marker yet: all content but a possible start of marker at its end."""
    keep = held_back(text, marker)
    return Scan(text[: len(text) - keep], [], Status.PARTIAL if keep else Status.COMPLETE)
