"""torch.export of patched models: every head and family, static and dynamic shapes, with and
without an attention mask; the exported program against the eager patched model; save / load;
AOTInductor on CPU; and what Hugging Face's own export test does."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch.export import Dim

transformers = pytest.importorskip("transformers")

import roberta_fast  # noqa: E402,F401  (registers the ops a loaded program calls)
from tests.hf import (FAMILIES, HEADS, UNPAD_SUPPORTED, make_model, patch,  # noqa: E402
                      skip_if_stock_fails)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100


def padded_inputs(head: str, batch: int, seqlen: int, *, with_mask: bool = True) -> dict:
    """Ids with right padding (a full row, a short row); ``[B, choices, L]`` for multiple choice."""
    shape = (batch, 2, seqlen) if head == "ForMultipleChoice" else (batch, seqlen)
    ids = torch.randint(3, VOCAB, shape)
    lengths = torch.randint(1, seqlen + 1, shape[:-1])
    lengths.view(-1)[0] = seqlen
    mask = (torch.arange(seqlen) < lengths[..., None]).long()
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask} if with_mask else {"input_ids": ids}


def dynamic_shapes(inputs: dict) -> dict:
    """Batch and sequence dims dynamic (the choices dim of multiple choice stays static)."""
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=2, max=60)
    return {k: {0: batch, v.dim() - 1: seq} for k, v in inputs.items()}


def outputs(out) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def assert_same_outputs(got, want) -> None:
    got, want = outputs(got), outputs(want)
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def patched(family: str, head: str, **options):
    model = make_model(family, head).eval()
    return patch(model, **options)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_export_dynamic_shapes_matches_eager(head, with_mask):
    """Exported once with dynamic batch and sequence dims, the program gives the eager patched
    model's outputs on batches of other shapes. (BERT and XLM-R: the Hugging Face test below.)"""
    model = patched("roberta", head)
    example = padded_inputs(head, 3, 11, with_mask=with_mask)
    skip_if_stock_fails(model, example)
    program = torch.export.export(model, (), example, dynamic_shapes=dynamic_shapes(example))
    for batch, seqlen in ((3, 11), (2, 7), (5, 16)):
        inputs = padded_inputs(head, batch, seqlen, with_mask=with_mask)
        with torch.no_grad():
            assert_same_outputs(program.module()(**inputs), model(**inputs))


@pytest.mark.parametrize("head", ["Model", "ForMaskedLM", "ForMultipleChoice"])
def test_export_static_save_and_load(head, tmp_path):
    """A static export, saved with ``torch.export.save`` and loaded back, gives the eager
    outputs; the program holds roberta_fast's ops, not the stock attention and LayerNorm."""
    model = patched("roberta", head)
    inputs = padded_inputs(head, 3, 9)
    program = torch.export.export(model, (), inputs)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("roberta_fast" in op for op in ops), sorted(ops)
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        want = model(**inputs)
    assert_same_outputs(loaded.module()(**inputs), want)


def test_export_with_unpad_runs_the_padded_path():
    """Packing has data-dependent shapes: under export the unpadded encoder runs the padded path,
    whose outputs at real positions are the same."""
    if not UNPAD_SUPPORTED:
        pytest.skip("NOT RUN: unpad needs transformers >= 5.0")
    model = patched("roberta", "ForSequenceClassification", unpad=True)
    example = padded_inputs("ForSequenceClassification", 3, 11)
    program = torch.export.export(model, (), example, dynamic_shapes=dynamic_shapes(example))
    inputs = padded_inputs("ForSequenceClassification", 4, 9)
    with torch.no_grad():
        assert_same_outputs(program.module()(**inputs), model(**inputs))


def test_aot_inductor_package_of_patched_encoder(tmp_path):
    """``aoti_compile_and_package`` of the exported patched encoder (one tiny layer) runs and
    matches the eager model, on a batch of another shape."""
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64,
                                        max_position_embeddings=64, pad_token_id=1)
    model = patch(transformers.RobertaModel(config, add_pooling_layer=False).eval())
    example = padded_inputs("Model", 3, 11)
    program = torch.export.export(model, (), example, dynamic_shapes=dynamic_shapes(example))
    start = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    print(f"aoti_compile_and_package: {time.perf_counter() - start:.1f} s")
    runner = torch._inductor.aoti_load_package(path)
    inputs = padded_inputs("Model", 2, 7)
    with torch.no_grad():
        want = model(**inputs)
    got = runner(**inputs)
    torch.testing.assert_close(got["last_hidden_state"], want.last_hidden_state, rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hugging Face's export test
# ---------------------------------------------------------------------------------------------

def _hf_inputs(model, head: str) -> dict:
    """What the model testers of transformers' test suite feed ``test_torch_export``: random ids,
    random token types and a random 0/1 attention mask whose last column is 1 (holes anywhere,
    not only right padding); expanded over four choices for multiple choice."""
    batch, seqlen = 13, 7
    config = model.config
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seqlen)),
              "token_type_ids": torch.randint(0, config.type_vocab_size, (batch, seqlen)),
              "attention_mask": torch.randint(0, 2, (batch, seqlen))}
    inputs["attention_mask"][:, -1] = 1
    if head == "ForMultipleChoice":
        inputs = {k: v.unsqueeze(1).expand(-1, 4, -1).contiguous() for k, v in inputs.items()}
    return inputs


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_hugging_face_torch_export(family, head, dynamic):
    """transformers' ``test_torch_export_static`` / ``_dynamic`` on patched models: its exporter
    (``DynamoExporter``: non-strict ``torch.export``, every dim ``Dim.AUTO`` when dynamic), its
    inputs, and its check (every output tensor within 1e-4 of the eager model's)."""
    try:
        from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter
    except ImportError:
        pytest.skip(f"NOT RUN: transformers {transformers.__version__} has no exporters "
                    "(the test exists from 5.x releases that ship DynamoExporter)")
    from transformers.exporters.utils import get_leaf_tensors

    config = getattr(transformers, f"{FAMILIES[family]}Config")(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=512, type_vocab_size=16,
        num_labels=2 if head == "ForQuestionAnswering" else 3)
    model = patch(getattr(transformers, f"{FAMILIES[family]}{head}")(config).eval())
    inputs = _hf_inputs(model, head)
    skip_if_stock_fails(model, inputs)
    with torch.no_grad():
        torch.manual_seed(1234)
        eager = get_leaf_tensors(model(**copy.deepcopy(inputs)))
    program, _ = DynamoExporter().export_program(model, copy.deepcopy(inputs),
                                                 DynamoConfig(dynamic=dynamic))
    with torch.no_grad():
        torch.manual_seed(1234)
        exported = get_leaf_tensors(program.module()(**copy.deepcopy(inputs)))
    assert exported and exported.keys() == eager.keys()
    torch.testing.assert_close(exported, eager, atol=1e-4, rtol=1e-4)
