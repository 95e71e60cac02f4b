import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3.cli import main
from beit3.data.index import read_jsonl
from beit3.data.streams import SampleStream, TarShards, TextFiles
from beit3.data.synthetic import CLASSES, WORLD_SIZES, WorldSize, generate
from beit3.data.synthetic.language import captions, question, statement_with_pairs
from beit3.data.synthetic.scene import COLOURS, random_scene, render


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


TINY = WorldSize(coco_train=6, coco_val=6, vqa_test=2, questions_per_image=2, flickr=4, nlvr2_train=2, nlvr2_eval=2,
                 class_train=1, class_val=1, detection_train=2, detection_val=1,
                 pretrain_pairs=4, pretrain_images=4, pretrain_texts=4, shards=2, rest_val_images=1)


def test_cli_world_is_byte_identical_for_a_seed(synthetic_world, tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path / "again"), "--size", "small"]) == 0
    assert "vqa.rest_val.jsonl" in capsys.readouterr().out
    assert digest(tmp_path / "again") == digest(synthetic_world)
    generate(tmp_path / "other", size=TINY, seed=1, build_indexes=False)
    generate(tmp_path / "same", size=TINY, seed=1, build_indexes=False)
    generate(tmp_path / "seed2", size=TINY, seed=2, build_indexes=False)
    assert digest(tmp_path / "other") == digest(tmp_path / "same") != digest(tmp_path / "seed2")


