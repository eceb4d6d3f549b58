"""EngineCore: step() = schedule, execute, update. It knows nothing about sockets."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from pagoda.config import ConfigError, EngineConfig
from pagoda.core.batch import RunnerOutput
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler
from pagoda.engine.messages import EngineOutputs, EngineReady, EngineRequest, RequestType

if TYPE_CHECKING:
    from pagoda.structured.matcher import GrammarCompiler

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        # Imported here: the API server imports this module (for run_engine_core) and must
        # not load torch; only the engine process does.
        from pagoda.model.runner import ModelRunner

        self.config = config
        self.runner = ModelRunner(config)
        self.max_model_len = resolve_max_model_len(
            config.model.max_model_len,
            self.runner.spec.max_position_embeddings,
            self.runner.num_blocks * self.runner.block_size,
        )
        self.scheduler = Scheduler(
            config.scheduler,
            config.cache,
            self.runner.num_blocks,
            self.max_model_len,
            forced_tokens=config.structured.forced_tokens,
            speculative=config.speculative,
        )
        self._rng = random.Random(config.model.seed)
        self.grammars = _grammar_compiler(config, self.runner.spec.vocab_size)

    def add_request(self, er: EngineRequest) -> None:
        params = er.sampling_params
        request = Request(
            er.request_id,
            er.prompt_token_ids,
            params,
            eos_token_ids=tuple(er.eos_token_ids),
            parent_id=er.parent_id,
            arrival_time=er.arrival_time,
        )
        # A request's own seed fixes its samples; others draw one from the engine's seed.
        request.sampling_seed = (
            params.seed if params.seed is not None else self._rng.getrandbits(32)
        )
        if params.structured_outputs is not None:
            # Compiled in a worker thread while the prompt prefills.
            ends = (() if params.ignore_eos else request.eos_token_ids) + tuple(
                params.stop_token_ids or ()
            )
            assert self.grammars is not None, "without llguidance, constraints are refused earlier"
            request.grammar = self.grammars.compile(params.structured_outputs, ends)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> EngineOutputs:
        """One iteration: choose the batch, run the model on it, turn the results into outputs."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.scheduled:
            runner_output = self.runner.execute(scheduler_output)
        else:
            runner_output = RunnerOutput()
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs.stats = self.scheduler.stats()
        return outputs

    def ready_message(self) -> EngineReady:
        """What the client learns once the model is loaded: the context and the KV cache."""
        runner = self.runner
        return EngineReady(
            self.max_model_len,
            runner.num_blocks,
            runner.block_size,
            str(runner.dtype),
            runner.spec.vocab_size,
        )

    def check_invariants(self) -> None:
        self.scheduler.kv.check_invariants()


def _grammar_compiler(config: EngineConfig, vocab_size: int) -> GrammarCompiler | None:
    """Starts building the grammar tokenizer at once when llguidance is installed.

    It takes 0.4 s (49k tokens) to 4 s (262k) in a worker thread; started at load, it is
    ready before the first constrained request. Without llguidance, None: the API server
    and LLM refuse constrained requests themselves (grammar_of names the missing package).
    """
    import importlib.util

    if importlib.util.find_spec("llguidance") is None:
        return None
    from pagoda.structured.matcher import GrammarCompiler

    return GrammarCompiler(config.model.path, vocab_size)


def resolve_max_model_len(requested: int | None, model_len: int, cache_tokens: int) -> int:
    """The context length: what was asked for, else the model's, within what the cache holds.

    A request of max_model_len tokens then always fits the KV cache alone, so it is never
    preempted by itself. An explicit --max-model-len beyond the model's context or the
    cache is an error naming the largest that works (as vLLM's); without one, the model's
    own is lowered to the cache's capacity with a warning.
    """
    if requested is not None:
        if requested > model_len:
            raise ConfigError(
                f"--max-model-len {requested} is longer than the model's context of "
                f"{model_len} tokens"
            )
        if requested > cache_tokens:
            raise ConfigError(
                f"--max-model-len {requested} is longer than the KV cache holds: the largest "
                f"that fits is {cache_tokens}; give --kv-cache-memory more or --max-model-len "
                "less"
            )
        return requested
    if cache_tokens < model_len:
        logger.warning(
            "the KV cache holds %d tokens, fewer than the model's context of %d: the context "
            "is lowered to %d (give --kv-cache-memory more, or --max-model-len to choose)",
            cache_tokens,
            model_len,
            cache_tokens,
        )
    return min(model_len, cache_tokens)


