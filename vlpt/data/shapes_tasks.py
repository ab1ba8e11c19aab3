"""The shapes downstream suite: VQA, referring expressions, NLVR2 and retrieval on shapes images.

So that an ablation on a CPU can ask whether a pretraining objective helps *downstream*: UNITER's
four kinds of finetuning task, in the world of the shapes pretraining data (:mod:`vlpt.data.shapes`:
1-3 colored shapes, the same region features and words).  Samples follow the downstream sample
schema (``docs/data.md``, which shows examples); each ``json`` also keeps a ``scene`` (the objects
of each region row) and, where a text names objects unambiguously, their grounding (``objects``).

*   ``vqa`` -- a question with a closed answer vocabulary (:data:`QUESTION_ANSWERS`).  Its answer is
    drawn uniformly from its type's answers, the question text independently of it, and only then
    an image in which that answer is true: no question text tells its answer more often than
    chance (:func:`vlpt.data.shapes_blind.blind_baseline` measures it).
*   ``refexp`` -- an expression that picks exactly one region, by attributes or by a relation to
    another, uniquely described object; ``target_region`` is its row (rows are in random order).
    A relation's scene has three objects, and its target is the farthest one in the relation's
    direction only half the time, so that where the boxes stand does not give the target away.
*   ``nlvr2`` -- a statement about two images (``2.jpg``/``2.regions.npz`` the right one) that needs
    both: that both / exactly one / neither of them shows what a caption of the pretraining kind
    describes ("exactly one image contains a red circle left of a small blue square").  The label
    is drawn 50/50 first, then which images show the caption, then the images: one that does not
    has the described sizes and the caption's relation between the same places, other colors and
    shapes, so its boxes alone never tell it from one that does.
*   ``retrieval`` -- images of 2-3 objects with 2-3 different captions each, one sample per caption
    with the image's ``image_id``; ``samples`` counts images, so a split of N images gives R@K over N.

Within an image no two objects share color and shape; relations are the pretraining ones (along
the axis where box centers differ more: :func:`vlpt.data.shapes.relation_of`).  Item ``i`` of seed
``s`` comes from ``np.random.default_rng([s, i, code])`` alone (``code`` fixed per task: tasks and
pretraining never share a random stream), so reruns are byte-identical; train and held-out splits
take different seeds, and their images are then all different.
"""
from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .generated import atomic_folder, write_tar_shards
from .shapes import (Box, check_write_arguments, describe_objects, jpeg_bytes, place_boxes, regions_npz, relation_of,
                     render_objects)
from .shapes_vocab import (COLORS, FEATURE_DIM, NUM_CLASSES, RELATIONS, SHAPES, SIZES, VOCAB_WORDS, class_index,
                           train_tokenizer)

__all__ = [
    "TASKS", "TASK_WORDS", "ANSWER_VOCAB", "QUESTION_ANSWERS", "NLVR2_STATEMENTS", "REFEXP_TYPES",
    "make_task_samples", "generate", "task_tokenizer", "write_shapes_task",
]

TASKS = ("vqa", "refexp", "nlvr2", "retrieval")
_STREAM = {"vqa": 101, "refexp": 102, "nlvr2": 103, "retrieval": 104}  # third word of each item's seed

ROLES = ("size", "color", "shape")
_VALUES = {"size": SIZES, "color": COLORS, "shape": SHAPES}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

#: VQA question types and the answers each can have (every question text of a type can have each)
QUESTION_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS, "shape": SHAPES, "relation_color": COLORS, "relation_shape": SHAPES,
    "count": ("0", "1", "2", "3"), "exist": ("yes", "no"),
}
#: the VQA answer vocabulary written as ``answer_vocab.json`` (index = position)
ANSWER_VOCAB: tuple[str, ...] = tuple(dict.fromkeys(a for v in QUESTION_ANSWERS.values() for a in v))

#: NLVR2 statement types: whether (the left image shows the caption, the right one does) makes one true
NLVR2_STATEMENTS: dict[str, Callable[[bool, bool], bool]] = {
    "both": lambda left, right: left and right,
    "one": lambda left, right: left != right,
    "neither": lambda left, right: not left and not right,
}
REFEXP_TYPES = ("attribute", "relation")

