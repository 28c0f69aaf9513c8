"""Training with the patched model follows the stock model step for step (float32, CPU)."""
from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from roberta_fast.masking import DynamicMaskingCollator  # noqa: E402
from tests.hf import patch  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

VOCAB, PAD, BOS, EOS, MASK = 100, 1, 0, 2, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def fast_options(unpad: bool) -> dict:
    """Every option whose module is in this tree."""
    options = dict(unpad=unpad)
    for option, module in (("layer_norm", "layer_norm_residual"), ("mlm_loss", "masked_lm_loss")):
        try:
            importlib.import_module(f"roberta_fast.nn.{module}")
        except ImportError:
            options[option] = False
    return options


def tiny_config(cls_name: str = "RobertaConfig", dropout: float = 0.0, **over):
    return getattr(transformers, cls_name)(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=PAD,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2, **over)


def synthetic_examples(n: int, low: int = 4, high: int = 17) -> list[dict]:
    """Sequences a tiny model learns in a few dozen steps: one token repeated, with a few random
    tokens mixed in; the class is the repeated token's parity."""
    out = []
    for _ in range(n):
        length = int(torch.randint(low, high, ()))
        token = int(torch.randint(4, 24, ()))
        body = torch.full((length - 2,), token)
        noise = torch.rand(length - 2) < 0.2
        body[noise] = torch.randint(4, VOCAB, (int(noise.sum()),))
        out.append({"input_ids": [BOS] + body.tolist() + [EOS], "label": token % 2})
    return out


def mlm_batches(steps: int, batch: int = 8) -> list[dict]:
    """Fixed masked batches, so both models see the same masks."""
    collate = DynamicMaskingCollator(mask_token_id=MASK, vocab_size=VOCAB, pad_token_id=PAD,
                                     special_token_ids=(BOS, EOS), mlm_probability=0.2)
    data = synthetic_examples(steps * batch)
    return [collate(data[i * batch:(i + 1) * batch]) for i in range(steps)]


def cls_batches(steps: int, batch: int = 8) -> list[dict]:
    collate = DynamicMaskingCollator(mask_token_id=MASK, vocab_size=VOCAB, pad_token_id=PAD,
                                     mlm_probability=0.0)
    data = synthetic_examples(steps * batch)
    out = []
    for i in range(steps):
        chunk = data[i * batch:(i + 1) * batch]
        b = collate(chunk)
        del b["labels"]
        b["labels"] = torch.tensor([e["label"] for e in chunk])
        out.append(b)
    return out


def train(model, batches, *, lr=2e-3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# The key bias does not change the attention output (softmax ignores a shift shared by all keys),
# so its gradient is zero up to rounding and AdamW turns that rounding into arbitrary steps; it
# is left out of the parameter comparison.
_UNIDENTIFIABLE = ("attention.self.key.bias",)


def assert_same_training(stock, fast, batches, tol=1e-4, param_tol=1e-3, learns=True):
    """Train a float64 copy of the stock model as the reference, then the stock and the patched
    model in float32 on the same batches. Every step's loss of the patched model is within
    ``tol`` of the reference, and every final parameter within ``param_tol``, or no further from
    it than twice the stock float32 run (rounding differences grow over many AdamW steps in any
    float32 run). Parameters get the wider floor: after 40-100 AdamW steps their float32 drift is
    chaotic (a LayerNorm bias measured 3.4e-4 against stock's 1.1e-4 in one run), while a wrong
    gradient moves them by a large fraction of their size."""
    ref = copy.deepcopy(stock).double()
    ref_losses = train(ref, batches)
    stock_losses = train(stock, batches)
    losses = train(fast, batches)

    def err(a, b):
        return abs(a - b) / abs(b)

    stock_worst = max(err(s, r) for s, r in zip(stock_losses, ref_losses))
    for step, (a, r) in enumerate(zip(losses, ref_losses)):
        assert err(a, r) <= 2 * stock_worst + tol, (
            f"step {step}: loss {a} vs float64 {r} (stock float32 worst rel err {stock_worst:.1e})")
    if learns:  # the run means something only if the loss moves
        assert sum(ref_losses[-10:]) < sum(ref_losses[:10])
    fast_params = dict(fast.named_parameters())
    stock_params = dict(stock.named_parameters())
    for name, p in ref.named_parameters():
        if name.endswith(_UNIDENTIFIABLE):
            continue
        e, base = rel_err(fast_params[name], p), rel_err(stock_params[name], p)
        assert e <= 2 * base + param_tol, f"{name}: rel err {e:.2e} (stock float32: {base:.2e})"
    return losses


@pytest.mark.parametrize("unpad", [False, True])
def test_mlm_loss_curve_matches_stock(unpad):
    stock = transformers.RobertaForMaskedLM(tiny_config()).train()
    fast = patch(copy.deepcopy(stock), **fast_options(unpad))
    losses = assert_same_training(stock, fast, mlm_batches(100))
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("unpad", [False, True])
def test_sequence_classification_fine_tuning_matches_stock(unpad):
    stock = transformers.RobertaForSequenceClassification(tiny_config()).train()
    fast = patch(copy.deepcopy(stock), **fast_options(unpad))
    # 40 steps do not always get a random tiny classifier off chance level (its float64 loss
    # rose over the run once in CI), so only the step-by-step agreement is asserted here.
    assert_same_training(stock, fast, cls_batches(40), learns=False)


def test_with_dropout_losses_fall_and_stay_finite():
    stock = transformers.RobertaForMaskedLM(tiny_config(dropout=0.1)).train()
    fast = patch(copy.deepcopy(stock), **fast_options(True))
    batches = mlm_batches(60)
    for model in (stock, fast):
        losses = train(model, batches)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-10:]) < sum(losses[:10]) * 0.95


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict, want: dict) -> None:
    """Gradients of the same batch summed in another order (micro-batches, ranks)."""
    assert set(got) == set(want)
    scale = max(float(g.norm()) for g in want.values())
    for name in want:
        if name.endswith(_UNIDENTIFIABLE):
            assert float((got[name] - want[name]).norm()) < 1e-5 * scale
        else:
            # Relative 1e-5, plus a floor of 1e-4 of the largest gradient: cancelling sums lose
            # relative precision to a change of order (FSDP's reduce-scatter left 3.9e-6 of the
            # largest on the token-type embedding gradient), and micro-batches re-padded to
            # their own length round their logits differently (2.3e-5 of the largest on the
            # classifier bias, a sum of probabilities minus one-hot). A lost, doubled or
            # mis-scaled shard or micro-batch moves a gradient by a large part of its size.
            err = float((got[name] - want[name]).norm())
            assert err < 1e-5 * float(want[name].norm()) + 1e-4 * scale, name


