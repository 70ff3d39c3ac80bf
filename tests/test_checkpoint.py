"""The official on-disk layout: the name table, the synthetic writer, and loader errors that say
what is wrong and where."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import homeseek
from homeseek.checkpoint import Checkpoint, CheckpointError, stored_shapes, tensor_table
from homeseek.config import ConfigError, ModelConfig, flash_config, tiny_config
from homeseek.synthetic import write_checkpoint


def test_flash_table_matches_the_real_inventory():
    """69,187 stored tensors in the real checkpoint, re-derived from config alone
    (docs/architecture.md §2.2)."""
    cfg = flash_config()
    table = tensor_table(cfg)
    stored = {}
    for name, spec in table.items():
        stored.update(stored_shapes(name, spec, cfg))
    assert len(stored) == 69187
    assert stored["layers.0.attn.wq_b.weight"][0] == (32768, 1024)
    assert stored["layers.0.attn.wq_b.scale"][0] == (256, 8)
    assert stored["layers.5.ffn.experts.7.w2.weight"][0] == (4096, 1024)
    assert stored["layers.5.ffn.experts.7.w2.scale"][0] == (4096, 64)
    assert stored["layers.42.attn.indexer.compressor.ape"][0] == (4, 256)  # layer 42 is CSA
    assert stored["layers.41.attn.compressor.ape"][0] == (128, 512)
    assert stored["layers.2.ffn.gate.tid2eid"][0] == (129280, 6)
    assert "layers.3.ffn.gate.tid2eid" not in stored and "layers.3.ffn.gate.bias" in stored
    assert stored["mtp.0.e_proj.scale"][0] == (32, 32)
    assert "mtp.0.attn.compressor.wkv.weight" not in stored


def test_config_roundtrip_and_errors(tmp_path):
    cfg = flash_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["compress_ratios"] = bad["compress_ratios"][:-1]
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_dict(bad)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_file(tmp_path / "config.json")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    # Small shards so the multi-shard paths (index resolution) are exercised.
    return write_checkpoint(
        tmp_path_factory.mktemp("ck"), tiny_config(), seed=0, shard_bytes=4 << 20
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_synthetic_layout_is_official(tiny_ckpt):
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files[0] == f"model-00001-of-{n:05d}.safetensors"
    ck = Checkpoint(tiny_ckpt)
    ck.validate()
    dt = {k: e.dtype for k, e in ck.entries.items()}
    assert (
        dt["layers.0.attn.wq_a.weight"] == "F8_E4M3" and dt["layers.0.attn.wq_a.scale"] == "F8_E8M0"
    )
    assert dt["layers.0.ffn.experts.3.w1.weight"] == "I8"
    assert dt["layers.0.ffn.experts.3.w1.scale"] == "F8_E8M0"
    assert dt["layers.0.ffn.gate.tid2eid"] == "I64"
    assert dt["layers.2.attn.compressor.ape"] == "F32" and dt["layers.2.attn.attn_sink"] == "F32"
    assert dt["embed.weight"] == "BF16" and dt["mtp.0.hc_head_fn"] == "F32"
    # Paths a zero init would hide are live.
    for name in (
        "layers.2.attn.attn_sink",
        "layers.2.attn.compressor.ape",
        "layers.3.ffn.gate.bias",
    ):
        assert ck.get(name).abs().sum() > 0, name
    tid = ck.get("layers.0.ffn.gate.tid2eid")
    assert tid.min() >= 0 and tid.max() < 8
    assert all(len(set(r)) == len(r) for r in tid[:100].tolist())  # distinct experts per token
    assert len(tensor_table(ck.cfg)) < len(ck.entries)  # scales are stored beside weights


def test_synthetic_is_deterministic(tmp_path, tiny_ckpt):
    other = write_checkpoint(tmp_path / "again", tiny_config(), seed=0, shard_bytes=4 << 20)

    def digest(p: Path) -> dict[str, str]:
        return {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(p.glob("*.safetensors"))
        }

    assert digest(other) == digest(tiny_ckpt)
    seed1 = write_checkpoint(tmp_path / "seed1", tiny_config(), seed=1, shard_bytes=4 << 20)
    assert digest(seed1) != digest(tiny_ckpt)


def test_missing_shard_names_the_file(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    victim = sorted(ck.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(ck)


def test_truncated_shard_names_the_file(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    victim = sorted(ck.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated"):
        Checkpoint(ck)
    victim.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(ck)


def test_corrupt_header(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    victim = sorted(ck.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(ck)


def test_tensor_missing_from_index_is_named(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    idx_path = ck / "model.safetensors.index.json"
    index = json.loads(idx_path.read_text())
    shard = index["weight_map"]["layers.3.attn.compressor.ape"]
    # Rewrite that shard without the tensor and drop it from the index.
    tensors = load_file(str(ck / shard))
    del tensors["layers.3.attn.compressor.ape"]
    save_file(tensors, str(ck / shard))
    del index["weight_map"]["layers.3.attn.compressor.ape"]
    idx_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.3\.attn\.compressor\.ape missing"):
        Checkpoint(ck).validate()


def test_index_pointing_at_wrong_shard(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    idx_path = ck / "model.safetensors.index.json"
    index = json.loads(idx_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    idx_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{files[1]}: tensor {name}"):
        Checkpoint(ck)


def test_shape_contradicting_config_names_tensor_and_field(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["q_lora_rank"] = 64
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"attn\.wq_a\.weight has shape .*q_lora_rank"):
        Checkpoint(ck).validate()


def test_dtype_contradicting_format(tmp_path, tiny_ckpt):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = "layers.1.attn.wkv.weight"
    shard = ck / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].float().to(torch.bfloat16)  # FP8 weight stored as bf16
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {name} has dtype BF16"):
        Checkpoint(ck).validate()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        Checkpoint(tmp_path)


def test_loads_without_tokenizer_files(tmp_path):
    ck = write_checkpoint(tmp_path / "ids-only", tiny_config(), seed=0, tokenizer=False)
    assert not (ck / "tokenizer.json").exists()
    eng = homeseek.load(ck, dtype=torch.float32, max_context=64)
    assert eng.tokenizer is None
    logits = eng.session().forward([0, 5, 6])
    assert logits.shape == (3, 129280) and torch.isfinite(logits).all()


def test_tiny_checkpoint_size_report(tiny_ckpt, capsys):
    files = list(tiny_ckpt.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    with capsys.disabled():
        print(f"\n[tiny synthetic checkpoint] {len(files)} shard(s), {total / 2**20:.1f} MiB")
    assert total < 64 << 20
