"""End-to-end: one RoBERTa encoder layer and the whole masked-LM model, forward + backward, stock
Hugging Face (eager and SDPA attention, ``torch.compile`` on a GPU) against the patched model on
each roberta_fast backend that runs on the device.

The layer takes full-length sequences (no padding mask); the model takes a padded batch with
lengths uniform in [seq/4, seq] and 15% of the real tokens labelled. TFLOP/s count the model FLOPs
of the padded batch as stock computes them (matmuls and attention, x3 for forward + backward), so
within a group they are proportional to speed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from benchmarks.common import Case, Unavailable, benchmark_case, env_settings, pytest_cases

ROBERTA_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, vocab_size=50265, max_position_embeddings=514)
ROBERTA_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, vocab_size=50265, max_position_embeddings=514)


def _config(shape: dict, attn: str, **overrides):
    from transformers import RobertaConfig

    config = RobertaConfig(**{**shape, **overrides}, type_vocab_size=1, layer_norm_eps=1e-5,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    config._attn_implementation = attn
    return config


def _layer_flops(config, batch: int, seq: int) -> float:
    h, i = config.hidden_size, config.intermediate_size
    per_token = 2 * (4 * h * h + 2 * h * i) + 4 * seq * h  # projections, FFN, QK^T and PV
    return 3.0 * batch * seq * per_token


def _model_flops(config, batch: int, seq: int) -> float:
    h, v = config.hidden_size, config.vocab_size
    head = 3.0 * batch * seq * 2 * (h * h + h * v)
    return config.num_hidden_layers * _layer_flops(config, batch, seq) + head


def _patch_fn():
    """``roberta_fast.patch`` wrapped so that "cannot patch here" reads as a skipped case."""
    try:
        from roberta_fast.patch import patch
    except ImportError as exc:
        raise Unavailable(f"patch() is not available: {exc}") from exc

    def apply(model, **options):
        try:
            return patch(model, **options)
        except RuntimeError as exc:  # a fast module does not load here; patch() changed nothing
            raise Unavailable(f"patch() cannot run here: {exc}") from exc

    return apply


def _check_backend(backend: str) -> None:
    import roberta_fast

    why = roberta_fast.available_backends().get(backend, "unknown backend")
    if not why.startswith("ok"):
        raise Unavailable(f"backend {backend} is unavailable: {why}")


def _pin(backend: str | None):
    """A context that runs the ops on ``backend``: forward and backward, and a layer called on its
    own (outside the model whose forward patch(backend=...) pins)."""
    if backend is None:
        return contextlib.nullcontext
    import roberta_fast

    return lambda: roberta_fast.use_backend(backend)


def _stock_impls(device: str, quick: bool, model: bool) -> list[tuple[str, str, bool]]:
    """(impl name, HF attention implementation, compiled) of the stock baselines."""
    impls = [("HF sdpa", "sdpa", False)]
    # Eager attention on a CPU model run costs as much as the rest of the quick suite together.
    if not (model and quick and device == "cpu"):
        impls.insert(0, ("HF eager", "eager", False))
    # Compiling on a CPU takes minutes here; on a GPU it is the baseline users reach for.
    if device == "cuda" or not quick:
        impls.append(("torch.compile(HF sdpa)", "sdpa", True))
    return impls


def _fast_backends(device: str) -> list[str]:
    # Triton on a CPU runs in the interpreter, whose timings say nothing.
    return ["cuda", "triton"] if device == "cuda" else ["cpu"]


def _layer_setup(shape: dict, batch: int, seq: int, device: str, dtype: torch.dtype,
                 attn: str, compiled: bool, backend: str | None):
    def setup():
        from transformers import RobertaModel

        if backend is not None:
            _check_backend(backend)
            patch = _patch_fn()
        # A one-layer model with a tiny vocabulary: patch() sees a whole model, and the layer is
        # taken from it afterwards, whatever patch() puts in its place.
        config = _config(shape, attn, num_hidden_layers=1, vocab_size=8)
        model = RobertaModel(config, add_pooling_layer=False)
        if backend is not None:
            patch(model, backend=backend)
        model = model.to(device=device, dtype=dtype).train()
        layer = model.encoder.layer[0]
        if compiled:
            layer = torch.compile(layer)
        x = torch.randn(batch, seq, config.hidden_size, device=device, dtype=dtype,
                        requires_grad=True)
        grad = torch.randn_like(x)
        pin = _pin(backend)

        def fn():
            with pin():
                out = layer(x)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(grad)

        return fn

    return setup


def _model_inputs(config, batch: int, seq: int, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, seq // 4), seq + 1, (batch,), generator=gen)
    ids = torch.randint(4, config.vocab_size - 1, (batch, seq), generator=gen)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    ids[:, 0] = 0
    ids[torch.arange(batch), lengths - 1] = 2
    ids = ids.masked_fill(~mask, config.pad_token_id)
    chosen = (torch.rand(batch, seq, generator=gen) < 0.15) & mask
    chosen[:, 1] |= True  # at least one label per row
    labels = ids.masked_fill(~chosen, -100)
    return ids.to(device), mask.long().to(device), labels.to(device)


def _model_setup(shape: dict, layers: int, batch: int, seq: int, device: str,
                 dtype: torch.dtype, attn: str, compiled: bool, backend: str | None, unpad: bool):
    def setup():
        from transformers import RobertaForMaskedLM

        if backend is not None:
            _check_backend(backend)
            patch = _patch_fn()
        config = _config(shape, attn, num_hidden_layers=layers)
        model = RobertaForMaskedLM(config)
        if backend is not None:
            patch(model, backend=backend, unpad=unpad)
        model = model.to(device=device, dtype=dtype).train()
        run = torch.compile(model) if compiled else model
        ids, mask, labels = _model_inputs(config, batch, seq, device, seed=batch * 100003 + seq)
        pin = _pin(backend)

        def fn():
            with pin():
                run(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

        return fn

    return setup


def _sizes(device: str, quick: bool) -> tuple[list, list]:
    """Layer sizes (name, shape, batch, seq) and model sizes (name, shape, layers, batch, seq)."""
    if device == "cuda":
        if quick:
            return ([("base", ROBERTA_BASE, 8, 512)],
                     [("roberta-base", ROBERTA_BASE, 12, 8, 512)])
        return ([("base", ROBERTA_BASE, 32, 128), ("base", ROBERTA_BASE, 8, 512),
                 ("large", ROBERTA_LARGE, 8, 512)],
                [("roberta-base", ROBERTA_BASE, 12, 16, 512),
                 ("roberta-large", ROBERTA_LARGE, 24, 8, 512)])
    if quick:
        # A CPU does a few tens of GFLOP/s: the quick run keeps base widths with fewer tokens and,
        # for the model, 2 of the 12 layers (the vocabulary projection stays full size).
        return ([("base", ROBERTA_BASE, 1, 128)],
                [("roberta-base (2 of 12 layers)", ROBERTA_BASE, 2, 1, 64)])
    return ([("base", ROBERTA_BASE, 4, 128), ("base", ROBERTA_BASE, 1, 512)],
            [("roberta-base", ROBERTA_BASE, 12, 2, 128)])


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """Layer and whole-model cases: stock baselines first, then each fast backend of the device."""
    layer_sizes, model_sizes = _sizes(device, quick)
    for name, shape, batch, seq in layer_sizes:
        config = _config(shape, "sdpa", num_hidden_layers=1)
        group = f"layer {name} b{batch} s{seq} fwd+bwd"
        params = {"kind": "layer", "hidden": shape["hidden_size"], "batch": batch, "seq": seq,
                  "tokens": batch * seq}
        flops = _layer_flops(config, batch, seq)
        for impl, attn, compiled in _stock_impls(device, quick, model=False):
            yield Case(group, impl, _layer_setup(shape, batch, seq, device, dtype, attn, compiled,
                                                 None), flops=flops, baseline=True, params=params)
        for backend in _fast_backends(device):
            yield Case(group, f"roberta_fast {backend}",
                       _layer_setup(shape, batch, seq, device, dtype, "sdpa", False, backend),
                       flops=flops, params=params)
    for name, shape, layers, batch, seq in model_sizes:
        config = _config(shape, "sdpa", num_hidden_layers=layers)
        group = f"{name} MLM b{batch} s{seq} fwd+bwd"
        params = {"kind": "model", "hidden": shape["hidden_size"], "layers": layers,
                  "batch": batch, "seq": seq, "tokens": batch * seq}
        flops = _model_flops(config, batch, seq)
        for impl, attn, compiled in _stock_impls(device, quick, model=True):
            yield Case(group, impl, _model_setup(shape, layers, batch, seq, device, dtype, attn,
                                                 compiled, None, False),
                       flops=flops, baseline=True, params=params)
        for backend in _fast_backends(device):
            for unpad in (False, True) if device == "cuda" else (False,):
                yield Case(group, f"roberta_fast {backend}" + (" unpad" if unpad else ""),
                           _model_setup(shape, layers, batch, seq, device, dtype, "sdpa", False,
                                        backend, unpad),
                           flops=flops, params=params)


try:
    import pytest
except ImportError:  # `roberta-fast bench` does not need pytest; only the pytest entry point does
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("case", pytest_cases(cases))
    def test_model(benchmark, case: Case) -> None:
        benchmark_case(benchmark, case, env_settings()[0])
