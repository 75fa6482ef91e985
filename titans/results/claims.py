"""Numbers in hand-written text that must be backed by the generated tables.

A results page's head (results/<study>/README.md) and README's Results section are written by hand; the
tables of the pages are generated. `titans-results rebuild` (and its `--check` in CI) fails while a stated
number is unbacked, so a head cannot keep a number that the raw outputs no longer give. `unbacked(prose, generated)` lists every number the prose states as a
result that no number of the generated text gives: decimals with three or more digits after the point
(accuracies, intervals), and quantities stated as a ratio (``40x``, ``99×``) or in MFLOPs. A prose number
with d decimals is backed when some generated number rounds to it at d decimals; a ratio is backed by a
generated ratio (or the inverse of a generated fraction) within 5%. Commands in fenced code blocks are not prose.
"""

from __future__ import annotations

import re

_DECIMAL = re.compile(r"(?<![\w.])[+-]?\d+\.\d{3,}(?!\w|\.\d)")
_QUANTITY = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(x|×|MFLOPs)(?![\w])")
_ANY = re.compile(r"(?<![\w.])[+-]?\d+(?:\.\d+)?")


def prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def stated(text: str) -> list[str]:
    """The result numbers stated in the prose of `text`, in order (ratios and MFLOPs with their unit)."""
    body = prose(text)
    found = [(m.start(), m.group(0)) for m in _DECIMAL.finditer(body)]
    found += [(m.start(), m.group(1) + m.group(2)) for m in _QUANTITY.finditer(body)]
    return [s for _, s in sorted(set(found))]


def _decimals(number: str) -> int:
    return len(number.split(".", 1)[1]) if "." in number else 0


def _backed(claim: str, values: list[float]) -> bool:
    unit = next((u for u in ("MFLOPs", "x", "×") if claim.endswith(u)), "")
    number = claim[: len(claim) - len(unit)] if unit else claim
    want, d = float(number), _decimals(number)
    if unit in ("x", "×"):  # a ratio: stated rounded, perhaps as the inverse of a generated fraction
        candidates = values + [1 / v for v in values if v > 0]
        return any(abs(v - want) <= max(0.5 * 10**-d, 0.05 * want) for v in candidates)
    return any(round(v, d) == round(want, d) or round(abs(v), d) == round(abs(want), d) for v in values)


def _numbers(text: str) -> list[float]:
    return [float(m.group(0)) for m in _ANY.finditer(text)]


def unbacked(text: str, generated: str, elsewhere: str = "") -> list[str]:
    """The numbers `text` states that no number in `generated` backs. Decimals may also be backed by
    `elsewhere` (other studies' generated text, e.g. a shared teacher's accuracy); ratios and MFLOPs only by
    `generated`."""
    own, other = _numbers(generated), _numbers(elsewhere)
    return [
        claim
        for claim in stated(text)
        if not _backed(claim, own) and not (claim[-1].isdigit() and _backed(claim, other))
    ]
