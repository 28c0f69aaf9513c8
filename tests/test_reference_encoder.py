"""The plain-PyTorch reference encoder reproduces Hugging Face's RoBERTa / BERT.

Every case draws a fresh random config, fresh random weights (all of them, LayerNorm and biases
included, so a swapped or forgotten parameter shows) and fresh random inputs, then compares with
``rel_err`` against the same weights run by ``transformers``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertModel, RobertaConfig, RobertaForMaskedLM,
                          RobertaModel)

from roberta_fast.reference.encoder import (RobertaReferenceForMaskedLM, RobertaReferenceModel,
                                            reference_from_hf, roberta_position_ids)
from tests.helpers import rel_err

TOL = 1e-5  # float32 ceiling of DESIGN.md
ATTN = ["eager", "sdpa"]


# ----------------------------------------------------------------------------------------------
# Random configs, weights and batches
# ----------------------------------------------------------------------------------------------

def _pick(low: int, high: int) -> int:
    """A fresh integer in [low, high] from torch's global generator."""
    return int(torch.randint(low, high + 1, ()).item())


def _config(kind: str = "roberta", attn: str = "eager", **overrides):
    heads = _pick(2, 4)
    kwargs = dict(
        vocab_size=_pick(90, 120),
        hidden_size=heads * _pick(8, 16),  # awkward sizes such as 33 = 3 x 11 come up
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=_pick(37, 128),
        max_position_embeddings=66,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=[1e-5, 1e-12][_pick(0, 1)],
        hidden_dropout_prob=0.1,  # inert in eval(); proves the reference honours eval()
        attention_probs_dropout_prob=0.1,
        attn_implementation=attn,
    )
    kwargs.update(overrides)
    return (RobertaConfig if kind == "roberta" else BertConfig)(**kwargs)


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """Replace every weight (HF inits LayerNorm to 1/0 and lm_head.bias to 0) by random values."""
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name or "layer_norm.weight" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))


def _hf_and_reference(cls, config, **kwargs):
    hf = cls(config, **kwargs)
    _randomize(hf)
    hf.eval()
    ref = reference_from_hf(hf)
    assert not ref.training
    return hf, ref


def _batch(config, padded: bool, batch: int = 4, seq_len: int | None = None):
    """Random ids with no stray padding token; padded rows have differing lengths, one is 1."""
    seq_len = seq_len if seq_len is not None else _pick(5, 20)
    pad = config.pad_token_id
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    ids[ids == pad] = (pad + 1) % config.vocab_size
    if not padded:
        return ids, None
    lengths = [seq_len, 1] + [_pick(2, seq_len - 1) for _ in range(batch - 2)]
    mask = torch.zeros(batch, seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids[mask == 0] = pad
    return ids, mask


def _token_types(config, ids):
    return torch.randint(0, config.type_vocab_size, ids.shape)


def _labels(config, ids, mask):
    """Labels on about a third of the real tokens (at least one), -100 elsewhere."""
    labels = torch.randint(0, config.vocab_size, ids.shape)
    chosen = torch.rand(ids.shape) < 0.35
    chosen[0, 0] = True
    if mask is not None:
        chosen &= mask.bool()
    return torch.where(chosen, labels, torch.full_like(labels, -100))


def _assert_model_matches(hf, ref, ids, mask, token_types=None, tol=TOL, hf_dtype=None):
    # Padded query positions are compared too: under both eager and sdpa they attend to the
    # row's real keys, so HF's values there are well defined and the reference reproduces them.
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, token_type_ids=token_types, output_hidden_states=True)
        last, pooled, hidden = ref(ids, mask, token_types)
    assert len(hidden) == hf.config.num_hidden_layers + 1
    assert len(out.hidden_states) == len(hidden)
    errors = {"last_hidden_state": rel_err(last, out.last_hidden_state)}
    for i, (mine, theirs) in enumerate(zip(hidden, out.hidden_states)):
        errors[f"hidden_states[{i}]"] = rel_err(mine, theirs)
    if hf.pooler is not None:
        errors["pooler_output"] = rel_err(pooled, out.pooler_output)
    else:
        assert pooled is None
    for name, err in errors.items():
        assert err < tol, f"{name}: rel err {err:.3e} >= {tol:.0e} ({hf.config})"
    return errors


