"""ModelRunner: a SchedulerOutput in, one forward pass and sampling, a RunnerOutput out."""

from __future__ import annotations

import logging

import torch

from pagoda.config import ConfigError, EngineConfig
from pagoda.core.batch import RunnerOutput, ScheduledRequest, SchedulerOutput
from pagoda.model.attention_metadata import AttentionMetadata
from pagoda.model.kv_memory import allocate_kv_cache
from pagoda.model.loader import load_model, release_freed_memory
from pagoda.model.loader.quantization import DENSE_COPY_MAX_BYTES
from pagoda.model.spec import ModelSpec
from pagoda.outputs import Logprobs
from pagoda.sample.sampler import SamplerOutput, SamplingMetadata, sample

logger = logging.getLogger(__name__)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """ "auto" is bfloat16 where the hardware computes in it natively, float32 elsewhere."""
    if dtype == "auto":
        native_bf16 = device.startswith("cuda") or _cpu_has_bf16()
        dtype = "bfloat16" if native_bf16 else "float32"
        logger.info("dtype auto: using %s", dtype)
    return TORCH_DTYPES[dtype]


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def computes_from_blocks(
    requested: str, dtype: torch.dtype, device: str, quantization: str
) -> bool:
    """Whether a GGUF model's weights stay in their file's blocks (the formats the kernels
    take; loader/quantization.py): on the CPU unless --quantization none, in bfloat16, or in
    the float32 that auto chose for a CPU without native bfloat16, which then reads the
    file's 4-8 bits a weight as llama.cpp does rather than a dense float32 copy 4-8x larger.
    An explicit --dtype float32 keeps the dense float32 reference."""
    on_cpu = torch.device(device).type == "cpu"
    # auto resolves to bfloat16 or float32 only: either way it computes from the blocks
    return on_cpu and quantization != "none" and (dtype == torch.bfloat16 or requested == "auto")


