"""Tests of the shapes downstream suite (vlpt.data.shapes_tasks).

What the suite promises, checked from the outside: shards in the downstream schema that vlpt's
reader decodes; labels that are true of the image (re-derived here from the scene and the boxes
with an independent reading of each text); texts that alone predict their label no better than
chance; deterministic, seed-disjoint splits; texts the tokenizer covers one token per word.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vlpt.data import shapes as S  # noqa: E402
from vlpt.data import shapes_blind as B  # noqa: E402
from vlpt.data import shapes_tasks as T  # noqa: E402

#: items per split (train: seed 0, held-out: seed 1); a few thousand VQA questions for the statistics
SIZES = {"vqa": (1000, 1500), "refexp": (600, 1000), "nlvr2": (600, 1000), "retrieval": (300, 300)}
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def splits():
    """In-memory train (seed 0) and held-out (seed 1) splits of every task."""
    return {task: {seed: list(T.generate(task, SIZES[task][seed], seed=seed)) for seed in (0, 1)}
            for task in T.TASKS}


def _meta(sample):
    return json.loads(sample["json"])


def _boxes(sample, prefix=""):
    with np.load(io.BytesIO(sample[prefix + "regions.npz"]), allow_pickle=False) as z:
        return z["boxes"]


def _relation(a, b):
    """How box a (normalized x1, y1, x2, y2) stands to box b, along the axis of larger center offset."""
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _parse_desc(words):
    """``[a|an|the] [size] [color] shape|object`` (or plural) -> {role: value}."""
    words = [w for w in words if w not in ("a", "an", "the")]
    desc = {}
    for w in words:
        if w in S.SIZES:
            desc["size"] = w
        elif w in S.COLORS:
            desc["color"] = w
        elif w in S.SHAPES or w in PLURALS:
            desc["shape"] = PLURALS.get(w, w)
        else:
            assert w in ("object", "objects"), words
    assert words[-1] in (*S.SHAPES, *PLURALS, "object", "objects"), words
    return desc


def _picks(scene, desc):
    return [i for i, o in enumerate(scene) if all(o[r] == v for r, v in desc.items())]


_REL = "|".join(S.RELATIONS)


def _resolve(text, scene, boxes):
    """Rows an expression ``DESC [REL the DESC]`` refers to, read independently of the generator."""
    m = re.fullmatch(rf"(.+?) ({_REL}) (the .+)", text)
    if not m:
        return _picks(scene, _parse_desc(text.split()))
    anchors = _picks(scene, _parse_desc(m.group(3).split()))
    if len(anchors) != 1:
        return []
    a = anchors[0]
    return [i for i in _picks(scene, _parse_desc(m.group(1).split()))
            if i != a and _relation(boxes[i], boxes[a]) == m.group(2)]


def _vqa_truth(text, scene, boxes):
    """The answer to a question, from the scene and the boxes alone."""
    if m := re.fullmatch(r"what (color|shape) is (the .+)", text):
        found = _resolve(m.group(2), scene, boxes)
        assert len(found) == 1, (text, scene)
        return scene[found[0]][m.group(1)]
    if m := re.fullmatch(r"how many (.+) are there", text):
        return str(len(_picks(scene, _parse_desc(m.group(1).split()))))
    m = re.fullmatch(r"is there (an? .+)", text)
    assert m, text
    return "yes" if _picks(scene, _parse_desc(m.group(1).split())) else "no"


_OBJ = r"an? (?:(?:small|large) )?\w+ \w+"
_CAPTION = re.compile(rf"({_OBJ})(?: ({_REL}) ({_OBJ})(?: and ({_OBJ}))?)?")


def _caption_rows(caption, scene):
    """The phrases of a caption of the pretraining grammar, each object's rows it names, and its relation."""
    m = _CAPTION.fullmatch(caption)
    assert m, caption
    phrases = [_parse_desc(p.split()) for p in (m.group(1), m.group(3), m.group(4)) if p]
    return phrases, [_picks(scene, d) for d in phrases], m.group(2)


def _shows(caption, scene, boxes):
    """Whether an image is what a caption describes: every object named once (with its size when one
    is named), no other object, and the relation true of the first two."""
    phrases, rows, relation = _caption_rows(caption, scene)
    if sorted(r for found in rows for r in found) != list(range(len(scene))) or any(len(f) != 1 for f in rows):
        return False
    return _relation(boxes[rows[0][0]], boxes[rows[1][0]]) == relation


