"""Evaluation metrics mean what they say: a model that is always right scores exactly 1, one that
is always wrong scores 0, a model that cannot tell candidates apart scores chance.

Each objective's ``evaluate`` runs through the public contract (``Objective.evaluate(model, data)``
with a :class:`vlpt.eval.EvalData`) on hand-made validation samples. ``EvalData.encode`` is
replaced by an *oracle*: its trunk output is computed from identities planted in the samples
(which caption, which image, which word, which region), and the objective's head is replaced by
an identity, so what every metric must come out as is known exactly.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vlpt import EncoderOutput, get_objective
from vlpt.batch import META
from vlpt.data.collate import Collator
from vlpt.eval import EvalData, recall_at
from vlpt.model import VLModel
from vlpt.testing import TinyTokenizer, tiny_model_config

VOCAB = TinyTokenizer.vocab_size
DIM = 4  # region feature size
CANDIDATES = 12  # retrieval candidates (more than 10, so recall@10 of a wrong model is 0)


def _vl() -> VLModel:
    torch.manual_seed(0)
    return VLModel(tiny_model_config(region_feature_dim=DIM)).eval()


def _objective(name: str, vl: VLModel, **options):
    cls = get_objective(name)
    return cls(cls.Options(**options), vl, TinyTokenizer())


def _samples(n: int = 16) -> list[dict]:
    """Captions ``[CLS] size color shape and size color shape [SEP]`` about two objects.

    Planted identities: ``caption_id`` (an int, travels with the caption), the image's id in
    every feature (travels with the image), ``true_ids`` (the caption's ids before masking) and
    ``token_region`` (per token, the region its word names; -1 for other tokens).
    """
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        k = 2 + i % 2  # two regions, or three with a distractor
        regions = rng.permutation(k)[:2]  # the rows showing the first and second object
        ids = np.array([2, *rng.integers(5, VOCAB, 7), 3])
        word_ids = [-1, 0, 1, 2, 3, 4, 5, 6, -1]
        objects = [{"region": int(regions[0]), "words": {"size": 0, "color": 1, "shape": 2}},
                    {"region": int(regions[1]), "words": {"size": 4, "color": 5, "shape": 6}}]
        token_region = np.full(len(ids), -1)
        token_region[1:4], token_region[5:8] = regions[0], regions[1]
        out.append({
            "key": f"s{i}", "caption_id": i, "input_ids": ids, "word_ids": word_ids,
            "true_ids": ids.copy(), "token_region": token_region,
            "features": np.full((k, DIM), i + 1, np.float32),  # the image's id, never 0
            "boxes": np.tile(np.array([0.1, 0.2, 0.6, 0.9], np.float32), (k, 1)),
            META: {"objects": objects},
        })
    return out


class OracleData(EvalData):
    """EvalData whose ``encode`` returns ``respond(batch, features the model sees)``."""

    def __init__(self, samples, respond, pad_values=None):
        super().__init__(samples, Collator(0, pad_values), torch.device("cpu"), batch_size=16,
                         retrieval_candidates=CANDIDATES)
        self.respond = respond

    @torch.no_grad()
    def encode(self, model, batch) -> EncoderOutput:
        feats, _, _ = model.regions_from_batch(batch)  # (B, K, D): zeroed when evaluation asks for blind
        return self.respond(batch, feats)


# -- image-text matching and retrieval ---------------------------------------------------------
def _itm_metrics(logit_of) -> dict[str, float]:
    """itm's metrics when the matched-class logit of (caption c, image v) is ``logit_of(c, v)``."""
    vl = _vl()
    itm = _objective("itm", vl).eval()
    itm.head = nn.Identity()  # logits = pooled

    def respond(batch, feats):
        caption = batch["caption_id"].float()  # (B,)
        image = feats[:, 0, 0] - 1  # (B,)
        pooled = torch.stack([torch.zeros_like(caption), logit_of(caption, image)], dim=-1)  # (B, 2)
        return EncoderOutput(hidden=torch.zeros(len(caption), 1, 2), pooled=pooled, text_len=1, model=vl)

    return itm.evaluate(vl, OracleData(_samples(), respond, itm.pad_values))


RETRIEVAL = [f"retrieval_{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]


def test_itm_and_retrieval_are_one_for_an_oracle_and_zero_for_its_opposite():
    right = _itm_metrics(lambda c, v: torch.where(c == v, 4.0, -4.0))
    assert right["itm_acc"] == 1.0
    assert all(right[k] == 1.0 for k in RETRIEVAL), right
    wrong = _itm_metrics(lambda c, v: torch.where(c == v, -4.0, 4.0))
    assert wrong["itm_acc"] == 0.0
    assert all(wrong[k] == 0.0 for k in RETRIEVAL), wrong  # the partner ranks last of 12


def test_itm_acc_is_balanced_and_tied_retrieval_is_chance():
    # always "matched": every positive right, every negative wrong
    assert _itm_metrics(lambda c, v: torch.full_like(c, 4.0))["itm_acc"] == 0.5
    # p = 0.5 everywhere: every positive wrong (not > 0.5), every negative right; every candidate tied
    tied = _itm_metrics(lambda c, v: torch.zeros_like(c))
    assert tied["itm_acc"] == 0.5
    for d in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert tied[f"retrieval_{d}_r{k}"] == pytest.approx(k / CANDIDATES)


def test_retrieval_directions_are_not_swapped():
    # score(c, v) = 2c + [c == v]: each caption's own image is its best (t2i perfect), but for
    # image v every caption c > v scores higher than v's own (i2t: only the last k images hit)
    metrics = _itm_metrics(lambda c, v: 0.1 * (2 * c + (c == v).float()) - 1.0)
    for k in (1, 5, 10):
        assert metrics[f"retrieval_t2i_r{k}"] == 1.0
        assert metrics[f"retrieval_i2t_r{k}"] == pytest.approx(k / CANDIDATES)


def test_recall_at_reads_the_diagonal_of_rows():
    n = 6
    rows_right = np.arange(n)[:, None] * 2.0 + np.eye(n)  # each row's maximum is its diagonal
    assert recall_at(rows_right, 1) == 1.0
    assert recall_at(rows_right.T, 1) == pytest.approx(1 / n)
    assert recall_at(rows_right.T, 3) == pytest.approx(3 / n)
    assert recall_at(np.ones((n, n)), 2) == pytest.approx(2 / n)  # ties: chance, not 0 or 1
    second = np.eye(n) + np.roll(np.eye(n), 1, axis=1) * 2  # the partner is always second
    assert recall_at(second, 1) == 0.0 and recall_at(second, 2) == 1.0


# -- masked language modeling and its blind variants ---------------------------------------------
def _mlm_metrics(predict) -> dict[str, float]:
    """mlm's metrics when the model predicts ``predict(true_ids, sees_image)`` at every text position."""
    vl = _vl()
    mlm = _objective("mlm", vl).eval()
    mlm.transform = nn.Identity()  # logits = hidden @ E^T + bias with E = I: the hidden state is the prediction
    with torch.no_grad():
        mlm.bias.zero_()
    one_hot_words = SimpleNamespace(word_embeddings=nn.Embedding.from_pretrained(torch.eye(VOCAB)))

    def respond(batch, feats):
        sees_image = (feats.abs().sum(dim=(1, 2)) > 0)[:, None]  # (B, 1)
        pred = predict(batch["true_ids"], sees_image)  # (B, T)
        text = nn.functional.one_hot(pred, VOCAB).float()  # (B, T, V)
        return EncoderOutput(hidden=text, pooled=text[:, 0], text_len=text.shape[1], model=one_hot_words)

    return mlm.evaluate(vl, OracleData(_samples(), respond, mlm.pad_values))


ROLES = ("size", "color", "shape")


def test_mlm_accuracies_are_one_for_an_oracle_and_zero_for_its_opposite():
    right = _mlm_metrics(lambda ids, sees: ids)
    keys = ["mlm_acc", *(f"attr_{r}_acc{b}" for r in ROLES for b in ("", "_blind"))]
    assert sorted(right) == sorted(keys)
    assert all(right[k] == 1.0 for k in keys), right
    wrong = _mlm_metrics(lambda ids, sees: (ids + 1) % VOCAB)
    assert all(wrong[k] == 0.0 for k in keys), wrong


def test_blind_variants_hide_the_image_and_only_the_image():
    # a model that names words right only when it sees region features
    needs_image = _mlm_metrics(lambda ids, sees: torch.where(sees, ids, (ids + 1) % VOCAB))
    assert needs_image["mlm_acc"] == 1.0
    for r in ROLES:
        assert needs_image[f"attr_{r}_acc"] == 1.0 and needs_image[f"attr_{r}_acc_blind"] == 0.0


def _region_batch():
    samples = _samples(4)
    for s in samples:
        s.pop(META)
    return Collator(0)(samples)


def test_zero_region_features_zeroes_every_feature_and_nothing_else():
    vl = _vl()
    batch = _region_batch()
    original = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    feats, boxes, mask = vl.regions_from_batch({**batch, "zero_region_features": True})
    assert feats.shape == original["features"].shape and feats.dtype == original["features"].dtype
    assert (feats == 0).all()
    assert torch.equal(boxes, original["boxes"]) and torch.equal(mask, original["region_mask"])
    assert all(torch.equal(batch[k], v) for k, v in original.items())  # the batch itself is untouched
    seen, _, _ = vl.regions_from_batch(batch)
    assert torch.equal(seen, original["features"])  # without the switch the features are the data's

    # the whole forward: blind equals features zeroed by hand (text, boxes, masks as they were)
    with torch.no_grad():
        blind = vl({**batch, "zero_region_features": True}).hidden
        by_hand = vl({**batch, "features": torch.zeros_like(batch["features"])}).hidden
        sighted = vl(batch).hidden
    assert torch.allclose(blind, by_hand, atol=1e-6)
    assert not torch.allclose(blind, sighted, atol=1e-3)


# -- word-region alignment: grounding accuracy ---------------------------------------------------
def _grounding_acc(region_of_word) -> float:
    """WRA's ``grounding_acc`` when each grounded token's state points at ``region_of_word(region,
    regions in its image)``: the state of region j is e_j, of an ungrounded token e_K (equally far
    from every region)."""
    vl = _vl()
    wra = _objective("wra", vl).eval()

    def respond(batch, feats):
        K = feats.shape[1]
        count = batch["region_mask"].sum(1, keepdim=True)  # (B, 1)
        grounded = batch["token_region"]  # (B, T), -1 where no object is named
        target = torch.where(grounded >= 0, region_of_word(grounded, count), K)  # (B, T)
        text = nn.functional.one_hot(target, K + 1).float()  # (B, T, K + 1)
        regions = torch.eye(K + 1)[:K].expand(len(count), K, K + 1)  # (B, K, K + 1)
        hidden = torch.cat([text, regions], dim=1)
        return EncoderOutput(hidden=hidden, pooled=hidden[:, 0], text_len=text.shape[1], model=vl)

    return wra.evaluate(vl, OracleData(_samples(), respond, wra.pad_values))["grounding_acc"]


def test_grounding_acc_is_one_when_words_send_their_mass_to_their_own_region():
    assert _grounding_acc(lambda r, k: r) == 1.0
    assert _grounding_acc(lambda r, k: (r + 1) % k) == 0.0  # every word aligned to another real region
    # the first object's words (tokens 1-3) aligned right, the second's (tokens 5-7) wrong: half
    half = _grounding_acc(lambda r, k: torch.where(torch.arange(r.shape[1]) < 4, r, (r + 1) % k))
    assert half == 0.5
