"""Load a Hugging Face BERT checkpoint into the trunk, and export it back.

vlpt's trunk uses its own short names and a fused QKV projection; this module
is the one place that knows how they map onto ``transformers.BertModel``'s
state dict. Loading never runs code: weights come from safetensors, or from a
``.bin`` through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..recipe import ModelConfig

#: vlpt name -> BERT name, for everything but the fused QKV
_PLAIN = {
    "text_embedder.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "text_embedder.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "text_embedder.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "text_embedder.norm.weight": "embeddings.LayerNorm.weight",
    "text_embedder.norm.bias": "embeddings.LayerNorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
_LAYER = {
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}


def read_bert_config(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise UserError(f"'{folder}' has no config.json: not a Hugging Face checkpoint folder")
    cfg = json.loads(path.read_text())
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_python"):
        raise UserError(f"'{folder}': hidden_act '{act}' is not supported (vlpt's trunk uses exact GELU)")
    return cfg


def apply_bert_config(model_cfg: ModelConfig, folder: str | Path) -> ModelConfig:
    """Copy a checkpoint's sizes into the model config (the checkpoint's sizes win)."""
    cfg = read_bert_config(folder)
    model_cfg.hidden_size = cfg["hidden_size"]
    model_cfg.layers = cfg["num_hidden_layers"]
    model_cfg.heads = cfg["num_attention_heads"]
    model_cfg.ffn_size = cfg["intermediate_size"]
    model_cfg.max_positions = cfg.get("max_position_embeddings", model_cfg.max_positions)
    model_cfg.vocab_size = cfg["vocab_size"]
    return model_cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        return load_file(str(st))
    bins = folder / "pytorch_model.bin"
    if bins.is_file():
        return torch.load(bins, map_location="cpu", weights_only=True)
    raise UserError(f"'{folder}' has neither model.safetensors nor pytorch_model.bin")


def _normalize_bert_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``bert.`` prefixes (BertForPreTraining) and rename old gamma/beta."""
    out = {}
    for k, v in sd.items():
        if k.startswith("bert."):
            k = k[len("bert.") :]
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def load_bert_into(model, folder: str | Path) -> list[str]:
    """Load BERT weights into ``model`` (a VLModel); returns the vlpt keys that stayed at init."""
    folder = Path(folder).expanduser()
    sd = _normalize_bert_keys(_read_weights(folder))
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for ours, theirs in _PLAIN.items():
        if theirs in sd:
            new[ours] = sd[theirs]
    for i in range(len(model.trunk.layers)):
        p = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            qkv = [sd.get(f"{p}attention.self.{n}.{part}") for n in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                new[f"trunk.layers.{i}.qkv.{part}"] = torch.cat(qkv, dim=0)
            for ours, theirs in _LAYER.items():
                t = sd.get(f"{p}{theirs}.{part}")
                if t is not None:
                    new[f"trunk.layers.{i}.{ours}.{part}"] = t
    # a checkpoint with a single token type still gives regions a start: copy row 0
    tt = new.get("text_embedder.token_type_embeddings.weight")
    if tt is not None and tt.shape[0] < own["text_embedder.token_type_embeddings.weight"].shape[0]:
        full = own["text_embedder.token_type_embeddings.weight"].clone()
        full[: tt.shape[0]] = tt
        full[tt.shape[0] :] = tt[0]
        new["text_embedder.token_type_embeddings.weight"] = full
    for k, v in new.items():
        if own[k].shape != v.shape:
            raise UserError(f"checkpoint '{folder}': {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(new, strict=False)
    return sorted(set(own) - set(new))


def trunk_to_bert_state_dict(model) -> dict[str, torch.Tensor]:
    """The trunk and text embedder under ``transformers.BertModel``'s names."""
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {theirs: own[ours] for ours, theirs in _PLAIN.items()}
    for i in range(len(model.trunk.layers)):
        p = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = own[f"trunk.layers.{i}.qkv.{part}"].chunk(3, dim=0)
            out[f"{p}attention.self.query.{part}"] = q
            out[f"{p}attention.self.key.{part}"] = k
            out[f"{p}attention.self.value.{part}"] = v
            for ours, theirs in _LAYER.items():
                out[f"{p}{theirs}.{part}"] = own[f"trunk.layers.{i}.{ours}.{part}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def bert_config_dict(model) -> dict:
    c = model.config
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "intermediate_size": c.ffn_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "max_position_embeddings": c.max_positions,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }


def export_bert(model, out_dir: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``BertModel.from_pretrained`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(bert_config_dict(model), indent=2) + "\n")
    save_file(trunk_to_bert_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