# What a driver hands the engine: (ADD, EngineRequest), (ABORT, [engine request ids]) or
# (SHUTDOWN, None).
Message = tuple[RequestType, object]


def run_busy_loop(
    core: EngineCore,
    receive: Callable[[float], Message | None],
    send: Callable[[EngineOutputs], None],
) -> None:
    """Takes requests, steps while there is work, sends each step's outputs; returns on
    SHUTDOWN. What the engine process and the in-process engine thread both run.

    receive(timeout) is the next message, or None when none came within timeout seconds.
    An idle engine sends an empty EngineOutputs every second, so that silence means hung.
    """
    while True:
        # Drain the inbox; wait on it only when there is nothing to compute.
        timeout = 0.0 if core.has_work else 1.0
        aborted = False
        while (message := receive(timeout)) is not None:
            kind, payload = message
            if kind == RequestType.ADD:
                assert isinstance(payload, EngineRequest)
                core.add_request(payload)
            elif kind == RequestType.ABORT:
                assert isinstance(payload, list)
                aborted |= bool(core.abort_requests(payload))
            else:
                assert kind == RequestType.SHUTDOWN, kind
                return
            timeout = 0.0
        stepped = core.has_work
        if stepped:
            send(core.step())
        elif aborted:  # no step will report that the engine emptied
            send(EngineOutputs([], stats=core.scheduler.stats()))
        else:  # idle: a heartbeat, so that the client can tell idle from hung
            send(EngineOutputs([]))
        if (stepped or aborted) and not core.has_work:
            core.check_invariants()  # cheap, and the moment when all is quiet


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """The engine process: take requests, step while there is work, send outputs back.

    Requests arrive on a PULL socket as a type byte and a msgpack payload; every
    step's outputs leave as one EngineOutputs on a PUSH socket, and an idle engine
    sends an empty one every second, so that silence means a hung engine. An exception is
    reported to the client as engine_error before the process exits non-zero.
    """
    import signal
    import sys
    import traceback

    import zmq

    from pagoda.engine import messages as m

    _die_with_parent()
    limit_heap()
    # Ctrl-C reaches the whole process group; the API server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s engine: %(message)s")

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        core = EngineCore(config)
        outbox.send(m.encoder.encode(core.ready_message()))

        def receive(timeout: float) -> Message | None:
            if not inbox.poll(int(timeout * 1000)):
                return None
            kind, payload = inbox.recv_multipart()
            if kind == m.RequestType.ADD.value:
                return m.RequestType.ADD, m.request_decoder.decode(payload)
            if kind == m.RequestType.ABORT.value:
                return m.RequestType.ABORT, m.abort_decoder.decode(payload)
            if kind == m.RequestType.SHUTDOWN.value:
                return m.RequestType.SHUTDOWN, None
            # A bug in the client: fail loudly, not as if asked to shut down.
            raise ValueError(f"unknown request type {kind!r}")

        run_busy_loop(core, receive, lambda step: outbox.send(m.encoder.encode(step)))
    except Exception as e:
        if isinstance(e, ConfigError):  # the message says it all: no traceback
            logger.error("%s", e)
            reason = str(e)
        else:
            logger.exception("engine core failed")
            reason = traceback.format_exc()
        outbox.send(m.encoder.encode(m.EngineOutputs(outputs=[], engine_error=reason)))
        sys.exit(1)
    finally:
        inbox.close(linger=0)
        outbox.close(linger=1000)
        ctx.term()


def _die_with_parent() -> None:
    """Asks Linux to kill this process when its parent dies, so that no engine is orphaned."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the client's shutdown still stops us


# glibc's mallopt parameters
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
MMAP_THRESHOLD = 4 << 20


def limit_heap() -> bool:
    """Has glibc's malloc hand back what a long run frees; False where there is no glibc.

    Left to itself it keeps a heap (arena) per thread that allocated, and its mmap threshold
    rises to the largest block freed (up to 32 MiB), after which a prompt step's activations
    come from the heap, whose freed holes stay resident. On the 1B-class file at 32 requests
    that was 140 MiB of freed heap kept at the peak; with one arena and every block of 4 MiB
    or more mapped on its own (and unmapped when freed) the heap grew by 32 MiB instead of
    179, and the peak fell by 119 MiB (benchmarks/engine_memory.py, BENCHMARKS.md section
    13). Called first thing in the engine process, before any thread allocates.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, 1)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
