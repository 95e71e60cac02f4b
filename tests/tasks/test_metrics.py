"""Metrics against hand-computed cases (and CIDEr against pycocoevalcap itself)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from beit3.tasks.metrics import (
    cider_d,
    coco_caption_scores,
    pair_accuracy_correct,
    retrieval_recall,
    topk_correct,
    vqa_accuracy,
    vqa_soft_score,
    write_vqa_submission,
)


def test_topk_correct_counts_rows_with_label_in_top_k():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 1: rank 5 (0.6 .5 .4 .3 .2) -> top-5 only
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # label 5: rank 6 -> neither
    ])
    labels = torch.tensor([0, 1, 5])
    assert topk_correct(logits, labels, (1, 5)) == {1: 1, 5: 2}
    # k larger than the number of classes counts everything
    assert topk_correct(logits[:, :3], torch.tensor([0, 1, 2]), (1, 5)) == {1: 1, 5: 3}


def test_pair_accuracy():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.3, 0.2]])
    assert pair_accuracy_correct(logits, torch.tensor([1, 1, 0])) == 2


@pytest.mark.parametrize("count, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out_by_count(count, expected):
    humans = ["yes"] * count + ["no"] * (10 - count)
    # 2 of 10: leaving out a "yes" leaves 1 (1/3), leaving out a "no" leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("yes", humans) == pytest.approx(expected)


def test_vqa_accuracy_mixed_answers_after_normalisation():
    humans = ["2", "two", "Two.", "3", "3", "3", "three", "4", "4", "several"]
    # after normalisation: "2" x3, "3" x4, "4" x2, "several" x1
    assert vqa_accuracy("2", humans) == pytest.approx(0.9)
    assert vqa_accuracy("Three", humans) == pytest.approx(1.0)
    assert vqa_accuracy("four", humans) == pytest.approx(0.6)
    assert vqa_accuracy("several", humans) == pytest.approx(0.3)
    assert vqa_accuracy("5", humans) == 0.0
    # a mean over the 10 subsets, not min(matches / 3, 1) of all ten: 3 humans -> 0.9, not 1
    assert vqa_accuracy("a dog", ["dog", "the dog", "dog", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]) \
        == pytest.approx(0.9)


def test_vqa_soft_score_takes_the_target_of_the_argmax():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([[0.3, 1.0, 0.0], [0.6, 0.9, 0.0], [1.0, 0.0, 0.0]])
    assert vqa_soft_score(logits, targets) == pytest.approx(1.0 + 0.6 + 0.0)


def test_vqa_submission_sorted_deduplicated_and_conflicts_refused(tmp_path):
    path = write_vqa_submission(tmp_path / "sub" / "vqa.json", [(5, "yes"), (2, "2"), (5, "yes")])
    assert json.loads(path.read_text()) == [{"question_id": 2, "answer": "2"}, {"question_id": 5, "answer": "yes"}]
    with pytest.raises(ValueError, match="question 5"):
        write_vqa_submission(tmp_path / "bad.json", [(5, "yes"), (5, "no")])


def _retrieval_case():
    # images given out of id order, with a repeat of id 3 whose (different) embedding is ignored
    image_ids = torch.tensor([7, 3, 3])
    image_embeds = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    s = 1 / math.sqrt(2)
    text_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [s, s]])
    text_image_ids = torch.tensor([7, 3, 3, 7])
    return image_embeds, image_ids, text_embeds, text_image_ids


def test_retrieval_recall_with_ties():
    image_embeds, image_ids, text_embeds, text_image_ids = _retrieval_case()
    # images (by id): 3 -> [1, 0], 7 -> [0, 1].  scores:   t0   t1   t2   t3
    #                                           image 3:    1    1    0   .71
    #                                           image 7:    0    0    1   .71
    # TR, image 3 (captions t1, t2): t0 and t1 tie at 1, t0 comes first -> rank 1, miss at 1
    #     image 7 (captions t0, t3): t2 (1), then t3 (.71) -> rank 1, miss at 1
    # IR, t0 (image 7): image 3 first -> miss; t1 (image 3): hit; t2 (image 3): miss;
    #     t3 (image 7): tie .71/.71, image 3 has the lower id -> miss
    out = retrieval_recall(image_embeds, image_ids, text_embeds, text_image_ids, ks=(1, 2))
    assert out["tr_r1"] == 0.0 and out["tr_r2"] == 100.0
    assert out["ir_r1"] == pytest.approx(25.0) and out["ir_r2"] == 100.0
    assert out["average_score"] == pytest.approx((0 + 100 + 25 + 100) / 4)


def test_retrieval_tie_rule_follows_candidate_order():
    image_embeds, image_ids, text_embeds, text_image_ids = _retrieval_case()
    # swap t0 and t1: now image 3's caption wins the tie at score 1
    order = torch.tensor([1, 0, 2, 3])
    out = retrieval_recall(image_embeds, image_ids, text_embeds[order], text_image_ids[order], ks=(1,))
    assert out["tr_r1"] == 50.0
    # the result does not depend on where the images came from in the input
    flipped = retrieval_recall(image_embeds.flip(0)[[1, 0, 2]], image_ids.flip(0)[[1, 0, 2]],
                               text_embeds, text_image_ids, ks=(1,))
    assert flipped == retrieval_recall(image_embeds, image_ids, text_embeds, text_image_ids, ks=(1,))


def test_retrieval_recall_perfect_and_default_ks():
    embeds = torch.eye(12)
    ids = torch.arange(12)
    out = retrieval_recall(embeds, ids, embeds, ids)
    assert set(out) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "average_score"}
    assert all(v == 100.0 for v in out.values())


CAPTIONS = {
    1: ["a red circle on a striped background", "one red circle", "a large red circle in the middle"],
    2: ["two shapes a blue square and a green triangle", "a blue square left of a green triangle"],
    3: ["a yellow diamond", "there is one yellow diamond in the picture", "a small yellow diamond at the top"],
}
PREDICTIONS = {1: "a red circle on a dotted background", 2: "a blue square and a green triangle", 3: "a yellow circle"}


def test_cider_d_equals_pycocoevalcap():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    gts = {k: list(v) for k, v in CAPTIONS.items()}
    res = {k: [v] for k, v in PREDICTIONS.items()}
    expected, expected_per_image = cider_module.Cider().compute_score(gts, res)
    ours, per_image = cider_d(PREDICTIONS, CAPTIONS)
    assert ours == pytest.approx(expected, abs=1e-9)
    assert [per_image[k] for k in gts] == pytest.approx(list(expected_per_image), abs=1e-9)


def test_cider_d_perfect_caption_beats_wrong_one():
    refs = {1: ["a red circle"], 2: ["a blue square"], 3: ["a green triangle"]}
    perfect, _ = cider_d({k: v[0] for k, v in refs.items()}, refs)
    wrong, _ = cider_d({1: "a blue square", 2: "a green triangle", 3: "a red circle"}, refs)
    assert perfect > 1.0 and wrong < perfect
    with pytest.raises(ValueError, match="no prediction"):
        cider_d({1: "a"}, refs)


@pytest.mark.slow  # ~15 s: starts Java for the PTB tokenizer and METEOR
@pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer and METEOR need java")
def test_coco_caption_scores_runs_the_coco_toolkit(capfd):
    pytest.importorskip("pycocoevalcap")
    scores = coco_caption_scores(PREDICTIONS, CAPTIONS)
    assert capfd.readouterr().out == ""  # the toolkit's chatter went to stderr
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
    assert 0 < scores["bleu1"] <= 1 and 0 < scores["cider"] < 10


def test_stdout_to_stderr_moves_python_and_subprocess_output(capfd):
    """Issue 21 item 9: what the COCO toolkit (Python and Java) prints must not reach stdout."""
    import os
    import subprocess
    import sys

    from beit3.tasks.metrics import stdout_to_stderr

    with stdout_to_stderr():
        print("python chatter")
        os.write(1, b"fd chatter\n")
        subprocess.run([sys.executable, "-c", "print('child chatter')"], check=True)
    print("result")
    captured = capfd.readouterr()
    assert captured.out == "result\n"
    assert all(text in captured.err for text in ("python chatter", "fd chatter", "child chatter"))
