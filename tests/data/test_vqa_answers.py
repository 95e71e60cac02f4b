import pytest

from beit3.data.vqa_answers import answer_targets, build_answer_vocab, normalize_answer, soft_score


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),          # number word, period at the end, lower case
        ("black/white", "black white"),   # punctuation between words becomes a space
        ("yes / no", "yes no"),           # punctuation touching a space is deleted
        ("1,000", "1000"),                # digit-comma-digit: punctuation deleted, commas stripped
        ("The Cat", "cat"),               # articles dropped
        ("dont", "don't"),                # contraction table
        ("none", "0"),
        ("1.5", "1.5"),                   # a decimal point stays
        ("2.", "2"),                      # a sentence period after a digit goes
        ("e.g.", "eg"),
        ("  lots   of   space ", "lots of space"),
    ],
)
def test_normalize_answer_hand_cases(raw, expected):
    assert normalize_answer(raw) == expected


def test_legacy_reproduces_both_regex_bugs():
    # Bug 1 (look-ahead typo): a period before a digit survives even without a digit before it.
    assert normalize_answer(".5", legacy=True) == ".5"
    assert normalize_answer(".5") == "5"
    # Bug 2 (re.UNICODE as count): only the first 32 periods are removed.
    dots = "x" + "." * 40
    assert normalize_answer(dots, legacy=True) == "x" + "." * 8
    assert normalize_answer(dots) == "x"


def test_soft_scores():
    assert [soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        soft_score(-1)


def test_vocab_keeps_answers_seen_min_count_times_in_first_seen_order():
    answers = ["b"] * 8 + ["X"] + ["x"] * 8 + ["c"] * 9 + ["b"]
    # "X" normalises to "x" (9 in all); "b" reaches 9 at the very end; "c" has 9.
    assert build_answer_vocab(answers) == ["b", "x", "c"]
    assert build_answer_vocab(answers, min_count=10) == []


def test_answer_targets_count_annotators():
    answer2label = {"2": 0, "yes": 1, "red": 2}
    raw = ["2"] * 6 + ["two", "Two", "3", "yes"]
    labels, scores = answer_targets(raw, answer2label)
    assert dict(zip(labels, scores)) == {0: 1.0, 1: 0.3}
    # The release matches raw strings: "two"/"Two" do not count for "2" and "3" is out of vocabulary.
    labels, scores = answer_targets(["two", "Two", "2", "3", "red", "red"], answer2label, legacy=True)
    assert dict(zip(labels, scores)) == {0: 0.3, 2: 0.6}