def test_world_files_use_the_official_formats(synthetic_world):
    size = WORLD_SIZES["small"]
    karpathy = json.loads((synthetic_world / "coco/dataset_coco.json").read_text())["images"]
    assert len(karpathy) == size.coco_train + size.coco_val
    assert {image["split"] for image in karpathy} == {"train", "restval", "val", "test"}
    assert all(len(image["sentences"]) == 5 and image["sentences"][0]["raw"] for image in karpathy)
    annotations = json.loads((synthetic_world / "coco/vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    assert all(len(a["answers"]) == 10 for a in annotations)
    with Image.open(synthetic_world / "coco/train2014/COCO_train2014_000000000001.jpg") as image:
        assert image.size == (64, 64)
    nlvr2 = read_jsonl(synthetic_world / "nlvr2/nlvr2/data/train.json")
    assert {r["label"] for r in nlvr2} == {"True", "False"} and all("directory" in r for r in nlvr2)
    assert len(list((synthetic_world / "imagenet/train").iterdir())) == len(CLASSES) == 24
    index = synthetic_world / "index"
    assert len(read_jsonl(index / "answer2label.txt")) >= 10
    assert len(read_jsonl(index / "imagenet.train.index.jsonl")) == 24 * size.class_train


def test_detection_annotations_match_the_masks(synthetic_world):
    coco = json.loads((synthetic_world / "detection/annotations/instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle", "diamond"]
    images = {image["id"]: image for image in coco["images"]}
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"] and annotation["area"] > 0
        assert len(annotation["segmentation"][0]) >= 6
        semantic = np.asarray(Image.open(synthetic_world / "detection/semantic/train" / image["file_name"]))
        box = semantic[y:y + h, x:x + w]
        # The box holds about the instance's pixels of its category (objects never overlap).
        assert abs(int((box == annotation["category_id"]).sum()) - annotation["area"]) <= 2
    semantic = np.asarray(Image.open(synthetic_world / "detection/semantic/train/000000.png"))
    assert set(np.unique(semantic)) <= {0, 1, 2, 3, 4}


def test_pretraining_shards_and_texts_stream(synthetic_world):
    size = WORLD_SIZES["small"]
    pairs = list(SampleStream(TarShards(str(synthetic_world / "pretrain/pairs")), fields=("image", "text")))
    assert len(pairs) == size.pretrain_pairs and isinstance(pairs[0]["image"], Image.Image)
    images = list(SampleStream(TarShards(str(synthetic_world / "pretrain/images")), fields=("image",)))
    assert len(images) == size.pretrain_images
    texts = list(SampleStream(TextFiles(synthetic_world / "pretrain/texts.txt"), fields=("text",)))
    assert len(texts) == size.pretrain_texts


# A linear probe on fixed colour-map features (kernel ridge regression) must beat chance on each task:
# the labels are a learnable function of pixels and words. Features and sizes are kept small for CI.
PALETTE = np.array(list(COLOURS.values()), np.float32)
SIDE = 36


def colour_map(image: Image.Image, grid: int) -> np.ndarray:
    pixels = np.asarray(image, np.float32)
    distance = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    onehot = np.eye(len(PALETTE), dtype=np.float32)[distance.argmin(-1)] * (distance.min(-1) < 40 ** 2)[..., None]
    cell = SIDE // grid
    return onehot.reshape(grid, cell, grid, cell, len(PALETTE)).mean((1, 3)).ravel()


class BagOfWords:
    def __init__(self) -> None:
        self.words: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        vector = np.zeros(96, np.float32)
        for word in text.replace("?", "").split():
            vector[self.words.setdefault(word, len(self.words))] = 1
        return vector


def joint(image_features: np.ndarray, words: np.ndarray) -> np.ndarray:
    return np.concatenate([np.outer(image_features, words).ravel(), image_features, words])


def probe_accuracy(rows: list[tuple[np.ndarray, int]], n_train: int, degree: int = 1) -> tuple[float, float]:
    """Held-out accuracy of kernel ridge regression (polynomial kernel, degree 1 = linear) and the majority rate."""
    x = np.stack([row[0] for row in rows]).astype(np.float64)
    y = np.array([row[1] for row in rows])
    targets = np.eye(y.max() + 1)[y]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a @ b.T if degree == 1 else (a @ b.T + 1) ** degree

    alpha = np.linalg.solve(kernel(x[:n_train], x[:n_train]) + 0.1 * np.eye(n_train), targets[:n_train] - targets[:n_train].mean(0))
    predicted = (kernel(x[n_train:], x[:n_train]) @ alpha).argmax(1)
    return float((predicted == y[n_train:]).mean()), float(np.bincount(y[n_train:]).max() / len(y[n_train:]))


@pytest.mark.parametrize("task", ["classification", "vqa", "retrieval"])
def test_a_linear_probe_beats_chance_on_each_task(task):
    rng, words, answers = random.Random(0), BagOfWords(), {}

    def example() -> tuple[np.ndarray, int]:
        if task == "classification":
            label = rng.randrange(len(CLASSES))
            scene = random_scene(rng, max_objects=3, main=tuple(CLASSES[label].split("_")))
            return colour_map(render(scene, SIDE), 6), label
        if task == "vqa":
            scene = random_scene(rng)
            text, answer, _ = question(scene, rng)
            return joint(colour_map(render(scene, SIDE), 3), words(text)), answers.setdefault(answer, len(answers))
        scene, matched = random_scene(rng), rng.random() < 0.5
        caption = captions(scene if matched else random_scene(rng), rng, 1)[0]
        return joint(colour_map(render(scene, SIDE), 2), words(caption)), int(matched)

    accuracy, chance = probe_accuracy([example() for _ in range(1500)], 1200)
    assert accuracy > chance + 0.12
    if chance < 0.3:  # many-way tasks: at least twice the majority-class rate
        assert accuracy > 2 * chance


def test_nlvr2_needs_the_images_and_a_probe_learns_it():
    """Every statement comes with a true and a false pair: words alone are at chance, words + images are not."""
    rng, words = random.Random(0), BagOfWords()
    with_images, words_only = [], []
    for _ in range(1200):
        text, true_pair, false_pair = statement_with_pairs(rng)
        vector = words(text)
        for truth, pair in ((1, true_pair), (0, false_pair)):
            colours = [10 * colour_map(render(scene, SIDE), 1) for scene in pair]
            with_images.append((np.concatenate(colours + [vector]), truth))
            words_only.append((vector, truth))
    accuracy, chance = probe_accuracy(with_images, 2000, degree=2)
    assert chance == 0.5 and accuracy > 0.75
    assert probe_accuracy(words_only, 2000, degree=2)[0] < 0.56


def test_corpus_holds_all_the_worlds_unlabelled_language(synthetic_world):
    corpus = (synthetic_world / "corpus.txt").read_text(encoding="utf-8").splitlines()
    texts = (synthetic_world / "pretrain/texts.txt").read_text(encoding="utf-8").splitlines()
    assert corpus[: len(texts)] == texts
    rest = corpus[len(texts):]
    assert any(line.endswith("?") for line in rest)  # VQA questions
    assert any(line.startswith(("both images", "the left image", "the right image", "exactly one image"))
               for line in rest)  # NLVR2 statements
