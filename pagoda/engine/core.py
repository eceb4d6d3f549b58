"""EngineCore: step() = schedule, execute, update. It knows nothing about sockets."""

from __future__ import annotations

import logging
import random

from pagoda.config import EngineConfig
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import RunnerOutput, Scheduler
from pagoda.engine.messages import EngineOutputs, EngineRequest
from pagoda.model.runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        spec_len = self.runner.spec.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or spec_len, spec_len)
        self.scheduler = Scheduler(
            config.scheduler, config.cache, self.runner.num_blocks, self.max_model_len
        )
        self._rng = random.Random(config.model.seed)

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

    def check_invariants(self) -> None:
        self.scheduler.kv.check_invariants()
