"""The `homeseek` command (also `python -m homeseek`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="checkpoint directory, or 'tiny' (a built-in synthetic model created on first use)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    p.add_argument("--max-context", type=int, default=None, help="tokens of state per session")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)"
    )
    p.add_argument(
        "--no-quant-sim",
        action="store_true",
        help="skip the reference's FP8/FP4 activation rounding (faster on CPU, less exact)",
    )


def _load(args: argparse.Namespace):
    import torch

    import homeseek

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return homeseek.load(
        args.model,
        device=device,
        dtype=getattr(torch, DTYPES[args.dtype]),
        max_context=args.max_context,
        quant_sim=not args.no_quant_sim,
        progress=True,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    eng = _load(args)
    out = sys.stdout
    if args.prompt_ids:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        kw = {"prompt_ids": ids}
    else:
        if args.prompt is None:
            print("error: give a prompt (or --prompt-ids 0,1,2)", file=sys.stderr)
            return 2
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.prompt})
        kw = {"messages": messages}
    if eng.tokenizer is None and "messages" in kw:
        print(f"error: {eng.path} has no tokenizer.json; use --prompt-ids", file=sys.stderr)
        return 2

    def on_text(delta: str) -> None:
        out.write(delta)
        out.flush()

    res = eng.generate(
        **kw,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        thinking=args.think,
        ignore_eos=args.ignore_eos,
        stop=args.stop,
        stream=None if eng.tokenizer is None else on_text,
    )
    if eng.tokenizer is None or args.show_ids:
        out.write(("\n" if res.text else "") + "token ids: " + " ".join(map(str, res.token_ids)))
    out.write("\n")
    s = res.stats
    print(
        f"[{res.finish_reason}] {s['prompt_tokens']} prompt + {s['completion_tokens']} completion "
        f"tokens; TTFT {s['ttft_s'] * 1000:.0f} ms, prefill {s['prefill_tok_s']:.1f} tok/s, "
        f"decode {s['decode_tok_s']:.1f} tok/s",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps({"finish_reason": res.finish_reason, "token_ids": res.token_ids, **s}))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from homeseek.config import PRESETS, ModelConfig
    from homeseek.synthetic import write_checkpoint

    if args.config in PRESETS:
        cfg = PRESETS[args.config]()
    else:
        cfg = ModelConfig.from_file(args.config)
    out = write_checkpoint(
        Path(args.out), cfg, seed=args.seed, shard_bytes=int(args.shard_gb * 2**30), progress=True
    )
    files = list(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {out}: {len(files)} shards, {size / 2**30:.2f} GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="homeseek",
        description="DeepSeek-V4-Flash on one consumer GPU plus host RAM.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a reply to a prompt, streaming to the terminal")
    _add_model_args(g)
    g.add_argument("prompt", nargs="?", help="the user message")
    g.add_argument("--system", help="a system message")
    g.add_argument("--prompt-ids", help="raw prompt token ids, comma-separated (no chat format)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--think", action="store_true", help="thinking mode (reasoning first)")
    g.add_argument("--ignore-eos", action="store_true", help="always run to --max-tokens")
    g.add_argument("--show-ids", action="store_true", help="also print the generated token ids")
    g.add_argument("--json", action="store_true", help="end with a JSON line of stats")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("synth", help="write a random checkpoint in the official layout")
    s.add_argument("config", help="'tiny', 'flash' (full V4-Flash size, ~150 GB) or a config.json")
    s.add_argument("out", help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-gb", type=float, default=4.0, help="target shard size in GiB")
    s.set_defaults(func=cmd_synth)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from homeseek.checkpoint import CheckpointError
    from homeseek.config import ConfigError
    from homeseek.engine import ContextError

    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ContextError, ValueError) as e:
        print(f"homeseek: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
