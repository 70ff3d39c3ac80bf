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


HUB_REPO = "deepseek-ai/DeepSeek-V4-Flash"
# What the engine needs from the release; the reference code and PDF are left out.
DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def cmd_download(args: argparse.Namespace) -> int:
    from homeseek.checkpoint import verify

    out = Path(args.dir)
    if not args.verify_only:
        from huggingface_hub import snapshot_download

        patterns = args.include or DOWNLOAD_PATTERNS
        print(f"downloading {args.repo} ({', '.join(patterns)}) into {out}", file=sys.stderr)
        try:
            # Resumes partial files; huggingface_hub draws the progress bars.
            snapshot_download(
                repo_id=args.repo,
                revision=args.revision,
                local_dir=str(out),
                allow_patterns=patterns,
                max_workers=args.workers,
            )
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            print(f"homeseek: download failed: {type(e).__name__}: {e}", file=sys.stderr)
            problems = verify(out) if out.exists() else [f"{out}: nothing downloaded"]
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
    problems = verify(out)
    if problems:
        print(f"{out}: incomplete ({len(problems)} problem(s)):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print("re-run `homeseek download` to resume", file=sys.stderr)
        return 1
    print(f"{out}: complete and consistent with its index and config.json")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    from homeseek import plan
    from homeseek.checkpoint import verify
    from homeseek.config import PRESETS, ModelConfig
    from homeseek.engine import preset_dir

    GiB = plan.GiB
    print(f"homeseek doctor - python {platform.python_version()}, torch {torch.__version__}")
    vram = 0
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            print(f"GPU {i}: {name}, {total / GiB:.1f} GiB VRAM ({free / GiB:.1f} GiB free)")
            vram = vram or free
    else:
        print("GPU: none visible to torch (CUDA not available): CPU only")
    total, avail = plan.host_memory()
    print(f"RAM: {total / GiB:.1f} GiB total, {avail / GiB:.1f} GiB available")
    lim = plan.pinned_limit()
    print(
        "pinned-memory limit (RLIMIT_MEMLOCK): "
        + ("unlimited" if lim is None else f"{lim / GiB:.2f} GiB")
        + " (cudaHostAlloc is not bound by it; mlock is)"
    )
    model = args.model
    if model in PRESETS:
        cfg = PRESETS[model]()
        where = preset_dir(model) if model == "tiny" else None
        print(f"model: preset {model!r}" + (f" (built in {where})" if where else ""))
        disk_path = where or Path.cwd()
    else:
        path = Path(model)
        disk_path = path
        problems = verify(path) if path.exists() else [f"{path}: does not exist"]
        cfg = (
            ModelConfig.from_file(path / "config.json")
            if not problems or (path / "config.json").exists()
            else ModelConfig()
        )
        if problems:
            print(f"checkpoint {path}: {len(problems)} problem(s)")
            for p in problems[:10]:
                print(f"  - {p}")
        else:
            files = list(path.glob("*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            print(f"checkpoint {path}: complete, {len(files)} shards, {size / GiB:.1f} GiB")
    print(f"disk free at {disk_path}: {plan.disk_free(disk_path) / GiB:.1f} GiB")
    gpu_gb = args.gpu_mem_gb if args.gpu_mem_gb is not None else (vram / GiB if vram else 24.0)
    host_gb = args.host_mem_gb if args.host_mem_gb is not None else plan.default_host_budget_gb()
    p = plan.memory_plan(cfg, gpu_gb, host_gb, args.max_context)
    print(f"memory plan (max_context {args.max_context}):")
    for line in p.lines():
        print(f"  {line}")
    return 0 if p.fits else 1


def _served_name(model: str) -> str:
    """The model id clients see: the checkpoint folder's name, or the preset's."""
    return Path(model).name or "homeseek"


def cmd_serve(args: argparse.Namespace) -> int:
    from homeseek.config import server_api_key
    from homeseek.server import MiB, ServerConfig, make_server, serve

    # Validate the server settings before spending minutes loading weights.
    cfg = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key if args.api_key is not None else server_api_key(),
        model_name=args.served_model_name or _served_name(args.model),
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * MiB),
        prefix_sessions=args.prefix_sessions,
        drain_timeout_s=args.drain_timeout,
        log_requests=not args.quiet,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        max_tokens_default=args.max_tokens_default,
        max_tokens_cap=args.max_tokens_cap,
    )
    httpd = make_server(cfg)  # a busy port fails now, not after loading the weights
    try:
        eng = _load(args)
    except BaseException:
        httpd.server_close()
        raise
    return serve(eng, cfg, httpd)


def cmd_chat(args: argparse.Namespace) -> int:
    from homeseek.chat_cli import ChatError, HttpBackend, LocalBackend, Repl

    if args.model is not None:
        backend = LocalBackend(_load(args), _served_name(args.model))
    else:
        http = HttpBackend(args.url, api_key=args.api_key)
        try:
            http.connect()
        except ChatError as e:
            print(f"homeseek: {e}", file=sys.stderr)
            return 1
        backend = http
    repl = Repl(
        backend,
        system=args.system,
        thinking=args.think,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    return repl.run()


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

    d = sub.add_parser("download", help="fetch the official weights and verify them")
    d.add_argument("dir", help="target directory (resumes what is already there)")
    d.add_argument("--repo", default=HUB_REPO, help=f"hub repository (default {HUB_REPO})")
    d.add_argument("--revision", default=None, help="branch, tag or commit")
    d.add_argument("--include", action="append", default=None, help="allow-pattern (repeatable)")
    d.add_argument("--workers", type=int, default=8, help="parallel downloads")
    d.add_argument("--verify-only", action="store_true", help="only check the directory")
    d.set_defaults(func=cmd_download)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions ...)")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    sv.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: $HOMESEEK_API_KEY, which `ps` hides)",
    )
    sv.add_argument(
        "--allowed-origins",
        default="",
        help="browser origins allowed by CORS, comma-separated, or '*' (default: none)",
    )
    sv.add_argument(
        "--max-tokens-default",
        type=int,
        default=None,
        help="max_tokens of requests that set none (default: until EOS, or the cap)",
    )
    sv.add_argument(
        "--max-tokens-cap",
        type=int,
        default=None,
        help="refuse (400) requests asking for more tokens than this (default: no cap)",
    )
    sv.add_argument("--served-model-name", default=None, help="model id shown to clients")
    sv.add_argument("--max-queue", type=int, default=16, help="waiting requests before 429")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body")
    sv.add_argument(
        "--prefix-sessions",
        type=int,
        default=1,
        help="conversations whose state is kept for prefix reuse (each holds max-context state)",
    )
    sv.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish work on SIGTERM"
    )
    sv.add_argument("--quiet", action="store_true", help="do not log each request")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser(
        "chat",
        help="interactive chat against a server (or in-process: --model)",
        description="Chat in the terminal with a running `homeseek serve` (--url), or, with "
        "--model, with the engine loaded in this process. Commands: /think /stats /clear "
        "/help /quit.",
    )
    _add_model_args(ch)
    ch.set_defaults(model=None)  # no --model: talk to the server at --url
    ch.add_argument("--url", default="http://127.0.0.1:8000", help="server (default %(default)s)")
    ch.add_argument("--api-key", default=None, help="the server's key (default: $OPENAI_API_KEY)")
    ch.add_argument("--system", default=None, help="a system message for the conversation")
    ch.add_argument("--think", action="store_true", help="start in thinking mode (/think toggles)")
    ch.add_argument("--max-tokens", type=int, default=None, help="per reply (default: no limit)")
    ch.add_argument("--temperature", type=float, default=1.0)
    ch.set_defaults(func=cmd_chat)

    dr = sub.add_parser("doctor", help="check this machine and a checkpoint; show a memory plan")
    dr.add_argument("--model", default="flash", help="checkpoint directory or preset name")
    dr.add_argument(
        "--gpu-mem-gb", type=float, default=None, help="GPU budget (default: free VRAM, or 24)"
    )
    dr.add_argument("--host-mem-gb", type=float, default=None, help="pinned host budget")
    dr.add_argument("--max-context", type=int, default=32768)
    dr.set_defaults(func=cmd_doctor)

    b = sub.add_parser(
        "bench",
        help="end-to-end speed (prefill, decode) against this machine's measured ceilings",
        description="Measure the whole model: TTFT and prefill tok/s per prompt length, decode "
        "tok/s at a short and a long position, expert traffic, GPU vs host time per token, and "
        "the ceilings of this machine measured in the same run. Default: the full V4-Flash "
        "dimensions with random weights built in memory on CUDA (GPU capped at 24 GiB), the "
        "tiny model on CPU. Prints a table, then one JSON line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--model", default=None, help="checkpoint directory or 'tiny' (on disk)")
    b.add_argument(
        "--synthetic", default=None, help="preset built in memory with random weights (flash)"
    )
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    b.add_argument(
        "--gpu-mem-gb", type=float, default=None,
        help="GPU budget in GiB; also caps the process (default 24 on CUDA)",
    )  # fmt: skip
    b.add_argument(
        "--host-mem-gb", type=float, default=None,
        help="pinned host RAM for experts in GiB (default: 75%% of available RAM)",
    )  # fmt: skip
    b.add_argument(
        "--expert-alias", type=int, default=64,
        help="synthetic: distinct expert records in host RAM (0 = every expert its own)",
    )  # fmt: skip
    b.add_argument(
        "--routing", default="model",
        help="comma-separated: model (the routers) and/or uniform (random experts per token)",
    )  # fmt: skip
    b.add_argument("--routing-trace", default=None, help="also replay a recorded trace (.npz)")
    b.add_argument(
        "--prompts", type=_int_list, default=(8, 512, 4096, 16384), help="prompt lengths"
    )
    b.add_argument("--decode-tokens", type=int, default=64, help="decode after the first prompt")
    b.add_argument(
        "--long-decode-tokens", type=int, default=16, help="decode after the longest prompt"
    )
    b.add_argument(
        "--profile-tokens", type=int, default=2, help="decode tokens run under the profiler"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    b.set_defaults(func=cmd_bench)

    pr = sub.add_parser("profile", help="record which experts a model routes to")
    _add_model_args(pr)
    pr.add_argument("--routing", action="store_true", required=True, help="routing profile")
    pr.add_argument("--tokens", type=int, default=2048, help="random tokens to run")
    pr.add_argument("--chunk", type=int, default=512)
    pr.add_argument("--out", required=True, help="profile JSON (for load(hot_profile=...))")
    pr.add_argument("--trace", default=None, help="also save the decode-order trace (.npz)")
    pr.set_defaults(func=cmd_profile)
    return p


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from homeseek.bench import BenchConfig, main

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    model, synthetic = args.model, args.synthetic
    if model is None and synthetic is None:  # the full-size yardstick on a GPU, tiny on a CPU
        synthetic, model = ("flash", None) if cuda else (None, "tiny")
    elif model is not None:
        synthetic = None
    routings = tuple(r.strip() for r in args.routing.split(",") if r.strip())
    if args.routing_trace:
        routings += (f"trace:{args.routing_trace}",)
    if args.threads:
        torch.set_num_threads(args.threads)
    bc = BenchConfig(
        model=model,
        synthetic=synthetic,
        device=device,
        dtype=getattr(torch, DTYPES[args.dtype]),
        gpu_mem_gb=args.gpu_mem_gb if args.gpu_mem_gb is not None else (24.0 if cuda else None),
        host_mem_gb=args.host_mem_gb,
        expert_alias=(args.expert_alias or None) if synthetic else None,
        routings=routings,
        prompts=args.prompts,
        decode_tokens=args.decode_tokens,
        long_decode_tokens=args.long_decode_tokens,
        profile_tokens=args.profile_tokens,
        seed=args.seed,
    )
    return main(bc)


def cmd_profile(args: argparse.Namespace) -> int:
    from homeseek.profile import record_routing, routing_profile, save_trace, write_profile

    if args.max_context is None:
        args.max_context = args.tokens + 16
    eng = _load(args)
    steps = record_routing(eng, args.tokens, chunk=args.chunk)
    counts = routing_profile(steps, eng.cfg.num_hidden_layers, eng.cfg.n_routed_experts)
    write_profile(args.out, counts)
    if args.trace:
        save_trace(args.trace, steps)
    used = int((counts > 0).sum())
    print(f"{args.out}: {len(steps)} routing steps over {args.tokens} tokens; {used} of "
          f"{counts.size} experts used")  # fmt: skip
    return 0


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