# ----------------------------------------------------------------------------------------------
# Parity with Hugging Face
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("attn", ATTN)
def test_model_matches_hf(attn, padded, case):
    config = _config(attn=attn)
    hf, ref = _hf_and_reference(RobertaModel, config)
    ids, mask = _batch(config, padded)
    token_types = _token_types(config, ids) if case % 2 else None
    _assert_model_matches(hf, ref, ids, mask, token_types)


@pytest.mark.parametrize("attn", ATTN)
def test_model_without_pooler_matches_hf(attn):
    config = _config(attn=attn)
    hf, ref = _hf_and_reference(RobertaModel, config, add_pooling_layer=False)
    assert ref.pooler is None
    ids, mask = _batch(config, padded=True)
    _assert_model_matches(hf, ref, ids, mask)


def test_single_token_batch_of_one():
    config = _config()
    hf, ref = _hf_and_reference(RobertaModel, config)
    ids, _ = _batch(config, padded=False, batch=1, seq_len=1)
    _assert_model_matches(hf, ref, ids, torch.ones_like(ids))
    _assert_model_matches(hf, ref, ids, None)


def test_all_padding_row_matches_eager():
    # A row with no real token at all: HF eager adds finfo.min to every key and so averages
    # the values uniformly; the reference does the same. (HF's sdpa path gives other values for
    # such a row, so it is compared with eager only.)
    config = _config(attn="eager")
    hf, ref = _hf_and_reference(RobertaModel, config)
    ids, mask = _batch(config, padded=True)
    mask[2] = 0
    ids[2] = config.pad_token_id
    _assert_model_matches(hf, ref, ids, mask)


@pytest.mark.parametrize("act", ["relu", "gelu_new", "silu"])
def test_other_activations_match_hf(act):
    config = _config(hidden_act=act)
    hf, ref = _hf_and_reference(RobertaModel, config)
    ids, mask = _batch(config, padded=True)
    _assert_model_matches(hf, ref, ids, mask)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("attn", ATTN)
def test_masked_lm_matches_hf(attn, tie):
    config = _config(attn=attn, tie_word_embeddings=tie)
    hf, ref = _hf_and_reference(RobertaForMaskedLM, config)
    assert (ref.lm_head.decoder.weight is ref.roberta.embeddings.word_embeddings.weight) == tie
    assert (ref.lm_head.decoder.bias is ref.lm_head.bias) == tie
    ids, mask = _batch(config, padded=True)
    labels = _labels(config, ids, mask)
    assert (labels != -100).any() and (labels == -100).any()
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, labels=labels)
        loss, logits = ref(ids, mask, labels=labels)
        no_loss, logits_again = ref(ids, mask)
    assert no_loss is None
    assert torch.equal(logits, logits_again)
    err_logits = rel_err(logits, out.logits)
    err_loss = rel_err(loss, out.loss)
    assert err_logits < TOL, f"logits rel err {err_logits:.3e}"
    assert err_loss < TOL, f"loss rel err {err_loss:.3e}"
    # The loss really is the mean over labelled positions only.
    keep = labels != -100
    by_hand = torch.nn.functional.cross_entropy(logits[keep].double(), labels[keep])
    assert rel_err(loss, by_hand) < TOL


def test_masked_lm_loss_without_labelled_token_is_nan_like_hf():
    config = _config()
    hf, ref = _hf_and_reference(RobertaForMaskedLM, config)
    ids, mask = _batch(config, padded=True)
    labels = torch.full_like(ids, -100)
    with torch.no_grad():
        hf_loss = hf(ids, attention_mask=mask, labels=labels).loss
        loss, logits = ref(ids, mask, labels=labels)
    assert torch.isnan(hf_loss) and torch.isnan(loss)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn", ATTN)
def test_gradients_match_hf(attn):
    config = _config(attn=attn)
    hf, ref = _hf_and_reference(RobertaForMaskedLM, config)
    ids, mask = _batch(config, padded=True)
    token_types = _token_types(config, ids)
    labels = _labels(config, ids, mask)
    hf(ids, attention_mask=mask, token_type_ids=token_types, labels=labels).loss.backward()
    ref(ids, mask, token_types, labels=labels)[0].backward()
    hf_params = dict(hf.named_parameters())
    ref_params = dict(ref.named_parameters())
    assert hf_params.keys() == ref_params.keys()
    for name, p in ref_params.items():
        theirs = hf_params[name].grad
        assert p.grad is not None and theirs is not None, name
        if name.endswith("attention.self.key.bias"):
            # Softmax ignores a shift shared by a whole row of scores, and the key bias shifts
            # each query's row by q . b_k: its exact gradient is 0, so both sides hold rounding
            # noise, small next to the query bias's gradient.
            scale = ref_params[name.replace("key.bias", "query.bias")].grad.norm()
            assert p.grad.norm() < 1e-5 * scale and theirs.norm() < 1e-5 * scale, name
            continue
        assert p.grad.norm() > 0, f"{name} got no gradient"
        err = rel_err(p.grad, theirs)
        assert err < TOL, f"grad of {name}: rel err {err:.3e}"


