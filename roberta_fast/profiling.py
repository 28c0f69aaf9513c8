"""Training throughput of RoBERTa masked-LM training, stock Hugging Face against patched.

``run_profile`` trains the same model twice from identical weights on identical batches and
masks: once as stock ``transformers`` builds it, once after ``roberta_fast.patch``. It reports
real (non-padding) tokens per second, samples per second, the median step time, peak memory, and a
per-op time breakdown taken with ``torch.profiler``. ``roberta-fast profile`` is its command line.

The module also holds the environment description (versions, device, CPU, git commit) that every
result file of ``roberta-fast bench`` and ``profile`` carries.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "ProfileInputError",
    "ProfileOptions",
    "build_config",
    "device_name",
    "environment",
    "repo_root",
    "results_dir",
    "run_profile",
    "save_report",
    "write_profile_plot",
]

# RoBERTa's special token ids (<s>, <pad>, </s>, <unk>) as in the released tokenizer; <mask> is the
# last id of the vocabulary.
BOS, PAD, EOS, UNK = 0, 1, 2, 3
FIRST_REGULAR_ID = 4

PRESETS: dict[str, dict] = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=50265, max_position_embeddings=514),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=50265, max_position_embeddings=514),
    # Small enough for tests and smoke runs on a CPU; same architecture.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, vocab_size=1000, max_position_embeddings=130),
}


class ProfileInputError(ValueError):
    """A user-supplied option or file cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None (wheel install).

    Recognised by the ``benchmarks/common.py`` that lies next to the package directory.
    """
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "common.py").is_file() else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "unknown"


def device_name(device: str) -> str:
    """A filesystem-safe device name: ``cuda-NVIDIA_H100_80GB_HBM3``, ``cpu-AMD_EPYC...``."""
    if device == "cuda":
        return "cuda-" + _safe(torch.cuda.get_device_name())
    return "cpu-" + _safe(cpu_model())


def results_dir(device: str) -> Path:
    """Default folder for result files: ``benchmarks/results/<device-name>/`` in the checkout, or
    ``./roberta-fast-results/<device-name>/`` when the package is not run from a checkout."""
    root = repo_root()
    base = root / "benchmarks" / "results" if root else Path.cwd() / "roberta-fast-results"
    return base / device_name(device)


def _git_commit(root: Path | None) -> dict | None:
    if root is None or not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        # --no-optional-locks: only read, never refresh the index of a tree others work in.
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status",
                                "--porcelain", "--untracked-files=no"], check=True,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken optional package is just "absent"
        return None


def environment(device: str) -> dict:
    """What a result depends on: device, versions, CPU, backends, git commit and date."""
    import roberta_fast

    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "device_dir": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"),
        "roberta_fast": roberta_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "backends": roberta_fast.available_backends(),
        "git": _git_commit(repo_root()),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"memory_bytes": props.total_memory,
                      "sm_count": props.multi_processor_count,
                      "capability": f"{props.major}.{props.minor}"}
    return env


# ---------------------------------------------------------------------------------------------
# Configs and data
# ---------------------------------------------------------------------------------------------

def build_config(spec: str):
    """A ``transformers.RobertaConfig`` from a preset name (base, large, tiny) or a config.json."""
    try:
        from transformers import RobertaConfig
    except ImportError as exc:
        raise ProfileInputError(f"profiling needs transformers ({exc}); install roberta-fast[hf]")
    if spec in PRESETS:
        return RobertaConfig(**PRESETS[spec], type_vocab_size=1, layer_norm_eps=1e-5,
                             pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    path = Path(spec)
    if not path.is_file():
        raise ProfileInputError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) "
                                "nor an existing config.json file")
    try:
        config = RobertaConfig.from_json_file(str(path))
    except (OSError, ValueError) as exc:
        raise ProfileInputError(f"cannot read config {path}: {exc}") from exc
    if config.hidden_size % config.num_attention_heads:
        raise ProfileInputError(f"config {path}: hidden_size {config.hidden_size} is not a "
                                f"multiple of num_attention_heads {config.num_attention_heads}")
    return config


def load_token_rows(path: Path, vocab_size: int, pad_id: int = PAD) -> list[torch.Tensor]:
    """Rows of token ids from a ``.pt`` (tensor, list of rows, or dict with ``input_ids``) or a
    ``.npy`` (2-D integer array; trailing ``pad_id`` is padding). Empty rows are dropped."""
    if not path.is_file():
        raise ProfileInputError(f"--lengths: {path} is not a file (expected uniform, full, or a "
                                ".pt/.npy file of token-id rows)")
    try:
        if path.suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ProfileInputError(f"--lengths: {path} must end in .pt or .npy")
    except ProfileInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise ProfileInputError(f"--lengths: cannot load {path}: {exc}") from exc
    if isinstance(data, dict):
        if "input_ids" not in data:
            raise ProfileInputError(f"--lengths: {path} holds a dict without 'input_ids'")
        data = data["input_ids"]
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data[None]
        if data.dim() != 2:
            raise ProfileInputError(f"--lengths: {path} holds a {data.dim()}-D tensor; expected "
                                    "rows of token ids (2-D)")
        rows = list(data)
    elif isinstance(data, (list, tuple)):
        rows = [torch.as_tensor(r) for r in data]
    else:
        raise ProfileInputError(f"--lengths: {path} holds {type(data).__name__}; expected a "
                                "tensor, a list of rows, or a dict with 'input_ids'")
    out = []
    for row in rows:
        if row.is_floating_point() or row.dtype == torch.bool or row.dim() != 1:
            raise ProfileInputError(f"--lengths: {path} must hold 1-D integer rows of token ids")
        row = row.to(torch.long)
        real = (row != pad_id).nonzero()
        if len(real) == 0:
            continue
        row = row[: int(real[-1]) + 1]
        bad = (row < 0) | (row >= vocab_size)
        if bool(bad.any()):
            raise ProfileInputError(f"--lengths: {path} holds token id {int(row[bad][0])}, "
                                    f"outside the model's vocabulary [0, {vocab_size})")
        out.append(row)
    if not out:
        raise ProfileInputError(f"--lengths: {path} holds no non-empty row")
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, L] long
    attention_mask: torch.Tensor   # [B, L] long, 1 = real token
    special: torch.Tensor          # [B, L] bool, True for <s>, </s>, <pad>
    real_tokens: int


def make_batches(config, *, batch: int, seq: int, count: int, lengths: str,
                 generator: torch.Generator) -> list[Batch]:
    """``count`` batches of ``batch`` rows of at most ``seq`` tokens (on the CPU).

    ``lengths`` is ``uniform`` (lengths uniform in ``[seq/4, seq]``), ``full`` (every row ``seq``
    long) or a path to token-id rows (see ``load_token_rows``), which are cut to ``seq`` and used
    in turn. Synthetic rows are ``<s> ids </s>`` with ids drawn from the regular vocabulary.
    """
    vocab = config.vocab_size
    pad = config.pad_token_id if config.pad_token_id is not None else PAD
    rows_from_file = None
    if lengths not in ("uniform", "full"):
        rows_from_file = load_token_rows(Path(lengths), vocab, pad)
    elif vocab <= FIRST_REGULAR_ID + 1:
        raise ProfileInputError(f"vocab_size {vocab} is too small for synthetic token ids")
    specials = torch.tensor([BOS, EOS, pad])
    out = []
    next_row = 0
    for _ in range(count):
        ids = torch.full((batch, seq), pad, dtype=torch.long)
        row_lengths = []
        for r in range(batch):
            if rows_from_file is not None:
                row = rows_from_file[next_row % len(rows_from_file)][:seq]
                next_row += 1
            else:
                low = max(2, seq // 4)
                n = seq if lengths == "full" else int(torch.randint(low, seq + 1, (1,),
                                                                    generator=generator))
                row = torch.randint(FIRST_REGULAR_ID, vocab - 1, (n,), generator=generator)
                row[0], row[-1] = BOS, EOS
            ids[r, : len(row)] = row
            row_lengths.append(len(row))
        # From the row lengths, not from the pad id: a file's row may hold the pad id inside.
        attention_mask = (torch.arange(seq)[None, :] < torch.tensor(row_lengths)[:, None]).long()
        special = torch.isin(ids, specials) | (attention_mask == 0)
        out.append(Batch(ids, attention_mask, special, int(attention_mask.sum())))
    return out


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------

MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ProfileOptions:
    """What ``run_profile`` trains and how; mirrors ``roberta-fast profile``'s options."""

    config: str = "base"
    batch: int = 16
    seq: int = 512
    steps: int = 20
    warmup: int = 5
    grad_accum: int = 1
    amp: str = "bf16"
    # The dtype of the whole model (``model.to(dtype)``): "fp32", or "bf16" / "fp16" for pure
    # half-precision training (then amp must be "none": the model has no fp32 weights to cast).
    dtype: str = "fp32"
    unpad: bool = False
    lengths: str = "uniform"
    device: str = "cuda"
    backend: str = "auto"
    trace: str | None = None
    # Which fast modules patch() swaps in (all by default; turn one off to see its share).
    attention: bool = True
    layer_norm: bool = True
    mlm_loss: bool = True
    profile_steps: int = 2
    top_ops: int = 15
    lr: float = 1e-4
    seed: int = 0
    run_stock: bool = True
    run_patched: bool = True

    def validate(self) -> None:
        for name in ("batch", "seq", "steps", "grad_accum", "profile_steps"):
            if getattr(self, name) < 1:
                raise ProfileInputError(f"--{name.replace('_', '-')} must be at least 1, "
                                        f"got {getattr(self, name)}")
        if self.seq < 2:
            raise ProfileInputError(f"--seq must be at least 2 (<s> and </s>), got {self.seq}")
        if self.warmup < 0:
            raise ProfileInputError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.amp not in ("bf16", "fp16", "none"):
            raise ProfileInputError(f"--amp must be bf16, fp16 or none, got {self.amp!r}")
        if self.device not in ("cpu", "cuda"):
            raise ProfileInputError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ProfileInputError("--device cuda: no CUDA device is available (torch "
                                    f"{torch.__version__}, CUDA build: {torch.version.cuda})")
        if self.amp == "fp16" and self.device == "cpu":
            raise ProfileInputError("--amp fp16 is for CUDA; use --amp bf16 or none on the CPU")
        if self.dtype not in MODEL_DTYPES:
            raise ProfileInputError(f"--dtype must be one of {', '.join(MODEL_DTYPES)}, got "
                                    f"{self.dtype!r}")
        if self.dtype != "fp32" and self.amp != "none":
            raise ProfileInputError(f"--dtype {self.dtype} casts the whole model; it takes "
                                    f"--amp none (got --amp {self.amp})")
        if self.dtype == "fp16" and self.device == "cpu":
            raise ProfileInputError("--dtype fp16 is for CUDA; use --dtype bf16 on the CPU")


