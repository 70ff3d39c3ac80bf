"""The memory plan (homeseek/plan.py): the prefill chunk derived from the GPU budget, the
workspace derived from the chunk, impossible requests refused before any weight is read; on a GPU
(marked gpu), the planned workspace bounds what prefill really allocates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import homeseek
from homeseek import engine as engine_mod
from homeseek import plan
from homeseek.config import DEFAULT_PREFILL_GROUP, ConfigError, RuntimeConfig, flash_config

GiB, MiB = 2**30, 2**20


def _room(p: plan.MemoryPlan) -> int:
    return p.gpu_budget - p.dense - p.state - p.rope


def test_derived_chunk_is_monotone_in_the_budget() -> None:
    cfg = flash_config()
    chunks = []
    for gb in [9 + 0.5 * i for i in range(40)]:  # 9 .. 28.5 GiB
        p = plan.memory_plan(cfg, gb, 0, 32768)
        assert p.chunk_derived and p.chunk in {2**k for k in range(6, 13)}, p.chunk
        if p.chunk > plan.MIN_PREFILL_CHUNK:  # the rule: the pool keeps >= 3/4 of the room
            assert p.workspace <= plan.PREFILL_SHARE * _room(p), gb
        chunks.append(p.chunk)
    assert chunks == sorted(chunks) and chunks[0] < chunks[-1] == plan.MAX_PREFILL_CHUNK


def test_workspace_grows_with_chunk_and_context() -> None:
    cfg = flash_config()
    ws = [plan.prefill_workspace(cfg, c, 32768) for c in (64, 256, 1024, 4096)]
    assert ws == sorted(ws) and ws[-1] > 3 * ws[1]
    short, long = (plan.prefill_workspace(cfg, 2048, n) for n in (16384, 1 << 20))
    # The indexer ranks every compressed entry: [T, max_context / 4] int64 keys.
    assert long - short > 2048 * ((1 << 20) - 16384) // 4 * 8


def test_full_flash_at_24_gib_derives_a_chunk_and_leaves_a_pool() -> None:
    cfg = flash_config()
    for ctx in (4096, 32768):
        p = plan.memory_plan(cfg, 24, 64, ctx)
        assert p.fits and p.chunk_derived and p.chunk >= 2048, p.lines()
        assert p.gpu_slots >= 2 * cfg.n_routed_experts, p.lines()
        assert p.workspace < 3 * GiB and p.workspace >= p.activations
        total = p.dense + p.state + p.rope + p.workspace + p.gpu_slots * p.record
        assert total <= 24 * GiB
    # A million tokens of context: the state grows, the indexer keys too; a smaller chunk fits.
    p = plan.memory_plan(cfg, 24, 64, 1 << 20)
    assert p.fits and p.chunk < plan.MAX_PREFILL_CHUNK, p.lines()


def test_a_layer_by_layer_group_reserves_the_other_chunks_streams() -> None:
    """Prefilling layer by layer holds the other chunks' streams [chunk, hc_mult, hidden] and
    what their segment A hands on (every chunk's A of a layer runs before the experts): the
    plan reserves them (as far as max_context reaches), the pool shrinks by as much, a group of
    one chunk costs nothing, and the plan's lines say so."""
    cfg = flash_config()
    base = plan.memory_plan(cfg, 24, 64, 32768, prefill_chunk=4096)
    p = plan.memory_plan(cfg, 24, 64, 32768, prefill_chunk=4096, prefill_group=16384)
    N, K, D = cfg.hc_mult, cfg.num_experts_per_tok, cfg.hidden_size
    # streams [T, N, D] bf16; u and shared [T, D] bf16, post and comb fp32, ids int64, weights fp32
    per_chunk = 4096 * (N * D * 2 + 2 * D * 2 + (N + N * N) * 4 + K * 12)
    assert p.group_streams == 3 * per_chunk
    assert 570 * 2**20 < p.group_streams < 590 * 2**20
    assert p.workspace == base.workspace + p.group_streams
    fewer = base.gpu_slots - p.gpu_slots
    assert fewer in (p.group_streams // p.record, p.group_streams // p.record + 1), fewer
    assert f"layer-by-layer group {p.group_streams / 2**20:.0f} MiB" in "\n".join(p.lines())
    assert plan.group_stream_bytes(cfg, 4096, 4096, 32768) == 0
    assert plan.group_stream_bytes(cfg, 4096, None, 32768) == 0
    assert plan.group_stream_bytes(cfg, 4096, 1 << 20, 8192) == per_chunk  # max_context caps it


def test_the_default_group_takes_at_most_an_eighth_of_the_pool() -> None:
    """Without a group given, the plan takes as many chunks as cost at most GROUP_POOL_SHARE of
    the pool a plan without one leaves (up to DEFAULT_PREFILL_GROUP and max_context): the full
    16K group at 24 GiB (4.4 % of the slots), a smaller one on a small card, none where two chunks
    would cost more."""
    cfg = flash_config()
    for gb, max_context in ((24, 32768), (12, 32768), (10, 32768), (24, 4096), (24, 6000)):
        base = plan.memory_plan(cfg, gb, 64, max_context)
        p = plan.memory_plan(cfg, gb, 64, max_context, derive_prefill_group=True)
        assert p.group_derived and p.chunk == base.chunk
        assert p.group_streams <= plan.GROUP_POOL_SHARE * base.gpu_slots * base.record
        assert p.group == 0 or (p.group % p.chunk == 0 and p.group > p.chunk)
        assert p.group <= max(DEFAULT_PREFILL_GROUP, p.chunk)
        if gb == 24 and max_context == 32768:
            assert p.group == DEFAULT_PREFILL_GROUP
            assert base.gpu_slots - p.gpu_slots <= 0.05 * base.gpu_slots
        if max_context == 4096:  # one chunk holds any prompt
            assert p.group == 0 and "prefill chunk by chunk" in "\n".join(p.lines())
        if max_context == 6000:  # two chunks at most
            assert p.group == 2 * p.chunk
    assert 0 < plan.memory_plan(cfg, 12, 64, 32768, derive_prefill_group=True).group < 16384
    assert plan.derive_group(cfg, 4096, 0, 32768) == 0  # no pool to spare: chunk by chunk
    given = plan.memory_plan(cfg, 24, 64, 32768, prefill_group=8192, derive_prefill_group=True)
    assert given.group == 8192 and not given.group_derived  # a given group is kept


def test_plan_lines_show_the_chunk_and_workspace() -> None:
    p = plan.memory_plan(flash_config(), 24, 64, 32768)
    text = "\n".join(p.lines())
    assert f"prefill chunk {p.chunk} tokens (derived from the budget)" in text
    assert f"workspace {p.workspace / GiB:.2f} GiB" in text and "fits: yes" in text
    q = plan.memory_plan(flash_config(), 24, 64, 32768, prefill_chunk=512)
    assert "prefill chunk 512 tokens (as set)" in "\n".join(q.lines())


def test_explicit_chunk_too_large_names_the_numbers() -> None:
    cfg = flash_config()
    p = plan.memory_plan(cfg, 10, 0, 32768, prefill_chunk=4096)
    assert not p.fits and p.fitting_chunk == 2048
    msg = p.problem()
    assert msg is not None
    assert msg.startswith("prefill_chunk=4096 does not fit gpu_mem_gb=10.0: dense weights ")
    assert f"prefill workspace {p.workspace / GiB:.2f} GiB (4096-token chunks)" in msg
    assert f"need {p.need / GiB:.2f} GiB" in msg and "lower prefill_chunk to at most 2048" in msg
    assert f"raise gpu_mem_gb to at least {math.ceil(p.need / GiB * 10) / 10:.1f}" in msg
    assert p.need / GiB <= p.min_gpu_gb  # "at least" is enough
    cli = p.problem(plan.CLI_NAMES)
    assert cli is not None and cli.startswith("--prefill-chunk 4096 does not fit --gpu-mem-gb 10.0")
    assert "lower --prefill-chunk to at most 2048" in cli and "--max-context" in cli
    # The derived chunk at the same budget fits.
    assert plan.memory_plan(cfg, 10, 0, 32768).fits


def test_engine_refuses_a_chunk_that_does_not_fit_before_loading(monkeypatch) -> None:
    def no_weights(*a, **kw):  # noqa: ANN002, ANN003
        raise AssertionError("weights were read")

    monkeypatch.setattr(engine_mod, "_load_block", no_weights)
    # tiny: 65,536 tokens of context; a chunk that long ranks [T, 16384] int64 indexer keys (8 GiB).
    want = r"prefill_chunk=65536 does not fit gpu_mem_gb=2\.0: "
    with pytest.raises(ConfigError, match=want) as e:
        homeseek.load("tiny", gpu_mem_gb=2, host_mem_gb=0, max_context=65536, prefill_chunk=65536)
    assert "lower prefill_chunk to at most" in str(e.value) and "GiB" in str(e.value)


def test_engine_uses_the_plan_chunk() -> None:
    eng = homeseek.load("tiny", gpu_mem_gb=2, host_mem_gb=0, max_context=512)
    assert eng.plan is not None and eng.plan.chunk_derived
    assert eng.rt.prefill_chunk == eng.plan.chunk == 512  # the whole context in one chunk
    eng = homeseek.load("tiny", gpu_mem_gb=2, host_mem_gb=0, max_context=512, prefill_chunk=100)
    assert eng.rt.prefill_chunk == eng.plan.chunk == 100 and not eng.plan.chunk_derived
    eng = homeseek.load("tiny", max_context=512)  # CPU, no budget: nothing to derive from
    assert eng.plan is None and eng.rt.prefill_chunk == 2048


def test_prefill_chunk_environment_variable(monkeypatch) -> None:
    monkeypatch.delenv("HOMESEEK_PREFILL_CHUNK", raising=False)
    assert RuntimeConfig.build().prefill_chunk is None
    monkeypatch.setenv("HOMESEEK_PREFILL_CHUNK", "512")
    assert RuntimeConfig.build().prefill_chunk == 512
    assert RuntimeConfig.build(prefill_chunk=64).prefill_chunk == 64
    monkeypatch.setenv("HOMESEEK_PREFILL_CHUNK", "0")
    with pytest.raises(ConfigError, match="HOMESEEK_PREFILL_CHUNK=0 must be >= 1"):
        RuntimeConfig.build()


# --- on a GPU ------------------------------------------------------------------------------------
def _three_layer_flash():
    """V4-Flash's widths (hidden 4096, vocab 129,280, 64 heads, 256 experts) in three layers, one
    of each attention kind: CSA (indexer), HCA, SWA."""
    return dataclasses.replace(
        flash_config(), num_hidden_layers=3, compress_ratios=(4, 128, 0, 0), num_hash_layers=1
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_stays_within_the_planned_workspace() -> None:
    """Prefill at V4-Flash widths allocates no more than the plan's workspace for its chunk, up
    to the chunk that ends at max_context, and the plan is not wildly pessimistic."""
    from homeseek.engine import Engine
    from homeseek.synthetic import SyntheticSource

    cfg, ctx = _three_layer_flash(), 4096
    rt = RuntimeConfig.build(
        device="cuda", dtype=torch.bfloat16, gpu_mem_gb=40, host_mem_gb=0, max_context=ctx
    )
    eng = Engine(SyntheticSource(cfg, seed=0, device="cuda", expert_alias=8), rt)
    ids = torch.randint(0, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(0))
    rows = []
    for chunk in (2048, 4096, 512, 64):
        eng.rt = dataclasses.replace(eng.rt, prefill_chunk=chunk)
        sess = eng.session()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        alloc0, res0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        sess.forward(ids.tolist(), last_only=True)  # chunks up to the one that ends at ctx
        torch.cuda.synchronize()
        grew = torch.cuda.max_memory_allocated() - alloc0
        grew_res = torch.cuda.max_memory_reserved() - res0
        sess.close()
        planned = plan.prefill_workspace(cfg, chunk, ctx, 2, True)
        act = plan.prefill_activation_bytes(cfg, chunk, ctx, 2, True)
        rows.append((chunk, grew, grew_res, act, planned))
        print(
            f"chunk {chunk:5d}: allocated +{grew / MiB:7.1f} MiB (reserved +{grew_res / MiB:7.1f})"
            f" | planned activations {act / MiB:7.1f} MiB, workspace {planned / MiB:7.1f} MiB"
            f" ({planned / max(grew, 1):.2f}x measured)"
        )
    for chunk, grew, _, act, planned in rows:
        assert grew <= planned, f"chunk {chunk}: measured {grew / MiB:.1f} MiB > planned"
        # The modelled part is the activations: the workspace adds the allocator margin (its
        # largest single block, 256 MiB of the head's rows here) and the fixed scratch (decode's
        # allowance), which cover fragmentation and decode and so never show in a prefill's
        # allocated growth (at 64-token chunks they are 2.4x that growth).
        assert act <= 2 * grew + 64 * MiB, f"chunk {chunk}: activations planned too high"
