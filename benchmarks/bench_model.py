"""End-to-end: one RoBERTa encoder layer and the whole masked-LM model, forward + backward, stock
Hugging Face (eager and SDPA attention, ``torch.compile`` on a GPU) against the patched model on
each roberta_fast backend that runs on the device.

The layer takes full-length sequences (no padding mask); the model takes a padded batch with
lengths uniform in [seq/4, seq] and 15% of the real tokens labelled. TFLOP/s count the model FLOPs
of the padded batch as stock computes them (matmuls and attention, x3 for forward + backward), so
within a group they are proportional to speed.

End-to-end throughput (groups ``e2e ...``): a training step of ``RobertaForMaskedLM`` (forward and
backward with dropout, 15% of the real tokens labelled; no optimizer step, which costs the same in
every row) and inference of ``RobertaForSequenceClassification`` under ``torch.inference_mode``,
the whole model in the run's dtype (``model.to(dtype)``), on a padded batch with lengths uniform
in [seq/4, seq] and on a full-length batch; in a bf16/fp16 run also the training step of the fp32
model under ``torch.autocast`` (mixed precision) at realistic lengths. Rows: stock (HF sdpa), ``torch.compile`` of it, the
patched model (``patch(model, unpad=True)``) and ``torch.compile`` of that (compiled rows outside ``--quick``
only; a quick GPU run has the realistic lengths only). They are timed interleaved,
best of a few rounds, and report real (non-padding) tokens per second; TFLOP/s there count only
the useful work (real tokens, the MLM head on the labelled tokens), so their fraction of the
matmul ceiling says how much of the machine reaches the model.
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


def _batch(config, batch: int, seq: int, lengths: str, task: str, device: str, seed: int):
    """(input_ids, attention_mask, labels or None, real lengths) of a synthetic batch: lengths
    ``"realistic"`` (uniform in [seq/4, seq]) or ``"full"``; labels (15% of the real tokens, at
    least one per row) for ``task == "train"``."""
    gen = torch.Generator().manual_seed(seed)
    if lengths == "full":
        sizes = torch.full((batch,), seq)
    else:
        sizes = torch.randint(max(2, seq // 4), seq + 1, (batch,), generator=gen)
    ids = torch.randint(4, config.vocab_size - 1, (batch, seq), generator=gen)
    mask = torch.arange(seq)[None, :] < sizes[:, None]
    ids[:, 0] = 0
    ids[torch.arange(batch), sizes - 1] = 2
    ids = ids.masked_fill(~mask, config.pad_token_id)
    labels = None
    if task == "train":
        chosen = (torch.rand(batch, seq, generator=gen) < 0.15) & mask
        chosen[:, 1] |= True
        labels = ids.masked_fill(~chosen, -100).to(device)
    return ids.to(device), mask.long().to(device), labels, sizes.tolist()


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
        ids, mask, labels, _ = _batch(config, batch, seq, "realistic", "train", device,
                                      seed=batch * 100003 + seq)
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


# ---------------------------------------------------------------------------------------------
# End-to-end throughput
# ---------------------------------------------------------------------------------------------

E2E_LENGTHS = {"realistic": "lengths U[seq/4, seq]", "full": "full length"}


def _useful_flops(config, sizes: list[int], task: str, labelled: int) -> float:
    """The work the model must do on real tokens only (x3 for forward + backward in training)."""
    h, inter = config.hidden_size, config.intermediate_size
    per_layer = sum(n * 2 * (4 * h * h + 2 * h * inter) + 4 * n * n * h for n in sizes)
    encoder = config.num_hidden_layers * per_layer
    if task == "train":
        return 3.0 * (encoder + labelled * 2 * (h * h + h * config.vocab_size))
    return encoder + len(sizes) * 2 * (h * h + 2 * h)  # pooled classifier, two labels


def _e2e_setup(shape: dict, layers: int, task: str, batch: int, seq: int, lengths: str,
               device: str, dtype: torch.dtype, patched: bool, compiled: bool, amp: bool):
    """``amp``: fp32 weights, the step under ``torch.autocast(device, dtype)`` (mixed-precision
    training); otherwise the whole model in ``dtype``."""
    def setup():
        from transformers import RobertaForMaskedLM, RobertaForSequenceClassification

        config = _config(shape, "sdpa", num_hidden_layers=layers)
        if patched:
            patch = _patch_fn()
        torch.manual_seed(layers * 1009 + batch)
        model = (RobertaForMaskedLM(config) if task == "train"
                 else RobertaForSequenceClassification(config))
        if patched:
            patch(model, unpad=True)
        model = model.to(device=device, dtype=torch.float32 if amp else dtype)
        model.train(task == "train")
        run = torch.compile(model) if compiled else model
        ids, mask, labels, _ = _batch(config, batch, seq, lengths, task, device,
                                          seed=batch * 100003 + seq)
        params = list(model.parameters())

        if task == "train":
            def fn():
                with torch.autocast(device, dtype=dtype, enabled=amp):
                    loss = run(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                for p in params:
                    p.grad = None
        else:
            def fn():
                with torch.inference_mode():
                    run(input_ids=ids, attention_mask=mask)

        return fn

    return setup


def _e2e_sizes(device: str, quick: bool) -> list[tuple[str, dict, int, str, int, int]]:
    """(name, shape, layers, task, batch, seq) of the end-to-end groups."""
    if device == "cuda":
        return [("roberta-base", ROBERTA_BASE, 12, "train", 32, 512),
                ("roberta-base", ROBERTA_BASE, 12, "infer", 128, 512)]
    if quick:  # 2 of 12 layers: the quick run stays short
        return [("roberta-base (2 of 12 layers)", ROBERTA_BASE, 2, "train", 8, 128),
                ("roberta-base (2 of 12 layers)", ROBERTA_BASE, 2, "infer", 32, 128)]
    return [("roberta-base", ROBERTA_BASE, 12, "train", 8, 128),
            ("roberta-base", ROBERTA_BASE, 12, "infer", 32, 128)]


def e2e_cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """Throughput groups: stock, torch.compile(stock), patched (unpad), torch.compile(patched)."""
    # Compiling a model takes minutes on a CPU and tens of seconds on a GPU host: not in --quick.
    compile_too = not quick
    # The GPU's quick run has seconds for this suite: the realistic lengths only.
    lengths_run = ["realistic"] if quick and device == "cuda" else list(E2E_LENGTHS)
    # Half-precision runs also train under autocast (fp32 weights), at realistic lengths.
    half = dtype in (torch.bfloat16, torch.float16)
    for name, shape, layers, task, batch, seq in _e2e_sizes(device, quick):
        config = _config(shape, "sdpa", num_hidden_layers=layers)
        runs = [(lengths, False) for lengths in lengths_run]
        if half and task == "train":
            runs.append(("realistic", True))
        for lengths, amp in runs:
            desc = E2E_LENGTHS[lengths]
            _, _, labels, sizes = _batch(config, batch, seq, lengths, task, "cpu",
                                             seed=batch * 100003 + seq)
            labelled = int((labels != -100).sum()) if labels is not None else 0
            group = f"e2e {task} {name} b{batch} s{seq} {desc.replace('seq', str(seq))}"
            if amp:
                group += f" autocast {'bf16' if dtype == torch.bfloat16 else 'fp16'}"
            params = {"kind": "e2e", "task": task, "layers": layers, "batch": batch, "seq": seq,
                      "lengths": lengths, "real_tokens": sum(sizes), "autocast": amp}
            flops = _useful_flops(config, sizes, task, labelled)
            impls = [("HF sdpa", False, False), ("torch.compile(HF sdpa)", False, True),
                     ("roberta_fast unpad", True, False),
                     ("torch.compile(roberta_fast unpad)", True, True)]
            for impl, patched, compiled in impls:
                if compiled and not compile_too:
                    continue
                yield Case(group, impl, _e2e_setup(shape, layers, task, batch, seq, lengths,
                                                   device, dtype, patched, compiled, amp),
                           flops=flops, baseline=not patched, params=params, interleave=True,
                           tokens=sum(sizes))


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
    yield from e2e_cases(device, dtype, quick)


try:
    import pytest
except ImportError:  # `roberta-fast bench` does not need pytest; only the pytest entry point does
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("case", pytest_cases(cases))
    def test_model(benchmark, case: Case) -> None:
        benchmark_case(benchmark, case, env_settings()[0])