def _statement(text):
    """An NLVR2 statement's quantifier ("both", "exactly", "neither") and its caption."""
    m = re.fullmatch(r"(both images contain|exactly one image contains|neither image contains) (.+)", text)
    assert m, text
    return m.group(1).split()[0], m.group(2)


def _nlvr2_truth(text, scenes, boxes):
    kind, caption = _statement(text)
    left, right = (_shows(caption, scene, b) for scene, b in zip(scenes, boxes))
    return {"both": left and right, "exactly": left != right, "neither": not left and not right}[kind]


def _binomial_margin(p, n, z=4.0):
    return z * np.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- constants and vocabulary


def test_constants_and_one_vocabulary_for_captions_and_the_suite():
    assert S.CAPTION_WORDS == (
        "a", "above", "and", "below", "blue", "circle", "cross", "gray", "green", "large", "left", "of",
        "orange", "purple", "red", "right", "small", "square", "triangle", "white", "yellow",
    )
    assert list(T.TASK_WORDS) == sorted(set(T.TASK_WORDS)) and T.TASK_WORDS == S.VOCAB_WORDS
    assert set(S.CAPTION_WORDS) | set(S.SUITE_WORDS) == set(S.VOCAB_WORDS)
    assert len(set(T.ANSWER_VOCAB)) == len(T.ANSWER_VOCAB)
    assert {a for answers in T.QUESTION_ANSWERS.values() for a in answers} == set(T.ANSWER_VOCAB)
    assert T.TASKS == ("vqa", "refexp", "nlvr2", "retrieval")


def test_every_text_tokenizes_one_token_per_word_and_uses_the_whole_vocabulary(splits):
    tok = T.task_tokenizer()
    assert tok.get_vocab() == S.train_tokenizer(T.TASK_WORDS).get_vocab()
    used = Counter()
    for task in T.TASKS:
        for s in splits[task][1]:
            words = s["txt"].split(" ")
            used.update(words)
            assert set(words) <= set(T.TASK_WORDS), s["txt"]
            enc = tok.encode(s["txt"])
            assert enc.tokens == ["[CLS]", *words, "[SEP]"] and 1 not in enc.ids, s["txt"]
    # no word of TASK_WORDS is dead: every one is produced somewhere, but the retired ones (kept for
    # stable token ids), which are not
    assert set(T.TASK_WORDS) - set(S.RETIRED_WORDS) == set(used), set(T.TASK_WORDS) - set(used)
    assert set(S.RETIRED_WORDS) <= set(S.SUITE_WORDS)


# --------------------------------------------------------------------------- writing, determinism


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every task written twice with seed 0 and once with seed 1, in small shards."""
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for task in T.TASKS:
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            folder = root / f"{task}-{name}"
            paths = T.write_shapes_task(folder, task, 25, seed=seed, shard_size=10, progress=False)
            out[task, name] = (folder, paths)
    return out


@pytest.mark.parametrize("task", T.TASKS)
def test_write_is_deterministic_atomic_and_complete(written, task):
    folder, paths = written[task, "a"]
    other, _ = written[task, "b"]
    expected = {"info.json", "tokenizer.json", *(["answer_vocab.json"] if task == "vqa" else [])}
    assert {p.name for p in folder.iterdir()} == expected | {os.path.basename(p) for p in paths}
    assert [os.path.basename(p) for p in paths] == [f"shapes-{task}-{i:06d}.tar" for i in range(3)]
    for name in sorted(p.name for p in folder.iterdir()):  # byte-identical reruns
        assert (folder / name).read_bytes() == (other / name).read_bytes(), name
    info = json.loads((folder / "info.json").read_text())
    assert info["task"] == task and info["seed"] == 0
    assert info["shards"] == [os.path.basename(p) for p in paths]
    assert info["images"] == (50 if task == "nlvr2" else 25)
    assert info["samples"] == len(list(T.generate(task, 25, seed=0)))
    assert info["feature_dim"] == S.FEATURE_DIM
    if task == "vqa":
        assert json.loads((folder / "answer_vocab.json").read_text()) == list(T.ANSWER_VOCAB)
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab() == T.task_tokenizer().get_vocab()
    # another seed, other data
    _, c_paths = written[task, "c"]
    assert (folder / os.path.basename(paths[0])).read_bytes() != open(c_paths[0], "rb").read()
    # a finished split is replaced whole; a folder with other content is refused
    T.write_shapes_task(other, task, 3, seed=4, shard_size=10, progress=False)
    assert sorted(p.name for p in other.iterdir()) == sorted(expected | {f"shapes-{task}-000000.tar"})
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        T.write_shapes_task(other, task, 3, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_retrieval_shards_keep_the_captions_of_an_image_together(written):
    from vlpt.data.stream import read_tar_samples

    _, paths = written["retrieval", "a"]
    images = defaultdict(set)
    for p in paths:
        for raw in read_tar_samples(p, lambda reason: pytest.fail(reason)):
            images[_meta(raw)["image_id"]].add(p)
    assert len(images) == 25 and all(len(shards) == 1 for shards in images.values())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown shapes task"):
        T.write_shapes_task(tmp_path / "x", "gqa", 5, progress=False)
    with pytest.raises(ValueError):
        T.write_shapes_task(tmp_path / "x", "vqa", 0, progress=False)
    with pytest.raises(ValueError, match="no blind baseline"):
        B.blind_baseline("retrieval", [])
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- schema, read back by vlpt


def _read_back(folder, paths):
    """Every sample of a written split through vlpt's own reader and decoder."""
    from vlpt.data.samples import DecodeSettings, decode_sample
    from vlpt.data.stream import read_tar_samples
    from vlpt.data.tokenizer import TextTokenizer

    tok = TextTokenizer.from_path(folder / "tokenizer.json")
    settings = DecodeSettings(feature_dim=S.FEATURE_DIM)
    raws = [raw for p in paths for raw in read_tar_samples(p, lambda reason: pytest.fail(reason))]
    return tok, raws, [decode_sample(raw, tok, settings) for raw in raws]