class PatchUnavailable(RuntimeError):
    """The patched run cannot happen here (patch or masking missing); the message says why."""


def _autocast(opts: ProfileOptions):
    if opts.amp == "none":
        return torch.autocast(opts.device, enabled=False)
    dtype = torch.bfloat16 if opts.amp == "bf16" else torch.float16
    return torch.autocast(opts.device, dtype=dtype)


def _masking_fn():
    """``roberta_fast.masking.dynamic_mask`` or None with the reason."""
    try:
        from .masking import dynamic_mask
    except ImportError as exc:
        return None, f"roberta_fast.masking is not available ({exc})"
    return dynamic_mask, "roberta_fast.masking.dynamic_mask"


def _vm_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(device: str) -> tuple[float | None, str]:
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated()), "peak allocated (torch.cuda)"
    kib = _vm_kib("VmHWM")
    return (float(kib * 1024) if kib is not None else None), "peak resident set of the process"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _profile_breakdown(prof, device: str, steps: int, top: int) -> dict:
    """Top ops by self time per step, ours (names with ``roberta_fast``) marked, and the time spent
    inside our ops counted once (an op of ours nested in another of ours is not added again)."""
    use_device = device == "cuda"
    attr_self = "self_device_time_total" if use_device else "self_cpu_time_total"
    attr_total = "device_time_total" if use_device else "cpu_time_total"
    averages = [a for a in prof.key_averages() if getattr(a, attr_self) > 0]
    averages.sort(key=lambda a: getattr(a, attr_self), reverse=True)
    total_self = sum(getattr(a, attr_self) for a in averages) or 1.0
    rows = [{
        "name": a.key,
        "calls_per_step": a.count / steps,
        "self_ms_per_step": getattr(a, attr_self) / 1e3 / steps,
        "percent": 100.0 * getattr(a, attr_self) / total_self,
        "ours": "roberta_fast" in a.key,
    } for a in averages[:top]]

    ours_us = 0.0
    for evt in prof.events():
        if "roberta_fast" not in evt.name:
            continue
        parent, nested = evt.cpu_parent, False
        while parent is not None:
            if "roberta_fast" in parent.name:
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            ours_us += getattr(evt, attr_total)
    return {
        "clock": "device (CUDA kernels)" if use_device else "CPU",
        "total_ms_per_step": total_self / 1e3 / steps,
        "ours_ms_per_step": ours_us / 1e3 / steps,
        "ours_percent": 100.0 * ours_us / total_self,
        "top": rows,
    }


