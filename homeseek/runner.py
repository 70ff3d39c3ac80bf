"""The step: per layer segment A, the scheduler, the routed experts, segment B (docs/runtime.md).

The runner owns how a step is launched; the model owns the math, the scheduler owns which
experts are resident. Two paths:

- `step(ids, state)`: any number of tokens (prefill), eager, the functions of model.py.
- `decode(token, state)`: one token, the capture-safe functions of decode.py over static
  buffers. On CUDA with graphs on, each piece is a CUDA graph: `embed`; per layer and position
  bucket `A` (the previous layer's mHC post, then attention + mHC + router + shared expert; it
  also looks the chosen experts up in the store's device slot map); `B` (the routed experts as
  the slot map has them, launched before the host has seen the ids); `E` (a wave of experts
  from a slot table the host wrote); `H` (the last mHC post and the head). B, E and H serve
  every layer: they read the runner's static buffers. Between B and the next A the scheduler
  reads the layer's expert ids from a pinned buffer A wrote; when B had them all, that is all
  the host does while the GPU runs B. Otherwise it makes the misses resident and E runs the
  layer's experts again from its table, so the sum never depends on what was resident. With
  graphs off the same functions run eagerly (`graphs=False`, and always on CPU).
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from homeseek import compile as C
from homeseek import decode as D
from homeseek import model as M
from homeseek.config import ModelConfig, RuntimeConfig
from homeseek.experts import PinnedRing, device_view
from homeseek.graphs import GraphedStep, GraphPool
from homeseek.kernels import ops
from homeseek.scheduler import Scheduler
from homeseek.state import SessionState, StateArena

if TYPE_CHECKING:
    from homeseek.profiler import DecodeRecorder


# Tokens one multi-token step (`Runner.verify`) takes: speculative decoding's token and its
# drafts (at most 3, RuntimeConfig.mtp).
VERIFY_MAX = 4
# A chunk's expert ids being copied to pinned host memory, and the event after the copy
# (`_ids_to_host`).
IdsHost = tuple[torch.Tensor, torch.cuda.Event]
# Buffers of the chunks' ids ring (at least): a layer queues every chunk of a group's ids
# before the host reads the first, so the ring holds a buffer per chunk (`steps` grows it).
IDS_RING = 16
# The GIL's switch interval while a step runs (seconds; Python's default is 0.005). A prefill
# step runs Python on three threads: this one queueing kernels, the loads' thread queueing
# record copies (`ExpertStore._load_behind`) and the reads-ahead thread; decode with the CPU
# lane, on two (the lane's worker starts and ends each job in Python; the verify step of
# speculative decoding has no lane). A thread that gives
# the GIL up inside a call (every torch op does) takes it back only if it wins the race for
# it, else once the interval has passed; so the thread on the GPU's critical path could wait
# up to 5 ms per op while the loads' thread queued copies (session 17's layer timeline: the
# main thread took 11-40 ms to queue one layer's few kernels, while that thread queued), and
# a lane job could wait as long to start while this thread scheduled.
SWITCH_INTERVAL = 0.0005
# How the CPU lane's sum reaches a decode layer's expert kernel (`Runner.lane_handoff`).
LANE_HANDOFFS = ("host", "gpu")


class _SwitchInterval:
    """The process's GIL switch interval lowered while any step that asks runs (steps of
    several engines or threads may overlap): Python's is saved by the first to enter and put
    back by the last to leave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = 0.0

    @contextlib.contextmanager
    def lowered(self, interval: float | None) -> Iterator[None]:
        if interval is None:
            yield
            return
        with self._lock:
            now = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, now))  # a bad value raises here, nothing held
            if self._depth == 0:
                self._saved = now
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    sys.setswitchinterval(self._saved)


_SWITCH = _SwitchInterval()


@dataclass
class DecodeBuffers:
    """Static tensors of the decode step: every graph reads and writes these, so graphs can be
    captured in any order and any graph's scratch may be reused by another."""

    live: torch.Tensor  # uint8 on the device: every buffer below up to `logits` is a view of it
    index: torch.Tensor  # [3] int64 (token, position, slot) on the device
    X: torch.Tensor  # [1, N, D] residual streams between layers
    Xa: torch.Tensor  # [1, N, D] streams after the attention sublayer (A -> B)
    u: torch.Tensor  # [1, D] normalised FFN input
    post: torch.Tensor  # [1, N] fp32
    comb: torch.Tensor  # [1, N, N] fp32
    sel: torch.Tensor  # [1, K] int64 expert ids (device)
    weights: torch.Tensor  # [1, K] fp32 routing weights
    shared: torch.Tensor  # [1, D] shared-expert output
    acc: torch.Tensor  # [1, D] scratch of a wave that adds to `moe` (kernels)
    acc_f32: torch.Tensor  # [1, D] fp32 routed experts so far (reference path)
    moe: torch.Tensor  # [1, D] routed + shared experts: the FFN output mHC post reads
    slots: torch.Tensor  # [1, K] int32 slot table (device): from the slot map, or the host
    # The CPU lane's sum on the device (homeseek/cpu_lane.py), and shared + that sum in fp32.
    cpu_part: torch.Tensor  # [1, D] fp32
    shared_f32: torch.Tensor  # [1, D] fp32
    # The next layer's experts as its router would pick them from this layer's input (the
    # decode prefetch).
    pred: torch.Tensor  # [1, K] int64
    logits: torch.Tensor  # [1, V] fp32
    # Pinned on CUDA: what the host writes (the step's index) and reads (the ids, the
    # prediction, the CPU lane's input and weights, which A copies there when the lane is on).
    host_index: torch.Tensor  # [3] int64
    pred_host: torch.Tensor  # [1, K] int64
    u_host: torch.Tensor  # [1, D]
    weights_host: torch.Tensor  # [1, K] fp32

    @classmethod
    def build(cls, cfg: ModelConfig, rt: RuntimeConfig) -> DecodeBuffers:
        dev, dt = rt.device, rt.dtype
        N, Dm, K = cfg.hc_mult, cfg.hidden_size, cfg.num_experts_per_tok
        f32, i64 = torch.float32, torch.long
        # The buffers one token carries from graph to graph of a step: views of one flat
        # buffer, so a multi-token step parks one token's set in a bank row and brings back
        # another's with one copy each (`Runner._switch`).
        live_spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "index": ((3,), i64), "X": ((1, N, Dm), dt), "Xa": ((1, N, Dm), dt),
            "u": ((1, Dm), dt), "post": ((1, N), f32), "comb": ((1, N, N), f32),
            "sel": ((1, K), i64), "weights": ((1, K), f32), "shared": ((1, Dm), dt),
            "acc": ((1, Dm), dt), "acc_f32": ((1, Dm), f32), "moe": ((1, Dm), dt),
            "slots": ((1, K), torch.int32), "cpu_part": ((1, Dm), f32),
            "shared_f32": ((1, Dm), f32), "pred": ((1, K), i64),
        }  # fmt: skip
        size = {k: math.prod(shape) * d.itemsize for k, (shape, d) in live_spec.items()}
        # Each view starts on a 16-byte boundary (any dtype's alignment, vector loads).
        start, n = {}, 0
        for k in live_spec:
            start[k], n = n, n + -(-size[k] // 16) * 16
        live = torch.zeros(n, dtype=torch.uint8, device=dev)
        views = {
            k: live[start[k] : start[k] + size[k]].view(d).view(shape)
            for k, (shape, d) in live_spec.items()
        }
        views["slots"].fill_(-1)
        pin = torch.cuda.is_available() and str(dev).startswith("cuda")
        return cls(
            live=live,
            **views,
            logits=torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=dev),
            host_index=torch.zeros(3, dtype=torch.long, pin_memory=pin),
            pred_host=torch.zeros(1, K, dtype=torch.long, pin_memory=pin),
            u_host=torch.zeros(1, Dm, dtype=dt, pin_memory=pin),
            weights_host=torch.zeros(1, K, dtype=torch.float32, pin_memory=pin),
        )