#: every word a text of the suite can produce: the shapes vocabulary (which includes them)
TASK_WORDS: tuple[str, ...] = VOCAB_WORDS

_ROWS = 3  # at most this many objects per image, as in pretraining
_TRIES = 1000  # scene proposals before giving up (only a bug makes a specification this hard to meet)


# --------------------------------------------------------------------------- descriptions

Thing = NamedTuple("Thing", [("size", str), ("color", str), ("shape", str)])
Desc = dict  # role -> value, e.g. {"size": "small", "shape": "circle"}: the objects it describes
Query = dict  # {"desc": Desc} or, by relation, {"desc": Desc, "rel": "left of", "anchor": Desc}


def _subsets(roles: tuple[str, ...], empty: bool = False, countable: bool = False) -> list[tuple[str, ...]]:
    """Role subsets a description may use; ``countable`` leaves out color+shape (one object at most)."""
    out = [c for k in range(0 if empty else 1, len(roles) + 1) for c in combinations(roles, k)]
    return [c for c in out if not (countable and "color" in c and "shape" in c)]


_ANY = _subsets(ROLES)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _desc(rng: np.random.Generator, subsets: list[tuple[str, ...]]) -> Desc:
    return {r: _pick(rng, _VALUES[r]) for r in _pick(rng, subsets)}


def _matches(thing: Thing, desc: Desc) -> bool:
    return all(getattr(thing, r) == v for r, v in desc.items())


def _referents(things: list[Thing], boxes: list[Box], q: Query) -> list[int]:
    """The objects a query picks: those ``desc`` describes that stand in ``rel`` to the one ``anchor``."""
    found = [i for i, t in enumerate(things) if _matches(t, q["desc"])]
    if "rel" not in q:
        return found
    anchors = _referents(things, boxes, {"desc": q["anchor"]})
    if len(anchors) != 1:
        return []
    return [i for i in found if i != anchors[0] and relation_of(boxes[i], boxes[anchors[0]]) == q["rel"]]


class _Text:
    """Words of a text, and for each object it mentions the word index of each role it names."""

    def __init__(self, *words: str):
        self.words: list[str] = []
        self.roles: dict[str, dict[str, int]] = {}
        self.add(*words)

    def add(self, *words: str) -> "_Text":
        self.words.extend(w for part in words for w in part.split())
        return self

    def mention(self, name: str, desc: Desc, article: str = "", plural: bool = False) -> "_Text":
        """``[article] [size] [color] shape-or-object``, plural for counts (``small circles``)."""
        noun = desc.get("shape")
        noun = (_PLURAL[noun] if plural else noun) if noun else ("objects" if plural else "object")
        words = [desc[r] for r in ("size", "color") if r in desc] + [noun]
        self.add("an" if article == "a" and words[0][0] in "aeiou" else article)
        self.roles[name] = {r: len(self.words) + i for i, r in enumerate(r for r in ROLES if r in desc)}
        self.words.extend(words)
        return self

    def __str__(self) -> str:
        return " ".join(self.words)


# --------------------------------------------------------------------------- scenes

_Spec = tuple[Desc, Desc | None]  # an object with the first attributes that the second does not describe


def _thing(rng: np.random.Generator, fixed: Desc, avoid: Desc | None, taken: set) -> Thing | None:
    """A random object with ``fixed``, not matching ``avoid``, its (color, shape) not ``taken``; half the
    time a near miss of ``avoid`` (all but one of its attributes), so descriptions must be read whole."""
    for _ in range(50):
        attrs = {r: _pick(rng, _VALUES[r]) for r in ROLES}
        if avoid and len(avoid) > 1 and rng.random() < 0.5:
            attrs.update(avoid)
            role = _pick(rng, sorted(avoid))
            attrs[role] = _pick(rng, [v for v in _VALUES[role] if v != avoid[role]])
        thing = Thing(**{**attrs, **fixed})
        if (thing.color, thing.shape) not in taken and not (avoid is not None and _matches(thing, avoid)):
            return thing
    return None


