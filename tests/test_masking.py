"""Dynamic MLM masking: statistics, reproducibility, the collator, and transformers.Trainer."""
import pytest
import torch

from roberta_fast.masking import IGNORE_INDEX, DynamicMaskingCollator, dynamic_mask
from tests.helpers import binomial_bound

VOCAB, PAD, BOS, EOS, MASK = 100, 1, 0, 2, 3


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_statistics(p):
    batch, seqlen = 64, 257
    ids = torch.randint(4, VOCAB, (batch, seqlen))
    lengths = torch.randint(1, seqlen + 1, (batch,))
    pad = torch.arange(seqlen)[None] >= lengths[:, None]
    ids[pad] = PAD
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    ids[:, 0] = BOS
    masked, labels = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB,
                                  special_tokens_mask=special, mlm_probability=p,
                                  pad_token_id=PAD)
    selected = labels != IGNORE_INDEX
    assert masked.shape == ids.shape and masked.dtype == ids.dtype and labels.dtype == ids.dtype
    assert not selected[special].any() and not selected[pad].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # nothing else changes

    maskable = int((~special & ~pad).sum())
    n = int(selected.sum())
    assert abs(n / maskable - p) < binomial_bound(maskable, p)
    to_mask = masked[selected] == MASK
    unchanged = masked[selected] == ids[selected]
    # A random replacement may draw the original id or the mask id (1/VOCAB each).
    frac_mask = float(to_mask.float().mean())
    frac_same = float(unchanged.float().mean())
    assert abs(frac_mask - (0.8 + 0.1 / VOCAB)) < binomial_bound(n, 0.8)
    assert abs(frac_same - (0.1 + 0.1 / VOCAB)) < binomial_bound(n, 0.1)
    random_tokens = masked[selected][~to_mask & ~unchanged]
    assert random_tokens.numel() > 0 and int(random_tokens.min()) >= 0
    assert int(random_tokens.max()) < VOCAB
    # Random replacements spread over the vocabulary.
    assert random_tokens.unique().numel() > 20


def test_generator_reproducibility_and_fresh_masks():
    ids = torch.randint(4, VOCAB, (8, 33))
    a = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB,
                     generator=torch.Generator().manual_seed(7))
    b = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB,
                     generator=torch.Generator().manual_seed(7))
    c = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB)
    d = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(c[1], d[1])  # dynamic: every call draws a new mask


def test_edge_probabilities():
    ids = torch.randint(4, VOCAB, (4, 9))
    masked, labels = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=0.0)
    assert torch.equal(masked, ids) and (labels == IGNORE_INDEX).all()
    _, labels = dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=1.0)
    assert torch.equal(labels, ids)


def test_bad_input():
    ids = torch.randint(4, VOCAB, (2, 5))
    with pytest.raises(TypeError, match="integer"):
        dynamic_mask(ids.float(), mask_token_id=MASK, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="mask_token_id"):
        dynamic_mask(ids, mask_token_id=VOCAB, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="mlm_probability"):
        dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=1.5)
    with pytest.raises(ValueError, match="shape"):
        dynamic_mask(ids, mask_token_id=MASK, vocab_size=VOCAB,
                     special_tokens_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocab_size"):
        dynamic_mask(ids, mask_token_id=MASK, vocab_size=0)


def _collator(**kwargs):
    return DynamicMaskingCollator(mask_token_id=MASK, vocab_size=VOCAB, pad_token_id=PAD,
                                  special_token_ids=(BOS, EOS), **kwargs)


def _examples(n, low=3, high=20):
    out = []
    for _ in range(n):
        length = int(torch.randint(low, high, ()))
        body = torch.randint(4, VOCAB, (length - 2,)).tolist()
        out.append({"input_ids": [BOS] + body + [EOS]})
    return out


def test_collator_shapes_and_rules():
    examples = _examples(6)
    examples[2] = {"input_ids": torch.tensor(examples[2]["input_ids"])}  # tensors work too
    batch = _collator(mlm_probability=0.5)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for v in batch.values():
        assert v.shape == (6, longest) and v.dtype == torch.long
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == PAD).all()
    selected = batch["labels"] != IGNORE_INDEX
    assert not selected[pad].any()
    assert not selected[:, 0].any()  # <s> is special
    for row, e in enumerate(examples):
        ids = torch.as_tensor(e["input_ids"])
        assert torch.equal(batch["labels"][row, :len(ids)][selected[row, :len(ids)]],
                           ids[selected[row, :len(ids)]])
    assert selected.any()


def test_collator_pad_to_multiple_and_errors():
    batch = _collator(pad_to_multiple_of=8)(_examples(3, 3, 10))
    assert batch["input_ids"].shape[1] % 8 == 0
    with pytest.raises(ValueError, match="empty"):
        _collator()([])
    with pytest.raises(KeyError, match="input_ids"):
        _collator()([{"ids": [1, 2]}])
    with pytest.raises(ValueError, match="1-D"):
        _collator()([{"input_ids": torch.ones(2, 2, dtype=torch.long)}])
    with pytest.raises(ValueError, match="mask_token_id"):
        DynamicMaskingCollator(mask_token_id=VOCAB, vocab_size=VOCAB, pad_token_id=PAD)


def test_collator_in_dataloader():
    loader = torch.utils.data.DataLoader(_examples(10), batch_size=4, collate_fn=_collator())
    sizes = [b["input_ids"].shape[0] for b in loader]
    assert sizes == [4, 4, 2]


def test_trainer_steps_on_patched_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="NOT RUN: transformers.Trainer needs accelerate")
    from tests.hf import UNPAD_SUPPORTED, patch

    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64,
                                        max_position_embeddings=40, pad_token_id=PAD)
    model = transformers.RobertaForMaskedLM(config)
    options = dict(layer_norm=False, mlm_loss=False, unpad=UNPAD_SUPPORTED)
    for module in ("layer_norm_residual", "masked_lm_loss"):
        try:
            __import__(f"roberta_fast.nn.{module}")
            options.pop({"layer_norm_residual": "layer_norm",
                         "masked_lm_loss": "mlm_loss"}[module])
        except ImportError:
            pass
    patch(model, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          max_steps=3, learning_rate=1e-3, report_to=[],
                                          logging_steps=1, save_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_examples(12),
                                   data_collator=_collator(mlm_probability=0.3))
    result = trainer.train()
    assert result.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
