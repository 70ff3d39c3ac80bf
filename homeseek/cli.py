"""The `homeseek` command (also `python -m homeseek`)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from homeseek import __version__

if TYPE_CHECKING:
    from homeseek.engine import Engine

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}

# Every environment variable homeseek reads (config.py is the only reader of HOMESEEK_*; a test
# keeps this table, config.py and the README in step). Shown in `homeseek --help`.
ENV_VARS = {
    "HOMESEEK_CACHE_DIR": "where --model tiny is written on first use "
    "(default: $XDG_CACHE_HOME/homeseek, else ~/.cache/homeseek)",
    "HOMESEEK_MAX_CONTEXT": "default of --max-context: tokens of decode state per session (32768)",
    "HOMESEEK_PREFILL_CHUNK": "default of --prefill-chunk: tokens per forward pass while "
    "prefilling a prompt (unset: the largest the GPU budget allows, up to 4096; 2048 on CPU)",
    "HOMESEEK_PREFILL_GROUP": "default of --prefill-group: tokens of a prompt prefilled layer "
    "by layer (unset: derived on CUDA, up to 16384; chunk by chunk on CPU; 0: chunk by chunk)",
    "HOMESEEK_API_KEY": "serve: the key clients must send when --api-key is not given "
    "(unlike a flag, not visible in `ps`)",
    "TORCHINDUCTOR_CACHE_DIR": "where torch.compile keeps the CUDA decode step's compiled kernels "
    "(default: <cache dir>/inductor), so a second start skips compiling",
    "HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE": "huggingface_hub's own settings, for `download`",
}


def _env_epilog() -> str:
    lines = ["environment variables:"]
    for name, text in ENV_VARS.items():
        lines.append(f"  {name}")
        lines += textwrap.wrap(text, 78, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


# --- argument checking ---------------------------------------------------------------------------
# Everything a user can get wrong is checked before any weight is read: argument types by argparse
# (the types below), the rest by `check_load` from the checkpoint directory's files alone.
class CliError(Exception):
    """A problem the user can fix, reported as one line `homeseek: error: ...` (no traceback)."""

    code = 1


class UsageError(CliError):
    """A wrong argument or environment variable: reported by the subcommand's parser, exit 2."""

    code = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line that names the mistake and where to look, instead of argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none (None / off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or action.default is None
            or action.default is False  # an off switch (0 is a real default and shown)
            or action.default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            want = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    return parse


def _float_in(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bad_lo = value <= lo if lo_open else value < lo
        if bad_lo or (hi is not None and value > hi) or value != value:
            low = f"> {lo:g}" if lo_open else f">= {lo:g}"
            want = f"{low} and <= {hi:g}" if hi is not None else low
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


def _device(text: str) -> str:
    """cpu, cuda or cuda:N; whether CUDA is really there is checked in `check_load`."""
    kind, _, index = text.partition(":")
    if text == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device homeseek runs on; use cpu or cuda")


def _int_csv(what: str, lowest: int, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: a comma-separated list of whole numbers >= lowest."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {what} (e.g. {example})"
            ) from None
        if not values or min(values) < lowest:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what} >= {lowest}, e.g. {example}")
        return values

    return parse


_token_ids = _int_csv("token ids", 0, "0,5,6")
_int_list = _int_csv("token counts", 1, "8,512")


def _host(text: str) -> str:
    """An IP address or a name this machine resolves (999.1.1.1 is neither)."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    hint = "use e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    if all(c.isdigit() or c in ".:" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid IP address; {hint}")
    try:
        socket.getaddrinfo(text, None)
    except (OSError, UnicodeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an IP address nor a host name this machine resolves; {hint}"
        ) from None
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="checkpoint directory, or 'tiny' (a built-in synthetic model created on first use)",
    )
    p.add_argument(
        "--device", type=_device, default=None, help="cpu or cuda[:N] (default: cuda if available)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    p.add_argument(
        "--max-context",
        type=_int_at_least(1),
        default=None,
        help="tokens of state per session (default: $HOMESEEK_MAX_CONTEXT, else 32768)",
    )
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="CPU threads for torch (default: torch's own)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=_int_at_least(1),
        default=None,
        help=f"tokens per forward pass while prefilling a prompt (default: {CHUNK_DEFAULT_TEXT})",
    )
    p.add_argument(
        "--prefill-group",
        type=_int_at_least(0),
        default=None,
        help="tokens of a prompt prefilled layer by layer, so each expert is copied to the GPU "
        "once per group instead of once per chunk; the GPU budget then also holds the other "
        f"chunks' streams and pending A (0: chunk by chunk; default: {GROUP_DEFAULT_TEXT})",
    )
    p.add_argument(
        "--gpu-mem-gb",
        type=_float_in(0, lo_open=True),
        default=None,
        help="GPU memory the engine may use in GiB, expert pool included "
        f"(default: {GPU_DEFAULT_TEXT})",
    )
    p.add_argument(
        "--host-mem-gb",
        type=_float_in(0),
        default=None,
        help=f"pinned host RAM for experts in GiB (default: {HOST_DEFAULT_TEXT})",
    )
    p.add_argument(
        "--no-quant-sim",
        action="store_true",
        help="skip the reference's FP8/FP4 activation rounding (faster on CPU, less exact)",
    )
    p.add_argument(
        "--no-graphs",
        action="store_true",
        help="run the decode step eagerly instead of as CUDA graphs (CUDA; CPU is always eager)",
    )
    _add_lane_args(p)


def _add_lane_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--cpu-lane, --cpu-threads, --prefetch (`several`: bench compares comma-separated modes)."""
    if several:
        p.add_argument(
            "--cpu-lane", type=_lane_list, default="auto",
            help="comma-separated on/off/auto: decode rows for each, in one engine (off: "
            "copy-only, without the lane and the next-layer prefetch, what they are measured "
            "against; default: auto)",
        )  # fmt: skip
    else:
        p.add_argument(
            "--cpu-lane", choices=("auto", "on", "off"), default="auto",
            help="compute some of a decode layer's missed experts on the CPU instead of copying "
            "them (auto: where the CPU kernel builds here; on: an error where it cannot)",
        )  # fmt: skip
    p.add_argument(
        "--cpu-threads", type=_int_at_least(1), default=None,
        help="threads of the CPU lane (default: the cores but two)",
    )  # fmt: skip
    pf_help = (
        "start copying the next layer's experts early: in decode those its router "
        "predicts from this layer's input, in prefill all of them for chunks that use nearly all"
    )
    if several:
        p.add_argument(
            "--prefetch", type=_prefetch_list, default=(True,),
            help=f"{pf_help} (comma-separated on/off: decode rows for each lane mode with each; "
            "the copy-only row then has neither)",
        )  # fmt: skip
    else:
        p.add_argument("--prefetch", choices=("on", "off"), default="on", help=pf_help)


def _prefetch_list(text: str) -> tuple[bool, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in ("on", "off") for m in modes):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated on and/or off")
    return tuple(m == "on" for m in dict.fromkeys(modes))


def _lane_list(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in ("auto", "on", "off")]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated auto, on and/or off")
    return modes


def _add_mtp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mtp", type=_int_at_least(0, 3), default=0,
        help="speculative decoding with this many drafts per step from the MTP block (0 = off)",
    )  # fmt: skip