def _train_run(model, batches: list[Batch], opts: ProfileOptions, mask_fn, mask_token_id: int,
               vocab_size: int, progress: Callable[[str, int, int], None] | None,
               label: str, trace_path: str | None) -> dict:
    """Warm-up, timed steps and profiled steps of masked-LM training; the measurements."""
    from .backends import use_backend

    device = opts.device
    model.to(device=device, dtype=MODEL_DTYPES[opts.dtype]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    scaler = torch.amp.GradScaler(device, enabled=opts.amp == "fp16")
    mask_gen = torch.Generator(device=device).manual_seed(opts.seed + 1)
    gpu_batches = [Batch(b.input_ids.to(device), b.attention_mask.to(device),
                         b.special.to(device), b.real_tokens) for b in batches]
    pad = model.config.pad_token_id

    def micro_step(b: Batch) -> torch.Tensor:
        # Backward runs outside the model's forward, so the backend is pinned here for both.
        with use_backend(opts.backend):
            return _micro_step(b)

    def _micro_step(b: Batch) -> torch.Tensor:
        if mask_fn is not None:
            ids, labels = mask_fn(b.input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size,
                                  special_tokens_mask=b.special, generator=mask_gen,
                                  pad_token_id=pad)
        else:
            # Without dynamic masking, stock HF is timed with a label on every real token: its
            # cost does not depend on how many positions carry a label.
            ids, labels = b.input_ids, b.input_ids.masked_fill(b.special, -100)
        with _autocast(opts):
            loss = model(input_ids=ids, attention_mask=b.attention_mask, labels=labels).loss
        scaler.scale(loss / opts.grad_accum).backward()
        return loss.detach()

    cursor = 0

    def step() -> tuple[torch.Tensor, int]:
        nonlocal cursor
        tokens, loss = 0, None
        for _ in range(opts.grad_accum):
            b = gpu_batches[cursor % len(gpu_batches)]
            cursor += 1
            loss = micro_step(b)
            tokens += b.real_tokens
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss, tokens

    total = opts.warmup + opts.steps
    for i in range(opts.warmup):
        step()
        if progress:
            progress(label, i + 1, total)
    _sync(device)
    _reset_peak(device)
    times, losses, tokens = [], [], 0
    for i in range(opts.steps):
        start = time.perf_counter()
        loss, n = step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        tokens += n
        if progress:
            progress(label, opts.warmup + i + 1, total)
    peak, peak_kind = _peak(device)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(opts.profile_steps):
            step()
        _sync(device)
    if trace_path:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace_path)

    elapsed = sum(times)
    samples = opts.steps * opts.grad_accum * opts.batch
    return {
        "tokens_per_s": tokens / elapsed,
        "samples_per_s": samples / elapsed,
        "step_time_median_s": statistics.median(times),
        "step_time_iqr_s": _iqr(times),
        "step_times_s": times,
        "real_tokens": tokens,
        "padded_tokens": opts.steps * opts.grad_accum * opts.batch * opts.seq,
        "losses": losses,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "breakdown": _profile_breakdown(prof, device, opts.profile_steps, opts.top_ops),
        "trace": trace_path,
    }


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _trace_paths(trace: str | None) -> dict[str, str | None]:
    if not trace:
        return {"stock": None, "patched": None}
    p = Path(trace)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    return {name: str(p.with_name(f"{stem}.{name}.json")) for name in ("stock", "patched")}


