"""Generation over an automatically inserted KV cache: prefill, decode steps, sampling, the CLI.

    gen = build_generator(model, model.example_inputs(1, 16), max_seq_len=1024, max_batch=8)
    tokens = gen.generate(input_ids, max_new_tokens=64)                        # greedy
    tokens = gen.generate(input_ids, 64, temperature=0.8, top_p=0.9, seed=0)  # sampled, reproducible
    logits = gen.prefill(input_ids, attention_mask)  # left padding: each row's tokens at the right end
    logits = gen.decode_step(next_ids)               # (b, 1) new tokens -> (b, vocab)

The programs come from passes/kv_cache.py. Static caches [max_batch, kv_heads, max_seq_len, d] per
attention; the decode step has static shapes: on CUDA it is captured in a CUDA graph once per batch-size
bucket (1, 2, 4, ..., max_batch) and replayed, the growing length living in a device tensor (`slot`), so
nothing recompiles or re-captures as the sequence grows. The graph also takes the greedy pick and advances
the slot, so greedy generation without a stop token is back-to-back replays. Prefill runs eagerly at any
prompt length up to max_seq_len. On CPU everything runs eagerly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fxopt import models, numerics, pipeline, zoo
from fxopt.capture import capture
from fxopt.cli_args import DTYPES, MODEL_HELP, nonnegative_int, positive_int
from fxopt.codegen.greedy import TOP_K_MAX, greedy_pick, sample_pick, sample_top_k
from fxopt.errors import GenerationError, UserError, check_output, require_cuda  # noqa: F401  (GenerationError: re-exported)
from fxopt.hardware import measure_copy_bandwidth
from fxopt.passes import kv_cache as kv
from fxopt.passes.infra import PassContext
from fxopt.progress import note, progress, stage
from fxopt.tensor_parallel import Weights, local_bytes, shard_graph


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device when cuda:0 is current."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


@dataclass
class GenerationStats:
    """Timings of the last generate() call (seconds; CUDA work synchronised at the boundaries)."""

    batch: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def ms_per_token(self) -> float:
        """Milliseconds per decode step (one new token for every row)."""
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens per second over all rows."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes the decode step is captured at: powers of two below max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class _DecodeGraph:
    """The decode step for one batch bucket, captured in a CUDA graph over static buffers.

    Besides the step itself the graph takes each row's pick (codegen/greedy.py), feeds it back as the next
    step's input (`ids`), records it in `history` at its position and advances the slot: generation is then one
    replay per token with nothing in between, no host op and no sync. The pick is greedy, or with `sampling`
    (a Sampler) a draw after its temperature / top-k / top-p, from Philox noise keyed by the device-side
    `seed`, the position and the row (no generator state for the graph to capture)."""

    def __init__(self, gen: Generator, bucket: int, sampling: Sampler | None = None):
        self.bucket = bucket
        self.sampling = sampling
        self.seed = torch.zeros((), dtype=torch.long, device=gen.device)
        self.ids = torch.zeros(bucket, 1, dtype=torch.long, device=gen.device)
        self.kv_start = torch.zeros(bucket, dtype=torch.long, device=gen.device)
        self.history = torch.zeros(bucket, gen.max_seq_len + 1, dtype=torch.long, device=gen.device)
        self.caches = [c[:bucket] for c in gen.caches]
        self.program = gen.decode_program(bucket)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.gen = gen

    def _step(self) -> torch.Tensor:
        slot = self.gen._slot
        logits = self.program(self.ids, slot, self.kv_start, *self.caches)  # (bucket, 1, vocab)
        if self.sampling is None:
            greedy_pick(logits[:, -1], self.ids, self.history, slot)  # ids <- argmax, history[:, slot + 1] too
        else:
            self.sampling.pick(logits[:, -1], self.ids, self.history, slot, self.seed)
        slot.add_(1)
        return logits

    def run(self) -> torch.Tensor:
        """One step at the device-side slot (which it advances); returns the static logits buffer."""
        if self.graph is None:
            # Warm up on a side stream (kernel compilation, allocator), then capture. Re-running the step at
            # the same slot is idempotent: it rewrites the same K/V there and reads the same keys.
            slot, ids = self.gen._slot.clone(), self.ids.clone()
            stream = torch.cuda.Stream(device=self.gen.device)
            stream.wait_stream(torch.cuda.current_stream(self.gen.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.gen._slot.copy_(slot)
                    self.ids.copy_(ids)
                    self._step()
            torch.cuda.current_stream(self.gen.device).wait_stream(stream)
            self.gen._slot.copy_(slot)
            self.ids.copy_(ids)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.gen._graph_pool):
                self.out = self._step()
            self.graph = graph
            self.gen.captures += 1
        self.graph.replay()
        return self.out


class Generator:
    """Prefill / decode / generate over static KV caches for a model proven cacheable by passes/kv_cache."""

    def __init__(self, programs: kv.KVPrograms, *, max_seq_len: int, max_batch: int, device: torch.device,
                 vocab_size: int | None = None, use_cuda_graph: bool | None = None, weight_bytes: int = 0,
                 fuse_decode: bool | None = None, ctx: PassContext | None = None):
        if max_seq_len < 1 or max_batch < 1:
            raise GenerationError(f"max_seq_len ({max_seq_len}) and max_batch ({max_batch}) must be >= 1")
        if programs.position_limit is not None and max_seq_len > programs.position_limit:
            raise GenerationError(f"max_seq_len={max_seq_len} exceeds the model's position table "
                                  f"({programs.position_limit} positions)")
        self.programs = programs
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.weight_bytes = weight_bytes
        self.tp_report = None  # with tensor parallelism: what this rank holds (fxopt.tensor_parallel.TPReport)
        self.use_cuda_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        # Per batch bucket, the decode program specialised to its static shapes and run through the cost and
        # fusion passes (generated Triton kernels for the pointwise/norm regions). GPU only by default.
        self.fuse_decode = self.use_cuda_graph if fuse_decode is None else fuse_decode
        # The caller's context (hardware, options such as fuse/rope/matmul and dump_dir) for every decode bucket
        self.ctx = ctx if ctx is not None else PassContext(options={"fuse": True, "rope": True, "matmul": True})
        self._decode_programs: dict[int, torch.fx.GraphModule] = {}
        self.notes: list[str] = list(programs.notes)
        self.caches: list[torch.Tensor] = []
        for spec in programs.caches:
            for dim in (spec.k_dim, spec.v_dim):
                self.caches.append(torch.zeros(max_batch, spec.kv_heads, max_seq_len, dim, dtype=spec.dtype,
                                               device=self.device))
        self._slot = torch.zeros((), dtype=torch.long, device=self.device)  # next cache slot, device side
        self._slot_holds = 0  # what _slot holds (graph replays advance it on the device)
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self._graphs: dict[tuple, _DecodeGraph] = {}  # by (batch bucket, sampling settings or None)
        self.captures = 0  # CUDA-graph captures so far (one per batch bucket used)
        self.stats = GenerationStats()
        self.reset()

    # -- state --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current sequences (the caches are simply overwritten by the next prefill)."""
        self.batch = 0
        self.length = 0  # slots filled, same for every row (left padding)
        self.kv_start = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def cache_bytes(self) -> int:
        """2 * layers * kv_heads * head_dim * max_seq_len * max_batch * dtype size."""
        return sum(c.numel() * c.element_size() for c in self.caches)

    def kv_bytes_per_token(self) -> int:
        """K and V bytes one position of one sequence occupies, summed over layers."""
        return sum(spec.bytes_per_token() for spec in self.programs.caches)

    def weight_stream_bytes(self, batch: int) -> int:
        """Bytes of weights one decode step reads: every tensor the decode program uses, once, except tables
        only indexed by `aten.embedding` (the token embedding), of which just `batch` rows are read."""
        total = 0
        program = self.programs.decode
        for node in program.graph.nodes:
            if node.op != "get_attr":
                continue
            obj = program
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                continue
            lookups = bool(node.users) and all(
                u.target == torch.ops.aten.embedding.default and u.args[0] is node for u in node.users)
            total += obj.element_size() * (batch * obj[0].numel() if lookups else obj.numel())
        return total

    def describe(self) -> str:
        specs = self.programs.caches
        heads = sorted({s.kv_heads for s in specs})
        dims = sorted({s.k_dim for s in specs})
        dtype = specs[0].dtype if specs else None
        return (f"KV cache: {len(specs)} layers x 2 x kv_heads {heads} x head_dim {dims} x max_seq_len "
                f"{self.max_seq_len} x max_batch {self.max_batch} x {dtype} = {self.cache_bytes / 2**20:.1f} MiB")

    def decode_program(self, bucket: int) -> torch.fx.GraphModule:
        """The decode program for batch `bucket` (fused when fuse_decode; the generic one otherwise or when
        fusion fails, with a note)."""
        if not self.fuse_decode:
            return self.programs.decode
        if bucket not in self._decode_programs:
            self._decode_programs[bucket] = self._fused_decode(bucket)
        return self._decode_programs[bucket]

    def _fused_decode(self, bucket: int) -> torch.fx.GraphModule:
        """pipeline.DECODE over a copy of the decode program specialised to batch `bucket`."""
        generic = self.programs.decode
        try:
            program = torch.fx.GraphModule(generic, copy.deepcopy(generic.graph))  # weights shared, not copied
            ids = torch.zeros(bucket, 1, dtype=torch.long, device=self.device)
            kv_start = torch.zeros(bucket, dtype=torch.long, device=self.device)
            kv.propagate_meta(program, ids, self._slot, kv_start, *[c[:bucket] for c in self.caches])
            ctx = dataclasses.replace(self.ctx, report=[])
            results = pipeline.run_passes(program, ctx, pipeline.DECODE, program=f"decode (batch {bucket})").results
            count = lambda name, what: results[name].counts.get(what, 0) if name in results else 0  # noqa: E731
            self.notes.append(f"decode program for batch {bucket}: {count('rope', 'rope')} rope kernels "
                              f"({count('rope', 'rope_cache_write')} writing K into the cache), "
                              f"{count('fusion', 'regions')} fused regions, {count('matmul_decode', 'gemv')} GEMVs "
                              f"({count('matmul_decode', 'gemv_qkv')} with the q/k/v heads, RoPE and cache writes "
                              "folded in)")
            self.notes.extend(f"decode program for batch {bucket}: {line}" for line in ctx.report)  # folds left
            return program
        except Exception as exc:  # noqa: BLE001 - the decode passes are optimisations: fall back, say so
            note = f"decode program for batch {bucket}: {exc}; running it unfused"
            self.notes.append(note)
            warnings.warn(note, stacklevel=2)
            return generic

    # -- checks (all before any state changes) -------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor, what: str) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise GenerationError(f"{what}: input_ids must be a 2-d (batch, seq) tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise GenerationError(f"{what}: input_ids must be int64 token ids, got {input_ids.dtype}")
        if not _same_device(input_ids.device, self.device):
            raise GenerationError(f"{what}: input_ids on {input_ids.device}, model on {self.device}")
        if input_ids.shape[1] == 0:
            raise GenerationError(f"{what}: empty sequence")
        if input_ids.shape[0] == 0 or input_ids.shape[0] > self.max_batch:
            raise GenerationError(f"{what}: batch {input_ids.shape[0]} not in [1, max_batch={self.max_batch}]")
        # a shard's vocab-parallel lookup gives an id past the table zeros on every rank instead of an index error
        if self.tp_report is not None and self.vocab_size is not None and \
                bool(((input_ids < 0) | (input_ids >= self.vocab_size)).any()):
            raise GenerationError(f"{what}: input_ids outside the vocabulary [0, {self.vocab_size})")

    def _left_padding(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        if attention_mask is None:
            return torch.zeros(b, dtype=torch.long, device=self.device)
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                  f"{tuple(input_ids.shape)}")
        mask = attention_mask.to(device=self.device, dtype=torch.long)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise GenerationError("attention_mask must hold 0 (padding) and 1 (token)")
        pad = s - mask.sum(dim=1)
        expected = (torch.arange(s, device=self.device)[None, :] >= pad[:, None]).long()
        if not torch.equal(mask, expected):
            raise GenerationError("attention_mask must describe left padding: each row's tokens contiguous at the "
                                  "right end (pad on the left, e.g. tokenizer.padding_side = 'left')")
        if bool((pad >= s).any()):
            raise GenerationError("attention_mask has a row with no tokens")
        return pad

    def _check_capacity(self, new_slots: int, what: str) -> None:
        if self.length + new_slots > self.max_seq_len:
            raise GenerationError(f"{what}: {self.length} cached + {new_slots} new positions = "
                                  f"{self.length + new_slots} exceeds the cache's max_seq_len={self.max_seq_len}; "
                                  "build the generator with a larger max_seq_len")

    # -- the two programs ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                all_logits: bool = False) -> torch.Tensor:
        """Run the prompt (b, s), left-padded when `attention_mask` has zeros; fill the caches.

        Returns the logits of the last position, (b, vocab), or of every position (b, s, vocab).
        """
        self._check_ids(input_ids, "prefill")
        b, s = input_ids.shape
        if s > self.max_seq_len:
            raise GenerationError(f"prefill: prompt length {s} exceeds the cache's max_seq_len={self.max_seq_len}")
        pad = self._left_padding(attention_mask, input_ids)
        input_ids = input_ids.long()
        key_mask = None
        if attention_mask is not None and bool((pad > 0).any()):
            key_mask = torch.arange(s, device=self.device)[None, :] >= pad[:, None]
        self.reset()
        self._set_slot(0)
        caches = [c[:b] for c in self.caches]
        program = self.programs.prefill if all_logits else self.programs.prefill_last
        logits = program(input_ids, self._slot, pad, key_mask, *caches)
        self.batch, self.length, self.kv_start = b, s, pad
        for graph in self._graphs.values():
            graph.kv_start.zero_()
            if graph.kv_start.shape[0] >= b:  # a smaller bucket's graph cannot serve this batch
                graph.kv_start[:b].copy_(pad)
        return logits if all_logits else logits[:, -1]

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Feed new tokens (b, n) after the cached ones; returns the last one's logits (b, vocab)
        (or (b, n, vocab)). n == 1 replays the captured CUDA graph on GPU."""
        self._check_ids(input_ids, "decode_step")
        if self.batch == 0:
            raise GenerationError("decode_step: call prefill first")
        b, n = input_ids.shape
        if b != self.batch:
            raise GenerationError(f"decode_step: batch {b} != the prefilled batch {self.batch}")
        self._check_capacity(n, "decode_step")
        logits = self._decode(input_ids.long())
        return logits.clone() if all_logits else logits[:, -1].clone()

    def _set_slot(self, value: int) -> None:
        if self._slot_holds != value:
            self._slot.fill_(value)
            self._slot_holds = value

    def _graph(self, b: int, sampling: Sampler | None = None) -> _DecodeGraph:
        """The CUDA-graphed step of the smallest batch bucket that holds b rows (with this sampling's pick)."""
        bucket = next(size for size in batch_buckets(self.max_batch) if size >= b)
        key = (bucket, sampling.settings if sampling is not None else None)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _DecodeGraph(self, bucket, sampling)
            graph.kv_start[:b].copy_(self.kv_start)
        return graph

    def _decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One step at the current length; returns (b, n, vocab) (a view of a static buffer on CUDA)."""
        b, n = input_ids.shape
        self._set_slot(self.length)
        if self.use_cuda_graph and n == 1:
            graph = self._graph(b)
            graph.ids[:b].copy_(input_ids)
            logits = graph.run()[:b]
            self._slot_holds += 1  # the graph advanced it
        else:
            caches = [c[:b] for c in self.caches]
            program = self.decode_program(b) if n == 1 else self.programs.decode
            logits = program(input_ids, self._slot, self.kv_start, *caches)
        self.length += n
        return logits

    def _replays(self, first: torch.Tensor, steps: int, sampler: Sampler) -> torch.Tensor:
        """`steps` tokens after `first` (b,), each one graph replay that feeds itself: (b, steps). Greedy, or
        drawn as `sampler` says from its seed."""
        b = first.shape[0]
        if steps == 0:
            return first.new_empty(b, 0)
        self._set_slot(self.length)
        graph = self._graph(b, sampler if sampler.do_sample else None)
        graph.seed.fill_(sampler.seed)
        graph.ids[:b].copy_(first[:, None])
        for _ in range(steps):
            graph.run()
        start = self.length + 1  # history[:, p] is the token picked for position p
        self.length += steps
        self._slot_holds = self.length
        return graph.history[:b, start:start + steps].clone()

    @torch.no_grad()
    def verify(self, logits_fn, input_ids: torch.Tensor, *, prefill_len: int | None = None, rtol: float = 1e-3,
               atol: float = 1e-3) -> float:
        """Check the claim dynamically: prefill of a prefix plus step-by-step decode of the rest must give the
        full forward's logits (`logits_fn(input_ids)`, e.g. the original model). Returns the max abs error;
        raises GenerationError naming the worst position when beyond atol + rtol * |reference|."""
        self._check_ids(input_ids, "verify")
        b, s = input_ids.shape
        if s < 2:
            raise GenerationError("verify: needs at least 2 tokens (a prefill and a decode step)")
        prefill_len = prefill_len or max(1, s // 2)
        reference = _logits_of(logits_fn(input_ids)).float()
        if reference.dim() == 3 and reference.shape[1] == s:  # every position's logits
            got = [self.prefill(input_ids[:, :prefill_len], all_logits=True).float()]
            for i in range(prefill_len, s):
                got.append(self.decode_step(input_ids[:, i:i + 1], all_logits=True).float())
            first = 0
        else:  # the model returns the last position's logits only (nanoGPT): the full forward of each prefix
            reference = torch.stack([_last(_logits_of(logits_fn(input_ids[:, :p]))).float()
                                     for p in range(prefill_len, s + 1)], dim=1)
            got = [_last(self.prefill(input_ids[:, :prefill_len])).float()[:, None]]
            for i in range(prefill_len, s):
                got.append(_last(self.decode_step(input_ids[:, i:i + 1])).float()[:, None])
            first = prefill_len - 1
        err = (torch.cat(got, dim=1) - reference).abs()
        excess = err - rtol * reference.abs()
        worst = int(excess.amax(dim=(0, 2)).argmax())
        if float(excess.max()) > atol:
            where = "prefill" if first + worst < prefill_len else "decode step"
            raise GenerationError(f"verify: the KV-cache programs disagree with the full forward at position "
                                  f"{first + worst} ({where}): max abs error {float(err[:, worst].max()):.3g}")
        return float(err.max())

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Prompt (b, s) -> (b, s + new) token ids: the prompt as given, then the generated tokens.

        Greedy unless sampling is asked for (do_sample=True, or any of temperature / top_k / top_p).
        A row that emits `eos_token_id` stops: its later tokens are `pad_token_id` (default: the eos id);
        generation ends when every row has stopped. `seed` makes sampling reproducible.
        """
        self._check_ids(input_ids, "generate")
        if max_new_tokens < 1:
            raise GenerationError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        b, s = input_ids.shape
        if s + max_new_tokens > self.max_seq_len:
            raise GenerationError(f"generate: prompt length {s} + max_new_tokens {max_new_tokens} = "
                                  f"{s + max_new_tokens} exceeds the cache's max_seq_len={self.max_seq_len}; "
                                  "build the generator with a larger max_seq_len")
        sampler = Sampler.make(do_sample, temperature, top_k, top_p, seed, self.device)
        if sampler.do_sample and seed is None and self.tp_report is not None:
            raise GenerationError("generate: sampling on a tensor-parallel shard needs a seed (the same on every "
                                  "rank, so that every rank draws the same tokens)")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long, device=self.device)
        pad_id = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        self._left_padding(attention_mask, input_ids)  # validate before the clock starts

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        logits = self.prefill(input_ids, attention_mask)
        fed = sampler(logits, position=s)  # what the next step reads; a finished row keeps feeding valid ids
        finished = torch.isin(fed, eos) if eos.numel() else None
        sync()
        mid = time.perf_counter()
        if self.use_cuda_graph and finished is None:
            # no stop token: every later token (greedy or sampled) comes from graph replays alone, no host op
            steps = max_new_tokens - 1
            new = torch.cat([fed[:, None], self._replays(fed, steps, sampler)], dim=1)
        else:
            steps, new = self._decode_loop(fed, max_new_tokens - 1, sampler, finished, eos, pad_id)
        sync()
        end = time.perf_counter()
        self.stats = GenerationStats(b, s, new.shape[1], mid - start, end - mid, steps)
        return torch.cat([input_ids.long(), new], dim=1)

    def _decode_loop(self, fed, steps, sampler, finished, eos, pad_id) -> tuple[int, torch.Tensor]:
        """Up to `steps` tokens after `fed`, one decode step and one host-side pick each, stopping when every
        row has emitted eos (`finished`): (steps taken, (b, 1 + tokens) with `fed` first)."""
        tokens = [fed]
        taken = 0
        for _ in range(steps):
            if finished is not None and bool(finished.all()):
                break
            logits = self._decode(fed[:, None])[:, -1]
            taken += 1
            fed = sampler(logits, position=self.length)  # the token after the one fed
            if finished is None:
                tokens.append(fed)
            else:
                tokens.append(torch.where(finished, torch.full_like(fed, pad_id), fed))
                finished = finished | torch.isin(fed, eos)
        return taken, torch.stack(tokens, dim=1)

