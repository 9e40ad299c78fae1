"""From an LMM's text answer to a 0-100 quality score, for any model that runs the fvq20k tasks.

FVQ-Rater answers "The video quality is good. The score is 63.27."; other LMMs answer whatever
they like. An answer becomes a score by the first rule that applies:
  1. FVQ-Rater's own answers carry their unrounded score (RatedAnswer), so lmms-eval's metrics
     equal `fvq-rater eval` exactly although the text shows two decimals;
  2. a number on a scale the answer states: "4/5", "7 out of 10", "4 on a scale of 1-5",
     "0.8 (0-1 scale)", mapped linearly onto 0-100;
  3. the number after "score", "rating", "rate(d)" or "quality", or the only number in the answer,
     read as 0-100 (the scale the generic prompt asks for);
  4. a single level word (bad, poor, fair, good, excellent): the centre of its MOS bin.
Anything else, or a number outside its scale, is unparsed: counted, never scored as 0.
An answer starting with ERROR_PREFIX is a video the model could not read: counted as failed.
"""
from __future__ import annotations

import re

from .common import LEVELS
LEVEL_CENTRES = {level: 10.0 + 20.0 * i for i, level in enumerate(LEVELS)}
ERROR_PREFIX = "[error] "
SCORED, UNPARSED, FAILED = "scored", "unparsed", "failed"
OUTSIDE = float("inf")  # a number that does not fit its scale: never a score

_NUMBER = r"(\d+(?:\.\d+)?)"
_OUT_OF = re.compile(_NUMBER + r"(?:\s+[a-z]+)?\s*(?:/|out of)\s*" + _NUMBER)  # "4/5", "2 stars out of 5"
_RANGE = r"(\d+(?:\.\d+)?)\s*(?:-|–|to)\s*(\d+(?:\.\d+)?)"
_STATED_SCALE = re.compile(r"scale (?:of |from )?" + _RANGE + r"|" + _RANGE + r"\s*scale")
_SIGNED = r"(-?\d+(?:\.\d+)?)"  # a negative rating is read as such, and is outside every scale
_KEYWORD_NUMBER = re.compile(r"(?:score|rating|rated|rate|quality)[^\d-]{0,24}?" + _SIGNED)
_ANY_NUMBER = re.compile(r"(?<![\w.-])" + _SIGNED + r"(?!\w|\.\d)")
_LEVEL_WORD = re.compile(r"\b(" + "|".join(LEVELS) + r")\b")


class RatedAnswer(str):
    """An answer's text that also carries the unrounded score it states."""

    score: float

    def __new__(cls, text: str, score: float):
        answer = super().__new__(cls, text)
        answer.score = score
        return answer

    def __getnewargs__(self):  # pickled when lmms-eval gathers samples from its ranks
        return str(self), self.score

    def strip(self, chars=None):
        # lmms-eval strips every answer (and str.strip returns a plain str): keep the score when
        # stripping changes nothing, as for FVQ-Rater's answers.
        stripped = str.strip(self, chars)
        return self if stripped == self else stripped


def error_answer(reason: str) -> str:
    return ERROR_PREFIX + reason


def parse_answer(answer) -> tuple[float | None, str]:
    """(score on 0-100 or None, SCORED | UNPARSED | FAILED) for one text answer."""
    if answer is None:
        return None, UNPARSED
    if str(answer).startswith(ERROR_PREFIX):
        return None, FAILED
    exact = getattr(answer, "score", None)
    if exact is not None:
        return float(exact), SCORED
    text = str(answer).lower().strip()
    score = _on_stated_scale(text)
    if score is None:
        score = _plain_number(text)
    if score is None:
        levels = set(_LEVEL_WORD.findall(text))
        score = LEVEL_CENTRES[levels.pop()] if len(levels) == 1 else None
    if score is None or not 0 <= score <= 100:
        return None, UNPARSED
    return score, SCORED


def _on_stated_scale(text: str) -> float | None:
    """The score of an answer that states its scale (OUTSIDE when the number does not fit it)."""
    match = _OUT_OF.search(text)
    if match:
        value, top = float(match[1]), float(match[2])
        return 100 * value / top if 0 < top and value <= top else OUTSIDE
    match = _STATED_SCALE.search(text)
    if not match:
        return None
    low, high = (float(g) for g in match.groups() if g is not None)
    values = [float(v) for v in _ANY_NUMBER.findall(text[:match.start()] + " " + text[match.end():])]
    if len(values) != 1 or not low <= values[0] <= high or low == high:
        return OUTSIDE
    return 100 * (values[0] - low) / (high - low)


def _plain_number(text: str) -> float | None:
    match = _KEYWORD_NUMBER.search(text)
    if match:
        return float(match[1])
    values = _ANY_NUMBER.findall(text)
    return float(values[0]) if len(values) == 1 else None
