"""Evaluation metrics for the fine-tuning tasks, computed the way the field reports them.

Every function here is pure (tensors or Python values in, numbers out) so it can be tested on
hand-computed cases and reused by the task definitions, ``beit3 evaluate`` and user code. The
tasks do the distributed part: they sum counts over processes, or gather embeddings, and then
call these functions.

* classification: :func:`topk_correct` (timm's top-1 / top-5 accuracy, in %);
* VQAv2: :func:`vqa_accuracy` (the official VQA evaluation: min(#humans / 3, 1) averaged over the
  ten leave-one-annotator-out subsets) and :func:`vqa_soft_score` (the local ViLT-style score the
  official fine-tuning code reports); :func:`write_vqa_submission` for the EvalAI server;
* NLVR2: :func:`pair_accuracy_correct`;
* retrieval: :func:`retrieval_recall` (R@1/5/10 both ways, ties broken deterministically);
* captioning: :func:`cider_d` (our own CIDEr-D, checked against ``pycocoevalcap``) and
  :func:`coco_caption_scores` (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE through ``pycocoevalcap``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from beit3.data.vqa_answers import normalize_answer

# ------------------------------------------------------------------------- classification


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5),
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """(len(ks),) counts, on the logits' device (no host sync), of the rows whose label is among
    the k highest logits (timm ``accuracy``); ``keep`` (B,) bool leaves rows out.

    logits: (B, C); labels: (B,) class ids. k larger than C counts every row as correct, as a
    top-5 on a 3-class problem would. Ties among logits follow ``torch.topk``; real logits
    essentially never tie.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    k_max = min(max(ks), logits.shape[1])
    hits = logits.topk(k_max, dim=1).indices.eq(labels[:, None])  # (B, k_max)
    if keep is not None:
        hits = hits & keep[:, None]
    return torch.stack([hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """:func:`topk_hits` as plain numbers by k."""
    return dict(zip(ks, topk_hits(logits, labels, ks).tolist()))


def pair_accuracy_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """NLVR2: rows whose argmax over the two classes is the label (1 = the statement is true)."""
    return int(logits.argmax(dim=-1).eq(labels).sum().item())


# ---------------------------------------------------------------------------------- VQAv2


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one answer under the official VQA evaluation, in [0, 1].

    For each of the (usually ten) annotators, the other annotators that gave the predicted answer
    are counted and ``min(count / 3, 1)`` is taken; the result is the mean over annotators. So an
    answer given by 4 or more of ten humans scores 1, by 3 humans 0.9 (three subsets lose one of
    them), by 2 humans 0.6 and by 1 human 0.3.

    Both the prediction and the human answers go through the official answer normalisation
    (:func:`beit3.data.normalize_answer`: punctuation, number words, articles, contractions). The
    official script skips that step when all annotators agree, which only matters for a
    prediction written differently from them ("Yes" vs "yes"); we always normalise.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in human_answers]
    matches = sum(a == predicted for a in answers)
    # Leaving out annotator i removes one match exactly when annotator i gave the prediction.
    per_subset = [min(1.0, (matches - (a == predicted)) / 3) for a in answers]
    return sum(per_subset) / len(per_subset)


def vqa_soft_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over rows of the soft target score (0, 0.3, 0.6, 0.9 or 1) of the argmax answer.

    This is the "score" the official fine-tuning code reports on its local validation split
    (ViLT's ``VQAScore``); divide by the number of rows for the mean. It is not the official VQA
    accuracy: it uses the 0.3-per-annotator scores of the training targets and only counts
    answers inside the vocabulary.
    """
    best = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    return float(targets.float().gather(1, best).sum().item())


def write_vqa_submission(path: str | os.PathLike, predictions: Iterable[tuple[int, str]]) -> Path:
    """Write the EvalAI file for VQAv2 test-dev / test-std: ``[{"question_id", "answer"}, ...]``.

    ``predictions`` are (question_id, answer) pairs, possibly with repeats (several processes may
    have answered the same padded question): repeats with the same answer are merged, different
    answers for one question are an error. Rows are sorted by question id.
    """
    answers: dict[int, str] = {}
    for qid, answer in predictions:
        qid = int(qid)
        if qid in answers and answers[qid] != answer:
            raise ValueError(f"question {qid} has two different answers: {answers[qid]!r} and {answer!r}")
        answers[qid] = answer
    rows = [{"question_id": qid, "answer": answers[qid]} for qid in sorted(answers)]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows) + "\n", encoding="utf-8")
    return target


# ------------------------------------------------------------------------------ retrieval


def _rank_of_first_hit(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Per row, the 0-based rank of the best-ranked relevant column.

    Columns are ordered by descending score; **ties keep column order** (a stable sort), so among
    equal scores the candidate with the lower index ranks first. scores, relevant: (Q, C).
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (Q, C)
    hit = relevant.gather(1, order)  # (Q, C): is the candidate at each rank relevant?
    if not bool(hit.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant candidate")
    return hit.float().argmax(dim=1)  # first True


def retrieval_recall(
    image_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in % for image→text (``tr_r{k}``) and text→image (``ir_r{k}``), and their mean.

    As in the official evaluation: images are deduplicated by id (the first embedding of each id
    is kept) and ordered by id; texts stay in the given order; scores are dot products. An image
    query is a hit at k when any of its captions is in its top k texts; a text query when its
    image is in its top k images. ``average_score`` is the mean of the six numbers (the official
    model-selection metric).

    Ties: candidates with equal scores are ranked in candidate order (images by ascending id,
    texts in input order), so the result does not depend on the sort implementation or device.
    """
    unique_ids, first = _first_occurrence(image_ids)
    images = image_embeds[first].float()  # (I, D), ordered by id
    texts = text_embeds.float()  # (T, D)
    scores = images @ texts.t()  # (I, T)
    relevant = unique_ids[:, None].eq(text_image_ids[None, :].to(unique_ids.device))  # (I, T)
    tr_rank = _rank_of_first_hit(scores, relevant)
    ir_rank = _rank_of_first_hit(scores.t(), relevant.t())
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (tr_rank < k).float().mean().item()
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * (ir_rank < k).float().mean().item()
    out["average_score"] = sum(out.values()) / len(out)
    return out


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and, for each, the index of its first occurrence in ``ids``."""
    unique_ids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(unique_ids),), len(ids), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique_ids, first


# ----------------------------------------------------------------------------- captioning


def _ngrams(words: Sequence[str], n_max: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def cider_d(
    predictions: Mapping[object, str], references: Mapping[object, Sequence[str]], *, n_max: int = 4, sigma: float = 6.0
) -> tuple[float, dict[object, float]]:
    """CIDEr-D as ``pycocoevalcap.cider`` computes it (the number COCO papers report, as a fraction).

    Texts are split on whitespace: tokenise them first (COCO evaluation lower-cases and strips
    punctuation with the PTB tokenizer). For each n = 1..4, captions become tf-idf vectors with
    the document frequency counted over the reference sets of *this* corpus; a prediction is
    compared with each reference by clipped cosine similarity times a Gaussian penalty on the
    length difference (sigma 6), averaged over n and references, times 10. Returns the corpus
    mean and the score per image. Two details of the reference implementation are kept: the
    "length" is the number of bigrams, and the idf uses log(number of images).
    """
    keys = list(references)
    missing = [k for k in keys if k not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} image(s), e.g. {missing[:3]}")
    refs = {k: [_ngrams(r.split(), n_max) for r in references[k]] for k in keys}
    hyps = {k: _ngrams(predictions[k].split(), n_max) for k in keys}
    doc_freq: Counter = Counter()
    for counts in refs.values():
        doc_freq.update(set().union(*counts) if counts else set())
    log_docs = math.log(float(len(keys)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n_max)]
        norm = [0.0] * n_max
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
            vec[n][gram] = weight
            norm[n] += weight * weight
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    per_image: dict[object, float] = {}
    for k in keys:
        h_vec, h_norm, h_len = vector(hyps[k])
        total = [0.0] * n_max
        for ref in refs[k]:
            r_vec, r_norm, r_len = vector(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for n in range(n_max):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] != 0 and r_norm[n] != 0:
                    dot /= h_norm[n] * r_norm[n]
                total[n] += dot * penalty
        per_image[k] = 10.0 * (sum(total) / n_max) / max(1, len(refs[k]))
    mean = sum(per_image.values()) / len(per_image) if per_image else 0.0
    return mean, per_image


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to standard output meanwhile to standard error instead: Python's
    ``print`` and, at the file-descriptor level, what Java and other subprocesses print. The COCO
    toolkit chatters on stdout ("tokenizing...", BLEU's ratios), which must not mix with a
    command's results there."""
    sys.stdout.flush()
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        err_fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):  # no real descriptors (embedded interpreters)
        saved = None
    if saved is not None:
        os.dup2(err_fd, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)


def coco_caption_scores(
    predictions: Mapping[object, str], references: Mapping[object, Sequence[str]], *, spice: bool = False
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (and SPICE when asked) with ``pycocoevalcap``.

    This is what COCO caption papers report: PTB tokenisation, then each scorer. METEOR, the
    tokenizer and SPICE run Java, so they need ``java`` on the PATH; SPICE also downloads
    Stanford CoreNLP on first use. Install with ``pip install 'beit3[eval]'``. Values are
    fractions (CIDEr 1.434 is the "143.4" of the tables). What the toolkit prints goes to
    standard error (:func:`stdout_to_stderr`).
    """
    with stdout_to_stderr():
        return _coco_caption_scores(predictions, references, spice=spice)


def _coco_caption_scores(
    predictions: Mapping[object, str], references: Mapping[object, Sequence[str]], *, spice: bool
) -> dict[str, float]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise ImportError("captioning metrics need pycocoevalcap: pip install 'beit3[eval]'") from err
    keys = list(references)
    gts = {k: [{"caption": c} for c in references[k]] for k in keys}
    res = {k: [{"caption": predictions[k]}] for k in keys}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    scores.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
    scorers = [("meteor", Meteor()), ("rouge_l", Rouge()), ("cider", Cider())]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append(("spice", Spice()))
    for name, scorer in scorers:
        value, _ = scorer.compute_score(gts, res)
        scores[name] = float(value)
    return scores