def resolve_kv_cache_dtype(
    kv_cache_dtype: str, dtype: torch.dtype, from_blocks: bool = False
) -> torch.dtype:
    """The KV cache's dtype. auto: the model's, but bfloat16 where a float32 model computes
    from a GGUF file's blocks (auto's float32 on a CPU without native bfloat16): its weights
    are already 4-8 bits, and llama.cpp keeps such a model's cache in float16. On the Gemma 3
    270M Q4_K_M file that cache kept the top token at 99.94 % of whole-sequence positions
    (mean KL < 0.0001; llama.cpp 98.95 %, 0.0017), BENCHMARKS.md section 13. bfloat16 may
    hold a float32 model's keys and values (the kernels read them as float32); a bfloat16
    model's cache is bfloat16."""
    if kv_cache_dtype == "auto":
        return torch.bfloat16 if from_blocks and dtype == torch.float32 else dtype
    cache = TORCH_DTYPES[kv_cache_dtype]
    if cache != dtype and dtype != torch.float32:
        raise ConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} with a {dtype} model: the cache holds the "
            "model's dtype, or bfloat16 under float32 (give --dtype float32, or leave "
            "--kv-cache-dtype auto)"
        )
    return cache


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * element


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.model.dtype, config.device)
        cpu_bf16 = self.device.type == "cpu" and self.dtype == torch.bfloat16
        quantization = config.model.quantization
        self.model = load_model(
            config.model.path,
            self.dtype,
            self.device,
            quantized=computes_from_blocks(
                config.model.dtype, self.dtype, config.device, quantization
            ),
            dense_copy_max_bytes=DENSE_COPY_MAX_BYTES if quantization == "auto" else 0,
        )
        if cpu_bf16:
            self.model.pack_for_onednn()
        release_freed_memory()  # loading's temporaries, and the weights packing replaced
        self.spec = self.model.spec
        self.block_size = config.cache.block_size
        self.kv_cache_dtype = resolve_kv_cache_dtype(
            config.cache.kv_cache_dtype, self.dtype, self.model.holds_blocks()
        )
        per_block = kv_bytes_per_block(self.spec, self.block_size, self.kv_cache_dtype)
        self.num_blocks = config.cache.kv_cache_memory // per_block
        if self.num_blocks < 2:
            raise ValueError(
                f"--kv-cache-memory {config.cache.kv_cache_memory} holds fewer than 2 blocks "
                f"of {per_block} bytes"
            )
        self.model.bind_kv_cache(
            allocate_kv_cache(
                self.spec.num_layers,
                self.num_blocks,
                self.block_size,
                self.spec.num_kv_heads,
                self.spec.head_dim,
                self.kv_cache_dtype,
                self.device,
            )
        )
        logger.info(
            "KV cache: %d blocks of %d tokens in %s (%.0f MiB)",
            self.num_blocks,
            self.block_size,
            str(self.kv_cache_dtype).removeprefix("torch."),
            self.num_blocks * per_block / 2**20,
        )

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Runs the scheduled tokens; samples for each request whose prompt is now complete."""
        scheduled = scheduler_output.scheduled
        token_ids: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledRequest] = []  # those that sample: their prompt is complete
        for s in scheduled:
            start, drafts = s.num_computed_tokens, s.draft_token_ids
            token_ids.extend(s.request.all_token_ids[start : start + s.num_own_tokens])
            token_ids.extend(drafts)
            if s.samples:
                # The last token's row, then each draft's: 1 + len(drafts) sampled rows.
                sampling.append(s)
                sample_rows.extend(range(len(token_ids) - len(drafts) - 1, len(token_ids)))
        attn, positions = AttentionMetadata.build(
            [s.num_computed_tokens for s in scheduled],
            [s.num_new_tokens for s in scheduled],
            [s.block_ids for s in scheduled],
            self.block_size,
            self.device,
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        # Only the sampled rows' hidden states are read, unless prompt logprobs want every
        # row. A step that samples nothing keeps one row: no projection runs on zero rows.
        keep = None
        if len(sample_rows) < len(token_ids) and all(
            s.request.sampling_params.prompt_logprobs is None for s in scheduled
        ):
            keep = torch.tensor(sample_rows or [len(token_ids) - 1], device=self.device)
        hidden = self.model(input_ids, positions.to(self.device), attn, keep)

        out = RunnerOutput()
        if keep is None:
            self._collect_prompt_logprobs(scheduled, hidden, out)
            if len(sample_rows) < len(token_ids):  # else every row, in order: nothing to pick
                hidden = hidden[sample_rows]
        if not sampling:
            return out
        logits = self.model.compute_logits(hidden)
        requests = [s.request for s in sampling]
        meta = SamplingMetadata.from_requests(
            requests, logits.shape[1], self.device, [s.draft_token_ids for s in sampling]
        )
        result = sample(logits, meta)
        tokens = result.token_ids.tolist()
        row = 0
        for s in sampling:
            num_rows = 1 + len(s.draft_token_ids)
            out.sampled[s.request.request_id] = tokens[row : row + num_rows]
            row += num_rows
        if result.sampled_logprobs is not None:
            self._collect_logprobs(sampling, result, out)
        return out

    def _collect_prompt_logprobs(self, scheduled, hidden: torch.Tensor, out: RunnerOutput) -> None:
        """Logprobs of each scheduled prompt token given the ones before it, where asked for."""
        offset = 0
        for s in scheduled:
            r, start = s.request, s.num_computed_tokens
            k = r.sampling_params.prompt_logprobs
            # Positions start .. stop-1 predict prompt tokens start+1 .. stop.
            stop = min(start + s.num_new_tokens, r.num_prompt_tokens - 1)
            if k is not None and stop > start:
                logprobs = self.model.compute_logits(
                    hidden[offset : offset + stop - start]
                ).log_softmax(dim=-1)
                targets = torch.tensor(r.prompt_token_ids[start + 1 : stop + 1], device=self.device)
                chosen = logprobs.gather(1, targets.unsqueeze(1))  # [n, 1]
                ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
                top_lp, top_ids = logprobs.topk(max(k, 1), dim=-1)
                entries: list[Logprobs | None] = []
                for i, (target, lp) in enumerate(zip(targets.tolist(), chosen.squeeze(1).tolist())):
                    entry = {target: (lp, ranks[i])}
                    for j in range(k):
                        entry.setdefault(int(top_ids[i, j]), (float(top_lp[i, j]), j + 1))
                    entries.append(entry)
                out.prompt_logprobs[r.request_id] = entries
            offset += s.num_new_tokens

    def _collect_logprobs(
        self, sampling: list[ScheduledRequest], result: SamplerOutput, out: RunnerOutput
    ) -> None:
        """Each sampled row's logprobs: the sampled token's, the top-k, the asked-for ones."""
        assert result.sampled_logprobs is not None and result.sampled_ranks is not None
        sampled_lp = result.sampled_logprobs.tolist()
        ranks = result.sampled_ranks.tolist()
        top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        row = 0
        for s in sampling:
            request = s.request
            k = request.sampling_params.logprobs
            tokens = out.sampled[request.request_id]
            rows = range(row, row + len(tokens))
            row += len(tokens)
            if k is None:
                continue
            entries: list[Logprobs] = []
            for i, token in zip(rows, tokens):
                entry = {token: (sampled_lp[i], ranks[i])}
                for j in range(k):
                    assert top_ids is not None and top_lp is not None
                    entry.setdefault(top_ids[i][j], (top_lp[i][j], j + 1))
                if i in result.asked:
                    asked_lp, asked_ranks = result.asked[i]
                    ids = request.sampling_params.logprob_token_ids or []
                    for t, logprob, rank in zip(ids, asked_lp, asked_ranks):
                        entry.setdefault(t, (logprob, rank))
                entries.append(entry)
            out.logprobs[request.request_id] = entries