def _scene(rng: np.random.Generator, specs: Callable[[np.random.Generator], list[_Spec]],
           valid: Callable[[list[Thing], list[Box]], bool], image_size: int) -> tuple[list[Thing], list[Box]]:
    """Objects made from ``specs`` and a layout of them, proposed until ``valid`` holds.  The text and
    its label are drawn before and never redrawn, so rejecting scenes never changes how often a text
    has a label: only which image shows it."""
    for _ in range(_TRIES):
        things: list[Thing] = []
        for fixed, avoid in specs(rng):
            thing = _thing(rng, fixed, avoid, {(t.color, t.shape) for t in things})
            if thing is None:
                break
            things.append(thing)
        else:
            for _ in range(20):
                boxes = place_boxes(rng, [t.size for t in things], image_size)
                if boxes is not None and valid(things, boxes):
                    return things, boxes
    raise RuntimeError("no scene satisfies the sample's specification")  # pragma: no cover - a bug


def _count_specs(rng: np.random.Generator, desc: Desc, k: int) -> list[_Spec]:
    """``k`` objects that ``desc`` describes among 1 to 3 objects (``desc`` empty: ``k`` objects)."""
    n = int(rng.integers(max(k, 1), _ROWS + 1)) if desc else k
    return [(desc, None)] * k + [({}, desc)] * (n - k)


def _image(rng: np.random.Generator, things: list[Thing], boxes: list[Box], image_size: int,
           prefix: str = "") -> tuple[dict, np.ndarray, list[dict]]:
    """Shard entries of the rendered scene, the region row of each object, and the scene by row."""
    img, pixels = render_objects(rng, [t.color for t in things], [t.shape for t in things], boxes, image_size)
    order = rng.permutation(len(things))  # region row -> object
    region_of = np.empty(len(things), dtype=np.int64)
    region_of[order] = np.arange(len(things))
    classes = np.array([class_index(things[o].color, things[o].shape) for o in order])
    npz = regions_npz(rng, pixels, [boxes[o] for o in order], classes, image_size)
    entries = {prefix + "jpg": jpeg_bytes(img), prefix + "regions.npz": npz}
    return entries, region_of, [things[o]._asdict() for o in order]


def _grounding(text: _Text, q: Query, things: list[Thing], boxes: list[Box], region_of: np.ndarray) -> list:
    """The json's ``objects``: the query's target (if unique) and anchor, with region and role words."""
    found = _referents(things, boxes, q)
    named = {"target": found[0]} if len(found) == 1 else {}
    if "rel" in q:
        named["anchor"] = _referents(things, boxes, {"desc": q["anchor"]})[0]
    return [{"region": int(region_of[i]), **things[i]._asdict(), "words": text.roles[name]}
            for name, i in named.items() if text.roles.get(name)]


def _sample(key: str, text, entries: dict, meta: dict) -> dict:
    meta_json = json.dumps(meta, separators=(",", ":")).encode()
    return {"__key__": key, "txt": str(text), **entries, "json": meta_json}


# --------------------------------------------------------------------------- vqa


def _vqa_question(rng: np.random.Generator, qtype: str) -> tuple[Query, _Text]:
    """A question of ``qtype`` and its text, drawn without looking at its answer."""
    if qtype in ("color", "shape"):
        q = {"desc": _desc(rng, _subsets(tuple(r for r in ROLES if r != qtype)))}
        return q, _Text(f"what {qtype} is").mention("target", q["desc"], "the")
    if qtype.startswith("relation_"):
        asked = qtype.split("_")[1]
        # an anchor named by the asked attribute alone would rule out its own value as the answer
        anchor = _desc(rng, [s for s in _ANY if s != (asked,)])
        q = {"desc": {}, "rel": _pick(rng, RELATIONS), "anchor": anchor}
        return q, _Text(f"what {asked} is the object", q["rel"]).mention("anchor", q["anchor"], "the")
    if qtype == "count":
        q = {"desc": _desc(rng, _subsets(ROLES, countable=True))}
        return q, _Text("how many").mention("target", q["desc"], plural=True).add("are there")
    q = {"desc": _desc(rng, _ANY)}
    return q, _Text("is there").mention("target", q["desc"], "a")


