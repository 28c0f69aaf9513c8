"""roberta_fast.patch / unpatch on Hugging Face RoBERTa, XLM-RoBERTa and BERT models."""
from __future__ import annotations

import copy
import json
import importlib.util
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import roberta_fast.backends as rf_backends  # noqa: E402
from roberta_fast.nn.attention import _FastSelfAttentionMixin, _op  # noqa: E402
from roberta_fast.nn.encoder import FastRobertaEncoder  # noqa: E402
from roberta_fast.patch import is_patched, unpatch  # noqa: E402
from roberta_fast.patch import patch as patch_always  # noqa: E402
from tests.hf import (FAMILIES, HEADS, OPTION_SETS, UNPAD_SUPPORTED, VOCAB, compare,  # noqa: E402
                      make_batch, make_model, needs, patch, real_positions, skip_if_stock_fails,
                      stock_and_patched, batch_for)
from tests.helpers import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_heads_match_stock(family, head, option_set):
    """Every head of every family, each option alone and all together, unpad on and off."""
    options = OPTION_SETS[option_set]
    needs(options, family, head)
    stock, fast = stock_and_patched(family, head, options)
    batch = batch_for(head)
    skip_if_stock_fails(stock, batch)
    mlm_fast_loss = head == "ForMaskedLM" and options.get("mlm_loss", True)
    compare(stock, fast, batch, check_logits=not mlm_fast_loss)


@pytest.mark.parametrize("unpad", [False, True])
def test_question_answering_real_positions_on_padded_batch(unpad):
    stock, fast = stock_and_patched("roberta", "ForQuestionAnswering",
                                    dict(layer_norm=False, unpad=unpad))
    batch = make_batch("ForQuestionAnswering")
    batch.pop("start_positions"), batch.pop("end_positions")
    real = real_positions(batch)
    with torch.no_grad():
        a, b = fast(**batch), stock(**batch)
    assert rel_err(a.start_logits[real], b.start_logits[real]) < 1e-5
    assert rel_err(a.end_logits[real], b.end_logits[real]) < 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementations(impl):
    stock, fast = stock_and_patched("roberta", "ForSequenceClassification",
                                    dict(layer_norm=False), impl=impl)
    compare(stock, fast, make_batch("ForSequenceClassification"))


@pytest.mark.parametrize("unpad", [False, True])
def test_flex_attention_block_mask_takes_stock_path(unpad, op_calls):
    """A flex-attention BlockMask cannot be read as a key-padding mask: the stock attention
    runs. (Forward only: flex attention has no backward on CPU, stock or patched.)"""
    try:
        stock, fast = stock_and_patched("roberta", "Model", dict(layer_norm=False, unpad=unpad),
                                        impl="flex_attention")
    except ValueError as exc:
        if "does not support" not in str(exc):
            raise
        pytest.skip(f"NOT RUN: transformers {transformers.__version__} has no flex attention for "
                    "RoBERTa")
    batch = make_batch("Model")
    real = real_positions(batch)
    with torch.no_grad():
        got, want = fast(**batch), stock(**batch)
    assert rel_err(got.last_hidden_state[real], want.last_hidden_state[real]) < 1e-5
    assert op_calls == {"attention": 0, "attention_varlen": 0}


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of the fused attention ops."""
    calls = {"attention": 0, "attention_varlen": 0}
    import roberta_fast.ops as ops

    for name in calls:
        fn = _op(name)

        def counting(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting, raising=False)
    return calls


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fast_path_runs(impl, op_calls):
    """The patched model really calls the fused op, whichever attention class the release builds
    for ``impl`` (4.x has a separate ``*SdpaSelfAttention``)."""
    model = patch(make_model("roberta", "Model", impl=impl).eval(), layer_norm=False,
                  mlm_loss=False)
    model(**make_batch("Model"))
    assert op_calls == {"attention": 2, "attention_varlen": 0}


def test_fast_path_runs_unpadded(op_calls):
    model = patch(make_model("roberta", "Model").eval(), layer_norm=False, mlm_loss=False,
                  unpad=True)
    model(**make_batch("Model"))
    assert op_calls == {"attention": 0, "attention_varlen": 2}


def test_unpad_without_padding_runs_padded(op_calls):
    """A mask that pads nothing: the unpadded encoder does not pack (the fused padded attention
    runs), and the result is stock's."""
    stock, fast = stock_and_patched("roberta", "ForSequenceClassification",
                                    dict(layer_norm=False, mlm_loss=False, unpad=True))
    batch = make_batch("ForSequenceClassification", pad=False)
    compare(stock, fast, batch)
    assert op_calls["attention_varlen"] == 0 and op_calls["attention"] > 0


@pytest.mark.parametrize("unpad", [False, True])
def test_unpatch_restores_classes_and_outputs(unpad):
    options = dict(unpad=unpad)
    needs(options)
    model = make_model("roberta", "ForMaskedLM").eval()
    classes = {n: type(m) for n, m in model.named_modules()}
    batch = make_batch("ForMaskedLM")
    with torch.no_grad():
        before = model(**batch)
    patch(model, **options)
    assert is_patched(model)
    assert any(type(m) is not classes[n] for n, m in model.named_modules())
    assert unpatch(model) is model
    assert not is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    with torch.no_grad():
        after = model(**batch)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert unpatch(model) is model  # unpatching a stock model is a no-op