# The default rule itself lives in homeseek.plan (default_gpu_budget_gb / default_host_budget_gb),
# shared by every command that loads a model and by `doctor`; this is how --help words it.
GPU_DEFAULT_TEXT = "90%% of the GPU memory free at start"
HOST_DEFAULT_TEXT = "75%% of the RAM available at start"
GROUP_DEFAULT_TEXT = (
    "$HOMESEEK_PREFILL_GROUP, else on CUDA as many chunks as take at most an eighth of the expert "
    "pool, up to 16384 tokens; chunk by chunk on CPU"
)
CHUNK_DEFAULT_TEXT = (
    "$HOMESEEK_PREFILL_CHUNK, else the largest power of two up to 4096 whose workspace takes at "
    "most a quarter of the GPU memory left after the dense weights and decode state; 2048 on CPU"
)


@dataclass(frozen=True)
class LoadArgs:
    """What `check_load` settled, handed to `homeseek.load` unchanged."""

    device: str
    max_context: int
    prefill_chunk: int | None  # None: derived from the GPU budget at load
    gpu_mem_gb: float | None
    host_mem_gb: float
    vocab_size: int


def _check_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return device
    if torch.version.cuda is None:
        raise UsageError(
            f"--device {device}: this torch ({torch.__version__}) is built without CUDA; "
            "use --device cpu, or install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"--device {device}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return device


def _check_cache_dir(where: Path) -> None:
    """The built-in model is written under the cache: fail now if that cannot happen."""
    from homeseek.config import default_cache_dir

    root = default_cache_dir()
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where.parent):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UsageError(
            f"cannot write the built-in model under {root} ({why}); set HOMESEEK_CACHE_DIR "
            "to a writable directory"
        ) from None