def _vqa_answer(qtype: str, q: Query, things: list[Thing], boxes: list[Box]) -> str | None:
    """The true answer in the scene; None when the object asked about is not unique."""
    found = _referents(things, boxes, q)
    if qtype == "count":
        return str(len(found))
    if qtype == "exist":
        return "yes" if found else "no"
    return getattr(things[found[0]], qtype.split("_")[-1]) if len(found) == 1 else None


def _vqa_specs(rng: np.random.Generator, qtype: str, q: Query, answer: str) -> list[_Spec]:
    """The objects of a proposed scene for the question and answer (the rest is checked after layout)."""
    if qtype in ("count", "exist"):
        return _count_specs(rng, q["desc"], int(answer) if qtype == "count" else int(answer == "yes"))
    if qtype in ("color", "shape"):
        return [({**q["desc"], qtype: answer}, None)] + [({}, q["desc"])] * int(rng.integers(0, _ROWS))
    target = ({qtype.split("_")[1]: answer}, q["anchor"])
    return [(q["anchor"], None), target] + [({}, q["anchor"])] * int(rng.integers(0, _ROWS - 1))


def _vqa(rng: np.random.Generator, key: str, image_size: int, seed: int) -> list[dict]:
    qtype = _pick(rng, tuple(QUESTION_ANSWERS))
    answer = _pick(rng, QUESTION_ANSWERS[qtype])
    q, text = _vqa_question(rng, qtype)
    valid = lambda t, b: _vqa_answer(qtype, q, t, b) == answer  # noqa: E731
    things, boxes = _scene(rng, lambda r: _vqa_specs(r, qtype, q, answer), valid, image_size)
    entries, region_of, scene = _image(rng, things, boxes, image_size)
    # a count's plural may name several objects: no grounding
    objects = [] if qtype == "count" else _grounding(text, q, things, boxes, region_of)
    return [_sample(key, text, entries, {
        "question_id": key, "image_id": key, "question_type": qtype, "answers": {answer: 10},
        "answer_ids": {str(ANSWER_VOCAB.index(answer)): 10}, "objects": objects, "scene": scene})]


# --------------------------------------------------------------------------- refexp


def _refexp_query(rng: np.random.Generator, etype: str) -> Query:
    if etype == "attribute":
        return {"desc": _desc(rng, _ANY)}
    q = {"desc": _desc(rng, _subsets(ROLES, empty=True)), "rel": _pick(rng, RELATIONS)}
    while True:  # an anchor the target can differ from: not implied by its words, nor its (color, shape)
        anchor = _desc(rng, _ANY)
        same_pair = all(r in anchor and q["desc"].get(r) == anchor[r] for r in ("color", "shape"))
        if not anchor.items() <= q["desc"].items() and not same_pair:
            return {**q, "anchor": anchor}


def _farthest(boxes: list[Box], rel: str) -> int:
    """The object farthest in the direction of ``rel`` ("left of": the leftmost box center)."""
    sign, axis = {"left of": (1, 0), "right of": (-1, 0), "above": (1, 1), "below": (-1, 1)}[rel]
    return min(range(len(boxes)), key=lambda i: sign * (boxes[i][axis] + boxes[i][2] / 2))


