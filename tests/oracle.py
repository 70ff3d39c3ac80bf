"""transformers' DeepseekV4ForCausalLM as the numerical oracle (docs/engine.md §4).

`build_oracle(ckpt_dir)` builds the HF model from the checkpoint's config and loads the same
weights homeseek reads, dequantised from the official FP8/FP4 formats, so both hold identical
values. HF zero-initialises sinks, ape, router bias and tid2eid; the synthetic writer randomises
them, so those paths are live in every comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch

from homeseek.checkpoint import Checkpoint, tensor_table
from homeseek.config import CSA, HCA, ModelConfig

# Official name fragments -> HF module paths (the HF port's own conversion mapping, restated).
_LEAF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV4Config

    n = cfg.num_hidden_layers
    hca = sorted({cfg.compress_ratios[i] for i in range(n) if cfg.attn_kind(i) == HCA})
    if len(hca) > 1:
        raise ValueError("the HF port supports one HCA ratio per model")
    kinds = {"swa": "sliding_attention", CSA: "compressed_sparse_attention"}
    kinds[HCA] = "heavily_compressed_attention"
    c = DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=1,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
        },
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim,
        layer_types=[kinds[cfg.attn_kind(i)] for i in range(n)],
        compress_rates={
            "compressed_sparse_attention": 4,
            "heavily_compressed_attention": hca[0] if hca else 128,
        },
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(n)],
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        rms_norm_eps=cfg.rms_norm_eps,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers,
    )
    c._attn_implementation = "eager"
    return c


def build_oracle(ckpt_dir: Path):
    """HF model (fp32, eval) holding the checkpoint's dequantised weights."""
    from transformers import DeepseekV4ForCausalLM

    ck = Checkpoint(ckpt_dir)
    cfg = ck.cfg
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    sd: dict[str, torch.Tensor] = {}
    gate_up: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, spec in tensor_table(cfg).items():
        if name.startswith("mtp."):
            continue  # the HF port does not instantiate MTP
        if name in _TOP:
            sd[_TOP[name]] = ck.get(name).float()
            continue
        _, layer, rest = name.split(".", 2)
        w = ck.get_weight(name).dequant() if spec.kind in ("fp8", "fp4") else ck.get(name)
        if ".experts." in rest:
            e, proj = rest.split(".")[2:4]
            gate_up.setdefault((int(layer), int(e)), {})[proj] = w
            continue
        sd[f"model.layers.{layer}.{_LEAF[rest]}"] = w.long() if spec.kind == "i64" else w.float()
    for layer in range(cfg.num_hidden_layers):
        ws = [gate_up[(layer, e)] for e in range(cfg.n_routed_experts)]
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((w["w1"], w["w3"])) for w in ws]
        )
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([w["w2"] for w in ws])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise AssertionError(f"oracle weight mapping: missing {missing}, unexpected {unexpected}")
    return model


def oracle_logits(model, ids: list[int]) -> torch.Tensor:
    """Full-prefill logits [T, V] from the oracle (no cache)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max and median |error| / std(ref logits), and argmax agreement in percent."""
    std = ref.std().item()
    err = (ours.float() - ref.float()).abs()
    return {
        "max_err_rel": err.max().item() / std,
        "median_err_rel": err.median().item() / std,
        "argmax_agree_pct": 100.0 * (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


# --- the MTP block -------------------------------------------------------------------------------
class MtpOracle:
    """The MTP block (docs/architecture.md §3.5) from transformers' parts: the HF port does not
    instantiate MTP, but the block is one standard decoder layer (SWA, learned router with bias),
    so a one-layer HF model holds `mtp.0.*` as its layer 0, with the block's own hc_head and
    final norm and the shared embedding and head. The input fusion (enorm, hnorm, e_proj,
    h_proj) is written here from the spec with HF's RMSNorm. `__call__` runs the layer over a
    window of rows without a cache and returns the last row's logits and output streams."""

    def __init__(self, ckpt_dir: Path) -> None:
        import dataclasses

        from transformers import DeepseekV4ForCausalLM
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

        ck = Checkpoint(ckpt_dir)
        cfg = ck.cfg
        one = dataclasses.replace(
            cfg, num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=0
        )
        torch.manual_seed(0)
        self.model = DeepseekV4ForCausalLM(hf_config(one)).float().eval()
        pre = "mtp.0."
        sd: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        ups: dict[int, dict[str, torch.Tensor]] = {}
        for name, spec in tensor_table(cfg).items():
            if not name.startswith(pre):
                continue
            rest = name[len(pre) :]
            w = ck.get_weight(name).dequant() if spec.kind in ("fp8", "fp4") else ck.get(name)
            if ".experts." in rest:
                e, proj = rest.split(".")[2:4]
                ups.setdefault(int(e), {})[proj] = w
            elif rest in _LEAF:
                sd[f"model.layers.0.{_LEAF[rest]}"] = w.float()
            else:  # the block's own additions: e_proj, h_proj, enorm, hnorm, norm, hc_head_*
                extra[rest] = w.float()
        ws = [ups[e] for e in range(cfg.n_routed_experts)]
        sd["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((w["w1"], w["w3"])) for w in ws]
        )
        sd["model.layers.0.mlp.experts.down_proj"] = torch.stack([w["w2"] for w in ws])
        sd["model.embed_tokens.weight"] = ck.get("embed.weight").float()
        sd["lm_head.weight"] = ck.get("head.weight").float()
        sd["model.norm.weight"] = extra.pop("norm.weight")
        sd["model.hc_head.hc_fn"] = extra.pop("hc_head_fn")
        sd["model.hc_head.hc_base"] = extra.pop("hc_head_base")
        sd["model.hc_head.hc_scale"] = extra.pop("hc_head_scale")
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if "inv_freq" not in k]
        if missing or unexpected:
            raise AssertionError(f"MTP oracle mapping: missing {missing}, unexpected {unexpected}")
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm, self.hnorm = DeepseekV4RMSNorm(D, eps=eps), DeepseekV4RMSNorm(D, eps=eps)
        self.enorm.weight.data = extra.pop("enorm.weight")
        self.hnorm.weight.data = extra.pop("hnorm.weight")
        self.e_proj, self.h_proj = extra.pop("e_proj.weight"), extra.pop("h_proj.weight")
        assert not extra, sorted(extra)

    @torch.no_grad()
    def __call__(
        self, streams: torch.Tensor, next_ids: list[int], positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the window (oldest first): the streams fed at each position [T, N, D], the
        id of the token after it, the position -> (last row's logits [V], its streams [N, D])."""
        m = self.model.model
        ids = torch.tensor([next_ids])
        e = self.enorm(m.embed_tokens(ids))  # [1, T, D]
        x = (e @ self.e_proj.T).unsqueeze(2) + self.hnorm(streams[None].float()) @ self.h_proj.T
        T = len(positions)
        pos = torch.tensor([positions])
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]  # causal; T <= window
        pe = {k: m.rotary_emb(e, position_ids=pos, layer_type=k) for k in ("main", "compress")}
        h = m.layers[0](
            x, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=ids
        )
        logits = self.model.lm_head(m.norm(m.hc_head(h)))
        return logits[0, -1].float(), h[0, -1]
