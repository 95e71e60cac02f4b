"""Write the synthetic world to disk in the official formats, then build its indexes with the real builders.

Everything a BEiT-3 run needs is produced from one seed, with no download: COCO-style Karpathy
captions and VQAv2 question/annotation files over the same images, Flickr30k-style captions, NLVR2
JSON lines with image pairs, class folders, COCO instance JSON with polygons and semantic masks, and
WebDataset shards of images, texts and pairs for pretraining. Because the files use the real formats,
``beit3 data build`` reads them like real data, so the demo exercises the same code paths.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from beit3.data.builders import BUILDERS, BuildReport
from beit3.data.synthetic.language import annotator_answers, captions, question, statement_with_pairs, text_corpus_line
from beit3.data.synthetic.scene import COLOURS, SHAPES, instance_masks, polygon, random_scene, render

CLASSES = [f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class WorldSize:
    """How many items each part of the world gets."""

    coco_train: int
    coco_val: int
    vqa_test: int
    questions_per_image: int
    flickr: int
    nlvr2_train: int
    nlvr2_eval: int
    class_train: int
    class_val: int
    detection_train: int
    detection_val: int
    pretrain_pairs: int
    pretrain_images: int
    pretrain_texts: int
    shards: int
    rest_val_images: int


WORLD_SIZES = {
    # A few seconds: tests and smoke runs.
    "small": WorldSize(coco_train=120, coco_val=60, vqa_test=20, questions_per_image=5, flickr=60,
                       nlvr2_train=60, nlvr2_eval=20, class_train=6, class_val=2,
                       detection_train=60, detection_val=20, pretrain_pairs=240, pretrain_images=240,
                       pretrain_texts=1000, shards=4, rest_val_images=20),
    # About a minute on two cores: enough to pretrain and fine-tune a tiny model in a demo.
    "medium": WorldSize(coco_train=1500, coco_val=500, vqa_test=200, questions_per_image=5, flickr=500,
                        nlvr2_train=2000, nlvr2_eval=200, class_train=60, class_val=15,
                        detection_train=600, detection_val=150, pretrain_pairs=3000, pretrain_images=3000,
                        pretrain_texts=20000, shards=8, rest_val_images=100),
}


def _rng(seed: int, part: str) -> random.Random:
    # One generator per part: changing one part's size leaves the others identical.
    return random.Random(f"{seed}:{part}")


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.save(path, quality=95)
    else:  # lossless whatever the level; the fastest one (the default, 6, took a fifth of the world's time)
        image.save(path, compress_level=1)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def write_shards(samples: Iterable[dict[str, bytes]], pattern: str, count: int, total: int) -> list[Path]:
    """Write WebDataset tar shards (``pattern`` holds ``{shard:06d}``); members of a sample share ``__key__``.

    Headers carry fixed times and owners so the same seed gives byte-identical shards.
    """
    per_shard = -(-total // count)
    paths: list[Path] = []
    tar = None
    for number, sample in enumerate(samples):
        if number % per_shard == 0:
            if tar is not None:
                tar.close()
            paths.append(Path(pattern.format(shard=len(paths))))
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
        for extension, data in sample.items():
            if extension == "__key__":
                continue
            info = tarfile.TarInfo(f"{sample['__key__'].decode()}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()
    return paths


def _encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class _World:
    def __init__(self, out: Path, size: WorldSize, seed: int, image_size: int) -> None:
        self.out, self.size, self.seed, self.image_size = out, size, seed, image_size

    def coco_and_vqa(self) -> None:
        """Karpathy captions and VQAv2 over shared train2014/val2014 images, plus test2015 for VQA test."""
        rng, size, root = _rng(self.seed, "coco"), self.size, self.out / "coco"
        karpathy, questions, annotations = [], {"train2014": [], "val2014": [], "test2015": []}, {"train2014": [], "val2014": []}
        subsets = [("train2014", size.coco_train), ("val2014", size.coco_val), ("test2015", size.vqa_test)]
        image_id, sent_id = 0, 0
        for subset, count in subsets:
            for number in range(count):
                image_id += 1
                scene = random_scene(rng)
                filename = f"COCO_{subset}_{image_id:012d}.jpg"
                _save(render(scene, self.image_size), root / subset / filename)
                if subset != "test2015":
                    split = "train" if subset == "train2014" else ("restval", "val", "test")[number % 3]
                    texts = captions(scene, rng)
                    sentences = [{"tokens": t.split(), "raw": t, "imgid": len(karpathy), "sentid": sent_id + k}
                                 for k, t in enumerate(texts)]
                    karpathy.append({"filepath": subset, "filename": filename, "imgid": len(karpathy), "split": split,
                                     "sentences": sentences, "sentids": [s["sentid"] for s in sentences], "cocoid": image_id})
                    sent_id += len(texts)
                asked = set()
                for k in range(size.questions_per_image):
                    text, answer, answer_type = question(scene, rng)
                    if text in asked:
                        continue
                    asked.add(text)
                    qid = image_id * 1000 + k
                    questions[subset].append({"image_id": image_id, "question": text, "question_id": qid})
                    if subset in annotations:
                        raw = annotator_answers(answer, answer_type, rng)
                        annotations[subset].append({
                            "question_type": " ".join(text.split()[:2]), "multiple_choice_answer": answer,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(raw)],
                            "image_id": image_id, "answer_type": answer_type, "question_id": qid})
        _write_json(root / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
        test_dev_images = {q["image_id"] for q in questions["test2015"]}
        test_dev_images = set(sorted(test_dev_images)[: max(1, len(test_dev_images) // 2)])
        questions["test-dev2015"] = [q for q in questions["test2015"] if q["image_id"] in test_dev_images]
        for subset, rows in questions.items():
            _write_json(root / "vqa" / f"v2_OpenEnded_mscoco_{subset}_questions.json",
                        {"info": {"description": "beit3 synthetic world"}, "task_type": "Open-Ended",
                         "data_type": "mscoco", "data_subtype": subset, "license": {}, "questions": rows})
        for subset, rows in annotations.items():
            _write_json(root / "vqa" / f"v2_mscoco_{subset}_annotations.json",
                        {"info": {"description": "beit3 synthetic world"}, "license": {},
                         "data_subtype": subset, "annotations": rows})

    def flickr(self) -> None:
        rng, root = _rng(self.seed, "flickr30k"), self.out / "flickr30k"
        images = []
        for number in range(self.size.flickr):
            scene = random_scene(rng)
            filename = f"{1000 + number}.jpg"
            _save(render(scene, self.image_size), root / "flickr30k-images" / filename)
            split = "val" if number % 10 == 8 else "test" if number % 10 == 9 else "train"
            texts = captions(scene, rng)
            images.append({"filename": filename, "imgid": number, "split": split,
                           "sentences": [{"tokens": t.split(), "raw": t, "imgid": number, "sentid": number * 5 + k}
                                         for k, t in enumerate(texts)],
                           "sentids": [number * 5 + k for k in range(len(texts))]})
        _write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})

    def nlvr2(self) -> None:
        """Each statement comes with a pair where it is true and a pair where it is false (``nlvr2_*`` statements)."""
        rng, root = _rng(self.seed, "nlvr2"), self.out / "nlvr2"
        for split, count in (("train", self.size.nlvr2_train), ("dev", self.size.nlvr2_eval), ("test1", self.size.nlvr2_eval)):
            lines = []
            for number in range(count):
                text, true_pair, false_pair = statement_with_pairs(rng)
                for pair_no, (truth, (left, right)) in enumerate(rng.sample([(True, true_pair), (False, false_pair)], 2)):
                    directory = str(number % 10)
                    folder = root / "images" / "train" / directory if split == "train" else root / split
                    prefix = f"{split}-{number}-{pair_no}"
                    _save(render(left, self.image_size), folder / f"{prefix}-img0.png")
                    _save(render(right, self.image_size), folder / f"{prefix}-img1.png")
                    record = {"identifier": f"{prefix}-0", "sentence": text, "label": "True" if truth else "False",
                              "writer": "synthetic"}
                    if split == "train":
                        record["directory"] = directory
                    lines.append(json.dumps(record))
            (root / "nlvr2" / "data").mkdir(parents=True, exist_ok=True)
            (root / "nlvr2" / "data" / f"{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def classes(self) -> None:
        """Class folders: the label names the colour and shape of the one large object among small distractors."""
        rng, root = _rng(self.seed, "imagenet"), self.out / "imagenet"
        for split, per_class in (("train", self.size.class_train), ("val", self.size.class_val)):
            for name in CLASSES:
                colour, shape = name.split("_")
                for number in range(per_class):
                    scene = random_scene(rng, min_objects=1, max_objects=3, main=(colour, shape))
                    _save(render(scene, self.image_size), root / split / name / f"{name}_{number:05d}.png")

    def detection(self) -> None:
        """COCO instances JSON (polygons, boxes, areas) and semantic masks (pixel = category id, 0 = background)."""
        rng, root = _rng(self.seed, "detection"), self.out / "detection"
        categories = [{"id": n + 1, "name": shape, "supercategory": "shape"} for n, shape in enumerate(SHAPES)]
        category_id = {shape: n + 1 for n, shape in enumerate(SHAPES)}
        annotation_id = 0
        for split, count in (("train", self.size.detection_train), ("val", self.size.detection_val)):
            images, annotations = [], []
            for number in range(count):
                scene = random_scene(rng)
                file_name = f"{number:06d}.png"
                _save(render(scene, self.image_size), root / split / file_name)
                semantic = np.zeros((self.image_size, self.image_size), np.uint8)
                for obj, mask in zip(scene.objects, instance_masks(scene, self.image_size)):
                    ys, xs = np.nonzero(mask)
                    if len(xs) == 0:
                        continue
                    annotation_id += 1
                    semantic[mask] = category_id[obj.shape]
                    outline = [round(v, 2) for point in polygon(obj, self.image_size) for v in point]
                    annotations.append({
                        "id": annotation_id, "image_id": number + 1, "category_id": category_id[obj.shape],
                        "segmentation": [outline], "area": int(mask.sum()), "iscrowd": 0,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                        "attributes": {"colour": obj.colour, "size": obj.size}})
                _save(Image.fromarray(semantic), root / "semantic" / split / file_name)
                images.append({"id": number + 1, "file_name": file_name, "width": self.image_size, "height": self.image_size})
            _write_json(root / "annotations" / f"instances_{split}.json",
                        {"info": {"description": "beit3 synthetic world"}, "licenses": [], "images": images,
                         "annotations": annotations, "categories": categories})

    def pretraining(self) -> None:
        """WebDataset shards of pairs (jpg + txt), images (jpg) and texts (txt), plus the texts as a plain file."""
        size, root = self.size, self.out / "pretrain"

        def pairs() -> Iterator[dict[str, bytes]]:
            rng = _rng(self.seed, "pretrain-pairs")
            for number in range(size.pretrain_pairs):
                scene = random_scene(rng)
                yield {"__key__": f"{number:08d}".encode(), "jpg": _encoded(render(scene, self.image_size)),
                       "txt": rng.choice(captions(scene, rng)).encode()}

        def images() -> Iterator[dict[str, bytes]]:
            rng = _rng(self.seed, "pretrain-images")
            for number in range(size.pretrain_images):
                yield {"__key__": f"{number:08d}".encode(), "jpg": _encoded(render(random_scene(rng), self.image_size))}

        rng = _rng(self.seed, "pretrain-texts")
        texts = [text_corpus_line(random_scene(rng), rng) for _ in range(size.pretrain_texts)]
        write_shards(pairs(), str(root / "pairs" / "pairs-{shard:06d}.tar"), size.shards, size.pretrain_pairs)
        write_shards(images(), str(root / "images" / "images-{shard:06d}.tar"), size.shards, size.pretrain_images)
        write_shards(({"__key__": f"{n:08d}".encode(), "txt": t.encode()} for n, t in enumerate(texts)),
                     str(root / "texts" / "texts-{shard:06d}.tar"), size.shards, len(texts))
        (root / "texts.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")

    def corpus(self) -> None:
        """``corpus.txt``: all the world's unlabelled language (texts, questions, statements) for the tokenizer."""
        (self.out / "corpus.txt").write_text("".join(line + "\n" for line in _corpus_lines(self.out)), encoding="utf-8")