def _refexp(rng: np.random.Generator, key: str, image_size: int, seed: int) -> list[dict]:
    etype = _pick(rng, REFEXP_TYPES)
    q = _refexp_query(rng, etype)
    target = q["desc"]
    text = _Text().mention("target", target, "the")
    if etype == "attribute":
        specs = lambda r: [(target, None)] + [({}, target)] * int(r.integers(1, _ROWS))  # noqa: E731
        valid = lambda t, b: _referents(t, b, q) == [0]  # noqa: E731
    else:
        text.add(q["rel"]).mention("anchor", q["anchor"], "the")
        # a third object, often described like the target: then only the relation tells them apart
        twin = not ("color" in target and "shape" in target)
        # the target is the farthest object in the relation's direction half the time (never the anchor,
        # which it stands in that relation to): boxes alone do not give a relation's target away
        farthest = bool(rng.integers(2))

        def specs(r: np.random.Generator) -> list[_Spec]:
            return [(target, None), (q["anchor"], None), (target if twin and r.random() < 0.6 else {}, q["anchor"])]

        def valid(t, b):
            return _referents(t, b, q) == [0] and (_farthest(b, q["rel"]) == 0) == farthest

    things, boxes = _scene(rng, specs, valid, image_size)
    entries, region_of, scene = _image(rng, things, boxes, image_size)
    x, y, side = boxes[0]
    return [_sample(key, text, entries, {
        "ref_id": key, "image_id": key, "split": f"seed{seed}", "expression_type": etype,
        "target_region": int(region_of[0]),
        "target_box": [v / image_size for v in (x, y, x + side, y + side)],
        "objects": _grounding(text, q, things, boxes, region_of), "scene": scene,
    })]


# --------------------------------------------------------------------------- nlvr2


def _shows(things: list[Thing], boxes: list[Box], caption: "_Caption") -> bool:
    """Whether a scene is the one a caption describes: the objects it names and no others (each
    named one with its color, shape and, where named, size) and its relation between the first two."""
    if len(things) != len(caption.named):
        return False
    rows = []
    for desc in caption.named:
        found = [i for i, t in enumerate(things) if _matches(t, desc) and i not in rows]
        if len(found) != 1:
            return False
        rows.append(found[0])
    return relation_of(boxes[rows[0]], boxes[rows[1]]) == caption.relation


class _Caption(NamedTuple):
    text: str
    named: list[Desc]  # the objects in caption order, each with the roles the caption names
    relation: str  # of the first named object to the second


def _described_scene(rng: np.random.Generator, image_size: int) -> tuple[list[Thing], list[int], _Caption]:
    """2-3 objects, and a caption of them in the pretraining grammar (:func:`describe_objects`)."""
    n = int(rng.integers(2, _ROWS + 1))
    things, boxes = _scene(rng, lambda r: [({}, None)] * n, lambda t, b: True, image_size)
    order, with_size = [int(i) for i in rng.permutation(n)], list(rng.random(n) < 0.6)
    sizes, colors, shapes = ([getattr(t, r) for t in things] for r in ROLES)
    text, _, relation = describe_objects(colors, shapes, sizes, boxes, order, list(range(n)), with_size)
    named = [{**({"size": sizes[i]} if with_size[i] else {}), "color": colors[i], "shape": shapes[i]} for i in order]
    return things, order, _Caption(text, named, relation["relation"])


def _nlvr2(rng: np.random.Generator, key: str, image_size: int, seed: int) -> list[dict]:
    kind = _pick(rng, tuple(NLVR2_STATEMENTS))
    label = bool(rng.integers(2))
    shows = _pick(rng, [(a, b) for a in (True, False) for b in (True, False) if NLVR2_STATEMENTS[kind](a, b) == label])
    described, order, caption = _described_scene(rng, image_size)
    first, second = order[0], order[1]
    entries, scenes = {}, []
    for prefix, shown in zip(("", "2."), shows):
        # both kinds of image: the described sizes, laid out with the caption's relation between the
        # objects in its first two places, so that boxes alone never tell a shown caption from another
        specs = [(t._asdict() if shown else {"size": t.size}, None) for t in described]

        def valid(t, b, shown=shown):
            return relation_of(b[first], b[second]) == caption.relation and _shows(t, b, caption) == shown

        things, boxes = _scene(rng, lambda r, specs=specs: specs, valid, image_size)
        image, _, scene = _image(rng, things, boxes, image_size, prefix)
        entries.update(image)
        scenes.append(scene)
    start = {"both": "both images contain", "one": "exactly one image contains", "neither": "neither image contains"}
    meta = {"identifier": key, "label": label, "statement_type": kind, "shows": list(shows)}
    return [_sample(key, f"{start[kind]} {caption.text}", entries, {**meta, "scenes": scenes})]


# --------------------------------------------------------------------------- retrieval