def check_load(args: argparse.Namespace, needs_tokenizer: bool = False) -> LoadArgs:
    """Validate everything `_load` needs from the arguments, the environment and the checkpoint
    directory's small files (config.json, tokenizer.json), before any weight is read."""
    from homeseek import plan
    from homeseek.config import (
        PRESETS,
        ConfigError,
        ModelConfig,
        env_int,
        prefill_chunk_env,
        prefill_group_default,
    )

    device = _check_device(args.device)
    try:
        max_context = args.max_context or env_int("MAX_CONTEXT", 32768)
        prefill_chunk = args.prefill_chunk or prefill_chunk_env()
        group = args.prefill_group
        if group is None:  # as RuntimeConfig.build fills it, so this plan is the engine's
            group = prefill_group_default(device)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    model = Path(args.model)
    if model.is_dir():  # a directory wins over a preset name, as in homeseek.load
        if not (model / "config.json").is_file():
            raise UsageError(
                f"--model {args.model}: no config.json there, so not a checkpoint directory; "
                "give the directory `homeseek download` wrote, or 'tiny'"
            )
        cfg = ModelConfig.from_file(model / "config.json")
        if needs_tokenizer and not (model / "tokenizer.json").is_file():
            raise UsageError(
                f"{args.model} has no tokenizer.json, so text cannot be encoded; add the release's "
                f"(homeseek download {args.model} --include 'tokenizer*') or give --prompt-ids"
            )
    elif args.model in PRESETS:
        if args.model != "tiny":
            raise UsageError(
                f"--model {args.model} is full size and never built on the fly: write it with "
                f"`homeseek synth {args.model} DIR` and pass --model DIR"
            )
        from homeseek.engine import preset_dir

        where = preset_dir(args.model)
        if not (where / "config.json").is_file():
            _check_cache_dir(where)
        cfg = PRESETS[args.model]()
    else:
        raise UsageError(
            f"--model {args.model}: no such directory; give a checkpoint directory "
            f"or one of the built-in models: tiny"
        )
    if max_context > cfg.max_position_embeddings:
        raise UsageError(
            f"--max-context {max_context} exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}); lower it"
        )
    gpu = args.gpu_mem_gb if args.gpu_mem_gb is not None else plan.default_gpu_budget_gb(device)
    host = args.host_mem_gb if args.host_mem_gb is not None else plan.default_host_budget_gb()
    if gpu is not None:  # same test as the engine's, but before minutes of loading
        act = 4 if args.dtype == "fp32" else 2
        p = plan.memory_plan(
            cfg, gpu, host, max_context, act_bytes=act, prefill_chunk=prefill_chunk,
            quant_sim=not args.no_quant_sim, prefill_group=group,
            derive_prefill_group=group is None,
        )  # fmt: skip
        problem = p.problem(plan.CLI_NAMES)
        if problem is not None:
            raise CliError(problem)
    return LoadArgs(device, max_context, prefill_chunk, gpu, host, cfg.vocab_size)


def _load(
    args: argparse.Namespace,
    checked: LoadArgs | None = None,
    needs_tokenizer: bool = False,
    max_sessions: int = 1,
) -> Engine:
    """Check the arguments (unless `checked` is the result of `check_load`), then load."""
    la = checked or check_load(args, needs_tokenizer=needs_tokenizer)
    import torch

    import homeseek

    if args.threads:
        torch.set_num_threads(args.threads)
    return homeseek.load(
        args.model,
        device=la.device,
        dtype=getattr(torch, DTYPES[args.dtype]),
        gpu_mem_gb=la.gpu_mem_gb,
        host_mem_gb=la.host_mem_gb,
        max_context=la.max_context,
        prefill_chunk=la.prefill_chunk,
        prefill_group=args.prefill_group,
        quant_sim=not args.no_quant_sim,
        graphs=False if args.no_graphs else None,
        max_sessions=max_sessions,
        mtp=getattr(args, "mtp", 0),
        progress=True,
        cpu_lane=args.cpu_lane,
        cpu_threads=args.cpu_threads,
        prefetch=args.prefetch == "on",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt_ids is not None and args.prompt is not None:
        raise UsageError("give a prompt or --prompt-ids, not both")
    if args.prompt_ids is None and args.prompt is None:
        raise UsageError('give a prompt, e.g. homeseek generate "Hello" (or --prompt-ids 0,1,2)')
    if args.prompt_ids is not None and args.system is not None:
        raise UsageError("--system needs a text prompt; with --prompt-ids put it in the ids")
    checked = check_load(args, needs_tokenizer=args.prompt_ids is None)
    if args.prompt_ids is not None and max(args.prompt_ids) >= checked.vocab_size:
        raise UsageError(
            f"--prompt-ids: id {max(args.prompt_ids)} is outside the vocabulary "
            f"(0 to {checked.vocab_size - 1})"
        )
    eng = _load(args, checked)
    out = sys.stdout
    if args.prompt_ids is not None:
        kw: dict[str, Any] = {"prompt_ids": args.prompt_ids}
    else:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.prompt})
        kw = {"messages": messages}

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
        row = {"text": res.text, "finish_reason": res.finish_reason, "token_ids": res.token_ids}
        print(json.dumps({**row, **s}, ensure_ascii=False))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from homeseek.config import PRESETS, ModelConfig
    from homeseek.synthetic import write_checkpoint

    if args.config in PRESETS:
        cfg = PRESETS[args.config]()
    elif Path(args.config).is_file():
        cfg = ModelConfig.from_file(args.config)
    else:
        raise UsageError(
            f"{args.config!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json"
        )
    try:
        out = write_checkpoint(
            Path(args.out),
            cfg,
            seed=args.seed,
            shard_bytes=int(args.shard_gb * 2**30),
            progress=True,
        )
    except OSError as e:
        raise CliError(f"cannot write {args.out}: {e.strerror or e}") from None
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


