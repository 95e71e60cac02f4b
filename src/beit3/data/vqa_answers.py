"""VQAv2 answers: the official normalisation, the answer vocabulary and soft scores.

BEiT-3 (after ViLT, after the VQA evaluation tools) normalises answers before counting them, keeps
answers seen at least 9 times (3129 on VQAv2) and gives each question a soft target per answer from
how many of its 10 annotators gave it: 0, 0.3, 0.6, 0.9, then 1.0 from four agreeing annotators.

The inherited ``normalize_word`` has two regular-expression bugs, fixed here by default:

1. The period pattern ``(?!<=\\d)(\\.)(?!\\d)`` was meant to start with a look-*behind*; as written it
   is a look-ahead for the literal text ``<=`` plus a digit, which never matters, so the pattern only
   looks at the next character. Its purpose is to keep decimal points ("1.5") and drop sentence
   periods. Taken literally, the look-behind would keep the period of "2." as well, so the fixed
   pattern keeps a period only *between* two digits: "2." -> "2", "1.5" stays, ".5" -> "5".
2. ``re.UNICODE`` was passed as the positional *count* argument of ``sub``, so only the first 32 periods
   of an answer were ever removed.

The release also counts annotator answers *without* normalising them, while the vocabulary holds
normalised strings, so "Two" or "2." never scores for the label "2". We normalise both sides by
default. ``legacy=True`` restores all three behaviours; use it only to rebuild the released
``answer2label.txt`` byte for byte so that an official VQA head can be reused.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

# Punctuation that is deleted when it touches a space (or when the answer holds "1,000"-style digits)
# and otherwise becomes a space, so "black/white" -> "black white" but "yes / no" -> "yes  no".
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_FIXED = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PERIOD_LEGACY = re.compile(r"(?!<=\d)(\.)(?!\d)")
_LEGACY_MAX_PERIODS = re.UNICODE  # the inherited call passed this flag (32) where ``count`` goes

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}

# Apostrophe-less spellings annotators type, mapped to the standard contraction. Entries of the
# original table that start with a capital letter ("Im", "Ive") are left out: words are lower-cased
# before the lookup, so they could never match.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
"""Soft score by number of agreeing annotators (index = count, capped at 4)."""


def normalize_answer(answer: str, *, legacy: bool = False) -> str:
    """Normalise a VQA answer as the official code does, with its period-regex bugs fixed unless ``legacy``.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("black/white")
    'black white'
    """
    # Punctuation decisions look at the original string, replacements accumulate in ``text``.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(answer) is not None
    text = answer
    for mark in _PUNCTUATION:
        if mark + " " in answer or " " + mark in answer or has_digit_comma:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    if legacy:
        text = _PERIOD_LEGACY.sub("", text, _LEGACY_MAX_PERIODS)
    else:
        text = _PERIOD_FIXED.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def soft_score(count: int) -> float:
    """Target score for an answer that ``count`` of the 10 annotators gave."""
    if count < 0:
        raise ValueError(f"an annotator count cannot be negative, got {count}")
    return SOFT_SCORES[min(count, len(SOFT_SCORES) - 1)]


def build_answer_vocab(answers: Iterable[str], *, min_count: int = 9, legacy: bool = False) -> list[str]:
    """Answers seen at least ``min_count`` times after normalisation, in first-seen order.

    Pass the ``multiple_choice_answer`` of every train then val annotation, in file order: the
    official label ids are this first-seen order, so the order of the input decides the head layout.
    """
    counts: Counter[str] = Counter()
    order: list[str] = []
    for raw in answers:
        answer = normalize_answer(raw, legacy=legacy)
        if answer not in counts:
            order.append(answer)
        counts[answer] += 1
    return [answer for answer in order if counts[answer] >= min_count]


def answer_targets(
    annotator_answers: Iterable[str], answer2label: Mapping[str, int], *, legacy: bool = False
) -> tuple[list[int], list[float]]:
    """Labels and soft scores of one question from its annotators' raw answers.

    Only answers in the vocabulary get a target; labels come back in order of first appearance. With
    ``legacy`` the raw answers are matched as typed, exactly like the release.
    """
    counts: Counter[str] = Counter(
        answer if legacy else normalize_answer(answer) for answer in annotator_answers
    )
    labels, scores = [], []
    for answer, count in counts.items():
        if answer in answer2label:
            labels.append(answer2label[answer])
            scores.append(soft_score(count))
    return labels, scores