def _retrieval(rng: np.random.Generator, key: str, image_size: int, seed: int) -> list[dict]:
    n = int(rng.integers(2, _ROWS + 1))
    things, boxes = _scene(rng, lambda r: [({}, None)] * n, lambda t, b: True, image_size)
    entries, region_of, scene = _image(rng, things, boxes, image_size)
    sizes, colors, shapes = ([getattr(t, r) for t in things] for r in ROLES)
    captions: dict[str, dict] = {}
    for _ in range(int(rng.integers(2, 4))):
        while True:  # a new caption each time: order and size words vary (n >= 2 gives 8+ texts)
            order, with_size = rng.permutation(n), list(rng.random(n) < 0.6)
            caption, objects, relation = describe_objects(
                colors, shapes, sizes, boxes, order, region_of, with_size)
            if caption not in captions:
                captions[caption] = {"objects": objects, "relation": relation}
                break
    return [_sample(f"{key}-{c}", text, entries, {"image_id": key, "caption_index": c, **g, "scene": scene})
            for c, (text, g) in enumerate(captions.items())]


# --------------------------------------------------------------------------- generation and writing


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown shapes task {task!r}; the tasks are {', '.join(TASKS)}")


def make_task_samples(task: str, index: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """The raw webdataset samples of item ``index`` of a split, keys ``f"{seed:04d}-{index:08d}"``: one
    sample, except ``retrieval``: one per caption of image ``index`` (keys plus ``-<caption>``)."""
    _check_task(task)
    rng = np.random.default_rng([seed, index, _STREAM[task]])
    maker = {"vqa": _vqa, "refexp": _refexp, "nlvr2": _nlvr2, "retrieval": _retrieval}[task]
    return maker(rng, f"{seed:04d}-{index:08d}", image_size, seed)


def generate(task: str, samples: int, seed: int = 0, image_size: int = 64) -> Iterator[dict]:
    """The raw samples of a split in order, without writing them (for tests and baselines)."""
    for index in range(samples):
        yield from make_task_samples(task, index, seed, image_size)


def task_tokenizer():
    """The suite's tokenizer: :func:`vlpt.data.shapes.train_tokenizer` with :data:`TASK_WORDS`."""
    return train_tokenizer(TASK_WORDS)


def write_shapes_task(out_dir, task: str, samples: int, seed: int = 0, image_size: int = 64,
                      shard_size: int = 2000, progress: bool = True, desc: str | None = None) -> list[str]:
    """Write a split of ``task`` to ``out_dir`` and return its shard paths.

    Writes ``shapes-<task>-000000.tar``, ... (``shard_size`` items each; ``samples`` and
    ``shard_size`` count images for ``retrieval``), ``tokenizer.json`` (:func:`task_tokenizer`),
    for ``vqa`` ``answer_vocab.json``, and ``info.json`` last, atomically as
    :func:`vlpt.data.shapes.write_shapes` does: ``info.json`` present means the split is complete.
    """
    from tqdm.auto import tqdm

    _check_task(task)
    check_write_arguments(samples, shard_size, image_size)
    written = Counter()

    def groups(bar) -> Iterator[list[dict]]:
        for index in range(samples):
            group = make_task_samples(task, index, seed, image_size)
            written["samples"] += len(group)
            yield group
            bar.update(1)

    with atomic_folder(out_dir, ("info.json", "tokenizer.json", "answer_vocab.json")) as tmp:
        with tqdm(total=samples, unit="item", desc=desc or f"shapes {task}", disable=not progress) as bar:
            names = write_tar_shards(tmp, f"shapes-{task}", groups(bar), shard_size)
        task_tokenizer().save(str(tmp / "tokenizer.json"))
        if task == "vqa":
            (tmp / "answer_vocab.json").write_text(json.dumps(list(ANSWER_VOCAB)) + "\n")
        info = {
            "task": task, "samples": written["samples"], "images": samples * (2 if task == "nlvr2" else 1),
            "shards": names, "seed": seed, "image_size": image_size, "shard_size": shard_size,
            "feature_dim": FEATURE_DIM, "num_classes": NUM_CLASSES,
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return [str(Path(out_dir).absolute() / n) for n in names]
