import pickle

import pytest

from fvq_plugin.answers import FAILED, LEVEL_CENTRES, SCORED, UNPARSED, RatedAnswer, error_answer, parse_answer
from fvq_plugin.model import LEVELS, answer_text


@pytest.mark.parametrize("answer, score", [
    ("The video quality is good. The score is 63.27.", 63.27),
    ("72", 72.0),
    ("Overall 45.", 45.0),
    ("Rating: 85", 85.0),
    ("I would rate the quality 38.5 because of blur in frame 3", 38.5),
    ("4/5", 80.0),
    ("3.5/5", 70.0),
    ("I would rate it 7 out of 10", 70.0),
    ("It deserves 2 stars out of 5", 40.0),
    ("On a scale of 1-5, I give it 4.", 75.0),
    ("I rate this video 3 on a scale from 1 to 5", 50.0),
    ("0.8 (0-1 scale)", 80.0),
    ("The quality is poor.", 30.0),
    ("quality level: EXCELLENT", 90.0),
])
def test_answers_become_scores_on_0_100(answer, score):
    assert parse_answer(answer) == (pytest.approx(score), SCORED)


@pytest.mark.parametrize("answer", [
    "", None, "blah", "I cannot tell.", "good and bad", "150", "score: 120", "6/5", "-3",
    "Frame 3 is blurry, 5 frames are fine",  # two numbers and no keyword: which one is the rating?
    "7 on a scale of 1-5",
])
def test_answers_without_a_readable_score_are_unparsed_never_zero(answer):
    assert parse_answer(answer) == (None, UNPARSED)


def test_level_words_map_to_the_centre_of_their_bin():
    assert [LEVEL_CENTRES[level] for level in LEVELS] == [10, 30, 50, 70, 90]


def test_an_unreadable_video_is_failed_not_unparsed():
    answer = error_answer("broken.mp4: moov atom not found at 0x28")
    assert parse_answer(answer) == (None, FAILED)


def test_fvq_rater_answers_carry_their_unrounded_score_through_strip_and_pickle():
    answer = RatedAnswer(answer_text("good", 63.271234), 63.271234)
    assert answer == "The video quality is good. The score is 63.27."
    assert answer.strip() is answer  # lmms-eval strips every answer
    restored = pickle.loads(pickle.dumps(answer))  # and pickles them to gather ranks
    assert restored == answer and parse_answer(restored) == (63.271234, SCORED)
    assert parse_answer(str(answer)) == (63.27, SCORED)  # a plain copy still parses, to 2 decimals
