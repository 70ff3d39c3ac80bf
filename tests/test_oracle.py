"""Oracle parity: homeseek vs transformers' DeepseekV4ForCausalLM (CPU, fp32, quant_sim off).

Each config is written in the official format by the synthetic writer; the oracle gets the same
weights dequantised. Compared: one full prefill, chunked prefills of several sizes, and >= 300
token-by-token decode steps that cross every compressor block boundary, HCA block and window wrap.

Where the oracle departs from the official reference (docs/architecture.md §6.14) it does so in
ways that vanish in fp32 without quantisation simulation, so no tolerance is widened for them: HF
adds 1e-20 to the
router normaliser (the reference adds none; we follow the reference), HF applies the routing
weight after w2 rather than before (equal in exact arithmetic), HF computes the per-head q norm in
fp32 (the reference in bf16), and HF has no FP8/FP4 simulation at all (tested per function in
test_formats.py and for self-consistency in test_engine.py).
"""

from __future__ import annotations

import pytest
import torch

import homeseek
from homeseek.config import tiny_config
from homeseek.synthetic import write_checkpoint

pytest.importorskip("transformers")
from oracle import build_oracle, compare, oracle_logits  # noqa: E402

# name -> overrides of tiny_config. Real V4-Flash values are in tiny_config's comments.
CONFIGS = {
    # SWA, SWA, CSA, HCA(16), CSA; window 16, top-k 8 (binds from 36 tokens on).
    "tiny": {},
    # Widths that are not multiples of the 128x128 FP8 block (ceil-sized scale grids at edges),
    # more heads and experts, one hash layer, HCA ratio 8.
    "tiny-edges": dict(
        hidden_size=192,
        num_hidden_layers=4,
        compress_ratios=(4, 8, 0, 4, 0),
        num_attention_heads=8,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=160,
        o_groups=4,
        o_lora_rank=40,
        sliding_window=24,
        index_topk=16,
        index_head_dim=64,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=96,
        num_hash_layers=1,
    ),
    # The real window (128) and HCA ratio (128): 330 tokens wrap the window and close two HCA
    # blocks; CSA top-k 16 of up to 82 entries.
    "tiny-w128": dict(
        num_hidden_layers=3,
        compress_ratios=(4, 128, 0, 0),
        sliding_window=128,
        index_topk=16,
        num_hash_layers=1,
    ),
}
N_TOKENS = 330


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    cfg = tiny_config(**CONFIGS[name])
    path = write_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=7, tokenizer=False)
    oracle = build_oracle(path)
    eng = homeseek.load(path, dtype=torch.float32, quant_sim=False, max_context=512)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (N_TOKENS,), generator=g).tolist()
    ref = oracle_logits(oracle, ids)
    return name, eng, ids, ref


TOL_MAX = 1e-4  # max |err| / std; measured ~1e-5 (fp32 summation order only)


def _check(stats: dict[str, float]) -> None:
    assert stats["max_err_rel"] < TOL_MAX, stats
    assert stats["argmax_agree_pct"] == 100.0, stats


def test_full_prefill(pair, parity_report):
    name, eng, ids, ref = pair
    ours = eng.session().forward(ids)
    stats = compare(ours, ref)
    parity_report(name, "prefill", stats)
    _check(stats)


@pytest.mark.parametrize("chunk", [3, 16, 37, 128])
def test_chunked_prefill(pair, parity_report, chunk):
    name, eng, ids, ref = pair
    sess = eng.session()
    ours = torch.cat([sess.forward(ids[a : a + chunk]) for a in range(0, len(ids), chunk)])
    stats = compare(ours, ref)
    parity_report(name, f"chunked {chunk}", stats)
    _check(stats)


def test_decode(pair, parity_report):
    """Prefill 1 token, then >= 300 single-token decode steps."""
    name, eng, ids, ref = pair
    sess = eng.session()
    ours = torch.stack([sess.decode(i) for i in ids])
    stats = compare(ours, ref)
    parity_report(name, f"decode x{len(ids)}", stats)
    _check(stats)


def test_engine_chunk_setting_matches(pair):
    """The engine's own prefill chunking (prefill_chunk) gives the same logits."""
    name, eng, ids, ref = pair
    small = homeseek.engine.Engine(
        eng.path,
        homeseek.config.RuntimeConfig.build(
            dtype=torch.float32, quant_sim=False, max_context=512, prefill_chunk=50
        ),
    )
    stats = compare(small.session().forward(ids), ref)
    _check(stats)