def test_state_dict_and_parameter_identity():
    model = make_model("roberta", "ForMaskedLM")
    state = model.state_dict()
    params = list(model.parameters())
    patch(model, layer_norm=False, mlm_loss=False, unpad=True)
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(new_state[k] is state[k] or new_state[k].data_ptr() == state[k].data_ptr()
               for k in state)
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_optimizer_made_before_patch_keeps_working():
    model = make_model("roberta", "ForSequenceClassification").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    patch(model, layer_norm=False, mlm_loss=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**make_batch("ForSequenceClassification")).loss.backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "roberta.encoder.layer.0.attention.self.query.weight" in moved
    assert len(moved) > len(before) // 2


@pytest.mark.parametrize("family,head", [("roberta", "ForMaskedLM"), ("xlm-roberta", "ForMaskedLM"),
                                         ("bert", "Model")])
def test_save_pretrained_loads_in_stock_transformers(tmp_path, family, head):
    model = patch(make_model(family, head).eval(), unpad=UNPAD_SUPPORTED)
    model.save_pretrained(tmp_path)
    stock_name = f"{FAMILIES[family]}{head}"
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [stock_name]
    # Both the masked-LM model and the base model are swapped to fast twins; saving writes the
    # stock architecture name all the same.
    assert is_patched(model) and type(model).__module__.startswith("roberta_fast")
    loaded = getattr(transformers, stock_name).from_pretrained(tmp_path).eval()
    assert not any(type(m).__module__.startswith("roberta_fast") for m in loaded.modules())
    mine = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, mine[key]), key
    auto = transformers.AutoModel.from_pretrained(tmp_path)
    assert auto.config.model_type == model.config.model_type
    # from_pretrained, then patch: the same model as the one saved.
    again = patch(loaded, unpad=UNPAD_SUPPORTED)
    batch = make_batch(head)
    with torch.no_grad():
        a, b = again(**batch), model(**batch)
    key = "loss" if head == "ForMaskedLM" else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))


@pytest.mark.parametrize("bad", ["gpt2", "linear", "string"])
def test_unpatchable_models_raise_and_stay_unchanged(bad):
    if bad == "gpt2":
        model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    elif bad == "linear":
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    else:
        with pytest.raises(TypeError, match="torch.nn.Module"):
            patch("roberta-base")
        return
    classes = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=type(model).__name__):
        patch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not is_patched(model)


def test_bad_options_raise_and_change_nothing():
    model = make_model("roberta", "ForMaskedLM")
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="unpad=True needs attention=True"):
        patch_always(model, attention=False, unpad=True)
    with pytest.raises(ValueError, match="unknown backend"):
        patch(model, backend="nope")
    with pytest.raises(ValueError, match="mlm_logits"):
        patch(model, mlm_logits="some")
    with pytest.raises(TypeError, match="attention"):
        patch(model, attention="yes")
    if not torch.cuda.is_available():
        with pytest.raises(rf_backends.BackendUnavailableError):
            patch(model, backend="cuda")
    assert [type(m) for m in model.modules()] == classes


def test_failure_mid_patch_leaves_model_stock(monkeypatch):
    model = make_model("roberta", "Model")
    classes = {n: type(m) for n, m in model.named_modules()}

    def broken(module, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(FastRobertaEncoder, "convert", broken)
    with pytest.raises(RuntimeError, match="boom"):
        patch_always(model, layer_norm=False, mlm_loss=False, unpad=True)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not is_patched(model)


def test_unpad_refused_where_layers_cannot_carry_packing():
    """Layers whose forward takes no **kwargs (transformers 4.x) could not hand the packing to
    the attention: unpad=True is refused with a clear error and nothing stays patched."""
    model = make_model("roberta", "Model")
    layer_cls = type(model.encoder.layer[0])

    class FixedArgumentsLayer(layer_cls):
        def forward(self, hidden_states, attention_mask=None):
            return layer_cls.forward(self, hidden_states, attention_mask)

    for layer in model.encoder.layer:
        layer.__class__ = FixedArgumentsLayer
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="unpad=True needs encoder layers"):
        patch_always(model, unpad=True)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not is_patched(model)


