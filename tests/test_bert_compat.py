"""The trunk loads a Hugging Face BERT checkpoint and reproduces BertModel; export round-trips."""
import torch
import transformers

from vlpt.model import VLModel
from vlpt.model.bert_io import apply_bert_config, export_bert, load_bert_into
from vlpt.recipe import ModelConfig


def _bert(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, type_vocab_size=2,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias values, so a mis-mapped weight shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "bert")
    return model


def _text_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 17), generator=g)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 12:] = False  # padding
    return ids, mask


def _vlpt_outputs(vl, ids, mask):
    out = vl({"input_ids": ids, "text_mask": mask})
    return out.hidden, out.pooled


def test_load_matches_bert_model(tmp_path):
    bert = _bert(tmp_path)
    cfg = apply_bert_config(ModelConfig(region_feature_dim=8), tmp_path / "bert")
    vl = VLModel(cfg).eval()
    untouched = load_bert_into(vl, tmp_path / "bert")
    assert all(k.startswith("region_embedder.") for k in untouched), untouched
    ids, mask = _text_batch()
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask.long())
        hidden, pooled = _vlpt_outputs(vl, ids, mask)
    real = mask[..., None].expand_as(hidden)
    assert torch.allclose(hidden[real], ref.last_hidden_state[real], atol=1e-5), (hidden - ref.last_hidden_state)[real].abs().max()
    assert torch.allclose(pooled, ref.pooler_output, atol=1e-5)


def test_export_loads_back_into_bert_model(tmp_path):
    torch.manual_seed(3)
    vl = VLModel(ModelConfig(hidden_size=32, layers=2, heads=4, ffn_size=64, max_positions=30, vocab_size=50,
                             region_feature_dim=8)).eval()
    export_bert(vl, tmp_path / "out")
    bert = transformers.BertModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask.long())
        hidden, pooled = _vlpt_outputs(vl, ids, mask)
    assert torch.allclose(hidden, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(pooled, ref.pooler_output, atol=1e-5)