def test_float64_reference():
    config = _config()
    hf, ref = _hf_and_reference(RobertaModel, config)
    ref = ref.double()
    hf64 = copy.deepcopy(hf).double()
    ids, mask = _batch(config, padded=True)
    with torch.no_grad():
        last, pooled, hidden = ref(ids, mask)
    assert last.dtype == torch.float64 and pooled.dtype == torch.float64
    assert all(h.dtype == torch.float64 for h in hidden)
    # Against HF in float32: the float32 rounding of HF is all that separates them.
    _assert_model_matches(hf, ref, ids, mask, tol=TOL)
    # Against HF in float64: the same computation, so agreement to float64 rounding.
    _assert_model_matches(hf64, ref, ids, mask, tol=1e-12)


def test_float64_masked_lm():
    config = _config()
    hf, ref = _hf_and_reference(RobertaForMaskedLM, config)
    ref = ref.double()
    assert ref.lm_head.decoder.weight is ref.roberta.embeddings.word_embeddings.weight
    hf64 = copy.deepcopy(hf).double()
    ids, mask = _batch(config, padded=True)
    labels = _labels(config, ids, mask)
    with torch.no_grad():
        loss, logits = ref(ids, mask, labels=labels)
        out32 = hf(ids, attention_mask=mask, labels=labels)
        out64 = hf64(ids, attention_mask=mask, labels=labels)
    assert logits.dtype == torch.float64 and loss.dtype == torch.float64
    assert rel_err(logits, out32.logits) < TOL
    assert rel_err(loss, out32.loss) < TOL
    assert rel_err(logits, out64.logits) < 1e-12
    assert rel_err(loss, out64.loss) < 1e-12


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("attn", ATTN)
def test_bert_model_matches_hf(attn, padded):
    config = _config(kind="bert", attn=attn)
    hf, ref = _hf_and_reference(BertModel, config)
    assert isinstance(ref, RobertaReferenceModel)
    ids, mask = _batch(config, padded)
    _assert_model_matches(hf, ref, ids, mask, _token_types(config, ids))
    # BERT counts positions from 0 with no regard to padding.
    assert torch.equal(ref.embeddings.position_ids(ids)[0], torch.arange(ids.shape[1]))


# ----------------------------------------------------------------------------------------------
# Position ids, loading, dropout
# ----------------------------------------------------------------------------------------------