@pytest.mark.parametrize("task", T.TASKS)
def test_schema(written, task):
    from vlpt.batch import BOXES, FEATURES, INPUT_IDS, META, SECOND

    tok, raws, clean = _read_back(*written[task, "a"])
    assert len(raws) == json.loads((written[task, "a"][0] / "info.json").read_text())["samples"]
    keys = [raw["__key__"] for raw in raws]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    for raw, s in zip(raws, clean):
        meta = s[META]
        assert tok.unk_id not in s[INPUT_IDS]
        n = len(meta["scene"]) if task != "nlvr2" else len(meta["scenes"][0])
        assert s[FEATURES].shape == (n, S.FEATURE_DIM) and s[BOXES].shape == (n, 4)
        if task == "vqa":
            (answer, count), = meta["answers"].items()
            assert count == 10 and meta["answer_ids"] == {str(T.ANSWER_VOCAB.index(answer)): 10}
            assert answer in T.QUESTION_ANSWERS[meta["question_type"]]
            assert meta["question_id"] == meta["image_id"] == raw["__key__"]
        elif task == "refexp":
            assert meta["ref_id"] == meta["image_id"] == raw["__key__"] and meta["split"] == "seed0"
            np.testing.assert_allclose(meta["target_box"], s[BOXES][meta["target_region"]], atol=1e-6)
        elif task == "nlvr2":
            assert isinstance(meta["label"], bool) and meta["identifier"] == raw["__key__"]
            assert s[FEATURES + SECOND].shape == (len(meta["scenes"][1]), S.FEATURE_DIM)
            assert {"jpg", "2.jpg", "regions.npz", "2.regions.npz"} <= set(raw)
        else:
            assert raw["__key__"].startswith(meta["image_id"] + "-")
    if task == "retrieval":
        by_image = defaultdict(list)
        for raw in raws:
            by_image[_meta(raw)["image_id"]].append(raw)
        for group in by_image.values():
            assert 2 <= len(group) <= 3 and len({r["txt"] for r in group}) == len(group)
            assert len({r["jpg"] for r in group}) == 1 and len({r["regions.npz"] for r in group}) == 1


# --------------------------------------------------------------------------- labels are true


def test_vqa_answers_are_true_of_the_image(splits):
    types = Counter()
    for s in splits["vqa"][1][:600]:
        meta = _meta(s)
        (answer, _), = meta["answers"].items()
        assert _vqa_truth(s["txt"], meta["scene"], _boxes(s)) == answer, (s["txt"], meta)
        types[meta["question_type"]] += 1
    assert set(types) == set(T.QUESTION_ANSWERS)


def test_refexp_picks_exactly_its_target(splits):
    types = Counter()
    for s in splits["refexp"][1][:600]:
        meta = _meta(s)
        assert _resolve(s["txt"], meta["scene"], _boxes(s)) == [meta["target_region"]], (s["txt"], meta)
        assert len(meta["scene"]) >= 2  # a choice to make
        types[meta["expression_type"]] += 1
    assert set(types) == set(T.REFEXP_TYPES) and min(types.values()) > 200


