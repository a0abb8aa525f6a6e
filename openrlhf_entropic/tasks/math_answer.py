"""Math answer checking for verifiable rewards: extract the final answer, normalize it lightly, compare.

Extraction takes the last `\\boxed{...}` (or `\\fbox{...}`), else a "final answer is X" /
"answer: X" / "#### X" line, else nothing (a response without an answer is wrong, not guessed).
Normalization removes what never changes the value: `$`, spaces, `\\left`/`\\right`, `\\!` and `\\,`,
`\\text{...}` wrappers, a trailing period, degree and percent marks, thousands separators,
`\\dfrac`/`\\tfrac`. Two answers are equal when the normalized strings are, or when both are numbers
(integers, decimals, `a/b`, `\\frac{a}{b}`, `-\\frac{a}{b}`) of equal value.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(
    r"(?:final answer(?: is)?|answer\s*(?:is|:))\s*:?\s*(?P<answer>[^\n]+)|^####\s*(?P<gsm>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)$")
_SLASH_FRACTION = re.compile(r"^(-?\d+)/(-?\d+)$")


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the last \\boxed{...} (braces balanced), else an answer line, else None."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if starts:
        depth, start = 1, starts[-1]
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                return text[start:position].strip()
        return None  # an unclosed \boxed{ is no answer
    lines = list(_ANSWER_LINE.finditer(text))
    if lines:
        last = lines[-1]
        # Responses are decoded with special tokens kept: cut at the first one (<|im_end|>, </s>).
        return re.split(r"<\||</s>", last.group("answer") or last.group("gsm"))[0].strip() or None
    return None


def normalize_answer(answer: str) -> str:
    """A canonical spelling of `answer` (see the module docstring for what is removed)."""
    text = answer.strip().strip("$").strip()
    while True:
        unwrapped = _TEXT_WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    for removed in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "^\\circ", "^{\\circ}", "\\%", "%", "$"):
        text = text.replace(removed, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\s+", "", text).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):  # 1,000,000 -> 1000000 (not a list "1,2")
        text = text.replace(",", "")
    return text


def _as_number(text: str) -> Fraction | None:
    if _NUMBER.match(text):
        return Fraction(text)
    for pattern in (_SLASH_FRACTION, _FRAC):
        match = pattern.match(text)
        if match:
            *sign, numerator, denominator = match.groups()
            if int(denominator) == 0:
                return None
            value = Fraction(int(numerator), int(denominator))
            return -value if sign and sign[0] == "-" else value
    return None


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers are the same after `normalize_answer`, by string or by numeric value."""
    predicted, reference = normalize_answer(predicted), normalize_answer(reference)
    if not predicted or not reference:
        return False
    if predicted == reference:
        return True
    predicted_value, reference_value = _as_number(predicted), _as_number(reference)
    return predicted_value is not None and predicted_value == reference_value


def score_response(response: str, label: str) -> tuple[float, bool]:
    """(reward 1.0 or 0.0, whether an answer was found) for a model `response` against the dataset `label`.

    The label may itself contain \\boxed{...}; otherwise it is the answer as written.
    """
    if label is None or not str(label).strip():
        raise ValueError("math reward: a sample has no label; set --data.label_key to the answer column")
    reference = extract_answer(str(label)) or str(label)
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0, False
    return (1.0 if answers_match(predicted, reference) else 0.0), True