def run_profile(opts: ProfileOptions,
                progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train stock and patched masked-LM models on the same data; the report as a plain dict.

    The patched run needs ``roberta_fast.patch`` and ``roberta_fast.masking``; when one is missing
    its entry holds ``{"error": reason}`` and the stock run still happens. ``progress(label,
    done, total)`` is called after each step.
    """
    opts.validate()
    config = build_config(opts.config)
    limit = config.max_position_embeddings - (config.pad_token_id or 0) - 1
    if opts.seq > limit:
        raise ProfileInputError(f"--seq {opts.seq} exceeds what the config's "
                                f"max_position_embeddings ({config.max_position_embeddings}) "
                                f"allows for RoBERTa positions ({limit})")
    if opts.backend != "auto":
        import roberta_fast

        why = roberta_fast.available_backends().get(opts.backend)
        if why is None:
            raise ProfileInputError(f"--backend {opts.backend!r} is unknown; choose auto, "
                                    + ", ".join(roberta_fast.available_backends()))
        if not why.startswith("ok"):
            raise ProfileInputError(f"--backend {opts.backend} is unavailable here: {why}")
    from transformers import RobertaForMaskedLM

    torch.manual_seed(opts.seed)
    data_gen = torch.Generator().manual_seed(opts.seed)
    count = max(1, min(opts.warmup + opts.steps + opts.profile_steps, 64)) * opts.grad_accum
    batches = make_batches(config, batch=opts.batch, seq=opts.seq, count=count,
                           lengths=opts.lengths, generator=data_gen)
    mask_token_id = config.vocab_size - 1
    mask_fn, masking = _masking_fn()

    config._attn_implementation = "sdpa"  # what stock users run today
    pristine = RobertaForMaskedLM(config)
    traces = _trace_paths(opts.trace)
    results: dict[str, dict] = {}

    if opts.run_stock:
        model = copy.deepcopy(pristine)
        try:
            results["stock"] = _train_run(model, batches, opts, mask_fn, mask_token_id,
                                          config.vocab_size, progress, "stock", traces["stock"])
        finally:
            del model
            if opts.device == "cuda":
                torch.cuda.empty_cache()

    if opts.run_patched:
        try:
            results["patched"] = _patched_run(pristine, batches, opts, mask_fn, masking,
                                              mask_token_id, config, progress, traces["patched"])
        except PatchUnavailable as exc:
            results["patched"] = {"error": str(exc)}

    speedup = None
    if "tokens_per_s" in results.get("stock", {}) and "tokens_per_s" in results.get("patched", {}):
        speedup = results["patched"]["tokens_per_s"] / results["stock"]["tokens_per_s"]
    return {
        "kind": "profile",
        "environment": environment(opts.device),
        "options": asdict(opts),
        "model": {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                  "heads": config.num_attention_heads,
                  "intermediate_size": config.intermediate_size,
                  "vocab_size": config.vocab_size,
                  "parameters": sum(p.numel() for p in pristine.parameters()),
                  "stock_attention": "sdpa"},
        "masking": masking if mask_fn is not None else
        f"none: {masking}; stock is timed with a label on every real token",
        "mask_token_id": mask_token_id,
        "results": results,
        "speedup": speedup,
    }


def _patched_run(pristine, batches, opts, mask_fn, masking, mask_token_id, config, progress,
                 trace_path) -> dict:
    try:
        from .patch import patch
    except ImportError as exc:
        raise PatchUnavailable(f"patch() is not available: {exc}") from exc
    if mask_fn is None:
        raise PatchUnavailable(f"dynamic masking is not available: {masking}; the patched run "
                               "needs it so that both runs see the same masks")
    model = copy.deepcopy(pristine)
    try:
        try:
            patch(model, attention=opts.attention, layer_norm=opts.layer_norm,
                  mlm_loss=opts.mlm_loss, unpad=opts.unpad, backend=opts.backend)
        except RuntimeError as exc:  # a fast module that does not load here; nothing was changed
            raise PatchUnavailable(f"patch() cannot run here: {exc}") from exc
        return _train_run(model, batches, opts, mask_fn, mask_token_id, config.vocab_size,
                          progress, "patched", trace_path)
    finally:
        del model
        if opts.device == "cuda":
            torch.cuda.empty_cache()


def write_profile_plot(report: dict, path: Path) -> Path:
    """A PNG summary: tokens/s of both runs and the top ops of each run's breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in report["results"].items() if "tokens_per_s" in v}
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(6 + 6 * len(runs), 5), squeeze=False)
    ax = axes[0][0]
    names = list(runs)
    ax.bar(names, [runs[n]["tokens_per_s"] for n in names], color=["#888", "#2a7"][: len(names)])
    ax.set_ylabel("real tokens / s")
    opts = report["options"]
    title = f"{opts['config']} b{opts['batch']} s{opts['seq']} amp={opts['amp']}"
    if report.get("speedup"):
        title += f"  speedup {report['speedup']:.2f}x"
    ax.set_title(title)
    for i, name in enumerate(names):
        top = runs[name]["breakdown"]["top"][:10][::-1]
        sub = axes[0][i + 1]
        sub.barh([t["name"][:40] for t in top], [t["self_ms_per_step"] for t in top],
                 color=["#2a7" if t["ours"] else "#888" for t in top])
        sub.set_xlabel(f"self ms / step ({runs[name]['breakdown']['clock']})")
        sub.set_title(f"{name}: top ops")
        sub.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_report(report: dict, out_dir: Path, prefix: str, latest_name: str | None = None
                ) -> tuple[Path, Path]:
    """Write ``<prefix>-<timestamp>.json`` and a stable copy (``latest_name``, by default
    ``<prefix>-latest.json``) under ``out_dir``; both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{prefix}-{stamp}.json"
    text = json.dumps(report, indent=2, default=str)
    path.write_text(text)
    latest = out_dir / (latest_name or f"{prefix}-latest.json")
    latest.write_text(text)
    return path, latest