def test_refexp_boxes_alone_do_not_give_a_relation_target_away(splits):
    """Among a relation expression's three objects, the target is the farthest in the relation's
    direction half the time and the next one otherwise (the anchor, which it stands in that relation
    to, is never passed): reading the boxes alone picks it at best half the time."""
    ranks = Counter()
    for s in splits["refexp"][1]:
        meta = _meta(s)
        if meta["expression_type"] != "relation":
            continue
        b = _boxes(s)
        rel = re.search(rf" ({_REL}) the ", s["txt"]).group(1)
        centers = {"left of": (b[:, 0] + b[:, 2]), "right of": -(b[:, 0] + b[:, 2]),
                   "above": (b[:, 1] + b[:, 3]), "below": -(b[:, 1] + b[:, 3])}[rel]
        assert len(b) == 3, s["txt"]
        ranks[int(np.argsort(centers, kind="stable").tolist().index(meta["target_region"]))] += 1
    n = sum(ranks.values())
    assert set(ranks) == {0, 1} and n > 300, ranks
    assert abs(ranks[0] / n - 0.5) <= _binomial_margin(0.5, n), ranks


def test_nlvr2_labels_are_true_and_need_both_images(splits):
    shown = Counter()
    for s in splits["nlvr2"][1][:600]:
        meta = _meta(s)
        boxes = [_boxes(s), _boxes(s, "2.")]
        assert _nlvr2_truth(s["txt"], meta["scenes"], boxes) == meta["label"], (s["txt"], meta)
        assert [len(b) for b in boxes] == [len(sc) for sc in meta["scenes"]]
        # which image shows the caption is stored as read here; both images have the described sizes
        caption = _statement(s["txt"])[1]
        assert [_shows(caption, sc, b) for sc, b in zip(meta["scenes"], boxes)] == meta["shows"]
        assert sorted(o["size"] for o in meta["scenes"][0]) == sorted(o["size"] for o in meta["scenes"][1])
        shown[tuple(meta["shows"])] += 1
    assert len(shown) == 4 and min(shown.values()) > 60, shown
    # every statement type is true half the time (the bound: 4 standard deviations)
    by_type = defaultdict(list)
    for s in splits["nlvr2"][1]:
        by_type[_meta(s)["statement_type"]].append(_meta(s)["label"])
    assert set(by_type) == set(T.NLVR2_STATEMENTS)
    for kind, labels in by_type.items():
        assert abs(np.mean(labels) - 0.5) <= _binomial_margin(0.5, len(labels)), kind
    # "exactly one": whether the left image shows the caption tells nothing alone
    by_left = defaultdict(list)
    for s in splits["nlvr2"][1]:
        meta = _meta(s)
        if meta["statement_type"] == "one":
            by_left[meta["shows"][0]].append(meta["label"])
    assert len(by_left) == 2
    for key, labels in by_left.items():
        assert abs(np.mean(labels) - 0.5) <= _binomial_margin(0.5, len(labels)), (key, np.mean(labels))


def test_nlvr2_boxes_alone_tell_nothing():
    """An image that does not show the caption has its sizes and its relation between the same
    places: where the boxes of the sizes a caption names stand tells nothing of the label."""
    checked = Counter()
    for s in T.generate("nlvr2", 1500, seed=2):
        meta = _meta(s)
        phrases, _, relation = _caption_rows(_statement(s["txt"])[1], meta["scenes"][0])
        sizes = [d.get("size") for d in phrases]
        if len(phrases) != 2 or None in sizes or sizes[0] == sizes[1]:
            continue  # only two objects of two named sizes: their boxes are known without appearance
        for shows, prefix, scene in zip(meta["shows"], ("", "2."), meta["scenes"]):
            b = _boxes(s, prefix)
            first, second = (next(i for i, o in enumerate(scene) if o["size"] == z) for z in sizes)
            assert _relation(b[first], b[second]) == relation, (s["txt"], shows)
            checked[shows] += 1
    assert min(checked.values()) > 100, checked


def test_retrieval_captions_are_true_of_their_image(splits):
    dropped = 0
    for s in splits["retrieval"][1]:
        meta, boxes = _meta(s), _boxes(s)
        phrases, _, relation = _caption_rows(s["txt"], meta["scene"])
        assert relation, s["txt"]  # 2-3 objects: always a relation
        # every object of the image is named exactly once, with its true size when a size is named
        assert _shows(s["txt"], meta["scene"], boxes), s["txt"]
        dropped += sum("size" not in d for d in phrases)
    assert dropped > 100  # some captions leave sizes out (so an image has several captions)