HYPOTHETICAL_GPU_GB = 24.0  # the card homeseek is built for, when doctor runs without a GPU


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    from homeseek import plan
    from homeseek.checkpoint import verify
    from homeseek.config import (
        PRESETS,
        ConfigError,
        ModelConfig,
        prefill_chunk_env,
        prefill_group_default,
    )
    from homeseek.engine import preset_dir

    GiB = plan.GiB
    print(f"homeseek doctor - python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            print(f"GPU {i}: {name}, {total / GiB:.1f} GiB VRAM ({free / GiB:.1f} GiB free)")
    else:
        print("GPU: none visible to torch (CUDA not available): CPU only")
    total, avail = plan.host_memory()
    print(f"RAM: {total / GiB:.1f} GiB total, {avail / GiB:.1f} GiB available")
    _doctor_cpu()
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
    # The same default rule as every command that loads a model (homeseek.plan).
    gpu_gb = args.gpu_mem_gb if args.gpu_mem_gb is not None else plan.default_gpu_budget_gb()
    host_gb = args.host_mem_gb if args.host_mem_gb is not None else plan.default_host_budget_gb()
    hypothetical = gpu_gb is None
    if hypothetical:
        # No GPU and no budget given: a plan for an example card, never a plain "fits: yes".
        gpu_gb = HYPOTHETICAL_GPU_GB
        print(
            f"no GPU here, so no real plan: showing one for a hypothetical {gpu_gb:g} GiB card "
            "(give --gpu-mem-gb N to plan for yours)"
        )
    try:
        chunk = args.prefill_chunk or prefill_chunk_env()
        group = args.prefill_group
        if group is None:  # the plan is for a GPU: its default
            group = prefill_group_default("cuda")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    p = plan.memory_plan(
        cfg, gpu_gb, host_gb, args.max_context, prefill_chunk=chunk, prefill_group=group,
        derive_prefill_group=group is None,
    )  # fmt: skip
    print(f"memory plan (max_context {args.max_context}):")
    for line in p.lines(hypothetical=hypothetical):
        print(f"  {line}")
    return 0 if p.fits else 1


def _doctor_cpu() -> None:
    """The CPU lane's view of this host: features, RAM read rate, whether the kernel builds."""
    import torch

    from homeseek.cpu_lane import default_threads, measure_read_bandwidth
    from homeseek.kernels.cpu_experts import available, cpu_features

    feats = cpu_features()
    threads = default_threads()
    n_thr = f"{threads} thread" + ("s" if threads != 1 else "")
    print(
        f"CPU: {feats['usable_cores']} usable cores; features {', '.join(feats['flags']) or '-'}; "
        f"RAM read {measure_read_bandwidth(1 << 29, threads) / 1e9:.0f} GB/s with {n_thr}"
    )
    ok, why = available()
    if not ok:
        state = f"off: {why}"
    else:
        state = f"the expert kernel builds here ({feats['isa']} path, {n_thr})"
        if not torch.cuda.is_available():
            state += "; it runs on CUDA engines only (a CPU engine computes every expert there)"
    print(f"CPU lane (--cpu-lane auto): {state}")


def _served_name(model: str) -> str:
    """The model id clients see: the checkpoint folder's name, or the preset's."""
    return Path(model).name or "homeseek"


def cmd_serve(args: argparse.Namespace) -> int:
    from homeseek.config import server_api_key
    from homeseek.server import MiB, ServerConfig, make_server, serve

    # Validate the model arguments and the server settings before spending minutes loading.
    checked = check_load(args)
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
        eng = _load(args, checked, max_sessions=cfg.prefix_sessions)
        eng.warm_up()  # the first request does not wait for graph capture
    except BaseException:
        httpd.server_close()
        raise
    return serve(eng, cfg, httpd)


def cmd_chat(args: argparse.Namespace) -> int:
    from homeseek.chat_cli import ChatError, HttpBackend, LocalBackend, Repl

    if args.model is None:
        given = [
            flag
            for flag, value in (
                ("--gpu-mem-gb", args.gpu_mem_gb),
                ("--host-mem-gb", args.host_mem_gb),
                ("--mtp", args.mtp or None),
            )
            if value is not None
        ]
        if given:
            raise UsageError(f"{given[0]} is for an in-process model: add --model (e.g. tiny)")
    if args.model is not None:
        backend = LocalBackend(_load(args, needs_tokenizer=True), _served_name(args.model))
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
    p = _Parser(
        prog="homeseek",
        description="DeepSeek-V4-Flash on one consumer GPU plus host RAM.",
        epilog=_env_epilog(),
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"homeseek {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        c = sub.add_parser(name, formatter_class=_Formatter, epilog=_env_epilog(), **kw)
        c.set_defaults(parser=c)  # checks after parsing report through the subcommand's parser
        return c

    pos_int, count = _int_at_least(1), _int_at_least(0)

    g = command("generate", help="generate a reply to a prompt, streaming to the terminal")
    _add_model_args(g)
    _add_mtp_arg(g)
    g.add_argument("prompt", nargs="?", help="the user message")
    g.add_argument("--system", help="a system message")
    g.add_argument(
        "--prompt-ids",
        type=_token_ids,
        help="raw prompt token ids, comma-separated (no chat format)",
    )
    g.add_argument("--max-tokens", type=pos_int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=_float_in(0), default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=_float_in(0, 1, lo_open=True), default=1.0, help="nucleus mass")
    g.add_argument("--top-k", type=count, default=0, help="sample among the k likeliest (0 = all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--think", action="store_true", help="thinking mode (reasoning first)")
    g.add_argument("--ignore-eos", action="store_true", help="always run to --max-tokens")
    g.add_argument("--show-ids", action="store_true", help="also print the generated token ids")
    g.add_argument("--json", action="store_true", help="end with a JSON line: text, ids, stats")
    g.set_defaults(func=cmd_generate)

    s = command("synth", help="write a random checkpoint in the official layout")
    s.add_argument("config", help="'tiny', 'flash' (full V4-Flash size, ~150 GB) or a config.json")
    s.add_argument("out", help="output directory")
    s.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    s.add_argument(
        "--shard-gb", type=_float_in(0, lo_open=True), default=4.0, help="target shard size, GiB"
    )
    s.set_defaults(func=cmd_synth)

    d = command("download", help="fetch the official weights and verify them")
    d.add_argument("dir", help="target directory (resumes what is already there)")
    d.add_argument("--repo", default=HUB_REPO, help="hub repository")
    d.add_argument("--revision", default=None, help="branch, tag or commit")
    d.add_argument("--include", action="append", default=None, help="allow-pattern (repeatable)")
    d.add_argument("--workers", type=pos_int, default=8, help="parallel downloads")
    d.add_argument("--verify-only", action="store_true", help="only check the directory")
    d.set_defaults(func=cmd_download)

    sv = command("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions ...)")
    _add_model_args(sv)
    _add_mtp_arg(sv)
    sv.add_argument("--host", type=_host, default="127.0.0.1", help="address to bind (loopback)")
    sv.add_argument(
        "--port", type=_int_at_least(0, 65535), default=8000, help="port (0 = any free port)"
    )
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
        type=pos_int,
        default=None,
        help="max_tokens of requests that set none (default: until EOS, or the cap)",
    )
    sv.add_argument(
        "--max-tokens-cap",
        type=pos_int,
        default=None,
        help="refuse (400) requests asking for more tokens than this (default: no cap)",
    )
    sv.add_argument("--served-model-name", default=None, help="model id shown to clients")
    sv.add_argument("--max-queue", type=pos_int, default=16, help="waiting requests before 429")
    sv.add_argument(
        "--max-body-mb", type=_float_in(0.001), default=32.0, help="largest request body, MiB"
    )
    sv.add_argument(
        "--prefix-sessions",
        type=pos_int,
        default=1,
        help="conversations whose state is kept for prefix reuse (each holds max-context state)",
    )
    sv.add_argument(
        "--drain-timeout", type=_float_in(0), default=30.0, help="seconds to finish work on SIGTERM"
    )
    sv.add_argument("--quiet", action="store_true", help="do not log each request")
    sv.set_defaults(func=cmd_serve)

    ch = command(
        "chat",
        help="interactive chat against a server (or in-process: --model)",
        description="Chat in the terminal with a running `homeseek serve` (--url), or, with "
        "--model, with the engine loaded in this process. Commands: /think /stats /clear "
        "/help /quit.",
    )
    _add_model_args(ch)
    _add_mtp_arg(ch)
    ch.set_defaults(model=None)  # no --model: talk to the server at --url
    ch.add_argument("--url", default="http://127.0.0.1:8000", help="server")
    ch.add_argument("--api-key", default=None, help="the server's key (default: $OPENAI_API_KEY)")
    ch.add_argument("--system", default=None, help="a system message for the conversation")
    ch.add_argument("--think", action="store_true", help="start in thinking mode (/think toggles)")
    ch.add_argument(
        "--max-tokens", type=pos_int, default=None, help="per reply (default: no limit)"
    )
    ch.add_argument("--temperature", type=_float_in(0), default=1.0, help="0 = greedy")
    ch.set_defaults(func=cmd_chat)

    dr = command("doctor", help="check this machine and a checkpoint; show a memory plan")
    dr.add_argument("--model", default="flash", help="checkpoint directory or preset name")
    dr.add_argument(
        "--gpu-mem-gb",
        type=_float_in(0, lo_open=True),
        default=None,
        help=f"GPU budget in GiB (default: {GPU_DEFAULT_TEXT}; without a GPU, give one)",
    )
    dr.add_argument(
        "--host-mem-gb",
        type=_float_in(0),
        default=None,
        help=f"pinned host budget in GiB (default: {HOST_DEFAULT_TEXT})",
    )
    dr.add_argument("--max-context", type=pos_int, default=32768, help="tokens per session")
    dr.add_argument(
        "--prefill-chunk", type=pos_int, default=None,
        help=f"plan for this prefill chunk (default: {CHUNK_DEFAULT_TEXT})",
    )  # fmt: skip
    dr.add_argument(
        "--prefill-group", type=_int_at_least(0), default=None,
        help="plan for prompts prefilled layer by layer in groups of this many tokens "
        f"(0: chunk by chunk; default: {GROUP_DEFAULT_TEXT})",
    )  # fmt: skip
    dr.set_defaults(func=cmd_doctor)

    b = command(
        "bench",
        help="end-to-end speed (prefill, decode) against this machine's measured ceilings",
        description="Measure the whole model: TTFT and prefill tok/s per prompt length, decode "
        "tok/s at a short and a long position, expert traffic, GPU vs host time per token, and "
        "the ceilings of this machine measured in the same run. Default: the full V4-Flash "
        "dimensions with random weights built in memory on CUDA (GPU capped at 24 GiB), the "
        "tiny model on CPU. Prints a table, then one JSON line.",
    )
    b.add_argument("--model", default=None, help="checkpoint directory or 'tiny' (on disk)")
    b.add_argument(
        "--synthetic", choices=["flash", "tiny"], default=None,
        help="built in memory with random weights (default on CUDA: flash)",
    )  # fmt: skip
    b.add_argument(
        "--device", type=_device, default=None, help="cpu or cuda (default: cuda if any)"
    )
    b.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    b.add_argument(
        "--gpu-mem-gb", type=_float_in(0, lo_open=True), default=None,
        help="GPU budget in GiB; also caps the process (default on CUDA: 24)",
    )  # fmt: skip
    b.add_argument(
        "--host-mem-gb", type=_float_in(0), default=None,
        help=f"pinned host RAM for experts in GiB (default: {HOST_DEFAULT_TEXT})",
    )  # fmt: skip
    b.add_argument(
        "--expert-alias", type=count, default=64,
        help="synthetic: distinct expert records in host RAM (0: every expert its own)",
    )  # fmt: skip
    b.add_argument(
        "--layers", type=pos_int, default=None,
        help="synthetic: only the preset's first N layers (a model that fits the GPU whole: "
        "every expert resident; the whole model's per-token times scale by its layers / N)",
    )  # fmt: skip
    b.add_argument(
        "--resident", action="store_true",
        help="copy every expert into the GPU pool before each routing mode's rows: the "
        "all-resident rows (the budget must hold the whole model; see --layers)",
    )  # fmt: skip
    b.add_argument(
        "--routing", default="model",
        help="comma-separated: model (the routers) and/or uniform (random experts per token)",
    )  # fmt: skip
    b.add_argument("--routing-trace", default=None, help="also replay a recorded trace (.npz)")
    b.add_argument(
        "--prefill-group", type=_int_at_least(0), default=None,
        help=f"tokens of a prompt prefilled layer by layer (0: chunk by chunk; default: "
        f"{GROUP_DEFAULT_TEXT})",
    )  # fmt: skip
    b.add_argument(
        "--prompts", type=_int_list, default="8,512,4096,16384", help="prompt lengths, comma-sep."
    )
    b.add_argument("--decode-tokens", type=_int_at_least(2), default=64, help="after the first")
    b.add_argument(
        "--long-decode-tokens", type=count, default=16,
        help="after the longest prompt (from a cold pool, after as many untimed tokens as the "
        "shortest prompt, at most 16: compared with the short-position row)",
    )  # fmt: skip
    b.add_argument("--profile-tokens", type=count, default=2, help="decode tokens profiled")
    b.add_argument("--seed", type=count, default=0, help="weights, prompts and uniform routing")
    b.add_argument("--threads", type=pos_int, default=None, help="CPU threads for torch")
    b.add_argument(
        "--no-graphs", action="store_true", help="decode eagerly instead of as CUDA graphs"
    )
    b.add_argument(
        "--max-context", type=pos_int, default=None,
        help="the engine's max_context (default: what the prompts and decode need)",
    )  # fmt: skip
    _add_lane_args(b, several=True)
    b.add_argument(
        "--mtp", type=_int_at_least(0, 3), default=0,
        help="also decode the short-position tokens speculatively with this many drafts: from "
        "the MTP block, and forced drafts kept at 50/70/90%% (random weights keep few of the "
        "block's own)",
    )  # fmt: skip
    b.set_defaults(func=cmd_bench)

    pr = command(
        "profile",
        help="--routing: which experts a model routes to; --decode: where a token's time goes",
    )
    _add_model_args(pr)
    mode = pr.add_mutually_exclusive_group()
    mode.add_argument(
        "--routing", action="store_true",
        help="record the experts random tokens route to: a profile JSON (--out) for "
        "load(hot_profile=...), and with --trace the decode-order trace (.npz)",
    )  # fmt: skip
    mode.add_argument(
        "--decode", action="store_true",
        help="time decode tokens per layer and per graph (GPU time, idle gaps, scheduler, "
        "copies); a table and a JSON line, with --trace a Chrome/Perfetto trace (.json)",
    )  # fmt: skip
    pr.add_argument(
        "--tokens", type=pos_int, default=None,
        help="tokens to run (routing: random tokens, 2048; decode: tokens timed, 16)",
    )  # fmt: skip
    pr.add_argument("--chunk", type=pos_int, default=512, help="routing: tokens per forward pass")
    pr.add_argument("--out", default=None, help="routing: the profile JSON to write")
    pr.add_argument(
        "--trace", default=None,
        help="routing: also save the decode-order trace (.npz); decode: a Chrome trace (.json)",
    )  # fmt: skip
    pr.add_argument("--prompt-tokens", type=pos_int, default=32, help="decode: prompt length")
    pr.add_argument(
        "--plot", default=None, help="decode: stacked bars per layer (.png; needs matplotlib)"
    )
    pr.add_argument(
        "--compare-eager", action="store_true", help="decode: also the eager step, side by side"
    )
    pr.add_argument(
        "--synthetic", choices=["flash", "tiny"], default=None,
        help="decode: a preset built in memory with random weights instead of --model (as "
        "`homeseek bench`; on CUDA the process is capped at --gpu-mem-gb, default 24)",
    )  # fmt: skip
    pr.add_argument(
        "--expert-alias", type=count, default=64,
        help="decode --synthetic: distinct expert records in host RAM (0: every expert its own)",
    )  # fmt: skip
    pr.set_defaults(func=cmd_profile)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from homeseek.bench import BenchConfig, main

    device = _check_device(args.device)
    cuda = device.startswith("cuda")
    model, synthetic = args.model, args.synthetic
    if model is not None and synthetic is not None:
        raise UsageError("give --model or --synthetic, not both")
    if model is None and synthetic is None:  # the full-size yardstick on a GPU, tiny on a CPU
        synthetic, model = ("flash", None) if cuda else (None, "tiny")
    if model is not None and model != "tiny" and not (Path(model) / "config.json").is_file():
        raise UsageError(f"--model {model}: not a checkpoint directory (no config.json) nor 'tiny'")
    routings = tuple(r.strip() for r in args.routing.split(",") if r.strip())
    bad = [r for r in routings if r not in ("model", "uniform")]
    if bad or not routings:
        raise UsageError(f"--routing {args.routing!r}: use model, uniform or model,uniform")
    if args.routing_trace and not Path(args.routing_trace).is_file():
        raise UsageError(f"--routing-trace {args.routing_trace}: no such file")
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
        layers=args.layers,
        resident=args.resident,
        routings=routings,
        prompts=args.prompts,
        decode_tokens=args.decode_tokens,
        long_decode_tokens=args.long_decode_tokens,
        profile_tokens=args.profile_tokens,
        seed=args.seed,
        graphs=False if args.no_graphs or not cuda else None,
        context=args.max_context,
        mtp=args.mtp,
        cpu_lanes=args.cpu_lane,
        cpu_threads=args.cpu_threads,
        prefetch=args.prefetch,
        prefill_group=args.prefill_group,
    )
    return main(bc)


