"""Load a checkpoint, own the weights, run sessions (chunked prefill and decode).

`Engine` owns the dense weights, the expert store and the RoPE tables; `Session` owns one
sequence's decode state. The runner runs a step (per layer segment A, the routed experts made
resident by the scheduler, segment B); docs/runtime.md has the split. A request's decode loop
(`Engine.generate`) lives in homeseek/generation.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from homeseek import decode as D
from homeseek import model as M
from homeseek import plan
from homeseek.checkpoint import Checkpoint, QWeight, layer_prefix, layer_table
from homeseek.config import (
    DEFAULT_PREFILL_CHUNK,
    PRESETS,
    ConfigError,
    ModelConfig,
    RuntimeConfig,
    default_cache_dir,
)
from homeseek.cpu_lane import CpuLane, lane_status
from homeseek.experts import READER_THREADS, ExpertStore, record_bytes
from homeseek.generation import Generation, GenerationResult
from homeseek.kernels import ops
from homeseek.mtp import MtpTrack
from homeseek.runner import Runner
from homeseek.sampling import SamplingParams, TokenLogprob
from homeseek.scheduler import Scheduler
from homeseek.speculative import DraftSource, MtpDrafts
from homeseek.state import SessionState, StateArena

# Prefill chunks are halved down to this size when one runs out of GPU memory (a safety net: the
# memory plan sizes the chunk so that it fits).
MIN_PREFILL_CHUNK = plan.MIN_PREFILL_CHUNK


class ContextError(ValueError):
    """A sequence would grow past the preallocated context."""


# --- built-in models -----------------------------------------------------------------------------
TINY_SEED = 0


def preset_dir(name: str, seed: int = TINY_SEED) -> Path:
    """Directory of a built-in synthetic model; the name changes whenever its content would."""
    from homeseek.synthetic import WRITER_VERSION

    cfg = PRESETS[name]()
    key = json.dumps([cfg.to_dict(), seed, WRITER_VERSION], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return default_cache_dir() / "models" / f"{name}-{digest}"


def ensure_preset(name: str, seed: int = TINY_SEED) -> Path:
    """Create a built-in model on first use (offline; written atomically) and return its path."""
    from homeseek.synthetic import write_checkpoint

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if name != "tiny":
        raise ConfigError(
            f"preset {name!r} is full size: write it explicitly with `homeseek synth {name} DIR`"
        )
    final = preset_dir(name, seed)
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        write_checkpoint(tmp, PRESETS[name](), seed=seed)
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists():  # nobody else won the race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(path_or_preset: str | os.PathLike) -> Path:
    p = Path(path_or_preset)
    if p.is_dir():
        return p
    if str(path_or_preset) in PRESETS:
        return ensure_preset(str(path_or_preset))
    raise ConfigError(
        f"{path_or_preset}: not a checkpoint directory nor a preset ({', '.join(sorted(PRESETS))})"
    )


# --- weights -------------------------------------------------------------------------------------
def _load_block(ckpt: Checkpoint, cfg: ModelConfig, layer: int, device: str) -> M.LayerWeights:
    """Dense weights of one block, keyed by local name: linears as QWeight, the rest as tensors."""
    pre = layer_prefix(cfg, layer)
    lw: M.LayerWeights = {}
    for name, spec in layer_table(cfg, layer, pre).items():
        if ".experts." in name:
            continue  # routed experts belong to the expert store
        local = name[len(pre) :]
        if local.endswith(".weight") and len(spec.shape) == 2:
            lw[local.removesuffix(".weight")] = ckpt.get_weight(name).to(device)
        elif local.endswith(".weight"):  # norm weights: fp32 as the reference holds them
            lw[local.removesuffix(".weight")] = ckpt.get(name).float().to(device)
        elif spec.kind == "i64":
            lw[local] = ckpt.get(name).long().to(device)
        else:
            lw[local] = ckpt.get(name).float().to(device)
    M.fuse_linears(lw)
    return lw


class Engine:
    """A loaded model. Build with `homeseek.load`."""

    def __init__(
        self, source: Path | Checkpoint | Any, rt: RuntimeConfig, progress: bool = False
    ) -> None:
        """source: a checkpoint directory, an open Checkpoint, or an in-memory source with the
        same reading methods (`homeseek.synthetic.SyntheticSource`)."""
        self.rt = rt
        self.progress = progress  # progress bars on loading and long prefills
        self.ckpt = Checkpoint(source) if isinstance(source, (str, Path)) else source
        self.path = self.ckpt.path
        self.ckpt.validate()
        self.cfg = cfg = self.ckpt.cfg
        if rt.max_context > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_context={rt.max_context} exceeds the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        # The memory plan (docs/engine.md §1) settles the prefill chunk and the expert pool before
        # any weight is read, so a budget or chunk that cannot work fails now, with the numbers.
        self.plan = self._memory_plan()
        chunk = rt.prefill_chunk
        if chunk is None:
            chunk = self.plan.chunk if self.plan is not None else DEFAULT_PREFILL_CHUNK
        # The group: the plan's (derived when none was given), else chunk by chunk.
        group = self.plan.group if self.plan is not None else (rt.prefill_group or 0)
        self.rt = rt = dataclasses.replace(rt, prefill_chunk=chunk, prefill_group=group)
        # Triton kernels only for CUDA tensors, decided once here: the engine never runs CPU
        # tensors through triton's interpreter (which TRITON_INTERPRET=1 would otherwise allow).
        on_cuda = str(rt.device).startswith("cuda")
        kernels = rt.kernels and on_cuda and ops.use_triton(torch.empty(0, device=rt.device))
        self.ctx = M.Ctx(cfg, rt.dtype, rt.quant_sim, kernels)
        dev = rt.device
        self.top = {
            "embed": self.ckpt.get("embed.weight").to(dev),
            "head": self.ckpt.get("head.weight").to(dev),
            "norm": self.ckpt.get("norm.weight").float().to(dev),
        }
        for k in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
            self.top[k] = self.ckpt.get(k).float().to(dev)
        self.layers = list(range(cfg.num_hidden_layers))
        self.weights = [
            _load_block(self.ckpt, cfg, i, dev)
            for i in tqdm(self.layers, desc="loading layers", disable=not progress)
        ]
        # The MTP block (mtp > 0): its dense weights here, its experts in the store under layer
        # id num_hidden_layers. It serves Session.mtp_logits; speculative decoding is not built.
        self.mtp: M.LayerWeights | None = None
        self.mtp_top: dict[str, torch.Tensor] | None = None
        expert_layers = list(self.layers)
        if rt.mtp:
            if cfg.num_nextn_predict_layers < 1:
                raise ConfigError(f"mtp={rt.mtp}: this checkpoint has no MTP block")
            self.mtp = _load_block(self.ckpt, cfg, cfg.num_hidden_layers, dev)
            self.mtp_top = M.mtp_top(self.mtp, self.top)
            expert_layers.append(cfg.num_hidden_layers)
        n_slots, n_host = self._expert_budget()
        self.experts = ExpertStore(
            self.ckpt, cfg, expert_layers, dev, n_slots, n_host, policy=rt.eviction,
            progress=progress,
        )  # fmt: skip
        for layer in self.layers:
            if cfg.is_hash_layer(layer):
                self.experts.tid2eid[layer] = self.weights[layer]["ffn.gate.tid2eid"].cpu()
        if rt.hot_profile:
            from homeseek.profile import hot_set

            self.experts.pin_hot(hot_set(rt.hot_profile, self.experts.n_slots // 2))
        self.rope = M.RopeTables(cfg, rt.max_context, dev)
        self.scheduler = Scheduler(self.experts, cfg)
        self.scheduler.prefetch = rt.prefetch
        # The CPU lane times a record's copy: before the host tier starts pinning on its thread,
        # whose pinned allocations hold the driver and stretched that timing ~2,000-fold (the
        # lane then took every miss).
        self.lane_status = self._cpu_lane(kernels)
        if n_host:
            self.experts.copier = _record_copier()
            self.experts.start_host_fill()
        if kernels:  # the FP8 GEMV's split-K scratch, sized for every FP8 product of the model
            from homeseek.kernels.fp8_linear import GEMV_MAX_M, fp8_linear_workspace

            blocks = self.weights + ([self.mtp] if self.mtp is not None else [])
            ws = fp8_linear_workspace(M.fp8_shapes(blocks, cfg), GEMV_MAX_M, dev)
            self.ctx = dataclasses.replace(
                self.ctx, fp8_ws=ws, **D.decode_workspaces(cfg, rt.max_context, dev)
            )
        # With CUDA graphs every session's state lives in one arena the graphs index by slot;
        # eager, each session allocates its own.
        self.arena = StateArena(cfg, rt, self.layers, rt.max_sessions) if rt.graphs else None
        self.runner = Runner(
            cfg, rt, self.ctx, self.top, self.weights, self.rope, self.scheduler, self.arena,
            report=(lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else None,
        )  # fmt: skip
        self.tokenizer = _load_tokenizer(self.path) if self.path is not None else None

    def _cpu_lane(self, kernels: bool) -> str:
        """Start the CPU lane where the runtime config asks for it and it can run -> a line
        saying whether it runs, and if not why (stats, doctor)."""
        rt = self.rt
        if rt.cpu_lane != "off" and not kernels and str(rt.device).startswith("cuda"):
            if rt.cpu_lane == "on":
                raise ConfigError("cpu_lane='on' needs the Triton kernels (kernels=True)")
            return "off (the Triton kernels are off)"
        on, why = lane_status(rt.cpu_lane, rt.device)
        if on:
            self.scheduler.lane = CpuLane(
                self.cfg, rt.device, record_bytes(self.cfg), rt.dtype, rt.quant_sim,
                threads=rt.cpu_threads,
            )  # fmt: skip
            why = f"on ({self.scheduler.lane.threads} threads)"
        return why

    def _gpu_budget_gb(self) -> float | None:
        """gpu_mem_gb, else the CLI's default rule on CUDA; None: no budget (CPU)."""
        if self.rt.gpu_mem_gb is not None:
            return self.rt.gpu_mem_gb
        return plan.default_gpu_budget_gb(self.rt.device)

    def _host_budget_gb(self) -> float:
        rt = self.rt
        return rt.host_mem_gb if rt.host_mem_gb is not None else plan.default_host_budget_gb()

    def _memory_plan(self) -> plan.MemoryPlan | None:
        """The GPU split for this runtime config (design: gpu_mem_gb is the engine's total), or
        None without a budget (CPU). Raises ConfigError when it cannot work, unless expert_slots
        sets the pool by hand (tests and tools; the plan then only picks the prefill chunk)."""
        cfg, rt = self.cfg, self.rt
        gpu_gb = self._gpu_budget_gb()
        if gpu_gb is None:
            return None
        p = plan.memory_plan(
            cfg, gpu_gb, self._host_budget_gb(), rt.max_context,
            act_bytes=torch.finfo(rt.dtype).bits // 8, sessions=rt.max_sessions,
            prefill_chunk=rt.prefill_chunk, quant_sim=rt.quant_sim, mtp=rt.mtp > 0,
            prefill_group=rt.prefill_group, derive_prefill_group=rt.prefill_group is None,
        )  # fmt: skip
        problem = p.problem(plan.PY_NAMES)
        if problem is not None and rt.expert_slots is None:
            raise ConfigError(problem)
        return p

    def _expert_budget(self) -> tuple[int, int]:
        """(GPU slots, host records): the plan's pool, expert_slots when given, every expert
        without a budget (CPU: the slots are host memory)."""
        rec = record_bytes(self.cfg)
        n_host = int(self._host_budget_gb() * plan.GiB) // rec
        if self.rt.expert_slots is not None:
            return self.rt.expert_slots, n_host
        if self.plan is None:
            return (len(self.layers) + int(self.rt.mtp > 0)) * self.cfg.n_routed_experts, 0
        return self.plan.gpu_slots, n_host

    def session(self) -> Session:
        return Session(self)

    def warm_up(self) -> None:
        """Capture the decode step's CUDA graphs (compiling their glue) now, on a scratch
        session, instead of during the first request's first token. Later position buckets are
        captured when a sequence first reaches them. Nothing to do without graphs."""
        if not self.rt.graphs:
            return
        sess = self.session()
        try:
            sess.decode(0)
        finally:
            sess.close()
        self.runner.capture_experts()

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        thinking: bool = False,
        reasoning_effort: str | None = None,
    ) -> list[int]:
        """Messages -> prompt ids in the official V4 chat format (one BOS, no second one)."""
        from homeseek.chat import encode_messages

        if self.tokenizer is None:
            raise ValueError(
                f"{self.path}: no tokenizer.json, so chat messages cannot be encoded; "
                "pass prompt_ids instead"
            )
        mode = "thinking" if thinking else "chat"
        text = encode_messages(
            list(messages), thinking_mode=mode, reasoning_effort=reasoning_effort
        )
        return self.tokenizer.encode(text)

    def generate(
        self,
        messages: Sequence[dict[str, Any]] | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        thinking: bool = False,
        ignore_eos: bool = False,
        stop: Sequence[str] | None = None,
        stream: Callable[[str], None] | None = None,
        reasoning_effort: str | None = None,
        session: Session | None = None,
        cancel: Callable[[], bool] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        stream_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
        draft_source: DraftSource | None = None,
    ) -> GenerationResult:
        """Generate a completion for chat `messages` or raw `prompt_ids` (docs/engine.md §3).

        `stream(delta)` receives text as it is decoded, never splitting a UTF-8 character and
        never showing text that a stop string later cuts. Without a tokenizer, generation from
        `prompt_ids` still works (token ids out, empty text). `session` continues an existing
        sequence (prefix reuse: the prompt must be only the new tokens). `cancel()` is polled
        once per token; when it returns True generation ends with finish_reason "cancelled".
        Penalties and `logit_bias` (token id -> bias) follow OpenAI (`homeseek.sampling`).
        `logprobs=n` records each generated token's log-probability and the n most likely
        (`GenerationResult.logprobs`); `prompt_logprobs` also those of the prompt ids fed here
        (the first has no predecessor in this call: None), at the cost of full-prompt logits.
        `stream_logprobs(entries)` receives the generated tokens' logprobs as their text is
        streamed (needs `logprobs`). With `mtp=k` at load, decoding is speculative: k drafts
        from the MTP block per step, verified in one step (homeseek/speculative.py; the same
        tokens at temperature 0, the same distribution otherwise); `draft_source` replaces the
        MTP block as the drafter (tests and benchmarks: `speculative.ForcedDrafts`,
        `speculative.ForcedAcceptance`).
        """
        if (messages is None) == (prompt_ids is None):
            raise ValueError("pass exactly one of messages or prompt_ids")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=dict(logit_bias or {}),
            logprobs=logprobs,
        )
        if stream_logprobs is not None and logprobs is None:
            raise ValueError("stream_logprobs needs logprobs (the number of top tokens, 0-20)")
        if prompt_logprobs and logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (the number of top tokens, 0-20)")
        if draft_source is not None and not self.rt.mtp:
            raise ValueError("draft_source needs an engine loaded with mtp=k (k drafts per step)")
        ids = (
            self.encode_chat(messages, thinking, reasoning_effort)
            if messages is not None
            else [int(i) for i in prompt_ids]
        )
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.rt.max_context - (session.pos if session is not None else 0)
        if len(ids) >= room:
            raise ContextError(
                f"prompt of {len(ids)} tokens leaves no room in max_context={self.rt.max_context}"
                f" (session at {self.rt.max_context - room}); raise max_context or shorten the "
                "prompt"
            )
        sess = session or self.session()
        try:
            drafts = draft_source or (MtpDrafts() if self.rt.mtp else None)
            gen = Generation(
                self, sess, params, thinking, stream, cancel, prompt_logprobs, stream_logprobs,
                drafts,
            )  # fmt: skip
            return gen.run(ids)
        finally:
            if session is None:  # ours: give its state slot back now
                sess.close()