def test_position_ids_by_hand():
    ids = torch.tensor([[5, 1, 7, 1, 8], [1, 1, 9, 9, 9], [4, 4, 4, 4, 4]])
    expected = torch.tensor([[2, 1, 3, 1, 4], [1, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    assert torch.equal(roberta_position_ids(ids, padding_idx=1), expected)


def test_position_ids_match_hf():
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
    pad = _pick(0, 5)
    ids = torch.randint(0, 8, (5, _pick(3, 30)))  # small vocabulary: padding lands anywhere
    ours = roberta_position_ids(ids, pad)
    theirs = RobertaEmbeddings.create_position_ids_from_input_ids(ids, pad)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, theirs)


def test_state_dict_keys_and_loading():
    config = _config()
    hf = RobertaForMaskedLM(config)
    ref = RobertaReferenceForMaskedLM(config)
    assert set(ref.state_dict()) == set(hf.state_dict())
    ref.load_state_dict(hf.state_dict(), strict=True)
    # Older checkpoints carry the position_ids / token_type_ids buffers: tolerated.
    legacy = dict(hf.state_dict())
    legacy["roberta.embeddings.position_ids"] = torch.arange(66)[None]
    legacy["roberta.embeddings.token_type_ids"] = torch.zeros(1, 66, dtype=torch.long)
    ref.load_state_dict(legacy, strict=True)
    # Anything else stays strict.
    missing = dict(hf.state_dict())
    del missing["roberta.encoder.layer.1.output.dense.weight"]
    with pytest.raises(RuntimeError, match="output.dense.weight"):
        ref.load_state_dict(missing, strict=True)
    extra = dict(hf.state_dict())
    extra["roberta.pooler.dense.weight"] = torch.zeros(config.hidden_size, config.hidden_size)
    with pytest.raises(RuntimeError, match="pooler"):
        ref.load_state_dict(extra, strict=True)

    base = RobertaModel(config)
    assert set(RobertaReferenceModel(config).state_dict()) == set(base.state_dict())


def test_reference_from_hf_keeps_type_dtype_and_mode():
    config = _config()
    hf = RobertaModel(config, add_pooling_layer=False).double().train()
    ref = reference_from_hf(hf)
    assert type(ref) is RobertaReferenceModel and ref.pooler is None and ref.training
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    for name, p in hf.state_dict().items():
        assert torch.equal(ref.state_dict()[name], p), name
    mlm = reference_from_hf(RobertaForMaskedLM(config).eval())
    assert type(mlm) is RobertaReferenceForMaskedLM and not mlm.training
    with pytest.raises(TypeError, match="RobertaModel"):
        reference_from_hf(torch.nn.Linear(2, 2))


def test_dropout_follows_train_and_eval():
    config = _config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    _, ref = _hf_and_reference(RobertaModel, config)
    ids, mask = _batch(config, padded=True)
    with torch.no_grad():
        eval_out = ref(ids, mask)[0]
        assert torch.equal(eval_out, ref(ids, mask)[0])
        ref.train()
        first, second = ref(ids, mask)[0], ref(ids, mask)[0]
    assert not torch.equal(first, second)
    assert not torch.equal(first, eval_out)

    # With every probability 0, train() is eval() exactly.
    quiet = RobertaReferenceModel(_config(hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0,
                                          vocab_size=config.vocab_size,
                                          hidden_size=config.hidden_size,
                                          num_attention_heads=config.num_attention_heads,
                                          intermediate_size=config.intermediate_size,
                                          layer_norm_eps=config.layer_norm_eps))
    quiet.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(quiet.train()(ids, mask)[0], eval_out)


# ----------------------------------------------------------------------------------------------
# Bad input and unsupported configs
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    config = _config()
    ref = RobertaReferenceForMaskedLM(config).eval()
    ids, mask = _batch(config, padded=True, seq_len=8)
    vocab = config.vocab_size
    cases = [
        (TypeError, "integer", dict(input_ids=ids.float())),
        (ValueError, r"\[batch, seq_len\]", dict(input_ids=ids[0])),
        (ValueError, r"\[batch, seq_len\]", dict(input_ids=ids[:, :0])),
        (ValueError, "input_ids holds", dict(input_ids=torch.full_like(ids, vocab))),
        (ValueError, "input_ids holds", dict(input_ids=torch.full_like(ids, -1))),
        (ValueError, "attention_mask has shape", dict(input_ids=ids, attention_mask=mask[:, 1:])),
        (ValueError, "only 1", dict(input_ids=ids, attention_mask=mask * 2)),
        (ValueError, "token_type_ids holds",
         dict(input_ids=ids, token_type_ids=torch.full_like(ids, config.type_vocab_size))),
        (ValueError, "labels holds", dict(input_ids=ids, labels=torch.full_like(ids, vocab))),
        (ValueError, "labels holds", dict(input_ids=ids, labels=torch.full_like(ids, -1))),
        (ValueError, "labels has shape", dict(input_ids=ids, labels=ids[:, 1:])),
        (TypeError, "labels must be an integer", dict(input_ids=ids, labels=ids.float())),
        (ValueError, "sequence too long",
         dict(input_ids=torch.full((1, 65), config.pad_token_id + 1))),
    ]
    for exc, match, kwargs in cases:
        with pytest.raises(exc, match=match):
            ref(**kwargs)
    # The longest sequence that fits: 64 tokens take positions 2..65 of 66.
    ref(torch.full((1, 64), config.pad_token_id + 1))
    bert = RobertaReferenceModel(_config(kind="bert"))
    bert(torch.full((1, 66), 5))
    with pytest.raises(ValueError, match="sequence too long"):
        bert(torch.full((1, 67), 5))


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        RobertaReferenceModel(_config(hidden_size=30, num_attention_heads=4))
    with pytest.raises(ValueError, match="decoder"):
        RobertaReferenceModel(_config(is_decoder=True))
    other = _config()
    other.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type"):
        RobertaReferenceModel(other)
    relative = _config()
    relative.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type"):
        RobertaReferenceModel(relative)
    with pytest.raises(ValueError, match="hidden_act"):
        RobertaReferenceModel(_config(hidden_act="no_such_activation"))