def cmd_profile(args: argparse.Namespace) -> int:
    if not (args.routing or args.decode):
        print(
            "homeseek profile needs a mode:\n"
            "  --routing  which experts random tokens route to -> a profile JSON (--out)\n"
            "             whose top entries load(hot_profile=...) pins; --trace saves the\n"
            "             decode-order trace\n"
            "  --decode   where a decode token's time goes, per layer and graph: GPU time,\n"
            "             idle gaps, scheduler, copies; --trace/--plot/--compare-eager add views"
        )
        return 2
    routing_only = {"--out": args.out, "--chunk": args.chunk != 512}
    decode_only = {
        "--plot": args.plot, "--compare-eager": args.compare_eager,
        "--prompt-tokens": args.prompt_tokens != 32, "--synthetic": args.synthetic,
        "--expert-alias": args.expert_alias != 64,
    }  # fmt: skip
    wrong = [k for k, v in (decode_only if args.routing else routing_only).items() if v]
    if wrong:
        raise UsageError(f"{wrong[0]} is for {'--decode' if args.routing else '--routing'} only")
    if args.routing:
        return _profile_routing(args)
    return _profile_decode(args)


def _profile_routing(args: argparse.Namespace) -> int:
    from homeseek.profile import record_routing, routing_profile, save_trace, write_profile

    if args.out is None:
        raise UsageError("--routing needs --out FILE (the profile JSON to write)")
    tokens = args.tokens or 2048
    if args.max_context is None:
        args.max_context = tokens + 16
    eng = _load(args)
    steps = record_routing(eng, tokens, chunk=args.chunk)
    counts = routing_profile(steps, eng.cfg.num_hidden_layers, eng.cfg.n_routed_experts)
    write_profile(args.out, counts)
    if args.trace:
        save_trace(args.trace, steps)
    used = int((counts > 0).sum())
    print(f"{args.out}: {len(steps)} routing steps over {tokens} tokens; {used} of "
          f"{counts.size} experts used")  # fmt: skip
    return 0


