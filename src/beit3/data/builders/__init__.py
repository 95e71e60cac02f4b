"""Index builders: read a task's official annotation files and write our JSON-lines indexes.

``BUILDERS`` maps the task names used by ``beit3 data build <task>`` to the builder functions.
Every builder takes ``(root, out, *, strict=False, verify_images=False, ...)`` and returns a
``BuildReport``.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from beit3.data.builders.common import BuildReport
from beit3.data.builders.imagenet import build_imagenet
from beit3.data.builders.karpathy import build_captioning, build_retrieval
from beit3.data.builders.nlvr2 import build_nlvr2
from beit3.data.builders.vqa import build_vqa, read_answer2label

BUILDERS: dict[str, Callable[..., BuildReport]] = {
    "coco_retrieval": partial(build_retrieval, dataset="coco"),
    "flickr30k": partial(build_retrieval, dataset="flickr30k"),
    "coco_captioning": build_captioning,
    "vqav2": build_vqa,
    "nlvr2": build_nlvr2,
    "imagenet": build_imagenet,
}

__all__ = ["BUILDERS", "BuildReport", "build_captioning", "build_imagenet", "build_nlvr2",
           "build_retrieval", "build_vqa", "read_answer2label"]
