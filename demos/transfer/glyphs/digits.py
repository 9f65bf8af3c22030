"""The no-digit rule: the downstream classes (handwritten 0-9) must be unseen upstream.

Excluded, with the reason recorded for each character:
- every number character (Unicode categories Nd, No, Nl: any script's digits, superscript
  and circled digits, Roman numerals) and anything whose compatibility decomposition holds
  one (e.g. a ligature or symbol spelled with a digit);
- the look-alikes of LOOKALIKES: letters and symbols drawn as a digit, listed by hand with
  the shape they share; a letter built on one with a mark (Ó, ś, Ž) goes too, since at the
  downstream's 8x8 the mark is a pixel or two;
- and, in `classes`, any candidate whose rendering is close to a rendered digit
  (DIGIT_SIMILARITY), which catches look-alikes in scripts no list here covers.
"""

from __future__ import annotations

import unicodedata

DIGIT_CATEGORIES = frozenset({"Nd", "No", "Nl"})

# (characters, the digit, why they read as it): each character is excluded for its reason.
# No letter here is drawn as a 7: none of the scripts' common forms is a bar over a slant.
LOOKALIKES: tuple[tuple[str, str, str], ...] = (
    ("OoΟοОо", "0", "Latin, Greek and Cyrillic O are the closed oval of a 0"),
    ("ՕօᴏⲞⲟꓳⵔ", "0", "Armenian oh, small capital O, Coptic o, Lisu O, Tifinagh yar: a 0"),
    ("º°○◯∘", "0", "a ring (degree sign, circles) scaled to the image is a round 0"),
    ("θΘϴѲѳØø∅⌀", "0", "an oval crossed by a bar is the barred or slashed zero"),
    ("Il|", "1", "capital I, small l and the vertical bar are one upright stroke: a 1"),
    ("ıiℓ", "1", "dotless i, i and script l are an upright stroke (plus a dot or loop): a 1"),
    ("ǀΙιІіӀӏƖᛁⵏꓲ", "1", "click letter, iota, palochka, Runic isaz, Tifinagh yan: one stroke"),
    ("וןا", "1", "Hebrew vav and final nun, Arabic alef: an upright stroke, as the digit 1"),
    ("ZzΖᴢ", "2", "Z is a top bar, a diagonal and a base: a squared 2"),
    ("Ƨƨ", "2", "the Latin letter tone two is drawn as the digit 2"),
    ("ЗзӠӡ", "3", "Cyrillic ze and Abkhasian dze are two bowls open to the left: a 3"),
    ("ƷʒȜȝɜ", "3", "ezh, yogh and reversed open e are a 3 with a flat or round top"),
    ("Чч", "4", "Cyrillic che is an open top over a bar and a stem: a handwritten 4"),
    ("SsЅѕ", "5", "S and Cyrillic dze are the S curve of a rounded 5"),
    ("Ƽƽ$", "5", "the Latin letter tone five is drawn as a 5; the dollar sign is an S"),
    ("bбGδ", "6", "b, Cyrillic be, G and delta: a bottom loop under a rising stroke, a 6"),
    ("BΒВßȢȣ", "8", "B, Greek beta, Cyrillic ve, sharp s and ou: two stacked bowls, an 8"),
    ("gqɡԛ", "9", "g, q, script g and Cyrillic qa: a bowl on a descender, a 9"),
)
LOOKALIKE_REASONS: dict[str, str] = {
    char: f"looks like {digit}: {reason}" for chars, digit, reason in LOOKALIKES for char in chars
}


def exclusion_reason(char: str) -> str | None:
    """Why `char` may not be a class under the no-digit rule, or None if it may."""
    category = unicodedata.category(char)
    if category in DIGIT_CATEGORIES:
        return f"a number character (Unicode category {category})"
    decomposed = unicodedata.normalize("NFKD", char)
    if any(unicodedata.category(part) in DIGIT_CATEGORIES for part in decomposed):
        return "its compatibility decomposition holds a digit"
    if char in LOOKALIKE_REASONS:
        return LOOKALIKE_REASONS[char]
    base = unicodedata.normalize("NFD", char)[0]
    if base != char and base in LOOKALIKE_REASONS:
        return (
            f"{base} with a mark, which at 8x8 is a pixel or two; {base} {LOOKALIKE_REASONS[base]}"
        )
    return None
