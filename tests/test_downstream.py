"""Downstream tasks as objectives: VQA's targets, every finetuning objective trains on shards a test
writes, missing fields, and finetuning from a BERT folder or a vlpt run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from vlpt.cli import main as vlpt_main
from vlpt.data.samples import npz_bytes
from vlpt.data.shapes import train_tokenizer

from conftest import tiny_recipe

WORDS = "a red blue circle square what color is the left of true false".split()


def _write_shards(path, n=24, seed=0, label=True, second=False, meta_every=1):
    """Samples with every downstream field the objectives read (``label`` as NLVR2's or VE's)."""
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            k = int(rng.integers(2, 5))
            regions = {"features": rng.normal(size=(k, 192)).astype(np.float16),
                       "boxes": np.sort(rng.random((k, 4)), axis=1).astype(np.float32)}
            meta = {"image_id": i // 2, "answer_ids": {str(i % 3): 10, "3": 1}, "target_region": int(i % k),
                    "target_box": regions["boxes"][i % k].tolist(),
                    "label": (i % 2 == 0) if label is True else ["entailment", "neutral", "contradiction"][i % 3]}
            sample = {"__key__": f"s{i:04d}", "txt": " ".join(rng.choice(WORDS, 5)), "regions.npz": npz_bytes(regions)}
            if i % meta_every == 0:
                sample["json"] = json.dumps(meta).encode()
            if second:
                sample["2.regions.npz"] = npz_bytes({"features": rng.normal(size=(3, 192)).astype(np.float16),
                                                     "boxes": np.sort(rng.random((3, 4)), axis=1).astype(np.float32)})
            w.write(sample)
    return path


@pytest.fixture()
def data(tmp_path):
    train_tokenizer([" ".join(WORDS)]).save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def _recipe(tmp_path, shards, tasks, **extra):
    return tiny_recipe(tmp_path, data={"train": [{"shards": str(shards)}], "val": {"shards": str(shards)}},
                       model={"tokenizer": str(tmp_path / "tokenizer.json")}, tasks=tasks, mixing="sum",
                       train={"steps": 5, "lr": 1e-3, "warmup": 1}, eval={"samples": 24, "batch_size": 8},
                       checkpoint={"every": None, "keep": 1}, **extra)


# -- VQA's targets and accuracy, by the VQA v2 definition ---------------------------------------
def test_vqa_soft_scores_and_accuracy_follow_vqa_v2():
    from vlpt_objectives.vqa import soft_scores, top_answer_score

    # 10 annotators: 7 said "2" (index 0), 2 said "3" (index 1), 1 said "4" (index 2)
    given = ["2"] * 7 + ["3"] * 2 + ["4"]

    def official(answer):  # VQA v2's evaluation: min(1, matches among the other 9 / 3), averaged over the 10
        return np.mean([min(1.0, sum(g == answer for g in given[:i] + given[i + 1:]) / 3) for i in range(10)])

    target = soft_scores({"0": 7, "1": 2, "2": 1}, num_answers=4)
    np.testing.assert_allclose(target, [official("2"), official("3"), official("4"), 0.0], rtol=1e-6)
    np.testing.assert_allclose(target, [1.0, 0.6, 0.3, 0.0], rtol=1e-6)
    assert soft_scores({"0": 3, "1": 4}, num_answers=2).tolist() == pytest.approx([0.9, 1.0])
    logits = torch.tensor([[0.1, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    scores = top_answer_score(logits, torch.tensor(np.stack([target] * 3)))
    np.testing.assert_allclose(scores.numpy(), [0.6, 1.0, 0.0], rtol=1e-6)  # "3": 0.6, "2": 1, unseen: 0
    with pytest.raises(ValueError, match="num_answers"):
        soft_scores({"7": 3}, num_answers=4)


def test_vqa_and_ve_evaluate_every_question_with_the_field():
    """A question whose answers are all outside the vocabulary (``answer_ids: {}``) scores 0 and
    counts, as in UNITER's evaluation, and a VE label given as index 0 counts; a sample without
    the field does not."""
    from types import SimpleNamespace

    from vlpt_objectives.ve import VisualEntailment
    from vlpt_objectives.vqa import VisualQuestionAnswering

    class Counting:  # EvalData's interface; mean_score counts the questions it is given
        def __init__(self, samples):
            self.samples = samples

        def mean_score(self, views, score, blind=False):
            return len(views)

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8))
    vqa = VisualQuestionAnswering(VisualQuestionAnswering.Options(num_answers=4), model, None)
    questions = [{"meta": {"answer_ids": {}}}, {"meta": {"answer_ids": {"1": 10}}}, {"meta": {}}, {}]
    assert vqa.evaluate(None, Counting(questions))["vqa_acc"] == 2
    ve = VisualEntailment(VisualEntailment.Options(), model, None)
    pairs = [{"meta": {"label": 0}}, {"meta": {"label": "neutral"}}, {"meta": {}}]
    assert ve.evaluate(None, Counting(pairs))["ve_acc"] == 2


def test_refexp_head_has_uniters_one_or_two_layers():
    from types import SimpleNamespace

    from torch import nn

    from vlpt_objectives.refexp import ReferringExpression

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8))
    two = ReferringExpression(ReferringExpression.Options(), model, None).head  # RefCOCO+'s config
    one = ReferringExpression(ReferringExpression.Options(mlp=1), model, None).head  # RefCOCO's, RefCOCOg's
    assert isinstance(two, nn.Sequential) and len(two) == 4 and isinstance(one, nn.Linear)
    assert one.weight.shape == (1, 8) and float(one.bias.detach().abs().sum()) == 0.0
    assert "mlp is 1 or 2" in ReferringExpression.check_task(ReferringExpression.Options(mlp=3), [])


# -- every downstream objective trains on shards in the public schema -------------------------------
def test_downstream_objectives_train_five_steps(data, capsys):
    shards = _write_shards(data / "down-000000.tar", second=True)
    tasks = {"vqa": {"weight": 1, "objectives": {"vqa": {"weight": 1.0, "num_answers": 4}}},
             "refexp": {"weight": 1, "objectives": {"refexp": 1.0}},
             "nlvr2": {"weight": 1, "objectives": {"nlvr2": 1.0}},
             "itr": {"weight": 1, "objectives": {"itr": {"weight": 1.0, "hard_negatives": 3}}}}
    assert vlpt_main(["train", str(_recipe(data, shards, tasks))]) == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (data / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "vqa/loss" in r]
    assert len(trained) == 5 and all(np.isfinite(r[f"{t}/loss"]) for r in trained for t in tasks)
    ev = json.loads((data / "run" / "eval.json").read_text())
    for key in ("vqa_acc", "vqa_acc_blind", "refexp_acc", "refexp_iou50", "refexp_acc_blind", "nlvr2_acc",
                "nlvr2_acc_blind", "itr_t2i_r1", "itr_i2t_r10"):
        assert 0.0 <= ev[key] <= 1.0, key
    # the refexp targets are rows with their own box: IoU with the gold box of the picked region
    assert ev["refexp_iou50"] >= ev["refexp_acc"]


def test_ve_trains_on_class_name_labels(data, capsys):
    shards = _write_shards(data / "ve-000000.tar", label="class")
    tasks = {"ve": {"weight": 1, "objectives": {"ve": 1.0}}}
    assert vlpt_main(["train", str(_recipe(data, shards, tasks))]) == 0, capsys.readouterr().err[-3000:]
    ev = json.loads((data / "run" / "eval.json").read_text())
    assert 0.0 <= ev["ve_acc"] <= 1.0 and "ve_acc_blind" in ev


def test_samples_lacking_a_field_are_counted_not_fatal(data, capsys):
    shards = _write_shards(data / "some-000000.tar", n=40, meta_every=2)  # every other sample has no json
    tasks = {"vqa": {"weight": 1, "objectives": {"vqa": {"weight": 1.0, "num_answers": 4}}}}
    assert vlpt_main(["train", str(_recipe(data, shards, tasks))]) == 0, capsys.readouterr().err[-3000:]
    last = [json.loads(line) for line in (data / "run" / "metrics.jsonl").read_text().splitlines() if "loss" in line][-1]
    assert last["data/skipped/lacks_meta.answer_ids"] > 0


def test_a_downstream_objective_on_data_without_its_fields_exits_2(tmp_path):
    recipe = tiny_recipe(tmp_path, tasks={"vqa": {"weight": 1, "objectives": {"vqa": 1.0}}})  # shapes captions
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if not line.startswith("vlpt: building")]
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr
    assert "tasks.vqa" in res.stderr and "meta.answer_ids" in res.stderr and "no source can feed it" in res.stderr


# -- finetuning from a BERT folder saved by another tool, and from a vlpt run ---------------------
def _padded_bert(folder):
    """A BertModel and a tokenizer.json saved with padding and truncation on (as many exports are)."""
    import transformers

    from vlpt.data.shapes import VOCAB_WORDS

    tok = train_tokenizer(VOCAB_WORDS)
    tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    bert.save_pretrained(folder)
    return bert, tok


def test_init_from_a_bert_folder_with_a_padding_tokenizer_trains_and_exports_it_unchanged(tmp_path, capsys):
    import transformers

    bert, tok = _padded_bert(tmp_path / "bert")
    recipe = tiny_recipe(tmp_path, model={"init_from": str(tmp_path / "bert")}, train={"steps": 3, "lr": 0.0})
    assert vlpt_main(["train", str(recipe)]) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "pads every text to 128 ids and truncates at 128 ids" in err  # said once, not applied
    assert "model.init_from: loaded" in err and "fresh" in err
    assert vlpt_main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    again = transformers.BertModel.from_pretrained(tmp_path / "export").eval()
    ids = torch.tensor([tok.encode("a large red circle left of a small blue square").ids[:12]])
    with torch.no_grad():
        want, got = bert(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


def test_init_from_a_vlpt_run_loads_the_encoder_and_starts_heads_fresh(tmp_path, capsys):
    from safetensors.torch import load_file

    from vlpt.build import build_model
    from vlpt.recipe import load_recipe

    (tmp_path / "pre").mkdir()
    pre = tiny_recipe(tmp_path / "pre", train={"steps": 2, "lr": 1e-3, "warmup": 1})
    assert vlpt_main(["train", str(pre)]) == 0
    saved = load_file(str(tmp_path / "pre" / "run" / "checkpoints" / "step-0000002" / "model.safetensors"))
    tuned = load_recipe(tiny_recipe(tmp_path, model={"init_from": str(tmp_path / "pre" / "run"), "hidden_size": 64}))
    built = build_model(tuned)
    assert built.model.vl.config.hidden_size == 32  # the pretrained run's sizes win
    assert "loaded the encoder" in built.init_report and "fresh heads: mlm, itm" in built.init_report
    state = built.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k.startswith("vl."))
    head = "objectives.itm.head.weight"
    assert not torch.equal(state[head], saved[head])  # heads start fresh
    # ... except a retrieval rank head, which starts as UNITER's from ITM's matched row and bias
    itr = {"itr": {"weight": 1, "objectives": {"itr": {"weight": 1.0, "hard_negatives": 3}}}}
    built = build_model(load_recipe(tiny_recipe(tmp_path, model={"init_from": str(tmp_path / "pre" / "run")},
                                                tasks=itr)))
    rank = built.model.objectives["itr"].rank
    assert torch.equal(rank.weight.detach(), saved[head][1:]) and torch.equal(rank.bias.detach(), saved["objectives.itm.head.bias"][1:])
    assert "itr: rank head from the pretrained ITM head" in built.init_report
    off = dict(itr, itr={"weight": 1, "objectives": {"itr": {"weight": 1.0, "init_from_itm": False}}})
    built = build_model(load_recipe(tiny_recipe(tmp_path, model={"init_from": str(tmp_path / "pre" / "run")}, tasks=off)))
    report = built.init_report
    assert built.model.objectives["itr"].rank.bias is None and "itr" in report.split("fresh heads: ")[1]
    assert "rank head from" not in report


# -- NLVR2's paired-attn head (UNITER's NLVR2 config) -----------------------------------------------
def test_nlvr2_paired_attn_reads_both_images_and_ignores_padding():
    from vlpt.batch import SECOND
    from vlpt.testing import DOWNSTREAM_META, prepare_batch, tiny_pretrain_model, tiny_samples, tiny_task

    task = tiny_task({"nlvr2": {"weight": 1.0, "head": "paired-attn"}}, name="nlvr2")
    model = tiny_pretrain_model([task]).eval()
    head = model.objectives["nlvr2"]
    batch = prepare_batch(model, task, tiny_samples(8, meta=DOWNSTREAM_META, second_image=True, regions=(1, 5)))
    loss, _ = model("nlvr2", batch)
    loss.backward()
    for name, p in head.named_parameters():  # every part of the head takes part (both attentions, pool, join)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        logits = head.logits(model.vl(batch), batch)
        other = dict(batch, **{"features" + SECOND: batch["features" + SECOND].flip(0)})  # right images swapped
        assert (head.logits(model.vl(other), other) - logits).abs().max() > 1e-4
        # a sample padded in the batch scores as it does alone (no padding): the masks hold on both sides
        samples = tiny_samples(8, meta=DOWNSTREAM_META, second_image=True, regions=(1, 5))
        short = [i for i, x in enumerate(samples) if len(x["features"]) < max(len(y["features"]) for y in samples)
                 and len(x["features2"]) < max(len(y["features2"]) for y in samples)]
        assert short  # some samples have fewer regions than others in both images
        for i in short:
            alone = prepare_batch(model, task, [samples[i]])
            torch.testing.assert_close(head.logits(model.vl(alone), alone)[0], logits[i], atol=1e-5, rtol=1e-5)