def test_gradient_accumulation_matches_full_batch():
    model = patch(transformers.RobertaForSequenceClassification(tiny_config()).train(),
                  **fast_options(True))
    full = cls_batches(1, batch=8)[0]
    model.zero_grad(set_to_none=True)
    model(**full).loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 4), slice(4, 8)):
        micro = {k: v[half] for k, v in full.items()}
        longest = int(micro["attention_mask"].sum(1).max())  # re-pad to the micro-batch
        micro = {k: (v[:, :longest] if v.dim() == 2 else v) for k, v in micro.items()}
        (model(**micro).loss / 2).backward()
    got = _grads(model)
    assert_same_gradients(got, want)


def _distributed_worker(rank: int, world: int, path: str, port: int) -> None:
    """One rank: the saved model, patched, wrapped in DDP or FSDP2, on its share of the batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        saved = torch.load(path, weights_only=False)
        model = transformers.RobertaForSequenceClassification(tiny_config())
        model.load_state_dict(saved["state"])
        patch(model.train(), **saved["options"])
        if saved["wrapper"] == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.roberta.encoder.layer:  # each layer its own shard group
                fully_shard(layer)
            wrapped = fully_shard(model)
        part = {k: v.chunk(world)[rank] for k, v in saved["batch"].items()}
        wrapped(**part).loss.backward()
        # FSDP leaves each rank a shard of every gradient: gather them (a collective, so on
        # every rank) before rank 0 saves.
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 .detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save(grads, path + ".grads")
    finally:
        dist.destroy_process_group()
    # A finished rank leaves at once: a gloo thread can keep the interpreter from exiting
    # (seen about once in ten runs, after destroy_process_group).
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(fn, args: tuple, world: int, timeout: float = 180.0) -> None:
    """``fn(rank, *args)`` in ``world`` spawned processes; a hang fails the test, not CI."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, wrapper):
    """DistributedDataParallel, and FSDP2 (``fully_shard``), over 2 gloo processes give the
    gradients of one process on the whole batch."""
    if wrapper == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="NOT RUN: no FSDP in this torch")
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("NOT RUN: this torch has no FSDP2 fully_shard")
    options = fast_options(True)
    model = patch(transformers.RobertaForSequenceClassification(tiny_config()).train(), **options)
    batch = cls_batches(1, batch=8)[0]
    path = os.path.join(tmp_path, "case.pt")
    torch.save({"state": model.state_dict(), "options": options, "batch": batch,
                "wrapper": wrapper}, path)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    want = _grads(model)

    _run_ranks(_distributed_worker, (2, path, _free_port()), world=2)
    got = torch.load(path + ".grads")
    assert_same_gradients(got, want)