def test_second_patch_is_noop_and_new_options_reapply():
    options = dict(layer_norm=False, mlm_loss=False)
    stock = make_model("roberta", "ForTokenClassification").eval()
    model = patch(copy.deepcopy(stock), **options)
    record = model._roberta_fast_patch
    classes = [type(m) for m in model.modules()]
    assert patch(model, **options) is model
    assert model._roberta_fast_patch is record
    assert [type(m) for m in model.modules()] == classes
    assert isinstance(model.roberta.encoder, FastRobertaEncoder)
    assert not model.roberta.encoder._roberta_fast_unpad
    patch(model, unpad=True, **options)  # other options: unpatched and patched again
    assert model.roberta.encoder._roberta_fast_unpad
    assert model._roberta_fast_patch["options"]["unpad"] is True
    compare(stock, model, make_batch("ForTokenClassification"))
    patch(model, **options)
    assert not model.roberta.encoder._roberta_fast_unpad
    assert isinstance(model.roberta.encoder.layer[0].attention.self, _FastSelfAttentionMixin)
    unpatch(model)
    assert "_roberta_fast_unpad" not in vars(model.roberta.encoder)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_output_hidden_states(unpad, family):
    stock, fast = stock_and_patched(family, "Model", dict(layer_norm=False, unpad=unpad))
    batch = make_batch("Model")
    real = real_positions(batch)
    with torch.no_grad():
        a = fast(**batch, output_hidden_states=True)
        b = stock(**batch, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert x.shape == y.shape
        assert rel_err(x[real], y[real]) < 1e-5
    if unpad and importlib.util.find_spec("transformers.utils.output_capturing") is not None:
        # Transformers with the shared output collector: the unpadded path ran (zeros at the
        # padding). Older 5.x releases keep their collector private, so the padded path runs.
        assert all(torch.count_nonzero(h[~real]) == 0 for h in a.hidden_states[1:])
    # Selecting one layer by index works as in stock, in the releases that offer it.
    with torch.no_grad():
        selected = stock(**batch, output_hidden_states=[-2]).hidden_states
        c = fast(**batch, output_hidden_states=[-2])
    if selected[0] is None:
        assert len(c.hidden_states) == 3 and c.hidden_states[0] is None
        assert c.hidden_states[2] is None
        assert rel_err(c.hidden_states[1][real], b.hidden_states[1][real]) < 1e-5


@pytest.mark.parametrize("unpad", [False, True])
def test_output_attentions_falls_back_to_stock(unpad):
    stock, fast = stock_and_patched("roberta", "Model", dict(layer_norm=False, unpad=unpad),
                                    impl="eager")
    batch = make_batch("Model")
    with torch.no_grad():
        a = fast(**batch, output_attentions=True)
        b = stock(**batch, output_attentions=True)
    assert len(a.attentions) == 2
    for x, y in zip(a.attentions, b.attentions):
        assert rel_err(x, y) < 1e-5


@pytest.mark.parametrize("unpad", [False, True])
def test_gradient_checkpointing(unpad):
    stock, fast = stock_and_patched("roberta", "ForSequenceClassification",
                                    dict(layer_norm=False, mlm_loss=False, unpad=unpad))
    for m in (stock, fast):
        m.gradient_checkpointing_enable()
        m.train()  # dropout is 0, so train mode is deterministic
    assert fast.roberta.encoder.layer[0].gradient_checkpointing
    compare(stock, fast, make_batch("ForSequenceClassification"))


def test_backend_pin(monkeypatch):
    seen = []
    import roberta_fast.ops as ops

    fn = _op("attention")

    def recording(*args, **kwargs):
        seen.append(rf_backends.current())
        return fn(*args, **kwargs)

    monkeypatch.setattr(ops, "attention", recording, raising=False)
    model = patch(make_model("roberta", "Model").eval(), layer_norm=False, mlm_loss=False,
                  backend="reference")
    outside = rf_backends.current()
    model(**make_batch("Model"))
    assert seen == ["reference", "reference"]
    assert rf_backends.current() == outside  # the pin ends with the forward
    unpatch(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.slow
def test_torch_compile_forward_backward():
    stock, fast = stock_and_patched("roberta", "ForSequenceClassification",
                                    dict(layer_norm=False, mlm_loss=False))
    compiled = torch.compile(fast)
    batch = make_batch("ForSequenceClassification")
    loss = compiled(**batch).loss
    loss.backward()
    want = stock(**batch).loss
    assert rel_err(loss, want) < 1e-5
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


@pytest.mark.parametrize("unpad", [False, True])
def test_decoder_with_cache_and_cross_attention_matches_stock(unpad):
    """A causal decoder with cross-attention and a key/value cache takes the stock paths; the
    cache argument's name differs between transformers releases, which must not matter."""
    stock, fast = stock_and_patched("roberta", "ForCausalLM", dict(unpad=unpad), is_decoder=True,
                                    add_cross_attention=True)
    hidden = stock.config.hidden_size
    ids = torch.randint(3, VOCAB, (2, 6))
    memory = torch.randn(2, 5, hidden)
    cache_name = ("cache" if "cache" in inspect.signature(stock.forward).parameters
                  else "past_key_values")
    with torch.no_grad():
        outs = []
        for model in (stock, fast):
            first = model(input_ids=ids, encoder_hidden_states=memory, use_cache=True)
            cache = getattr(first, cache_name)
            assert cache is not None
            nxt = model(input_ids=ids[:, -1:].flip(0), encoder_hidden_states=memory,
                        **{cache_name: cache}, use_cache=True)
            outs.append((first.logits, nxt.logits))
    for got, want in zip(outs[1], outs[0]):
        assert rel_err(got, want) < 1e-6