def _profile_decode(args: argparse.Namespace) -> int:
    from homeseek import profiler

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    pc = profiler.DecodeProfileConfig(tokens=args.tokens or 16, prompt=args.prompt_tokens,
                                      compare_eager=args.compare_eager)  # fmt: skip
    if args.max_context is None:
        args.max_context = pc.prompt + pc.warmup + pc.tokens + 16
    eng = _synthetic_engine(args) if args.synthetic else _load(args)
    res = profiler.profile_decode(eng, pc)
    if args.trace:
        Path(args.trace).write_text(json.dumps(profiler.chrome_trace(res["_tokens"])))
        print(f"trace: {args.trace} (open in ui.perfetto.dev or chrome://tracing)")
    if args.plot:
        profiler.plot(res, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _synthetic_engine(args: argparse.Namespace) -> Engine:
    """`profile --decode --synthetic`: the preset built in memory, the process capped at the
    GPU budget (default 24 GiB on CUDA), as `homeseek bench` measures."""
    import torch

    from homeseek.bench import build_engine, cap_process
    from homeseek.config import RuntimeConfig

    if args.model != "tiny":
        raise UsageError("give --model or --synthetic, not both")
    device = _check_device(args.device)
    gpu = args.gpu_mem_gb
    if gpu is None and device.startswith("cuda"):
        gpu = 24.0
    if args.threads:
        torch.set_num_threads(args.threads)
    cap_process(device, gpu)
    rt = RuntimeConfig.build(
        device=device,
        dtype=getattr(torch, DTYPES[args.dtype]),
        gpu_mem_gb=gpu,
        host_mem_gb=args.host_mem_gb,
        max_context=args.max_context,
        quant_sim=not args.no_quant_sim,
        graphs=False if args.no_graphs else None,
        cpu_lane=args.cpu_lane,
        cpu_threads=args.cpu_threads,
        prefetch=args.prefetch == "on",
    )
    return build_engine(rt, None, args.synthetic, expert_alias=args.expert_alias or None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        # The subcommand's parser words it like argparse's own errors: one line, exit 2.
        args.parser.error(str(e))
    except CliError as e:
        print(f"homeseek: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError) as e:
        # ConfigError, ContextError (ValueError) and CheckpointError (RuntimeError) carry
        # messages written for users; any other RuntimeError is a bug and keeps its traceback.
        from homeseek.checkpoint import CheckpointError

        if isinstance(e, RuntimeError) and not isinstance(e, CheckpointError):
            raise
        print(f"homeseek: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