class Session:
    """One sequence: preallocated decode state plus the position reached.

    With CUDA graphs the state is a slot of the engine's arena (rt.max_sessions of them): a
    session holds its slot until `close()` or until it is garbage-collected."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = SessionState(engine.cfg, engine.rt, engine.layers, arena=engine.arena)
        self._finalizer = weakref.finalize(self, self.state.arena.release, self.state.slot)
        self.tokens: list[int] = []  # every id this sequence has consumed, in order
        self._chunk_cap = engine.rt.prefill_chunk  # halved when a chunk runs out of memory
        self._layer_major = True  # off when a group of chunks runs out of memory
        self._mtp = MtpTrack(engine) if engine.mtp is not None else None

    def close(self) -> None:
        """Give the state slot back; the session cannot be used afterwards."""
        self._finalizer()
        self.state = None  # type: ignore[assignment]

    @property
    def pos(self) -> int:
        return self.state.pos

    def reset(self) -> None:
        self.state.reset()
        self.tokens.clear()
        if self._mtp is not None:
            self._mtp.reset()

    def snapshot(self) -> tuple:
        """What `rollback` needs to undo the tokens consumed after this point (speculative
        decoding: the window rings, the compressors' partial blocks and overlap halves, the
        position; compressed entries written past it stay masked until rewritten)."""
        mtp_pos = self._mtp.main_pos if self._mtp is not None else 0
        return self.state.save(), self.state.pos, len(self.tokens), mtp_pos

    def rollback(self, snap: tuple) -> None:
        """Back to a `snapshot` of this session (taken since its last rollback or reset)."""
        saved, pos, n, mtp_pos = snap
        self.state.restore(saved)
        self.state.pos = pos
        del self.tokens[n:]
        if self._mtp is not None:
            self._mtp.rewind(mtp_pos)

    def truncate(self, snap: tuple, keep: int) -> bool:
        """Keep only the first `keep` tokens consumed since a `snapshot` of this session, in
        place: the rows the later ones wrote come back from the snapshot
        (`SessionState.undo_positions`), without consuming the kept ones again. False, with
        nothing changed, when the tokens since the snapshot outnumber a ring's rows (then
        `rollback` and feed the kept tokens again)."""
        saved, pos, n, mtp_pos = snap
        if keep < 0 or pos + keep > self.state.pos:
            raise ValueError(f"truncate: keep {keep} of {self.state.pos - pos} tokens")
        if not self.state.undo_positions(saved, pos, pos + keep, self.state.pos):
            return False
        self.state.pos = pos + keep
        del self.tokens[n + keep :]
        if self._mtp is not None:
            self._mtp.rewind(mtp_pos + keep)
        return True

    def mtp_logits(self, next_token: int) -> torch.Tensor:
        """The MTP block's logits float32 [vocab] for the token after `next_token`: from the main
        model's final streams at the last consumed position and `next_token` (the token that
        follows it). Each call advances the block's window by one position: a second call
        before the next forward chains, on the previous call's output (a chain of drafts).
        Needs an engine loaded with mtp >= 1."""
        if self._mtp is None:
            raise ValueError("mtp_logits needs the MTP block: load the model with mtp=1")
        if self.state is None:
            raise ValueError("this session is closed")
        V = self.engine.cfg.vocab_size
        if not 0 <= int(next_token) < V:
            raise ValueError(f"token id {next_token} is outside [0, {V})")
        with torch.inference_mode():
            return self._mtp.logits(int(next_token), self.tokens)

    def forward(
        self, token_ids: Sequence[int] | torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """Feed any number of tokens at the current position -> float32 logits [T, vocab].

        Long inputs run in chunks of `prefill_chunk`; `last_only` returns just [1, vocab].
        """
        eng = self.engine
        id_list = self._checked(token_ids, "forward")
        T = len(id_list)
        if T == 1:  # decode: the capture-safe step (CUDA graphs when on)
            with torch.inference_mode():
                logits = eng.runner.decode(id_list[0], self.state)
                if self._mtp is not None:  # the final streams the step left in its buffer
                    self._mtp.observe(eng.runner.buf.X)
            self.tokens.append(id_list[0])
            return logits[None]
        ids = torch.tensor(id_list, dtype=torch.long, device=eng.rt.device)
        outs = []
        chunk = min(eng.rt.prefill_chunk, self._chunk_cap)
        bar = tqdm(
            total=T, desc="prefill", unit="tok", leave=False, disable=not eng.progress or T <= chunk
        )
        a = 0
        with torch.inference_mode(), bar:
            while a < T:
                # A group of chunks passes the model layer by layer (`Runner.steps`).
                group = max(eng.rt.prefill_group or 0, chunk) if self._layer_major else chunk
                n = min(group, T - a)
                bounds = [(b, min(b + chunk, a + n)) for b in range(a, a + n, chunk)]
                saved = self.state.save() if n > 1 else None
                pos0 = self.state.pos
                if len(bounds) > 1 and torch.cuda.is_available():
                    # A group holds its chunks' streams for the whole pass, among the
                    # layers' large scratch: start it from an allocator without the blocks
                    # earlier prompts of other lengths left cached (at 24 GiB a 16K group
                    # once ran out of memory after 256- and 4K-token prompts, having fit
                    # after 4K-token prompts alone). Freeing cached blocks costs ~ms.
                    torch.cuda.empty_cache()
                try:
                    Xs = eng.runner.steps([(ids[b:e], id_list[b:e]) for b, e in bounds], self.state)
                except torch.OutOfMemoryError:
                    if (n <= MIN_PREFILL_CHUNK and len(bounds) == 1) or saved is None:
                        raise
                    # The activations did not fit: put back the state the failed step had
                    # started to change, and go on chunk by chunk, then in halves (for this
                    # session from now on).
                    self.state.restore(saved)
                    self.state.pos = pos0
                    del saved
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if len(bounds) > 1:
                        self._layer_major = False
                        what = f"{len(bounds)} chunks of {chunk} tokens prefilled layer by layer"
                        then = "chunk by chunk"
                    else:
                        chunk = self._chunk_cap = max(n // 2, MIN_PREFILL_CHUNK)
                        what, then = f"a chunk of {n} tokens", f"with {chunk}-token chunks"
                    warnings.warn(
                        f"prefill: {what} ran out of GPU memory; continuing {then} (the "
                        "memory plan should have prevented this: please report it; "
                        "--prefill-chunk / --prefill-group set where it starts)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                for (b, e), X in zip(bounds, Xs, strict=True):
                    self.tokens.extend(id_list[b:e])
                    if self._mtp is not None:
                        self._mtp.observe(X)
                    if not last_only or e == T:
                        outs.append(eng.runner.head(X[-1:] if last_only else X))
                a += n
                bar.update(n)
                # Drop the streams [n, N, D] and the undo record now: held until the next
                # step returned, they would add to its peak (the plan counts one set).
                del Xs, X, saved
        return torch.cat(outs)

    def verify(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed 1 to 4 tokens as one step of the decode pieces -> float32 logits [T, vocab]
        (speculative decoding's verify step). Each row is what feeding the tokens one at a time
        with `decode` gives, bitwise unless decode's CPU lane or a pool too small for a layer's
        experts rounds a routed sum differently (`Runner.verify`); the step syncs once per
        layer for all tokens and loads each layer's experts once for all of them. CUDA graphs
        when on."""
        id_list = self._checked(token_ids, "verify")
        if len(id_list) == 1:  # the decode step itself
            return self.forward(id_list)
        with torch.inference_mode():
            logits, finals = self.engine.runner.verify(id_list, self.state)
            if self._mtp is not None:
                self._mtp.observe(finals)
        self.tokens.extend(id_list)
        return logits

    def _checked(self, token_ids: Sequence[int] | torch.Tensor, what: str) -> list[int]:
        """The ids as ints, checked: the session open, at least one, in the vocabulary, within
        max_context."""
        eng = self.engine
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        if self.state is None:
            raise ValueError("this session is closed")
        id_list = [int(t) for t in token_ids]
        T = len(id_list)
        if T == 0:
            raise ValueError(f"{what}() needs at least one token id")
        V = eng.cfg.vocab_size
        bad = [i for i, t in enumerate(id_list) if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {id_list[bad[0]]} at index {bad[0]} is outside [0, {V})")
        if self.state.pos + T > eng.rt.max_context:
            raise ContextError(
                f"sequence would reach {self.state.pos + T} tokens (at {self.state.pos}, +{T}); "
                f"max_context is {eng.rt.max_context}: raise max_context or shorten the prompt"
            )
        return id_list

    def decode(self, token_id: int) -> torch.Tensor:
        """One token -> float32 logits [vocab]."""
        return self.forward([int(token_id)])[0]


def _load_tokenizer(path: Path) -> object | None:
    try:
        from homeseek.tokenizer import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_dir(path)


def _record_copier() -> Callable[[list[tuple[torch.Tensor, torch.Tensor]]], None] | None:
    """The CPU kernel library's parallel copy, for the expert store's reads of the tier below
    the host cache; None where it does not build (the store's reader threads then do them)."""
    from homeseek.kernels.cpu_experts import CpuExperts, available

    if not available()[0]:
        return None
    return CpuExperts(threads=READER_THREADS).copy


def load(
    path_or_preset: str | os.PathLike = "tiny",
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    gpu_mem_gb: float | None = None,
    host_mem_gb: float | None = None,
    max_context: int | None = 32768,
    quant_sim: bool = True,
    graphs: bool | None = None,
    max_sessions: int = 1,
    mtp: int = 0,
    progress: bool = False,
    expert_slots: int | None = None,
    eviction: str = "lrfu",
    hot_profile: str | None = None,
    kernels: bool = True,
    prefill_chunk: int | None = None,
    prefill_group: int | None = None,
    cpu_lane: str = "auto",
    cpu_threads: int | None = None,
    prefetch: bool = True,
) -> Engine:
    """Load a checkpoint directory or a preset ("tiny") -> Engine (docs/engine.md §3).

    prefill_chunk: tokens per prefill chunk; None takes HOMESEEK_PREFILL_CHUNK, else derives it
    from the GPU budget (homeseek.plan); one that does not fit the budget is a ConfigError.
    prefill_group: tokens of a prompt prefilled layer by layer (each expert moves once per
    group, not once per chunk; the plan reserves the other chunks' streams and pending A); 0:
    chunk by chunk; None takes HOMESEEK_PREFILL_GROUP, else on CUDA the plan derives it
    (plan.derive_group) and elsewhere goes chunk by chunk.
    cpu_lane: "auto" / "on" / "off": compute some of a decode layer's missed experts on the CPU
    (homeseek/cpu_lane.py) with cpu_threads threads. prefetch: start copying the next layer's
    experts early (decode: those its router predicts from this layer's input; prefill: all of
    them, for chunks that use nearly all)."""
    rt = RuntimeConfig.build(
        device=device,
        dtype=dtype,
        gpu_mem_gb=gpu_mem_gb,
        host_mem_gb=host_mem_gb,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        prefill_group=prefill_group,
        quant_sim=quant_sim,
        graphs=graphs,
        max_sessions=max_sessions,
        mtp=mtp,
        expert_slots=expert_slots,
        eviction=eviction,
        hot_profile=hot_profile,
        kernels=kernels,
        cpu_lane=cpu_lane,
        cpu_threads=cpu_threads,
        prefetch=prefetch,
    )
    return Engine(resolve_model(path_or_preset), rt, progress=progress)


__all__ = ["Engine", "Session", "load", "ContextError", "GenerationResult", "QWeight"]
