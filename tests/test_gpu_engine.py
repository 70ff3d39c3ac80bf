"""The engine on CUDA equals the engine on CPU (tests marked gpu; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

import homeseek
from oracle import compare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(0, 129280, (160,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize("quant_sim", [False, True])
def test_cuda_fp32_matches_cpu(ids, quant_sim, parity_report):
    cpu = homeseek.load("tiny", device="cpu", dtype=torch.float32, quant_sim=quant_sim, max_context=256)
    gpu = homeseek.load("tiny", device="cuda", dtype=torch.float32, quant_sim=quant_sim, max_context=256)
    ref = cpu.session().forward(ids)
    # TF32 off: the comparison is about the engine, not the matmul mode.
    torch.backends.cuda.matmul.allow_tf32 = False
    full = gpu.session().forward(ids).cpu()
    stats = compare(full, ref)
    parity_report("tiny", f"cuda fp32 sim={quant_sim}", stats)
    assert stats["max_err_rel"] < 1e-3 and stats["argmax_agree_pct"] >= 99, stats
    sess = gpu.session()
    dec = torch.stack([sess.decode(i) for i in ids]).cpu()
    stats = compare(dec, ref)
    parity_report("tiny", f"cuda fp32 decode sim={quant_sim}", stats)
    assert stats["max_err_rel"] < 1e-3 and stats["argmax_agree_pct"] >= 99, stats


def test_cuda_bf16_generate(ids):
    eng = homeseek.load("tiny", device="cuda", dtype=torch.bfloat16, max_context=256)
    r = eng.generate(messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0)
    assert len(r.token_ids) == 16 and r.stats["decode_tok_s"] > 0
    r2 = eng.generate(messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0)
    assert r.token_ids == r2.token_ids
