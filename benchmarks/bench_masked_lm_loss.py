"""The masked-LM head, forward + backward, at roberta-base sizes (H 768, V 50265), 15% of the
tokens labelled:

- "stock HF" (baseline): ``RobertaLMHead`` on every position + ``CrossEntropyLoss``;
- "gather then stock" (baseline): the stock head on the gathered labelled rows + ``F.cross_entropy``;
- "roberta_fast <backend> (logits=none|masked)": ``MaskedLMHead`` (gather, transform, the fused
  chunked loss) on each roberta_fast backend that runs on the device (never the Triton interpreter).

Each timed call ends with ``zero_grad(set_to_none=True)``, so every call starts without gradients,
as a training step does after the optimizer: the peak memory is what one step adds on top of the
parameters and inputs, the new gradients included (the decoder's [V, H] weight gradient alone is
147 MiB in fp32, a floor for every impl). TFLOP/s count the useful
work of every impl alike (the labelled rows' dense + decoder GEMMs, x3 for forward + backward), so
within a group they are proportional to speed.

Run ``python -m benchmarks.bench_masked_lm_loss [--full]`` for a table on this machine, or
``pytest benchmarks/bench_masked_lm_loss.py`` for pytest-benchmark; ``--row-kernel`` times the row
kernel alone (one chunk of logits, fp32 and bf16) against the copy ceiling instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import Case

HIDDEN = 768
VOCAB = 50265
LABELLED = 0.15
IGNORE = -100


def _config():
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                         num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-5)


def _inputs(batch: int, seq: int, device: str, dtype: torch.dtype):
    features = torch.randn(batch, seq, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (batch, seq), device=device)
    labels = labels.masked_fill(torch.rand(batch, seq, device=device) >= LABELLED, IGNORE)
    return features, labels


def _stock_full(device, dtype, batch, seq):
    def setup():
        from transformers.models.roberta.modeling_roberta import RobertaLMHead

        head = RobertaLMHead(_config()).to(device=device, dtype=dtype)
        features, labels = _inputs(batch, seq, device, dtype)
        loss_fct = torch.nn.CrossEntropyLoss()

        def fn():
            logits = head(features)
            loss = loss_fct(logits.view(-1, VOCAB), labels.view(-1))
            loss.backward()
            head.zero_grad(set_to_none=True)
            features.grad = None
        return fn
    return setup


def _gather_then_stock(device, dtype, batch, seq):
    def setup():
        from transformers.models.roberta.modeling_roberta import RobertaLMHead

        head = RobertaLMHead(_config()).to(device=device, dtype=dtype)
        features, labels = _inputs(batch, seq, device, dtype)

        def fn():
            keep = labels.view(-1) != IGNORE
            rows = features.view(-1, HIDDEN)[keep]
            loss = F.cross_entropy(head(rows), labels.view(-1)[keep])
            loss.backward()
            head.zero_grad(set_to_none=True)
            features.grad = None
        return fn
    return setup


def _fast(device, dtype, batch, seq, backend, mode):
    def setup():
        import roberta_fast
        from roberta_fast.nn import MaskedLMHead

        head = MaskedLMHead(_config(), logits_mode=mode).to(device=device, dtype=dtype)
        features, labels = _inputs(batch, seq, device, dtype)

        def fn():
            with roberta_fast.use_backend(backend):
                loss, _ = head(features, labels)
            loss.backward()
            head.zero_grad(set_to_none=True)
            features.grad = None
        return fn
    return setup


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """Cases per token count: 8 x 128 and 8 x 512 (quick), plus 32 x 512 (16384 tokens, the GPU
    target shape: in the quick set too on a GPU, where it takes seconds)."""
    shapes = [(8, 128), (8, 512)]
    if not quick or device == "cuda":
        shapes.append((32, 512))
    for batch, seq in shapes:
        tokens = batch * seq
        group = f"fwd+bwd {batch}x{seq} tokens"
        rows = LABELLED * tokens
        flops = 3 * 2 * rows * HIDDEN * (VOCAB + HIDDEN)
        params = {"batch": batch, "seq": seq, "hidden": HIDDEN, "vocab": VOCAB,
                  "labelled": LABELLED, "dtype": str(dtype).replace("torch.", "")}
        yield Case(group, "stock HF", _stock_full(device, dtype, batch, seq), flops=flops,
                   baseline=True, params=params)
        yield Case(group, "gather then stock", _gather_then_stock(device, dtype, batch, seq),
                   flops=flops, baseline=True, params=params)
        for backend in common.native_backends(device):
            for mode in ("none", "masked"):
                yield Case(group, f"roberta_fast {backend} (logits={mode})",
                           _fast(device, dtype, batch, seq, backend, mode), flops=flops,
                           params={**params, "backend": backend, "logits": mode})


try:  # pytest glue; absent when the module runs as a script without pytest
    import pytest

    @pytest.mark.parametrize("case", common.pytest_cases(cases))
    def test_masked_lm_loss(benchmark, case):
        benchmark(case.setup())
except ImportError:  # pragma: no cover
    pass


def row_kernel_roofline(dtypes, rounds: int, device: str = "cpu", rows: int | None = None
                        ) -> list[dict]:
    """The row kernel alone (``masked_lm_loss_rows``: loss and gradient in place) on a
    ``[rows, V]`` chunk, every row labelled, timed round-robin next to a copy of the same byte
    count into a reused tensor (the kernel works in place: it allocates nothing) and next to
    eager PyTorch's ``cross_entropy`` + ``softmax`` on the chunk. ``rows``: by default the rows
    of one chunk of the op (its memory budget, 64 MiB on a CPU), so fp32 and bf16 move the same
    bytes. Bytes: the chunk read once and written once."""
    import importlib

    mlm_op = importlib.import_module("roberta_fast.ops.masked_lm_loss")  # the module, not the op

    out = []
    for dtype in dtypes:
        e = torch.empty((), dtype=dtype).element_size()
        n = rows or mlm_op._chunk_rows(device, VOCAB, e, None)
        logits = torch.randn(n, VOCAB, device=device).to(dtype)
        labels = torch.randint(0, VOCAB, (n,), device=device)
        scale = torch.full((1,), 1.0 / n, device=device)
        kernel = torch.ops.roberta_fast.masked_lm_loss_rows
        nbytes = 2 * n * VOCAB * e
        fns = {"copy, reused dst": common.copy_fn(nbytes, device, allocate=False),
               "roberta_fast row kernel": lambda: kernel(logits, labels, scale, IGNORE, True),
               "torch eager": lambda: (F.cross_entropy(logits, labels, reduction="none"),
                                       torch.softmax(logits, -1))}
        best = common.best_times(fns, device, rounds=rounds)
        for impl, t in best.items():
            out.append({"dtype": str(dtype).replace("torch.", ""), "rows": n, "impl": impl,
                        "ms": t * 1e3, "gb_per_s": nbytes / t / 1e9,
                        "of_copy": best["copy, reused dst"] / t})
        del fns, logits
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also 32 x 512 tokens")
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--row-kernel", action="store_true",
                        help="only the row kernel on one chunk, fp32 and bf16, against the copy "
                             "ceiling")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = args.device
    if args.row_kernel:
        print(f"row kernel, [rows, {VOCAB}] chunk, every row labelled, "
              f"{torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds; bytes: "
              "the chunk read and written once")
        for row in row_kernel_roofline([torch.float32, torch.bfloat16], args.rounds, device):
            print(f"{row['dtype']:<9} rows {row['rows']:<5} {row['impl']:<24} {row['ms']:8.2f} ms "
                  f"{row['gb_per_s']:6.1f} GB/s {100 * row['of_copy']:5.0f}% of copy", flush=True)
        return
    dtype = common.default_dtype(device)
    quick = not args.full
    rows = []
    for case in cases(device, dtype, quick):
        with contextlib.suppress(KeyboardInterrupt):
            row = common.run_case(case, device, quick=quick)
            rows.append(row)
            mem = row["peak_mem_bytes"]
            print(f"{row['group']:<26} {row['impl']:<36} {row['median_s'] * 1e3:9.1f} ms  "
                  f"{(mem or 0) / 2**20:8.1f} MiB", flush=True)
    by_group: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], {})[row["impl"]] = row
    for group, impls in by_group.items():
        stock = impls.get("stock HF")
        if not stock:
            continue
        for impl, row in impls.items():
            if impl == "stock HF":
                continue
            speed = stock["median_s"] / row["median_s"]
            mem = (row["peak_mem_bytes"] or 0) / max(stock["peak_mem_bytes"] or 1, 1)
            print(f"{group}: {impl}: {speed:.2f}x faster than stock, {mem:.3f} of its peak memory")


if __name__ == "__main__":
    main()
