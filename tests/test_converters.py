"""The downstream converters: VQA v2, RefCOCO(+/g), NLVR2, SNLI-VE -> shards in vlpt's schema.

Each test writes a tiny file in the public format and a few generated images, converts it,
and reads the shards back with the training stream's tar reader. Also: the plain-data
pickle reader (RefCOCO's ``refs(unc).p``) loads plain refs and refuses a pickle that would
run code; VQA's answer normalization and soft scores; resuming an interrupted conversion.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_data_tools import _tool, read_shard

from vlpt.errors import UserError


@pytest.fixture(scope="module")
def vqa():
    return _tool("vqa_to_shards")


def make_image(path: Path, size=(40, 30), color=(200, 40, 10), fmt=None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def samples_of(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for p in sorted(out.glob("*.tar")) for s in read_shard(p)}


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------


def test_vqa_answer_normalization_and_soft_scores(vqa):
    cases = {"Two": "2", "The Red One.": "red 1", "isnt": "isn't", "3.5": "3.5", "1,000": "1000",
             "black-and-white": "black and white", "t - shirt": "t shirt", "yes!": "yes", "hot dog's": "hot dog's",
             "  an apple\t": "apple", "dont": "don't", "none": "0", "whats": "what's", "couldnt've": "couldn't've",
             "its": "its", "well": "well", "5.": "5", "(a) cat": "cat", "mr. smith": "mr smith"}
    assert {k: vqa.normalize_answer(k) for k in cases} == cases
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["Red", "red", "red.", "RED", "the red", "red", "red", "Red!", "blue", "Blue"])]
    counts = vqa.answer_counts({"answers": answers})
    assert counts == {"red": 8, "blue": 2}
    assert {a: round(vqa.soft_score(n), 4) for a, n in counts.items()} == {"red": 1.0, "blue": 0.6}
    assert [round(vqa.soft_score(n), 4) for n in (0, 1, 2, 3, 4, 10)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]  # VQA v2


def _vqa_files(root: Path) -> dict:
    """3 images (the third missing), 5 questions; 'two' is the multiple-choice answer of 3 questions."""
    for image_id in (1, 2):
        make_image(root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", color=(60 * image_id, 0, 0))
    mc = {10: "2", 11: "Two", 20: "yes", 21: "two", 30: "yes"}
    image_of = {10: 1, 11: 1, 20: 2, 21: 2, 30: 3}
    questions = {"data_subtype": "train2014", "questions": [
        {"question_id": q, "image_id": image_of[q], "question": f"How many things   in question {q}?"} for q in mc]}
    annotations = {"annotations": [
        {"question_id": q, "image_id": image_of[q], "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": a,
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, x in enumerate([a] * 7 + ["three"] * 2 + ["a dog"])]} for q, a in mc.items()]}
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(annotations))
    return {"questions": root / "q.json", "annotations": root / "a.json", "images": root / "train2014"}


def test_vqa_to_shards_train_and_test_dev(tmp_path, vqa, capsys):
    f = _vqa_files(tmp_path)
    out = tmp_path / "train"
    base = ["--questions", str(f["questions"]), "--images", str(f["images"]), "--workers", "1", "--quiet"]
    assert vqa.main(base + ["--annotations", str(f["annotations"]), "--out", str(out), "--min-answer-count", "2",
                            "--shard-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "4 samples in 3 shard(s)" in err
    assert "skipped 1 missing image(s)" in err and "COCO_train2014_000000000003" in err
    vocab = json.loads((out / "answer_vocab.json").read_text())
    assert vocab == ["2", "yes"]  # '2'/'Two'/'two' normalize to one answer (3 questions), 'yes' (2 questions)
    samples = samples_of(out)
    assert set(samples) == {"10", "11", "20", "21"}
    s = samples["21"]
    assert s["txt"] == b"How many things in question 21?"
    assert s["jpg"] == (f["images"] / "COCO_train2014_000000000002.jpg").read_bytes()  # copied as it is
    assert meta(s) == {"question_id": 21, "image_id": 2, "question_type": "how many", "answer_type": "number",
                       "answers": {"2": 7, "3": 2, "dog": 1}, "answer_ids": {"0": 7}}
    assert meta(samples["20"])["answer_ids"] == {"1": 7}  # 'three' and 'dog' are outside the vocabulary
    regions = tmp_path / "regions"  # region features keep everything and bring the vocabulary along
    assert _tool("extract_regions").main([f"{out}/vqa-*.tar", "--out", str(regions), "--model", "resnet18",
                                          "--pretrained", "none", "--grid", "1", "--image-size", "32",
                                          "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((regions / "answer_vocab.json").read_text()) == vocab
    assert {k: meta(s) for k, s in samples_of(regions).items()} == {k: meta(s) for k, s in samples.items()}

    # test-dev: no annotations -> needs the training vocabulary, then empty answers
    dev = tmp_path / "dev"
    assert vqa.main(base + ["--out", str(dev)]) == 2
    assert "--answer-vocab" in one_line_error(capsys)
    (tmp_path / "ans2label.json").write_text(json.dumps({"yes": 1, "2": 0}))  # UNITER's {answer: index} form
    assert vqa.main(base + ["--out", str(dev), "--answer-vocab", str(tmp_path / "ans2label.json")]) == 0
    assert json.loads((dev / "answer_vocab.json").read_text()) == ["2", "yes"]
    m = meta(samples_of(dev)["10"])
    assert m["answers"] == {} and m["answer_ids"] == {} and m["question_type"] == ""

    capsys.readouterr()
    assert vqa.main(base + ["--out", str(tmp_path / "x"), "--annotations", str(tmp_path / "none.json")]) == 2
    assert "not found" in one_line_error(capsys)
    assert vqa.main(base + ["--out", str(tmp_path / "x"), "--annotations", str(f["annotations"]),
                            "--image-pattern", "same.jpg"]) == 2
    assert "same name" in one_line_error(capsys)


# --------------------------------------------------------------------------------------
# RefCOCO and the plain-data pickle reader
# --------------------------------------------------------------------------------------


def _refcoco_files(root: Path) -> tuple[list[dict], dict]:
    make_image(root / "images" / "COCO_train2014_000000000007.jpg", size=(200, 100))
    instances = {"images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 200, "height": 100}],
                 "annotations": [{"id": 70, "image_id": 7, "bbox": [20, 10, 100, 50], "category_id": 1},
                                 {"id": 71, "image_id": 7, "bbox": [150, 0, 50, 100], "category_id": 2},
                                 {"id": 72, "image_id": 7, "bbox": [5, 5, 0, 10], "category_id": 3}]}
    refs = [{"ref_id": 0, "ann_id": 71, "image_id": 7, "split": "train", "category_id": 2, "sent_ids": [0, 1],
             "sentences": [{"sent_id": 0, "sent": "right thing", "raw": "Right thing!", "tokens": ["right", "thing"]},
                           {"sent_id": 1, "sent": "the tall one", "raw": "The tall one", "tokens": []}]},
            {"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "testA", "category_id": 1, "sent_ids": [2],
             "sentences": [{"sent_id": 2, "sent": "left box", "raw": "left box", "tokens": []}]},
            {"ref_id": 2, "ann_id": 99, "image_id": 7, "split": "train", "category_id": 1, "sent_ids": [3],
             "sentences": [{"sent_id": 3, "sent": "gone", "raw": "gone", "tokens": []}]}]
    (root / "instances.json").write_text(json.dumps(instances))
    return refs, instances


def test_refcoco_pickle_and_json_refs(tmp_path, capsys):
    tool = _tool("refcoco_to_shards")
    refs, _ = _refcoco_files(tmp_path)
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))  # as the public files are
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    base = ["--instances", str(tmp_path / "instances.json"), "--images", str(tmp_path / "images"), "--workers", "1",
            "--quiet"]
    out = tmp_path / "train"
    assert tool.main(base + ["--refs", str(tmp_path / "refs(unc).p"), "--split", "train", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 samples" in err and "skipped 1 input row(s): ref whose annotation" in err
    samples = samples_of(out)
    assert set(samples) == {"0_0", "0_1"}  # one sample per sentence
    assert samples["0_1"]["txt"] == b"the tall one"
    m = meta(samples["0_0"])
    assert m["ref_id"] == 0 and m["image_id"] == 7 and m["split"] == "train" and m["sent_id"] == 0
    np.testing.assert_allclose(m["target_box"], [0.75, 0.0, 1.0, 1.0])
    assert "target_region" not in m and "boxes" not in m

    gt = tmp_path / "gt"
    assert tool.main(base + ["--refs", str(tmp_path / "refs.json"), "--out", str(gt), "--gt-boxes",
                             "--text-field", "raw"]) == 0
    samples = samples_of(gt)
    assert set(samples) == {"0_0", "0_1", "1_2"}
    assert samples["0_0"]["txt"] == b"Right thing!"
    m0, m1 = meta(samples["0_0"]), meta(samples["1_2"])
    np.testing.assert_allclose(m0["boxes"], [[0.1, 0.1, 0.6, 0.6], [0.75, 0.0, 1.0, 1.0]])  # the empty box left out
    assert m0["target_region"] == 1 and m1["target_region"] == 0 and m1["split"] == "testA"
    np.testing.assert_allclose(m1["target_box"], m1["boxes"][m1["target_region"]])


def test_plain_pickle_loads_plain_refs_and_refuses_code(tmp_path, capsys):
    from vlpt.data.plain_pickle import load_plain_pickle

    refs = [{"ref_id": 0, "sentences": [{"sent": "a", "sent_id": 0}], "box": (1.5, 2, None, True)}]
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_plain_pickle(path) == refs
    # a Python 2 byte string (SHORT_BINSTRING), as refs(unc).p holds them
    assert load_plain_pickle(b"\x80\x02]q\x00U\x05hello\x85q\x01a.") == [("hello",)]

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "x": Payload()}], protocol=2))
    with pytest.raises(UserError, match=r"refusing .* call \w+\.system"):
        load_plain_pickle(evil)
    assert not marker.exists()  # nothing ran

    class Persistent(pickle.Pickler):
        def persistent_id(self, obj):
            return "outside" if obj == "p" else None

    buf = io.BytesIO()
    Persistent(buf, protocol=2).dump(["p"])
    for bad, why in ((pickle.dumps({1, 2}, protocol=4), "set"), (buf.getvalue(), "persistent"),
                     (b"not a pickle", "not a readable pickle")):
        with pytest.raises(UserError, match=why):
            load_plain_pickle(bad)
    with pytest.raises(UserError, match="not found"):
        load_plain_pickle(tmp_path / "absent.p")

    # the converter refuses it in one line, exit 2
    _refcoco_files(tmp_path)
    assert _tool("refcoco_to_shards").main(["--refs", str(evil), "--instances", str(tmp_path / "instances.json"),
                                            "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o")]) == 2
    assert "refusing" in one_line_error(capsys) and not marker.exists()


# --------------------------------------------------------------------------------------
# NLVR2 (two images) -> regions for both; SNLI-VE
# --------------------------------------------------------------------------------------


def test_nlvr2_two_images_then_regions_for_both(tmp_path, capsys):
    images = tmp_path / "images"
    make_image(images / "dev" / "dev-850-0-img0.png", color=(255, 0, 0), fmt="PNG")
    make_image(images / "dev" / "dev-850-0-img1.png", color=(0, 0, 255), size=(30, 40), fmt="PNG")
    make_image(images / "train" / "74" / "train-5-1-img0.png", fmt="PNG")
    make_image(images / "train" / "74" / "train-5-1-img1.png", fmt="JPEG")  # a JPEG named .png (NLVR2 has them)
    make_image(images / "dev" / "dev-9-0-img0.png", fmt="PNG")  # its right image is missing
    rows = [{"identifier": "dev-850-0-0", "sentence": "The left image is red.", "label": "True"},
            {"identifier": "dev-850-0-1", "sentence": "Both are blue.", "label": "False"},
            {"identifier": "train-5-1-3", "sentence": "Same.", "label": "True", "directory": 74},
            {"identifier": "dev-9-0-0", "sentence": "One is missing.", "label": "True"},
            {"identifier": "dev-9-0-1", "sentence": "No label.", "label": "maybe"}]
    (tmp_path / "dev.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tmp_path / "raw"
    assert _tool("nlvr2_to_shards").main([str(tmp_path / "dev.json"), "--images", str(images), "--out", str(raw),
                                          "--workers", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "3 samples" in err and "skipped 1 missing image(s)" in err and "dev-9-0-img1.png" in err
    assert "label other than True/False" in err
    samples = samples_of(raw)
    assert set(samples) == {"dev-850-0-0", "dev-850-0-1", "train-5-1-3"}
    s = samples["dev-850-0-0"]
    assert {"txt", "jpg", "2.jpg", "json"} <= set(s) and meta(s) == {"identifier": "dev-850-0-0", "label": True}
    assert meta(samples["dev-850-0-1"])["label"] is False and meta(samples["train-5-1-3"])["directory"] == 74
    from PIL import Image

    with Image.open(io.BytesIO(s["jpg"])) as left, Image.open(io.BytesIO(s["2.jpg"])) as right:
        assert left.format == right.format == "JPEG" and left.size == (40, 30) and right.size == (30, 40)
        assert left.getpixel((5, 5))[0] > 200 and right.getpixel((5, 5))[2] > 200  # left red, right blue
    assert samples["train-5-1-3"]["2.jpg"] == (images / "train" / "74" / "train-5-1-img1.png").read_bytes()

    feats = tmp_path / "regions"
    assert _tool("extract_regions").main([f"{raw}/nlvr2-000000.tar", "--out", str(feats), "--model", "resnet18",
                                          "--pretrained", "none", "--grid", "2", "--image-size", "32",
                                          "--quiet"]) == 0
    out = samples_of(feats)
    assert set(out) == set(samples)
    for key, s in out.items():
        kept = {k: v for k, v in s.items() if "regions" not in k and not k.startswith("__")}
        assert kept == {k: v for k, v in samples[key].items() if not k.startswith("__")}  # all else copied
        for member in ("regions.npz", "2.regions.npz"):
            with np.load(io.BytesIO(s[member]), allow_pickle=False) as z:
                assert z["features"].shape == (4, 512) and z["boxes"].shape == (4, 4)
    with np.load(io.BytesIO(out["dev-850-0-0"]["regions.npz"]), allow_pickle=False) as a, \
            np.load(io.BytesIO(out["dev-850-0-0"]["2.regions.npz"]), allow_pickle=False) as b:
        assert not np.allclose(a["features"], b["features"])  # two images, two sets of features


def test_snli_ve_to_shards(tmp_path, capsys):
    tool = _tool("snli_ve_to_shards")
    make_image(tmp_path / "flickr" / "1001.jpg")
    make_image(tmp_path / "flickr" / "1002.jpg", color=(0, 255, 0))
    rows = [{"Flickr30K_ID": "1001", "sentence1": "premise", "sentence2": "A dog runs.", "gold_label": "entailment",
             "pairID": "1001.jpg#0r1e"},
            {"Flickr30K_ID": "1002", "sentence2": "A cat sleeps.", "gold_label": "contradiction",
             "pairID": "1002.jpg#2r1c"},
            {"Flickr30K_ID": "1002", "sentence2": "Unclear.", "gold_label": "-", "pairID": "1002.jpg#2r1x"},
            {"Flickr30K_ID": "1003", "sentence2": "Nobody.", "gold_label": "neutral", "pairID": "1003.jpg#0r1n"}]
    (tmp_path / "ve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert tool.main([str(tmp_path / "ve.jsonl"), "--images", str(tmp_path / "flickr"), "--out", str(out),
                      "--workers", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "2 samples" in err and "skipped 1 missing image(s)" in err and "gold_label other than" in err
    samples = samples_of(out)
    assert set(samples) == {"1001_jpg_0r1e", "1002_jpg_2r1c"}  # keys without dots
    s = samples["1001_jpg_0r1e"]
    assert s["txt"] == b"A dog runs." and s["jpg"] == (tmp_path / "flickr" / "1001.jpg").read_bytes()
    assert meta(s) == {"pair_id": "1001.jpg#0r1e", "image_id": "1001", "label": "entailment"}
    assert tool.main([str(tmp_path / "absent.jsonl"), "--images", str(tmp_path), "--out", str(out)]) == 2
    assert "not found" in one_line_error(capsys)


# --------------------------------------------------------------------------------------
# resuming, help
# --------------------------------------------------------------------------------------


def test_interrupted_conversion_resumes(tmp_path, vqa, capsys, monkeypatch):
    import vlpt.data.shard_writer as shard_writer

    f = _vqa_files(tmp_path)
    make_image(f["images"] / "COCO_train2014_000000000003.jpg")
    args = ["--questions", str(f["questions"]), "--annotations", str(f["annotations"]), "--images", str(f["images"]),
            "--min-answer-count", "1", "--shard-size", "2", "--workers", "1", "--quiet"]
    assert vqa.main(args + ["--out", str(tmp_path / "fresh")]) == 0
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "fresh").glob("*.tar")}
    assert len(fresh) == 3

    real, calls, seen = shard_writer.encode_image, [], {}
    out = tmp_path / "out"

    def interrupted(path, opts):  # Ctrl-C while the second shard is half written
        calls.append(path)
        if len(calls) == 4:
            seen["writing"] = sorted(p.name for p in out.glob("*vqa-000001.tar*"))
            raise KeyboardInterrupt
        return real(path, opts)

    monkeypatch.setattr(shard_writer, "encode_image", interrupted)
    assert vqa.main(args + ["--out", str(out)]) == 130
    assert seen["writing"] == [f".vqa-000001.tar.tmp-{os.getpid()}"]  # a half shard only under a temporary name
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.tar")) == ["vqa-000000.tar"]  # no half shard under a final name
    assert not list(out.glob(".*.tmp-*"))
    first = (out / "vqa-000000.tar").stat().st_mtime_ns

    monkeypatch.setattr(shard_writer, "encode_image", real)
    assert vqa.main(args + ["--out", str(out)]) == 0
    assert "1 of 3 shard(s) already complete" in capsys.readouterr().err
    assert (out / "vqa-000000.tar").stat().st_mtime_ns == first  # skipped, not rewritten
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == fresh  # the same bytes as one uninterrupted run
    assert vqa.main(args + ["--out", str(out), "--shard-size", "3"]) == 2  # other settings: refused
    assert "--overwrite" in one_line_error(capsys)


@pytest.mark.parametrize("name", ["vqa_to_shards", "refcoco_to_shards", "nlvr2_to_shards", "snli_ve_to_shards"])
def test_converter_help_and_bad_flag(name, capsys):
    tool = _tool(name)
    with pytest.raises(SystemExit) as exc:
        tool.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Examples" in out and f"python tools/{name}.py" in out and "--shard-size" in out and "--limit" in out
    with pytest.raises(SystemExit) as exc:
        tool.main(["--no-such-flag"])
    assert exc.value.code == 2
    assert one_line_error(capsys).startswith(f"{name}: error:")


def test_converter_output_and_input_mistakes_are_one_line(tmp_path, vqa, capsys):
    """--out a file (or under one), another conversion's folder, and ids or vocabulary indices of the
    wrong type: one line and exit 2, nothing written."""
    f = _vqa_files(tmp_path)
    base = ["--questions", str(f["questions"]), "--annotations", str(f["annotations"]), "--images", str(f["images"]),
            "--min-answer-count", "1", "--workers", "1", "--quiet"]
    (tmp_path / "afile").write_text("x")
    assert vqa.main(base + ["--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert vqa.main(base + ["--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot create the --out folder" in one_line_error(capsys)

    out = tmp_path / "out"
    assert vqa.main(base + ["--out", str(out)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    assert vqa.main(base + ["--out", str(out), "--prefix", "other"]) == 2  # would pass vqa-* off as its own
    assert "another conversion ('vqa-*.tar'" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == before

    questions = json.loads(f["questions"].read_text())
    questions["questions"][0]["image_id"] = "1"
    (tmp_path / "q_str.json").write_text(json.dumps(questions))
    args = base + ["--out", str(tmp_path / "x")]
    args[args.index(str(f["questions"]))] = str(tmp_path / "q_str.json")
    assert vqa.main(args) == 2
    assert "image_id '1' is a string, and --image-pattern 'COCO_train2014_%012d.jpg' formats integers" in \
        one_line_error(capsys)
    for q in questions["questions"]:  # string ids (other VQA-style sets) with a pattern for them
        q["image_id"] = f"COCO_train2014_{q['image_id']:012d}" if isinstance(q["image_id"], int) else \
            "COCO_train2014_000000000001"
    (tmp_path / "q_str.json").write_text(json.dumps(questions))
    assert vqa.main(args + ["--image-pattern", "{image_id}.jpg"]) == 0
    capsys.readouterr()
    assert meta(samples_of(tmp_path / "x")["10"])["image_id"] == "COCO_train2014_000000000001"
    questions["questions"][0]["image_id"] = [1]
    (tmp_path / "q_str.json").write_text(json.dumps(questions))
    assert vqa.main(args + ["--overwrite"]) == 2
    assert "question 0 has image_id [1]; ids are integers or strings" in one_line_error(capsys)
    (tmp_path / "mixed.json").write_text(json.dumps({"red": 0, "2": "1"}))
    assert vqa.main(base + ["--out", str(tmp_path / "y"), "--answer-vocab", str(tmp_path / "mixed.json")]) == 2
    assert "must be 0..N-1" in one_line_error(capsys)