def test_grounding_names_the_right_words_and_regions(splits):
    checked = Counter()
    for task in ("vqa", "refexp", "retrieval"):
        for s in splits[task][1][:400]:
            meta, words = _meta(s), s["txt"].split(" ")
            for obj in meta["objects"]:
                row = meta["scene"][obj["region"]]
                assert {r: obj[r] for r in ("size", "color", "shape")} == row
                assert obj["words"], obj
                for role, index in obj["words"].items():
                    assert words[index] == obj[role], (s["txt"], obj)
                checked[task] += 1
            if task == "vqa" and _meta(s)["question_type"] == "count":
                assert meta["objects"] == []  # a plural may name several objects
    assert min(checked.values()) > 100, checked


# --------------------------------------------------------------------------- balance and blind baselines


@pytest.mark.parametrize("task", ["vqa", "refexp", "nlvr2"])
def test_text_alone_predicts_no_better_than_chance(splits, task):
    held, train = splits[task][1], splits[task][0]
    fitted = B.blind_baseline(task, held, fit=train)
    in_sample = B.blind_baseline(task, held)
    kinds = {"vqa": T.QUESTION_ANSWERS, "refexp": T.REFEXP_TYPES, "nlvr2": T.NLVR2_STATEMENTS}[task]
    assert set(fitted) == set(kinds) | {"all"}
    for kind, row in fitted.items():
        # learnt on the train split, scored on held-out: chance, within 4 standard deviations
        margin = _binomial_margin(row["chance"], row["samples"])
        assert abs(row["accuracy"] - row["chance"]) <= margin, (kind, row)
        # fit on the held-out texts themselves: no better than the same texts with uniform labels
        mine = in_sample[kind]
        margin = _binomial_margin(mine["uniform"], mine["samples"])
        assert mine["accuracy"] <= mine["uniform"] + margin, (kind, mine)
    if task == "vqa":  # answers are uniform over each type's answers
        by_type = defaultdict(Counter)
        for s in held:
            meta = _meta(s)
            by_type[meta["question_type"]][next(iter(meta["answers"]))] += 1
        for qtype, counts in by_type.items():
            answers = T.QUESTION_ANSWERS[qtype]
            n, p = sum(counts.values()), 1 / len(answers)
            assert set(counts) == set(answers)
            assert max(abs(counts[a] / n - p) for a in answers) <= _binomial_margin(p, n), (qtype, counts)


def test_blind_baseline_sees_a_leak_when_there_is_one():
    """The measure itself can fail: labels that follow from the text score 1, random ones chance."""
    rng = np.random.default_rng(0)
    texts = [f"what color is the {c} {s}" for c in S.COLORS for s in S.SHAPES]

    def fake(label_of):
        out = []
        for i in range(800):
            text = texts[i % len(texts)]
            meta = {"question_type": "color", "answers": {label_of(text): 10}}
            out.append({"txt": text.encode(), "json": json.dumps(meta).encode()})
        return out

    leaky = fake(lambda text: text.split()[4])  # the answer is a word of the question
    fair = fake(lambda text: S.COLORS[rng.integers(len(S.COLORS))])
    assert B.blind_baseline("vqa", leaky, fit=leaky)["color"]["accuracy"] == 1.0
    row = B.blind_baseline("vqa", fair, fit=fake(lambda text: S.COLORS[rng.integers(len(S.COLORS))]))["color"]
    assert row["chance"] == 1 / len(S.COLORS) and abs(row["accuracy"] - row["chance"]) < 0.06
    in_sample = B.blind_baseline("vqa", leaky)["color"]
    assert in_sample["accuracy"] == 1.0 > in_sample["uniform"]


# --------------------------------------------------------------------------- held-out disjointness


@pytest.mark.parametrize("task", T.TASKS)
def test_train_and_held_out_share_no_image(splits, task):
    def images(samples):
        out = set()
        for s in samples:
            out.update(s[k] for k in ("jpg", "2.jpg") if k in s)
        return out

    def ids(samples):
        meta = [_meta(s) for s in samples]
        return {m.get("image_id", m.get("identifier")) for m in meta}

    train, held = splits[task][0], splits[task][1]
    assert not images(train) & images(held)
    assert not ids(train) & ids(held)
    # nor the same scene in the same place (an image that only differs by its background noise)
    layout = lambda s: (s["txt"], _boxes(s).tobytes())  # noqa: E731
    assert not {layout(s) for s in train} & {layout(s) for s in held}