def _corpus_lines(out: Path) -> Iterator[str]:
    yield from (out / "pretrain" / "texts.txt").read_text(encoding="utf-8").splitlines()
    for subset in ("train2014", "val2014"):
        questions = json.loads((out / "coco" / "vqa" / f"v2_OpenEnded_mscoco_{subset}_questions.json").read_text())
        yield from (q["question"] for q in questions["questions"])
    yield from (json.loads(line)["sentence"] for line in
                (out / "nlvr2" / "nlvr2" / "data" / "train.json").read_text(encoding="utf-8").splitlines())


def generate(out: str | Path, *, size: str | WorldSize = "small", seed: int = 0, image_size: int = 64,
             build_indexes: bool = True) -> list[BuildReport]:
    """Write the synthetic world under ``out``; with ``build_indexes`` also run every builder into ``out/index``.

    Returns the builders' reports (empty without ``build_indexes``). The same arguments give the same
    bytes on every machine.
    """
    out = Path(out)
    world_size = WORLD_SIZES[size] if isinstance(size, str) else size
    world = _World(out, world_size, seed, image_size)
    world.coco_and_vqa()
    world.flickr()
    world.nlvr2()
    world.classes()
    world.detection()
    world.pretraining()
    world.corpus()
    _write_json(out / "synthetic.json", {"seed": seed, "image_size": image_size, "size": asdict(world_size),
                                         "classes": CLASSES, "shapes": list(SHAPES), "colours": list(COLOURS)})
    if not build_indexes:
        return []
    index = out / "index"
    return [
        BUILDERS["coco_retrieval"](out / "coco", index),
        BUILDERS["coco_captioning"](out / "coco", index),
        BUILDERS["flickr30k"](out / "flickr30k", index),
        BUILDERS["vqav2"](out / "coco", index, rest_val_images=world_size.rest_val_images),
        BUILDERS["nlvr2"](out / "nlvr2", index),
        BUILDERS["imagenet"](out / "imagenet", index),
    ]