@dataclass
class Sampler:
    """Greedy argmax, or temperature / top-k / top-p (nucleus) sampling from a seeded generator."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    seed: int = 0  # the decode graph's draws (codegen/greedy.py's sample_pick) are keyed by it

    @classmethod
    def make(cls, do_sample, temperature, top_k, top_p, seed, device) -> Sampler:
        if do_sample is None:
            do_sample = any(v is not None for v in (temperature, top_k, top_p))
        if not do_sample:
            return cls()
        temperature = 1.0 if temperature is None else float(temperature)
        if not temperature > 0:
            raise GenerationError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
        if top_k is not None and top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        seed = int(seed) if seed is not None else int(torch.seed() % 2**62)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return cls(True, temperature, top_k, top_p, generator, seed)

    @property
    def settings(self) -> tuple:
        """What a decode graph's captured pick depends on (the seed is a device tensor it reads)."""
        return self.temperature, self.top_k, self.top_p

    def pick(self, logits: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, slot: torch.Tensor,
             seed: torch.Tensor) -> None:
        """Each row's sampled next token of logits (rows, vocab) into ids[:, 0] and history[:, slot + 1], on the
        GPU with no host sync (a CUDA graph captures it). Temperature alone: sample_pick scales the logits. Top-k
        up to TOP_K_MAX, with or without top-p: sample_top_k's kernels, no vocabulary sort. Otherwise (top-p
        alone, a larger k) filtered_logits' eager sort or topk, then sample_pick. All draw with sample_pick's
        noise keyed by (seed, position, row)."""
        inv_temperature = 1.0 / self.temperature
        top_k = self.top_k if self.top_k is not None and self.top_k < logits.shape[-1] else None
        nucleus = self.top_p is not None and self.top_p < 1.0
        if top_k is None and not nucleus:
            sample_pick(logits, ids, history, slot, seed, inv_temperature)
        elif top_k is not None and top_k <= TOP_K_MAX:
            sample_top_k(logits, ids, history, slot, seed, top_k=top_k, top_p=self.top_p,
                         inv_temperature=inv_temperature)
        else:
            sample_pick(self.filtered_logits(logits), ids, history, slot, seed, 1.0)

    def __call__(self, logits: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Each row's next token (rows,), for the token at `position`. On a GPU a draw is sample_pick's, keyed
        by (seed, position, row) as the decode graph's, so a seed gives the same tokens with or without graph
        replays; elsewhere (or without a position) torch.multinomial from the seeded generator."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        if logits.is_cuda and position is not None:
            rows = logits.shape[0]
            ids = torch.empty(rows, 1, dtype=torch.long, device=logits.device)
            history = torch.empty(rows, position + 1, dtype=torch.long, device=logits.device)
            slot = torch.tensor(position - 1, device=logits.device)  # the pick is for the position after slot
            self.pick(logits, ids, history, slot, torch.tensor(self.seed, device=logits.device))
            return ids[:, 0]
        return self.sample(logits)

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled fp32 logits with everything outside top-k / top-p set to -inf.

        Top-k keeps every logit >= the k-th largest (ties included, as HF's warper). With top-p as well, the
        nucleus is taken among torch.topk's k tokens, already sorted, instead of sorting the vocabulary: a
        token tied with the k-th beyond the k is then no candidate."""
        logits = logits.float() / self.temperature
        nucleus = self.top_p is not None and self.top_p < 1.0
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            values, order = torch.topk(logits, self.top_k, dim=-1)  # (rows, k), descending
            if nucleus:
                probs = torch.softmax(values, dim=-1)
                kept = torch.cumsum(probs, dim=-1) - probs < self.top_p  # mass strictly above each < top_p
                return torch.full_like(logits, float("-inf")).scatter(
                    -1, order, values.masked_fill(~kept, float("-inf")))
            return logits.masked_fill(logits < values[..., -1:], float("-inf"))
        if nucleus:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
            drop_sorted = before >= self.top_p  # keeps the smallest prefix reaching top_p (at least one)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.filtered_logits(logits), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Building a generator from a model
# ---------------------------------------------------------------------------------------------------

CAPTURE_BATCH, CAPTURE_SEQ = 2, 8  # >= 2 and distinct, so export keeps both dims symbolic


def _token_ids(example_kwargs: dict[str, Any]) -> torch.Tensor:
    ids = numerics.token_ids(example_kwargs)
    if ids is None:
        raise GenerationError(f"build_generator: cannot tell the token-id input among {sorted(example_kwargs)}")
    return ids


def capture_kwargs(model: torch.nn.Module, example_kwargs: dict[str, Any], device) -> dict[str, Any]:
    """Inputs to capture at: (CAPTURE_BATCH, CAPTURE_SEQ) so both dims stay symbolic. A model with
    `example_inputs(batch, seq)` makes its own; otherwise the example's token ids are tiled to that size,
    an attention mask the forward does not require is dropped (padding is the runtime's job) and one it
    requires becomes all ones."""
    if hasattr(model, "example_inputs") and hasattr(model, "dynamic_dims"):
        return model.example_inputs(CAPTURE_BATCH, CAPTURE_SEQ, device=device)
    ids = _token_ids(example_kwargs)
    name = next(k for k, v in example_kwargs.items() if v is ids)
    flat = ids.reshape(-1)
    reps = -(-CAPTURE_BATCH * CAPTURE_SEQ // flat.numel())
    new_ids = flat.repeat(reps)[: CAPTURE_BATCH * CAPTURE_SEQ].reshape(CAPTURE_BATCH, CAPTURE_SEQ)
    required = {p.name for p in inspect.signature(model.forward).parameters.values()
                if p.default is inspect.Parameter.empty}
    out: dict[str, Any] = {}
    for key, value in example_kwargs.items():
        if key == name:
            out[key] = new_ids.to(device=device, dtype=torch.long)
        elif not isinstance(value, torch.Tensor):
            out[key] = value
        elif key in required:
            out[key] = (torch.ones(CAPTURE_BATCH, CAPTURE_SEQ, dtype=value.dtype, device=device)
                        if value.dim() == 2 else value)
    return out


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def build_generator(model: torch.nn.Module, example_kwargs: dict[str, Any], *, max_seq_len: int, max_batch: int,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None, hw=None,
                    use_cuda_graph: bool | None = None, fuse_decode: bool | None = None,
                    matmul: bool = True, attention: bool = True, fuse: bool = True, rope: bool | None = None,
                    dump_dir=None, tensor_parallel: dist.ProcessGroup | None = None,
                    weights: Weights | None = None) -> Generator:
    """Capture `model` (a cache-less causal LM: input_ids -> logits), run pipeline.GENERATOR over it (attention,
    matmul, then kv_cache's split into prefill and decode programs) and return a Generator, which runs
    pipeline.DECODE per batch bucket with the same context. The user's model is never modified (a copy is
    converted when `dtype` / `device` differ from its own). `fuse=False` leaves the decode program's memory-bound
    ops, RoPE included, as PyTorch ops.

    tensor_parallel (a torch.distributed process group): the captured graph is first cut into this rank's
    Megatron shard (fxopt/tensor_parallel.py: heads, MLP columns/rows, vocab), so both programs and their caches
    hold this rank's heads only and every rank computes the same logits. `weights` (name -> tensor) then supplies
    the tensors of a model built on the meta device, so no rank holds the whole model.

    Raises kv_cache.KVCacheError, naming the node, when the model cannot take a cache (bidirectional
    attention, positions mixed outside attention).
    """

    model_device, model_dtype = _model_device_dtype(model)
    if model_device.type == "meta":  # weights come from `weights`, on the inputs' device, in their own dtype
        if tensor_parallel is None or weights is None:
            raise TypeError("build_generator: a model on the meta device needs tensor_parallel and weights")
        if dtype not in (None, model_dtype):
            raise TypeError(f"build_generator: a model on the meta device runs in its own dtype ({model_dtype})")
        device = torch.device(device) if device is not None else _inputs_device(example_kwargs)
    else:
        device = torch.device(device) if device is not None else model_device
    dtype = dtype or model_dtype
    if model_device.type != "meta" and (device != model_device or dtype != model_dtype):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    model = model.eval()
    kwargs = capture_kwargs(model, example_kwargs, device)
    captured = capture(model, kwargs)
    if tensor_parallel is not None:  # ShardingError here names the layer, before a tensor is read
        shard_graph(captured.gm, tensor_parallel, weights=weights)
    options = {"attention": attention, "matmul": matmul, "fuse": fuse, "rope": fuse if rope is None else rope,
               "dump_dir": dump_dir}
    ctx = pipeline.make_context(captured, hw, None, options)
    program = pipeline.run_passes(captured, ctx, pipeline.GENERATOR, program="generator")
    programs: kv.KVPrograms = program.results["kv_cache"].kv_programs
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tensor_parallel is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    else:  # what this rank streams: its shard (the programs hold the graph's tensors)
        weight_bytes = local_bytes(captured.gm)
    gen = Generator(programs, max_seq_len=max_seq_len, max_batch=max_batch, device=device, vocab_size=vocab,
                    use_cuda_graph=use_cuda_graph, weight_bytes=weight_bytes, fuse_decode=fuse_decode, ctx=ctx)
    gen.tp_report = getattr(captured.gm, "tp_report", None)
    return gen


def _inputs_device(example_kwargs: dict[str, Any]) -> torch.device:
    tensors = [v for v in example_kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Bandwidth accounting and the CLI
# ---------------------------------------------------------------------------------------------------


def bytes_per_decode_step(gen: Generator, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """HBM bytes one decode step must read at least: every weight once (embedding tables: the looked-up
    rows), plus each row's K/V so far (averaged over a generation of `new_tokens` after `prompt_len`)."""
    mean_len = prompt_len + (new_tokens - 1) / 2
    kv_bytes = batch * mean_len * gen.kv_bytes_per_token()
    weights = gen.weight_stream_bytes(batch)
    return {"weights": float(weights), "kv": float(kv_bytes), "total": float(weights + kv_bytes)}


CLI_PROMPT_LEN = 128  # `fxopt generate` defaults, capped so that prompt + new fit the model's positions
CLI_NEW_TOKENS = 128


def _cli_device(requested: str | None) -> str:
    """--device as a torch device string; UserError for a device this machine does not have."""

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}", "use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require_cuda(f"--device {requested}", "use --device cpu, or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)",
                            "use cuda:0 ... cuda:N-1")
    elif device.type != "cpu":
        raise UserError(f"--device {requested}: generate runs on cpu or cuda", "use --device cpu or cuda")
    return str(device)


def _cli_lengths(args: argparse.Namespace, spec: str, limit: int | None) -> tuple[int, int, int]:
    """(prompt_len, new_tokens, max_seq_len) from the flags and the model's position limit (None: no table)."""

    prompt = args.prompt_len or (min(CLI_PROMPT_LEN, max(1, limit // 2)) if limit else CLI_PROMPT_LEN)
    if limit and prompt >= limit:
        raise UserError(f"--prompt-len {prompt} leaves no room for new tokens: {spec} has {limit} positions",
                        f"use --prompt-len {limit - 1} or less")
    new = args.new_tokens or (min(CLI_NEW_TOKENS, limit - prompt) if limit else CLI_NEW_TOKENS)
    needed = prompt + new
    if limit and needed > limit:
        raise UserError(f"--prompt-len {prompt} + --new-tokens {new} = {needed} is past {spec}'s position "
                        f"table ({limit} positions)", f"keep prompt + new tokens <= {limit}")
    max_seq_len = args.max_seq_len or needed
    if max_seq_len < needed:
        raise UserError(f"--max-seq-len {max_seq_len} is less than prompt + new tokens ({prompt} + {new} = "
                        f"{needed})", "raise --max-seq-len, or leave it out (default: prompt + new)")
    if limit and max_seq_len > limit:
        raise UserError(f"--max-seq-len {max_seq_len} is past {spec}'s position table ({limit} positions)",
                        f"use --max-seq-len {limit} or less")
    return prompt, new, max_seq_len


def _refuse_non_causal(spec: str, model) -> None:
    """UserError for a model (or model class) that says it is not a causal LM (`is_causal_lm = False`)."""

    if getattr(model, "is_causal_lm", None) is False:
        raise UserError(f"{spec} is not a causal LM (its attention is bidirectional or encoder-decoder): it "
                        "cannot take a KV cache", "generate needs a decoder, e.g. gpt2-tiny, llama-tiny or hf:llama")


def cmd_generate(args: argparse.Namespace) -> int:

    device = _cli_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = DTYPES[dtype_name]
    if args.json:
        check_output(args.json, "--json")

    if args.model in models.PRESETS:  # a preset: check what its config says before building it
        _refuse_non_causal(args.model, models.MODEL_CLASSES[type(models.PRESETS[args.model])])
        _cli_lengths(args, args.model, zoo.spec_position_limit(args.model))
    if device == "cpu" and dtype != torch.float32:
        note(f"{dtype_name} on CPU is slow; --dtype fp32 (the CPU default) is faster")
    with stage(f"building {args.model} ({dtype_name}, {device})"):
        model = zoo.load_model(args.model, device=device, dtype=dtype)
    _refuse_non_causal(args.model, model)
    prompt_len, new_tokens, max_seq_len = _cli_lengths(args, args.model, zoo.position_limit(model))
    example = zoo.example_inputs(model, args.batch, prompt_len, device=device)
    with stage(f"capturing {args.model} and inserting the KV cache (b={args.batch}, up to {max_seq_len} "
               "positions)"):
        gen = build_generator(model, example, max_seq_len=max_seq_len, max_batch=args.batch)
    ids = _token_ids(example)
    if args.warmup:
        with stage(f"warm-up ({args.warmup} run(s))"):
            for _ in range(args.warmup):
                gen.generate(ids, min(new_tokens, 8))
    runs = []
    for _ in progress(range(args.repeat), desc=f"generating {new_tokens} tokens, {args.repeat} runs"):
        gen.generate(ids, new_tokens, eos_token_id=None)
        runs.append(gen.stats)
    stats = sorted(runs, key=lambda st: st.ms_per_token)[len(runs) // 2]
    moved = bytes_per_decode_step(gen, args.batch, prompt_len, new_tokens)
    achieved = moved["total"] / (stats.ms_per_token * 1e-3)
    copy_bw = None
    if device.startswith("cuda"):

        with stage("measuring copy bandwidth"):
            copy_bw = measure_copy_bandwidth()
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": dtype_name, "batch": args.batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_ms": 1e3 * stats.prefill_s, "ms_per_token": stats.ms_per_token,
        "tokens_per_s": stats.tokens_per_s, "bytes_per_step": moved, "achieved_bytes_per_s": achieved,
        "copy_bandwidth": copy_bw, "cache_bytes": gen.cache_bytes, "cuda_graph_captures": gen.captures,
    }
    print(gen.describe())
    print(f"{args.model} batch {args.batch}, prompt {prompt_len}, {new_tokens} new tokens, {dtype_name}, "
          f"{result['device']}")
    print(f"  prefill            {result['prefill_ms']:9.2f} ms")
    print(f"  decode             {stats.ms_per_token:9.3f} ms/token   {stats.tokens_per_s:9.1f} tokens/s")
    line = (f"  bandwidth          {achieved / 1e9:9.1f} GB/s  (weights {moved['weights'] / 1e9:.3f} GB + KV "
            f"{moved['kv'] / 1e9:.3f} GB per step)")
    if copy_bw:
        line += f" = {100 * achieved / copy_bw:.1f}% of measured copy bandwidth {copy_bw / 1e9:.0f} GB/s"
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `fxopt generate MODEL --batch --prompt-len --new-tokens`."""

    parser = subparsers.add_parser("generate", help="generate over an automatically inserted KV cache; prints "
                                                    "tokens/s, ms per token and achieved bandwidth")
    parser.add_argument("model", help=MODEL_HELP + " (a causal LM)")
    parser.add_argument("--batch", type=positive_int, default=1, help="prompts generated together")
    parser.add_argument("--prompt-len", type=positive_int, default=None,
                        help=f"prompt tokens (default: {CLI_PROMPT_LEN}, or half the model's positions if fewer)")
    parser.add_argument("--new-tokens", type=positive_int, default=None,
                        help=f"tokens to generate (default: {CLI_NEW_TOKENS}, or what fits the model's positions "
                             "after the prompt)")
    parser.add_argument("--max-seq-len", type=positive_int, default=None,
                        help="cache capacity (default: prompt + new tokens)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="(default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed generate() calls first")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures to this file")
    parser.set_defaults(func=cmd_generate)
    return parser


def _logits_of(out):
    """Logits from what a forward returns: a tensor, an HF output with .logits, or a tuple led by them."""
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def _last(logits: torch.Tensor) -> torch.Tensor:
    """(b, vocab) logits of the last position from (b, s, vocab) or already (b, vocab)."""
    return logits[:, -1] if logits.dim() == 3 else logits
