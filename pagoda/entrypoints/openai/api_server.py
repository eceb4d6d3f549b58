"""build_app: the FastAPI application in front of an EngineClient."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagoda
from pagoda.config import ServerConfig
from pagoda.engine.protocol import EngineClient
from pagoda.entrypoints.metrics import Metrics
from pagoda.entrypoints.openai import errors
from pagoda.entrypoints.openai.errors import OpenAIError, error_response
from pagoda.entrypoints.openai.limits import BodySizeLimitMiddleware, default_body_limit
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagoda.entrypoints.openai.serving_engine import run_unless_disconnected

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerState:
    """What the routes, the middleware and the launcher share about the running server."""

    engine: EngineClient
    config: ServerConfig
    metrics: Metrics
    draining: bool = False  # set by the launcher on SIGTERM: new work is refused
    server_load: int = 0  # /v1 POST requests in flight, for /load
    # Set by the launcher: checks the engine and stops the server when it is dead.
    on_engine_dead: Callable[[], Awaitable[None]] | None = None

    async def engine_died(self) -> None:
        """A request met a dead engine: let the launcher act at once, not at its next check."""
        if self.on_engine_dead is not None:
            await self.on_engine_dead()


class PagodaApp(FastAPI):
    """The FastAPI app with its typed server state (instead of values in `app.state`)."""

    server_state: ServerState

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # --root-path: the prefix a proxy strips (or not) before the request reaches us, set
        # where FastAPI's deprecated root_path argument set it; routes match with or without it.
        if root_path := self.server_state.config.root_path:
            scope["root_path"] = root_path
        await super().__call__(scope, receive, send)


def build_app(engine: EngineClient, server_config: ServerConfig | None = None) -> PagodaApp:
    """The OpenAI-compatible routes, operational routes, auth, CORS and error handling."""
    server_config = server_config or ServerConfig()
    app = PagodaApp(title="Pagoda", version=pagoda.__version__)
    metrics = Metrics(engine.config)
    engine.add_stat_logger(metrics)
    state = ServerState(engine, server_config, metrics)
    app.server_state = state
    completions = OpenAIServingCompletion(engine, server_config, state.engine_died)
    chat = OpenAIServingChat(engine, server_config, state.engine_died)

    app.add_exception_handler(OpenAIError, errors.openai_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)

    body_limit = server_config.max_request_body_size or default_body_limit(
        engine.tokenizer, engine.config.max_model_len
    )
    app.add_middleware(BodySizeLimitMiddleware, max_body_size=body_limit)
    app.add_middleware(GuardMiddleware, state=state)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(server_config.allowed_origins),
        allow_methods=list(server_config.allowed_methods),
        allow_headers=list(server_config.allowed_headers),
        allow_credentials=server_config.allow_credentials,
    )

    @app.get("/v1/models")
    async def models() -> ModelList:
        cfg = engine.config
        return ModelList(
            data=[
                ModelCard(id=name, root=cfg.model_path, max_model_len=cfg.max_model_len)
                for name in cfg.served_model_names
            ]
        )

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        # Tokenizing (and rendering a chat template) takes a thread, not the event loop:
        # a big prompt must not keep /health and everyone else's streams waiting.
        prompts, params = await asyncio.to_thread(completions.prepare, body)
        return await _respond(raw, completions, body, prompts, params)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        prompt, params = await asyncio.to_thread(chat.prepare, body)
        return await _respond(raw, chat, body, prompt, params)

    @app.post("/invocations")
    async def invocations(raw: Request) -> Response:
        """SageMaker's one route: a chat body goes to chat, a completion body to completions."""
        try:
            data = await raw.json()
        except ValueError as e:
            raise OpenAIError(f"invalid JSON: {e}", 400) from None
        for model in (ChatCompletionRequest, CompletionRequest):  # vLLM's order
            try:
                body = model.model_validate(data)
            except ValidationError:
                continue
            if isinstance(body, ChatCompletionRequest):
                return await create_chat_completion(body, raw)
            return await create_completion(body, raw)
        raise OpenAIError(
            "Cannot find suitable handler for request. Expected one of: "
            "['ChatCompletionRequest', 'CompletionRequest']",
            400,
        )

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await asyncio.to_thread(tokenize_now, body)

    def tokenize_now(body: TokenizeRequest) -> TokenizeResponse:
        completions.check_model(body.model)
        if body.messages is not None:
            template_fields = {"add_generation_prompt", "continue_final_message"}
            chat_request = ChatCompletionRequest(
                messages=body.messages,
                chat_template_kwargs=body.chat_template_kwargs,
                **body.model_dump(include=template_fields, exclude_unset=True),
            )
            text = chat.render(chat_request)
            tokens = chat.encode(text, "messages", add_special_tokens=False, bounded=False)
        elif body.prompt is not None:
            tokens = chat.encode(body.prompt, "prompt", body.add_special_tokens, bounded=False)
        else:
            raise OpenAIError("either prompt or messages is required", 400, "prompt")
        token_strs = None
        if body.return_token_strs:
            token_strs = [engine.tokenizer.id_to_token(t) or "" for t in tokens]
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=engine.config.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        completions.check_model(body.model)
        vocab = engine.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise OpenAIError("tokens: token id out of vocabulary", 400, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    if server_config.enable_tokenizer_info_endpoint:

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> dict:
            """What the tokenizer's configuration says, as vLLM's route answers."""
            tokenizer = engine.tokenizer
            return {
                "tokenizer_class": "PreTrainedTokenizerFast",  # a `tokenizers` tokenizer
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "model_max_length": engine.config.max_model_len,
                "vocab_size": tokenizer.vocab_size,
                "chat_template": tokenizer.chat_template,
            }

    @app.get("/health")
    async def health() -> Response:
        if engine.errored:
            return error_response(f"the engine is dead: {engine.dead_error}", 503)
        if state.draining:
            return error_response("the server is shutting down", 503)
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagoda.__version__}

    @app.get("/load")
    async def load() -> dict:
        return {"server_load": state.server_load}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class GuardMiddleware:
    """In front of every route: the API key, refusal while draining, and the X-Request-Id
    header with --enable-request-id-headers."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.config = state.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        with_id = self.config.enable_request_id_headers

        async def send_with_id(message: Message) -> None:
            if with_id and message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        path = scope["path"].removeprefix(self.config.root_path)
        if path.startswith("/v1"):
            if self.config.api_keys and not _authorised(headers, self.config.api_keys):
                response = error_response("invalid or missing API key", 401)
                await response(scope, receive, send_with_id)
                return
            if self.state.draining and scope["method"] == "POST":
                response = error_response("the server is shutting down", 503)
                await response(scope, receive, send_with_id)
                return
        counted = path.startswith("/v1") and scope["method"] == "POST"  # /load counts these
        self.state.server_load += counted
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.state.server_load -= counted


def _authorised(headers: Headers, keys: tuple[str, ...]) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return any(secrets.compare_digest(token.strip(), key) for key in keys)


async def _respond(raw: Request, serving, body, prompt, params) -> Response:
    """Streams the request as SSE, or runs it whole; an engine failure becomes its error."""
    if serving.engine.errored:
        # Before a stream's 200: a client (or a gateway retrying elsewhere) sees the 5xx.
        error = await serving.on_engine_error(serving.engine.dead_error)
        return JSONResponse(error, status_code=error["error"]["code"])
    if body.stream:
        return StreamingResponse(
            serving.stream(body, prompt, params),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        result = await run_unless_disconnected(raw, serving.create(body, prompt, params))
    except OpenAIError:
        raise
    except Exception as e:
        error = await serving.on_engine_error(e)
        return errors.ErrorResponse(error, status_code=error["error"]["code"])
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    load_format = raw.headers.get("endpoint-load-metrics-format", "")
    headers = orca_load_header(load_format, raw.app.server_state) if load_format else None
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


def orca_load_header(load_format: str, state: ServerState) -> dict[str, str] | None:
    """ORCA's `endpoint-load-metrics` response header, as vLLM writes it for a request that
    asks with `endpoint-load-metrics-format: TEXT|JSON` (load-aware gateways read it)."""
    stats = state.metrics.latest_stats
    named = {
        "kv_cache_usage_perc": float(stats.kv_cache_usage),
        "num_requests_waiting": float(stats.num_waiting),
    }
    if load_format.lower() == "text":
        text = ", ".join(f"named_metrics.{name}={value}" for name, value in named.items())
        return {"endpoint-load-metrics": f"TEXT {text}"}
    if load_format.lower() == "json":
        return {"endpoint-load-metrics": "JSON " + json.dumps({"named_metrics": named})}
    return None
