"""OpenAI-style errors: every failure leaves as {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Status -> the error type name vLLM's server uses.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """An error the API reports to its client with a status, a message and the field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """The error object. Its code is the HTTP status as an integer, as vLLM sends it: OpenAI's
    schema types code as a string, but the openai client takes any JSON value there (it
    reads str(code)), and clients written against vLLM compare it with the status."""
    error_type = _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a message that quotes the client's input
    (a lone surrogate, say) must not fail to encode as UTF-8 and turn a 4xx into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return ErrorResponse(error_body(message, status, param), status_code=status)


async def openai_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return error_response(exc.message, exc.status, exc.param)


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 becomes a 400 naming the first bad field, as in vLLM."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return error_response("invalid request")
    # Of a union's members (prompt: a string or a list of them, ...), the error that says
    # what is wrong with the value rather than that it is not some other type.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        return error_response(f"invalid JSON in the request body: {first.get('msg')}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "field required"
    text = f"{param}: {message}" if param else message
    return error_response(text, 400, param)


def _is_type_tag(part: object) -> bool:
    """pydantic names the member of a union it tried ('str', 'list[int]') inside error paths."""
    return isinstance(part, str) and ("[" in part or part in _SCALAR_TAGS)


_SCALAR_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(str(exc.detail), exc.status_code)


async def internal_error_handler(_: Request, exc: Exception) -> JSONResponse:
    return error_response(f"internal error: {type(exc).__name__}: {exc}", 500)