class Runner:
    """Runs steps of one sequence over the loaded weights."""

    def __init__(
        self,
        cfg: ModelConfig,
        rt: RuntimeConfig,
        ctx: M.Ctx,
        top: dict[str, torch.Tensor],
        weights: list[M.LayerWeights],
        rope: M.RopeTables,
        scheduler: Scheduler,
        arena: StateArena | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        """arena: the shared session state the graphs index by slot (graphs on); None runs the
        decode step eagerly over each session's own state. report: where a step that captured
        graphs says how many and how long (the CLI prints it)."""
        self.cfg, self.rt = cfg, rt
        self.top, self.weights, self.rope = top, weights, rope
        on_cuda = str(rt.device).startswith("cuda")
        self.ctx = ctx
        # The decode experts' scratch (one token's K pairs), built once and reused by every
        # launch on the compute stream (its counters are left at zero); without it each launch
        # allocates its own and zero-fills the counters, two more kernels per layer.
        self.fp4_ws = None
        if ctx.kernels and on_cuda:
            from homeseek.kernels.fp4_experts import fp4_experts_workspace

            self.fp4_ws = fp4_experts_workspace(
                cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size, rt.dtype,
                rt.device,
            )  # fmt: skip
        self.scheduler = scheduler
        self.layers = list(range(len(weights)))
        self.arena = arena
        self.report = report
        self.buf = DecodeBuffers.build(cfg, rt)
        b = self.buf
        self.ix = D.DecodeIndex(ids=b.index[0:1], pos=b.index[1:2], slot=b.index[2:3])
        self.pool = GraphPool(rt.device) if (rt.graphs and on_cuda) else None
        self.graphs = GraphedStep(self.pool, enabled=self.pool is not None)
        self._sel_ready = torch.cuda.Event() if on_cuda else None
        # Each layer's A copies its expert ids into its own pinned row, so that a layer whose ids
        # the host reads only after the next A is queued (`_resident_layer`) finds them intact.
        self._sel_rows = torch.zeros(
            len(weights), 1, cfg.num_experts_per_tok, dtype=torch.long, pin_memory=on_cuda
        )
        # Decode: True lets a layer whose experts are all on the device (and nothing to predict)
        # run B and the host queue the next A before it reads the ids; False: the host waits for
        # them first, as every layer with misses does. Off until measured on a GPU
        # (tools/decode_ab.py --switch resident-no-wait --layers 36 --resident; its GPU test is
        # test_resident_layers_do_not_wait_for_their_ids).
        self.resident_no_wait = False
        K = cfg.num_experts_per_tok
        # int64: with the store's `zero_copy` a cast kernel reads them in place (`_write_slots`)
        self._slot_stage = (
            [torch.zeros(VERIFY_MAX, K, dtype=torch.long, pin_memory=True) for _ in range(2)]
            if on_cuda else []
        )  # fmt: skip
        self._stage_np = [t.numpy() for t in self._slot_stage]
        self._stage_view = [device_view(t, rt.device) for t in self._slot_stage]
        self._stage_events: list[torch.cuda.Event | None] = [None, None]
        self._stage_i = 0
        self._stream: torch.cuda.Stream | None = None  # the step's compute stream (CUDA)
        self.capture_s = 0.0  # wall seconds spent capturing graphs (warm-up included)
        # A multi-token step (`verify`): each token's live buffers parked in a bank row while
        # another token's are live; the steps' indices (pinned) and expert ids (device, pinned)
        # and slot tables (device) of all its tokens.
        self.bank = torch.zeros(VERIFY_MAX, b.live.numel(), dtype=torch.uint8, device=rt.device)
        self._live: int | None = None  # the token whose buffers are live in a verify step
        self._v_index = torch.zeros(VERIFY_MAX, 3, dtype=torch.long, pin_memory=on_cuda)
        self._v_index_copied: torch.cuda.Event | None = None
        self._v_sel = torch.zeros(VERIFY_MAX, K, dtype=torch.long, device=rt.device)
        self._v_sel_host = torch.zeros(VERIFY_MAX, K, dtype=torch.long, pin_memory=on_cuda)
        self._v_slots = torch.full((VERIFY_MAX, K), -1, dtype=torch.int32, device=rt.device)
        self.verify_steps = 0
        self.verify_tokens = 0
        # Decode layers whose experts B ran whole (all resident when A looked), and the others
        # (E reran them from the host's table once the misses were resident).
        self.layers_b = 0
        self.layers_e = 0
        self.layers_no_wait = 0  # of layers_b: the host queued the next A before reading the ids
        self.recorder: DecodeRecorder | None = None  # `homeseek profile --decode` sets it
        # Prefill queues every chunk's A of a layer, each chunk's ids copied to the host early,
        # before their experts (`steps`); False: chunk after chunk, each chunk's ids read with
        # `.cpu()`, as before session 15 (tools/prefill_profile.py --group-order measures the two
        # in one process).
        self.a_first = True
        # The buffers the chunks' ids are copied into (`_ids_to_host`): one per chunk of a group
        # at least, so a buffer comes round again only once the host has read its ids.
        self._ids_ring = PinnedRing(IDS_RING, pin=on_cuda)
        # The GIL's switch interval during `steps` and `decode` (None: Python's own;
        # tools/prefill_profile.py --switch-interval and tools/decode_ab.py --switch
        # switch-interval measure the two in one process).
        self.switch_interval: float | None = SWITCH_INTERVAL
        # Decode: True queues a layer's prediction of the next layer's experts behind its own
        # copies, before its E; False (kept: measured no faster, 39.7 against 38.1 ms a token,
        # session 16) after the next A is queued (tools/decode_ab.py --switch early-prediction
        # measures the two in one process).
        self.early_prediction = False
        # A copies the experts' input to the host for the CPU lane when the engine has one
        # (decided once: the A graphs hold the copies; `scheduler.lane = None` then turns the
        # lane off without recapture, as the bench's copy-only rows do).
        self.lane_inputs = scheduler.lane is not None and ctx.kernels
        # How the CPU lane's sum reaches a layer's expert kernel: "host" (the host waits for
        # the lane's job, then copies the sum) or "gpu" (the compute stream waits for it,
        # `ops.await_copy`, and the host goes on queueing; the jobs' errors are raised at the
        # step's end). tools/decode_ab.py --switch lane-handoff measures the two.
        self._lane_handoff = "host"
        self._lane_jobs: list[Future[torch.Tensor]] = []
        # A also predicts the next layer's experts (its router on this layer's expert input)
        # so their copies start while this layer computes (`Scheduler.prefetch_predicted`).
        self.predict = scheduler.prefetch and ctx.kernels and on_cuda
        if ctx.kernels:
            C.configure()

    # --- prefill (and any T) -------------------------------------------------------------------
    def step(self, ids: torch.Tensor, id_list: list[int], state: SessionState) -> torch.Tensor:
        """ids [T] at the state's position -> the final streams [T, N, D]; advances the state."""
        return self.steps([(ids, id_list)], state)[0]

    def steps(
        self, chunks: Sequence[tuple[torch.Tensor, list[int]]], state: SessionState
    ) -> list[torch.Tensor]:
        """Consecutive chunks (ids [n_c] and their list) at the state's position, layer by layer:
        every chunk passes a layer before the next layer starts, so a layer's experts load once
        for all of them (chunk by chunk they load once per chunk) -> each chunk's final streams
        [n_c, N, D]; advances the state. The same math as `step` on each chunk in turn: all a
        chunk reads of a layer's state is what the earlier chunks wrote at that layer. Every
        step of more than one token (a prompt's chunks) runs with the GIL's switch interval
        at most `switch_interval`; Python's is put back after the last such step."""
        with _SWITCH.lowered(self.switch_interval):
            return self._steps(chunks, state)

    def _steps(
        self, chunks: Sequence[tuple[torch.Tensor, list[int]]], state: SessionState
    ) -> list[torch.Tensor]:
        starts, s = [], state.pos
        for ids, _ in chunks:
            starts.append(s)
            s += ids.shape[0]
        self.scheduler.begin_step([t for _, id_list in chunks for t in id_list])
        X = [M.embed(ids, self.top["embed"], self.ctx) for ids, _ in chunks]
        pos = [
            torch.arange(a, a + ids.shape[0], device=ids.device)
            for (ids, _), a in zip(chunks, starts, strict=True)
        ]
        # A buffer per chunk: a layer's ids are all queued before the host reads the first.
        self._ids_ring.at_least(len(chunks))
        ring = self._ids_ring if self.scheduler.pinned_rings else None
        try:
            n = len(chunks)
            for layer in self.layers:
                if not self.a_first:  # chunk after chunk (the order before session 15)
                    for c in range(n):
                        self._chunk_b(c, self._chunk_a(c, layer, X, chunks, pos, starts, state),
                                      layer, X, n, starts)  # fmt: skip
                    continue
                # Every chunk's A is queued, each followed by the copy of its expert ids to the
                # host, before the first chunk's ids are waited for: chunk c's attention reads
                # only what chunks < c wrote at this layer, never their experts' output. A
                # chunk's ids then arrive while the GPU runs the later chunks' A (and the
                # earlier chunks' experts), so the GPU's queue is not drained at each chunk's
                # ids: read with `.cpu()` in stream order, they waited for the chunk before's
                # experts, the GPU idled while the host scheduled and launched the next, and
                # the copy thread waited with the host (docs/runtime.md). The pending chunks
                # are counted by plan.group_stream_bytes.
                pend: list[tuple[M.FfnPending, IdsHost | None] | None] = []
                for c in range(n):
                    p = self._chunk_a(c, layer, X, chunks, pos, starts, state)
                    X[c] = p.X  # the old streams are no longer needed
                    pend.append((p, _ids_to_host(p.sel, ring)))
                for c in range(n):
                    item, pend[c] = pend[c], None
                    assert item is not None
                    self._chunk_b(c, item[0], layer, X, n, starts, item[1])
        except BaseException:
            # Loads and reads ahead still running must not overlap a retry's (an out-of-memory
            # group is undone and run again): let them finish; the step's error is the one.
            with contextlib.suppress(Exception):
                self.scheduler.store.join_loads()
            raise
        state.pos = s
        # Loads started for experts no token asked for are still running: finish them here, so
        # an error of theirs surfaces in this step and not in a later one.
        self.scheduler.store.join_loads()
        return X

    def _chunk_a(
        self,
        c: int,
        layer: int,
        X: list[torch.Tensor],
        chunks: Sequence[tuple[torch.Tensor, list[int]]],
        pos: list[torch.Tensor],
        starts: list[int],
        state: SessionState,
    ) -> M.FfnPending:
        """`steps`: segment A of chunk c at `layer`."""
        with self._gpu_span("A", layer):
            return M.segment_a(
                X[c], chunks[c][0], pos[c], starts[c], self.weights[layer],
                state.layers[layer], layer, self.rope, self.ctx,
            )  # fmt: skip

    def _chunk_b(
        self,
        c: int,
        p: M.FfnPending,
        layer: int,
        X: list[torch.Tensor],
        n: int,
        starts: list[int],
        ids_host: IdsHost | None = None,
    ) -> None:
        """`steps`: chunk c's experts and segment B at `layer` (of n chunks) into X[c]."""
        more = c + 1 < n  # later chunks of the group use this layer
        moe = self.moe(p, layer, starts[c] - starts[0], more, ids_host)
        with self._gpu_span("B", layer):
            X[c] = M.segment_b(p, moe, self.ctx)

    def _gpu_span(self, what: str, layer: int) -> contextlib.AbstractContextManager[None]:
        """The compute stream's span of the work queued inside, in a prefill's layer timeline
        when one is traced (tools/prefill_profile.py --layers; `Timeline.gpu`)."""
        tl = self.scheduler.store.timeline
        return tl.gpu(what, layer) if tl is not None else contextlib.nullcontext()

    def head(self, X: torch.Tensor) -> torch.Tensor:
        return M.head_logits(X, self.top, self.ctx)

    def _predicted(self, layer: int) -> int | None:
        """The layer whose experts decode predicts after `layer`'s A: the next main layer,
        unless it routes by hash (known at step start) or prediction is off."""
        nxt = self._following(layer)
        if not self.predict or nxt is None or self.cfg.is_hash_layer(nxt):
            return None
        return nxt

    def _following(self, layer: int) -> int | None:
        """The main layer after `layer` (None after the last, and for the MTP block)."""
        return layer + 1 if layer + 1 < len(self.layers) else None

    def mtp_step(
        self,
        X_L: torch.Tensor,
        ids: torch.Tensor,
        state: SessionState,
        mw: M.LayerWeights,
        mtop: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block (eager) at the state's position: the main model's final streams X_L
        [T, N, D] and the ids of the next tokens [T] -> (logits for the tokens after those
        [T, V] fp32, the block's output streams [T, N, D]); advances the state."""
        L = self.cfg.num_hidden_layers  # the MTP block's layer id (its experts' key in the store)
        pos = torch.arange(state.pos, state.pos + ids.shape[0], device=ids.device)
        X = M.mtp_input(X_L, ids, mw, self.top["embed"], self.ctx)
        p = M.segment_a(X, ids, pos, state.pos, mw, state.layers[L], L, self.rope, self.ctx)
        X = M.segment_b(p, self.moe(p, L), self.ctx)
        state.pos += ids.shape[0]
        return M.head_logits(X, mtop, self.ctx), X

    def moe(
        self,
        p: M.FfnPending,
        layer: int,
        offset: int = 0,
        more: bool = False,
        ids_host: IdsHost | None = None,
    ) -> torch.Tensor:
        """Routed experts + shared expert of one layer -> [T, D] in the activation dtype.
        `offset`: where these tokens start in the step (a routing override's row); `more`:
        later chunks of the step use this layer too (`Scheduler.layer`); `ids_host`: p.sel
        being copied to the host (`_ids_to_host`), read from there.

        CUDA: the FP4 kernel reads the slot pool through a slot table. CPU: the reference loop,
        experts in id order, so the sum is bitwise the same for any pool size or wave split.
        """
        store = self.scheduler.store
        fused = self.ctx.kernels
        out = p.shared if fused else None
        acc = None if fused else torch.zeros_like(p.u, dtype=torch.float32)
        following = self._following(layer)
        sel, ready = ids_host if ids_host is not None else (p.sel, None)
        waves = self.scheduler.layer(layer, sel, following, offset=offset, more=more, ready=ready)
        on_device = fused and ids_host is not None and self.scheduler.device_routed(layer)
        if on_device:
            # Every expert of the layer is in the device slot map (a pool that holds the model,
            # or this layer whole): the expert kernel looks its slots up there and is queued
            # now, before the host has the ids, so the GPU runs it right after A instead of
            # idling while the host waits for the ids and schedules (~1 ms a layer of a resident
            # 4K prefill, session 19). The host's bookkeeping follows (the waves below, run for
            # it alone): every lookup of the layer hits, and what it starts (the next layer's
            # copies) waits for this kernel wherever it refills a slot, as after any layer.
            slots = store.slot_map[layer].index_select(0, p.sel.view(-1)).view(p.sel.shape)
            out = self._wave(p, slots, out, layer)
        for sel, slot_of, _last in waves:
            if on_device:
                continue
            if fused:
                slots = self.scheduler.slot_table(sel, slot_of, p.u.device)
                out = self._wave(p, slots, out, layer)
            else:
                self._ref_experts(p.u, sel, p.weights, slot_of, acc)
        if fused:
            return out
        return (acc + p.shared.float()).to(p.u.dtype)

    def _wave(
        self, p: M.FfnPending, slots: torch.Tensor, out: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """A step's routed experts of one wave (slots [T, K], -1: not in it) from the FP4 slot
        pool, added to out -> the sum."""
        t = self.scheduler.store.pool.t
        with self._gpu_span("E", layer):
            return ops.fp4_experts(
                p.u, slots, p.weights, out, t["w13_q"], t["w13_s"], t["w2_q"], t["w2_s"],
                self.cfg.swiglu_limit, act_quant=self.rt.quant_sim,
            )  # fmt: skip

    # --- decode (T = 1) ------------------------------------------------------------------------
    def decode(self, token: int, state: SessionState) -> torch.Tensor:
        """One token at the state's position -> fp32 logits [V] (a fresh tensor); advances.
        With the CPU lane on, runs with the GIL's switch interval at most `switch_interval`
        (as `steps`)."""
        # The fused glue compiles with the kernel path (CUDA), eager or captured alike, so the
        # graph path and the eager path run the same kernels.
        n0, t0, c0 = self.graphs.counters.captured, self.capture_s, C.compile_seconds()
        # Only the CPU lane's worker runs Python beside a decode step: without it there is no
        # one to hand the GIL to, and the process's interval is left alone.
        interval = self.switch_interval if self._lane_on() else None
        with C.use(self.ctx.kernels), _SWITCH.lowered(interval):
            out = self._decode(token, state)
        n = self.graphs.counters.captured - n0
        if n and self.report is not None:
            self.report(
                f"captured {n} CUDA graphs for position bucket "
                f"{D.bucket_of(state.pos - 1, state.max_context)} in {self.capture_s - t0:.1f} s "
                f"(torch.compile {C.compile_seconds() - c0:.1f} s of it)"
            )
        return out

    def _decode(self, token: int, state: SessionState) -> torch.Tensor:
        if self.pool is not None and state.arena is not self.arena:
            raise ValueError("decode: the session's state is not in this engine's arena")
        b, rec = self.buf, self.recorder
        if rec is not None:
            rec.begin_token()
        bucket = D.bucket_of(state.pos, state.max_context)
        b.host_index[0], b.host_index[1], b.host_index[2] = token, state.pos, state.slot
        # The previous step's copy of host_index has run: its layers' ids were read back after it.
        b.index.copy_(b.host_index, non_blocking=True)
        sched = self.scheduler
        sched.begin_step([token], prefetch_hash=False)
        self._stream = sched.store.compute  # events record on it without a lookup
        self._run(("embed",), self._embed)
        # Host work that the GPU need not wait for runs once the next A is queued (`_moe_layer`
        # returns it): the GPU computes A while the host does it. First, the hash layers' copies.
        later: tuple[int, Callable[[], None]] | None = (
            self.layers[0],
            lambda: sched.prefetch_hash([token]),
        )
        try:
            for layer in self.layers:
                self._run_a(layer, bucket, state)
                now, later = later, None
                self._run_later(now)
                with rec.layer(layer) if rec is not None else contextlib.nullcontext():
                    later = self._moe_layer(layer)
            self._run(("H",), self._h)
        except BaseException:
            # The deferred work still runs (a layer's hits counted, their slots' last use
            # noted) before the error leaves the step; an error of its own does not hide it.
            with contextlib.suppress(Exception):
                self._run_later(later)
            self._lane_results(raise_error=False)
            raise
        self._run_later(later)
        self._lane_results()
        if rec is not None:
            rec.end_token()
        state.pos += 1
        return b.logits[0].clone()

    @property
    def lane_handoff(self) -> str:
        return self._lane_handoff

    @lane_handoff.setter
    def lane_handoff(self, mode: str) -> None:
        if mode not in LANE_HANDOFFS:
            raise ValueError(
                f"lane_handoff must be one of {', '.join(LANE_HANDOFFS)}, got {mode!r}"
            )
        if mode == "gpu" and platform.machine().lower() not in ("x86_64", "amd64"):
            # the kernel's reads rely on the host storing the sum before the flag, in order
            raise ValueError(
                f"lane_handoff='gpu' needs an x86-64 host (store order), this is "
                f"{platform.machine()}: use 'host'"
            )
        self._lane_handoff = mode

    def _lane_results(self, raise_error: bool = True) -> None:
        """Wait for the CPU lane's jobs handed off on the GPU this step; raise the first error
        (a failed job's flag is still set, so the GPU went on, with stale sums), or say so if
        a job outlasted what the GPU's wait is sure to last (it may have passed NaN on)."""
        jobs, self._lane_jobs = self._lane_jobs, []
        errors = [e for j in jobs if (e := j.exception()) is not None]
        lane = self.scheduler.lane
        late = lane is not None and lane.handoff_late
        if late:
            lane.handoff_late = False  # with the "host" hand-off there was no GPU wait to outlast
        if late and jobs:
            errors.append(
                RuntimeError(
                    "a CPU lane job outlasted the GPU's wait for it (kernels/handoff.py): this "
                    "step's output is not valid"
                )
            )
        if errors and raise_error:
            raise errors[0]

    def _run_a(self, layer: int, bucket: int, state: SessionState) -> None:
        """Layer's A (attention, shared expert, router) for the live token, at its position
        bucket: its graph, captured first if new."""
        lw, st = self.weights[layer], state.arena.layers[layer]

        def seg_a() -> None:
            self._a(lw, st, layer, bucket)

        # A's warm-up runs before its capture rewrite X, Xa, post and comb (the previous layer's
        # mHC post reads what A then overwrites): put them back as well.
        b = self.buf
        keep = [b.X, b.Xa, b.post, b.comb] if layer != self.layers[0] else []
        restore = _non_idempotent(st) + keep
        self._run(("A", layer, bucket), seg_a, restore=restore, layer=layer)

    def _run_later(self, later: tuple[int, Callable[[], None]] | None) -> None:
        """Run a layer's deferred host work (`_moe_layer`), timed as that layer's."""
        if later is None:
            return
        layer, fn = later
        rec = self.recorder
        with rec.layer(layer) if rec is not None else contextlib.nullcontext():
            fn()

    def _moe_layer(self, layer: int) -> tuple[int, Callable[[], None]] | None:
        """After A: the experts if all are resident (B), else, once the host has the ids and
        has made the misses resident, all of them again (E, wave by wave).

        Returns the host work of a layer B served whole, to run once the next A is queued: its
        residency bookkeeping and the copies of the next layer's predicted experts. Until then
        nothing touches the store (the slots B reads stay as they are), and a copy into a slot
        still waits for its last use. A layer with misses queues the prediction's copies
        itself, behind its own."""
        b = self.buf
        kernels = self.ctx.kernels
        # B runs the experts from the slot map as A found it; it is launched before the host
        # reads the ids, so the GPU works while the scheduler checks them. When B found them
        # all, that is the layer's result. When it missed any, E recomputes all of them from
        # the host's slot table: the sum then never depends on what was resident (the same
        # tokens whatever the cache held). A routing override replaces the ids after A, so
        # then B is skipped.
        ahead = kernels and self.scheduler.routing is None
        nxt = self._predicted(layer)
        store = self.scheduler.store
        if (
            ahead
            and self.resident_no_wait
            and self._sel_ready is not None
            and not self._lane_on()
            and store.layer_on_device(layer)
            and (nxt is None or not self.scheduler.prefetch or store.layer_on_device(nxt))
        ):
            return self._resident_layer(layer)
        if self._sel_ready is not None:
            self._sel_ready.record(self._stream)
        if ahead:
            self._run(("B",), self._b, layer=layer)
            # What B found: the map as published when A read it (nothing changed it since).
            held = self.scheduler.store.published(layer)
        if self._sel_ready is not None:
            self._sel_ready.synchronize()  # the one host wait of the layer
        # Copies: the next A overwrites the pinned prediction (one row for every layer) before
        # the work deferred to after its launch reads it. The ids have a row per layer (cloned
        # all the same: cheap, and nothing the scheduler holds can change under it).
        sel_host = self._sel_rows[layer].clone()
        pred = b.pred_host[0].tolist() if nxt is not None and self.scheduler.prefetch else None
        whole = ahead and bool(held[sel_host[0].numpy()].all())
        if whole:
            self.layers_b += 1
        else:
            self.layers_e += kernels
            predicted = None
            if pred is not None:

                def predicted() -> None:
                    self.scheduler.prefetch_predicted(nxt, pred)

            # early: the next layer's predicted experts queued on the copy stream right behind
            # this layer's misses, before its E is launched (E waits for those misses anyway);
            # else after the next A is queued
            early = self.early_prediction
            self._experts_of(layer, sel_host, then=predicted if early else None)
            return None if early or predicted is None else (layer, predicted)

        def later() -> None:
            for _ in self.scheduler.layer(layer, sel_host):
                pass  # hits only: counted, protected, their last use noted
            if pred is not None:
                self.scheduler.prefetch_predicted(nxt, pred)

        return layer, later

    def _resident_layer(self, layer: int) -> tuple[int, Callable[[], None]]:
        """A layer whose experts are all in the device slot map (no update pending) and whose
        successor needs no prediction: B is the layer's result whatever its ids, so nothing
        waits for them. The host queues the next A at once, and reads the ids in the deferred
        work (which runs once that A is queued), so the GPU finds the next segment queued when B
        ends. Waiting first, the GPU idled between the segments while the host woke, checked the
        ids and launched the next graph (session 21: every expert resident, ~1.1 ms of a
        36-layer token was not GPU-busy; the share between segments not measured apart)."""
        ready = self._sel_ready
        assert ready is not None
        ready.record(self._stream)  # after A, whose last copies put the ids in their row
        self._run(("B",), self._b, layer=layer)
        self.layers_b += 1
        self.layers_no_wait += 1
        row = self._sel_rows[layer]

        def later() -> None:
            ready.synchronize()  # A's ids (long done: the next A is queued behind B by now)
            for _ in self.scheduler.layer(layer, row.clone()):
                pass  # hits only: counted, protected, their last use noted

        return layer, later

    def _lane_on(self) -> bool:
        """Whether decode's layers split their misses with the CPU lane now (built, its inputs
        copied by A, and not turned off)."""
        return self.scheduler.lane is not None and self.lane_inputs

    def _experts_of(
        self, layer: int, sel_host: torch.Tensor, then: Callable[[], None] | None = None
    ) -> None:
        """The layer's experts once the host has made them resident: E wave by wave (with the
        CPU lane's part in the first), or the reference experts (kernels off). `then`: host
        work run once the last wave's copies are queued, before its kernels (a layer is one
        wave unless the pool is smaller than its experts: then no wave's copies are evicted
        for it)."""
        b = self.buf
        first = True  # of the layer's waves: the first starts from `shared`, the rest add
        sched = self.scheduler
        lane_input = (b.u_host, b.weights_host) if self._lane_on() else None
        for sel, slot_of, last in sched.layer(layer, sel_host, lane_input=lane_input):
            if then is not None and last:
                then()
            if not self.ctx.kernels:
                with self._timed(("B", first), layer):
                    self._moe_ref(sel, slot_of, last)
            else:
                self._write_slots(sel, slot_of)
                job, sched.cpu_job = sched.cpu_job, None
                if job is not None:  # the CPU lane took some: its sum joins the GPU's
                    if self._lane_handoff == "gpu":
                        self._lane_jobs.append(job)  # waited for at the step's end
                        flag, seq, part = sched.lane.handoff()
                        ops.await_copy(flag, seq, part, b.cpu_part)
                    else:
                        b.cpu_part.copy_(job.result(), non_blocking=True)
                    sched.lane.sent(self._stream)
                    self._run(("E", False, "cpu"), self._e_cpu, [b.moe], layer=layer)
                else:
                    add = not first
                    self._run(("E", add), lambda add=add: self._e(add), [b.moe], layer=layer)
            first = False

    # --- a few tokens as one step of decode's pieces (speculative decoding's verify) ------------
    def verify(self, tokens: list[int], state: SessionState) -> tuple[torch.Tensor, torch.Tensor]:
        """1..VERIFY_MAX tokens at the state's position -> (fp32 logits [T, V], the final
        streams [T, N, D]); advances the state by T.

        Layer by layer: each token's A in order (token t reads the layer state t - 1 wrote, as
        T decode steps would), one host sync for all their ids, the union of their experts made
        resident once, then each token's experts (E); at the end each token's head. Every piece
        is decode's own graph (the same A per position bucket, E and H; nothing new is
        captured), so each row is what decoding the tokens one at a time gives: bitwise where
        decode computes a token's experts in one wave on the GPU, as verify does when the
        layer's union fits the pool (decode's CPU lane, or waves that split a token's experts
        differently, round the routed sum differently). Between pieces one token's live
        buffers are parked in a bank row and another's brought back."""
        T = len(tokens)
        if not 1 <= T <= VERIFY_MAX:
            raise ValueError(f"verify takes 1 to {VERIFY_MAX} tokens, got {T}")
        if self.pool is not None and state.arena is not self.arena:
            raise ValueError("verify: the session's state is not in this engine's arena")
        # The per-layer recorder (`homeseek profile --decode`) times single-token steps only.
        rec, self.recorder = self.recorder, None
        try:
            with C.use(self.ctx.kernels):
                return self._verify(tokens, state)
        finally:
            self.recorder = rec

    def _verify(self, tokens: list[int], state: SessionState) -> tuple[torch.Tensor, torch.Tensor]:
        b, sched, T, p0 = self.buf, self.scheduler, len(tokens), state.pos
        # The last step's copies out of these rows have run (a step that failed early may have
        # left them queued).
        if self._v_index_copied is not None:
            self._v_index_copied.synchronize()
        for t, tok in enumerate(tokens):
            self._v_index[t, 0], self._v_index[t, 1], self._v_index[t, 2] = tok, p0 + t, state.slot
        sched.begin_step(tokens, prefetch_hash=False)
        self._stream = sched.store.compute
        self._live = None
        for t in range(T):
            self._switch(t, fresh=True)
            b.index.copy_(self._v_index[t], non_blocking=True)
            self._run(("embed",), self._embed)
        if self._sel_ready is not None:
            self._v_index_copied = torch.cuda.Event()
            self._v_index_copied.record(self._stream)
        buckets = [D.bucket_of(p0 + t, state.max_context) for t in range(T)]
        for layer in self.layers:
            for t in range(T):  # in order: each token's attention reads what the last wrote
                self._switch(t)
                self._run_a(layer, buckets[t], state)
                self._v_sel[t].copy_(b.sel[0])
            self._v_sel_host[:T].copy_(self._v_sel[:T], non_blocking=True)
            if layer == self.layers[0]:  # the GPU has the first layer's work: start the copies
                sched.prefetch_hash(tokens)
            if self._sel_ready is not None:
                self._sel_ready.record(self._stream)
                self._sel_ready.synchronize()  # the one host wait of the layer
            self._verify_experts(layer, self._v_sel_host[:T].clone())
        V, N, Dm = self.cfg.vocab_size, self.cfg.hc_mult, self.cfg.hidden_size
        logits = torch.empty(T, V, dtype=torch.float32, device=b.logits.device)
        finals = torch.empty(T, N, Dm, dtype=b.X.dtype, device=b.X.device)
        for t in sorted(range(T), key=lambda t: t != self._live):  # the live token first
            self._switch(t)
            self._run(("H",), self._h)
            logits[t].copy_(b.logits[0])
            finals[t].copy_(b.X[0])
        state.pos += T
        self.verify_steps += 1
        self.verify_tokens += T
        return logits, finals

    def _verify_experts(self, layer: int, sel_host: torch.Tensor) -> None:
        """A verify step's layer: its tokens' experts sel_host [T, K] made resident, a wave at a
        time, and each token's E (or reference experts) over them."""
        b, sched, T = self.buf, self.scheduler, sel_host.shape[0]
        order = list(range(T))[::-1]  # the live token (the last A) first
        first = True  # of the layer's waves: the first starts from `shared`, the rest add
        for sel, slot_of, last in sched.layer(layer, sel_host):
            if self.ctx.kernels:
                self._write_slots(sel, slot_of, self._v_slots[:T])
            for t in order:
                self._switch(t)
                if not self.ctx.kernels:
                    self._moe_ref(sel[t : t + 1], slot_of, last)
                    continue
                b.slots.copy_(self._v_slots[t : t + 1])
                add = not first
                self._run(("E", add), lambda add=add: self._e(add), [b.moe], layer=layer)
            order.reverse()  # the next wave starts with the token now live
            first = False
        self.layers_e += self.ctx.kernels

    def _switch(self, t: int, fresh: bool = False) -> None:
        """Make token t's buffers live: park the live token's in its bank row, bring t's back
        (`fresh`: t has none yet)."""
        if self._live == t:
            return
        if self._live is not None:
            self.bank[self._live].copy_(self.buf.live)
        if not fresh:
            self.buf.live.copy_(self.bank[t])
        self._live = t

    def _timed(self, key: Hashable, layer: int) -> contextlib.AbstractContextManager[None]:
        rec = self.recorder
        return rec.segment(key, layer) if rec is not None else contextlib.nullcontext()

    def _run(
        self,
        key: Hashable,
        fn: Callable[[], None],
        restore: list[torch.Tensor] | None = None,
        layer: int = -1,
    ) -> None:
        """Replay key's graph; capture it first if it is new (graphs on), else run fn eagerly."""
        g = self.graphs
        if g.pool is not None and g.enabled and key not in g.graphs and key not in g.failures:
            self._capture(key, fn, restore)
        with self._timed(key, layer):
            if g.pool is None or not g.enabled:
                fn()
            else:
                g.step(key, eager=fn)  # a replay, or fn eagerly (counted) if the capture failed

    def _capture(
        self, key: Hashable, fn: Callable[[], None], restore: list[torch.Tensor] | None
    ) -> None:
        """Capture key's graph. Its warm-up runs fn for real: put back what must not change."""
        g = self.graphs
        g.register(key, fn)
        saved = [t.clone() for t in restore or ()]
        t0 = time.perf_counter()
        g.capture(key)
        for t, s in zip(restore or (), saved, strict=True):
            t.copy_(s)
        self.capture_s += time.perf_counter() - t0

    def _embed(self) -> None:
        self.buf.X.copy_(M.embed(self.ix.ids, self.top["embed"], self.ctx))

    def _post(self) -> None:
        """mHC post of the layer before: its FFN output back into the streams."""
        b = self.buf
        ops.mhc_post(b.moe, b.Xa, b.post, b.comb, out=b.X, triton=self.ctx.kernels)

    def _a(self, lw: M.LayerWeights, st, layer: int, bucket: int) -> None:
        b = self.buf
        if layer != self.layers[0]:
            self._post()
        # A's results land in the static buffers through the ops that make them (no copies)
        out = M.FfnPending(b.Xa, b.u, b.post, b.comb, b.sel, b.weights, b.shared)
        D.segment_a_step(b.X, self.ix, bucket, lw, st, layer, self.rope, self.ctx, out=out)
        if not self.ctx.kernels:
            b.acc_f32.zero_()
        self._sel_rows[layer].copy_(b.sel, non_blocking=True)
        if self.lane_inputs:  # the CPU lane's input, read after the layer's sync
            b.u_host.copy_(b.u, non_blocking=True)
            b.weights_host.copy_(b.weights, non_blocking=True)
        nxt = self._predicted(layer)
        if nxt is not None:
            b.pred.copy_(D.route_step(b.u, self.ix.ids, self.weights[nxt], nxt, self.ctx)[0])
            b.pred_host.copy_(b.pred, non_blocking=True)
        if self.ctx.kernels:  # the slots B reads: -1 where the expert is not resident
            torch.index_select(self.scheduler.store.slot_map[layer], 0, b.sel[0], out=b.slots[0])

    def _experts(self, shared: torch.Tensor, out: torch.Tensor) -> None:
        t, b = self.scheduler.store.pool.t, self.buf
        ops.fp4_experts(
            b.u, b.slots, b.weights, shared, t["w13_q"], t["w13_s"], t["w2_q"], t["w2_s"],
            self.cfg.swiglu_limit, out=out, act_quant=self.rt.quant_sim, workspace=self.fp4_ws,
        )  # fmt: skip

    def _b(self) -> None:  # the experts the slot map holds, with the shared expert
        self._experts(self.buf.shared, self.buf.moe)

    def _e(self, add: bool) -> None:  # a wave from the host's slot table: from shared, or add
        b = self.buf
        self._experts(b.moe if add else b.shared, b.acc)
        b.moe.copy_(b.acc)

    def _e_cpu(self) -> None:  # the first wave, its shared input plus the CPU lane's sum
        b = self.buf
        torch.add(b.shared, b.cpu_part, out=b.shared_f32)  # fp32: one rounding, in the kernel
        self._experts(b.shared_f32, b.acc)
        b.moe.copy_(b.acc)

    def capture_experts(self) -> None:
        """Capture the expert graphs a token may need later (E, first wave or not), so that no
        capture stalls a request (`Engine.warm_up`)."""
        if self.pool is None or not self.graphs.enabled:
            return
        todo: list[tuple[Hashable, Callable[[], None]]] = [
            (("E", add), lambda add=add: self._e(add)) for add in (True, False)
        ]
        if self.lane_inputs:
            todo.append((("E", False, "cpu"), self._e_cpu))
        for key, fn in todo:
            if key not in self.graphs.graphs and key not in self.graphs.failures:
                self._capture(key, fn, [self.buf.moe, self.buf.acc])

    def _ref_experts(
        self,
        u: torch.Tensor,
        sel: torch.Tensor,
        weights: torch.Tensor,
        slot_of: dict[int, int],
        acc: torch.Tensor,
    ) -> None:
        """One wave of the reference experts (kernels off, CPU) into acc fp32, in id order."""
        store = self.scheduler.store
        weights_of = {e: store.weights(s) for e, s in slot_of.items()}.__getitem__
        M.routed_experts(u, sel.to(u.device), weights, sorted(slot_of), weights_of, self.ctx, acc)

    def _moe_ref(self, sel: torch.Tensor, slot_of: dict[int, int], last: bool) -> None:
        """Reference experts (kernels off, CPU), as Runner.moe; the last wave adds the shared
        expert."""
        b = self.buf
        self._ref_experts(b.u, sel, b.weights, slot_of, b.acc_f32)
        if last:
            b.moe.copy_((b.acc_f32 + b.shared.float()).to(b.u.dtype))

    def _h(self) -> None:
        self._post()
        self.buf.logits.copy_(D.head_step(self.buf.X, self.top, self.ctx))

    def _write_slots(
        self, sel: torch.Tensor, slot_of: dict[int, int], dst: torch.Tensor | None = None
    ) -> None:
        """The wave's slot table [T, K] into a static device table (the decode buffers' by
        default), through a pinned staging buffer (two, alternating: a wave's table may still be
        in flight when the next is written)."""
        dst = self.buf.slots if dst is None else dst
        if not self._slot_stage:  # CPU
            dst.copy_(self.scheduler.slot_table(sel, slot_of, dst.device))
            return
        i = self._stage_i = 1 - self._stage_i
        ev = self._stage_events[i]
        if ev is not None:
            ev.synchronize()
        T = sel.shape[0]
        self._stage_np[i][:T] = self.scheduler.slot_rows(sel, slot_of)
        if self.scheduler.store.zero_copy:  # a cast kernel reads the rows in place
            dst.copy_(self._stage_view[i][:T])
        else:  # a pinned -> device copy, then the cast
            dst.copy_(self._slot_stage[i][:T].to(dst.device, non_blocking=True))
        ev = self._stage_events[i] or torch.cuda.Event()
        ev.record(self._stream)
        self._stage_events[i] = ev

    def graph_stats(self) -> dict[str, float]:
        c = self.graphs.counters
        return {
            "graphs_captured": float(c.captured),
            "graph_capture_failures": float(c.capture_failures),
            "graph_replays": float(c.replays),
            "graph_eager_fallbacks": float(c.eager_fallbacks),
            "graph_capture_s": self.capture_s,
            "compile_s": C.compile_seconds(),
            "graph_pool_bytes": float(self.pool.pool_bytes() if self.pool is not None else 0),
            "decode_layers_b": float(self.layers_b),
            "decode_layers_e": float(self.layers_e),
            "decode_layers_no_wait": float(self.layers_no_wait),
            "verify_steps": float(self.verify_steps),
            "verify_tokens": float(self.verify_tokens),
        }


def _ids_to_host(sel: torch.Tensor, ring: PinnedRing | None = None) -> IdsHost | None:
    """Start copying a chunk's expert ids [T, K] to pinned host memory (the next buffer of
    `ring`; None: a block of torch's pinned allocator) on sel's device's current stream -> (the
    host tensor, the event after the copy); None on the CPU."""
    if sel.device.type != "cuda":
        return None
    stream = torch.cuda.current_stream(sel.device)
    if ring is None:
        host = torch.empty(sel.shape, dtype=sel.dtype, pin_memory=True)
        host.copy_(sel, non_blocking=True)  # on sel's device's current stream
        ev = torch.cuda.Event()
        ev.record(stream)
        return host, ev
    host = ring.tensor(sel.shape, sel.dtype)
    host.copy_(sel, non_blocking=True)
    ev = ring.used(stream)
    assert ev is not None
    return host, ev


def _non_idempotent(st) -> list[torch.Tensor]:
    """State segment A updates from its own previous value (the CSA overlap halves): a capture's
    warm-up runs A more than once, so these are put back afterwards."""
    out = []
    for c in (st.comp, st.index_comp):
        if c is not None and c.overlap:
            out += [c.prev_kv, c.prev_gate]
    return out
