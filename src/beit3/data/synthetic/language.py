"""The language of the synthetic world: captions, VQA questions with 10 answers, NLVR2 statements.

The vocabulary stays small (colours, shapes, sizes, positions, counts, relations) and templates
vary the wording, so a tiny model can learn it while it still has to ground words in pixels:
counting, colour/shape binding and spatial relations cannot be read off a colour histogram.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from beit3.data.synthetic.scene import COLOURS, COLUMNS, ROWS, SHAPES, Scene, SceneObject

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _count_phrase(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def _mention(obj: SceneObject, rng: random.Random, article: str = "a") -> str:
    """Noun phrase for an object, sometimes leaving out its size (captions need not be exhaustive)."""
    words = f"{obj.size} {obj.colour} {obj.shape}" if rng.random() < 0.5 else f"{obj.colour} {obj.shape}"
    return f"{article} {words}"


def _where(obj: SceneObject) -> str:
    if obj.row == 1 and obj.col == 1:
        return "in the center"
    if obj.row == 1:
        return f"on the {COLUMNS[obj.col]}"
    if obj.col == 1:
        return f"at the {ROWS[obj.row]}"
    return f"in the {ROWS[obj.row]} {COLUMNS[obj.col]} corner"


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """A true spatial relation of ``a`` to ``b`` (objects sit in distinct cells, so one always holds)."""
    options = [name for name, holds in (("to the left of", a.col < b.col), ("to the right of", a.col > b.col),
                                        ("above", a.row < b.row), ("below", a.row > b.row)) if holds]
    return rng.choice(options)


def caption(scene: Scene, rng: random.Random) -> str:
    """One true caption of the scene, from a randomly chosen template."""
    objs = list(scene.objects)
    kind = rng.choice(("list", "count", "relation", "position", "colour_count"))
    if kind == "relation" and len(objs) >= 2:
        a, b = rng.sample(objs, 2)
        return f"{_mention(a, rng)} {_relation(a, b, rng)} {_mention(b, rng)}"
    if kind == "position":
        obj = rng.choice(objs)
        return f"{_mention(obj, rng)} {_where(obj)} of the image"
    if kind == "count":
        noun = rng.choice(("shape", "object"))
        return f"{_count_phrase(len(objs), noun)} on a {scene.background} background"
    if kind == "colour_count":
        colour = rng.choice(objs).colour
        n = sum(obj.colour == colour for obj in objs)
        return f"there {'is' if n == 1 else 'are'} {_count_phrase(n, colour + ' shape')} in the picture"
    shuffled = rng.sample(objs, len(objs))
    mentions = [_mention(obj, rng) for obj in shuffled]
    listed = mentions[0] if len(mentions) == 1 else ", ".join(mentions[:-1]) + " and " + mentions[-1]
    return rng.choice(("{} on a {} background", "a picture of {} on a {} background",
                       "an image showing {}, {} background")).format(listed, scene.background)


def captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """``count`` captions, distinct when the templates allow it."""
    found: list[str] = []
    for _ in range(count * 6):
        text = caption(scene, rng)
        if text not in found:
            found.append(text)
        if len(found) == count:
            break
    while len(found) < count:
        found.append(caption(scene, rng))
    return found


def _unique(objs: list[SceneObject], key: Callable[[SceneObject], str]) -> list[SceneObject]:
    values = [key(obj) for obj in objs]
    return [obj for obj in objs if values.count(key(obj)) == 1]


def question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """One (question, answer, answer type) about the scene; answers come from a small closed set."""
    objs = list(scene.objects)
    for _ in range(20):
        kind = rng.choice(("colour", "shape", "count", "exists", "relation", "side"))
        if kind == "colour" and _unique(objs, lambda o: o.shape):
            obj = rng.choice(_unique(objs, lambda o: o.shape))
            return rng.choice(("what color is the {}?", "which color does the {} have?")).format(obj.shape), obj.colour, "other"
        if kind == "shape" and _unique(objs, lambda o: o.colour):
            obj = rng.choice(_unique(objs, lambda o: o.colour))
            return f"what shape is the {obj.colour} object?", obj.shape, "other"
        if kind == "count":
            pick = rng.random()
            if pick < 0.3:
                return "how many shapes are there?", str(len(objs)), "number"
            if pick < 0.65:
                colour = rng.choice(list(COLOURS))
                return f"how many {colour} shapes are there?", str(sum(o.colour == colour for o in objs)), "number"
            shape = rng.choice(SHAPES)
            return f"how many {shape}s are in the image?", str(sum(o.shape == shape for o in objs)), "number"
        if kind == "exists":
            if rng.random() < 0.5:
                obj = rng.choice(objs)
                colour, shape = obj.colour, obj.shape
            else:
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            present = any(o.colour == colour and o.shape == shape for o in objs)
            return f"is there a {colour} {shape}?", "yes" if present else "no", "yes/no"
        unique = _unique(objs, lambda o: o.colour + o.shape)
        if kind == "relation" and len(unique) >= 2:
            a, b = rng.sample(unique, 2)
            relation, test = rng.choice((("left of", a.col < b.col), ("right of", a.col > b.col),
                                         ("above", a.row < b.row), ("below", a.row > b.row)))
            return (f"is the {a.colour} {a.shape} {relation} the {b.colour} {b.shape}?", "yes" if test else "no", "yes/no")
        if kind == "side" and unique:
            obj = rng.choice(unique)
            return f"which side of the image is the {obj.colour} {obj.shape} on?", COLUMNS[obj.col], "other"
    return "how many shapes are there?", str(len(objs)), "number"


def annotator_answers(answer: str, answer_type: str, rng: random.Random, count: int = 10) -> list[str]:
    """``count`` raw answers as people type them: mostly right, some wrong, some with other spellings.

    Wrong answers make soft scores other than 1.0 appear; spellings such as "Two" or "yes." exercise
    the answer normalisation.
    """
    wrong_pool = {"number": [str(n) for n in range(5)], "yes/no": ["yes", "no"],
                  "other": list(COLOURS) + list(SHAPES) + list(COLUMNS)}[answer_type]
    answers = []
    for _ in range(count):
        given = answer if rng.random() < 0.85 else rng.choice(wrong_pool)
        style = rng.random()
        if style < 0.05 and given.isdigit():
            given = NUMBER_WORDS[int(given)] if given != "0" else "zero"
        elif style < 0.1:
            given = given.capitalize()
        elif style < 0.13:
            given = given + "."
        answers.append(given)
    return answers


def _has(scene: Scene, colour: str | None, shape: str | None) -> int:
    return sum((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in scene.objects)


def statement(left: Scene, right: Scene, rng: random.Random, want: bool) -> str:
    """An NLVR2-style statement about an image pair that is ``want`` (true or false); rejection-sampled."""
    for _ in range(100):
        text, truth = _random_statement(left, right, rng)
        if truth == want:
            return text
    raise RuntimeError("could not find a statement with the wanted truth value")


def _random_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    colour = rng.choice(list(COLOURS)) if rng.random() < 0.6 else None
    shape = rng.choice(SHAPES) if colour is None or rng.random() < 0.5 else None
    noun = " ".join(word for word in (colour, shape or "shape") if word)
    kind = rng.choice(("more", "both", "exactly_one", "count", "relation"))
    n_left, n_right = _has(left, colour, shape), _has(right, colour, shape)
    if kind == "more":
        more = rng.random() < 0.5
        text = f"the left image has {'more' if more else 'fewer'} {noun}s than the right image"
        return text, (n_left > n_right) if more else (n_left < n_right)
    if kind == "both":
        return f"both images contain a {noun}", n_left > 0 and n_right > 0
    if kind == "exactly_one":
        return f"exactly one image contains a {noun}", (n_left > 0) != (n_right > 0)
    if kind == "count":
        side, n_side = rng.choice((("left", n_left), ("right", n_right)))
        k = rng.randint(1, 3)
        return f"the {side} image contains exactly {_count_phrase(k, noun)}", n_side == k
    side, scene = rng.choice((("left", left), ("right", right)))
    a, b = rng.choice(scene.objects), rng.choice(left.objects + right.objects)
    truth = any(o.colour == a.colour and o.shape == a.shape and p.colour == b.colour and p.shape == b.shape
                and o.col < p.col for o in scene.objects for p in scene.objects)
    return f"in the {side} image a {a.colour} {a.shape} is left of a {b.colour} {b.shape}", truth


def text_corpus_line(scene: Scene, rng: random.Random) -> str:
    """A sentence for the text-only corpus: two captions of an unseen scene joined, longer than a caption."""
    first, second = captions(scene, rng, 2)
    return f"{first}. {second}."
