"""Embedded default corpus: deterministic English-like text from a small grammar.

The language-model data module needs text even when no file is on disk (CI, a
fresh clone, quick experiments). Rather than ship a public-domain book inside
the package, this module *generates* the text from a seeded probabilistic
grammar, so it costs no bytes in the repository and no licence question.

What the text looks like: chapters of paragraphs, each paragraph set in one of
six themes (farm, sea, city, forest, castle, school) with a protagonist, one
tense (present or past) and 4-9 sentences of narration and quoted dialogue,
wrapped at 76 columns. About 300 distinct words.

Why it is learnable: spelling is fixed per word; determiners agree with nouns
("a"/"an", "this"/"these"); verbs agree with their subject and with the
paragraph's tense; nouns, adjectives and places stay within the paragraph's
theme; pronouns follow the protagonist's name; dialogue follows a few fixed
patterns. A small model therefore gets far below the unigram entropy, while the
text is too varied to be memorised outright.

Determinism: the only source of randomness is :class:`random.Random` and only
its ``random()`` method (the Mersenne-Twister float stream, stable across Python
versions), so the same seed gives byte-identical text everywhere. That matters
because a checkpoint stores the tokenizer fitted on this text.

Example:
    >>> from mtl.data.text_corpus import default_corpus
    >>> text = default_corpus()
    >>> 300_000 < len(text) < 500_000
    True
"""

from __future__ import annotations

import functools
import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["DEFAULT_CORPUS_CHARS", "DEFAULT_CORPUS_SEED", "default_corpus", "generate_corpus"]

T = TypeVar("T")

DEFAULT_CORPUS_SEED = 1234
DEFAULT_CORPUS_CHARS = 400_000


def _pairs(spec: str) -> list[tuple[str, ...]]:
    """Parse ``"cow/cows fox/foxes"`` into ``[("cow", "cows"), ("fox", "foxes")]``."""
    return [tuple(item.split("/")) for item in spec.split()]


@dataclass(frozen=True)
class _Theme:
    nouns: list[tuple[str, ...]]  # (singular, plural)
    adjectives: list[str]
    verbs: list[tuple[str, ...]]  # transitive: (base, third person, past)
    places: list[str]


# fmt: off
_THEMES: dict[str, _Theme] = {
    "farm": _Theme(
        _pairs("farmer/farmers cow/cows horse/horses goat/goats hen/hens sheep/sheep barn/barns "
               "field/fields fence/fences apple/apples cart/carts dog/dogs"),
        ["muddy", "green", "tired", "hungry", "golden", "brown"],
        _pairs("feed/feeds/fed milk/milks/milked plant/plants/planted carry/carries/carried "
               "mend/mends/mended chase/chases/chased"),
        ["in the barn", "by the pond", "across the field", "behind the fence", "near the old mill"],
    ),
    "sea": _Theme(
        _pairs("sailor/sailors ship/ships boat/boats wave/waves fish/fish net/nets captain/captains "
               "gull/gulls island/islands rope/ropes shell/shells anchor/anchors"),
        ["salty", "grey", "wild", "cold", "blue", "empty"],
        _pairs("pull/pulls/pulled catch/catches/caught sail/sails/sailed watch/watches/watched "
               "tie/ties/tied throw/throws/threw"),
        ["on the deck", "along the shore", "beyond the harbour", "under the pier", "near the lighthouse"],
    ),
    "city": _Theme(
        _pairs("baker/bakers merchant/merchants street/streets market/markets coin/coins lamp/lamps "
               "tower/towers clock/clocks guard/guards window/windows loaf/loaves letter/letters"),
        ["busy", "narrow", "bright", "noisy", "rich", "crowded"],
        _pairs("sell/sells/sold buy/buys/bought count/counts/counted open/opens/opened "
               "deliver/delivers/delivered guard/guards/guarded"),
        ["in the market", "on the bridge", "at the corner", "behind the bakery", "by the city gate"],
    ),
    "forest": _Theme(
        _pairs("hunter/hunters fox/foxes wolf/wolves deer/deer owl/owls tree/trees path/paths "
               "mushroom/mushrooms river/rivers stone/stones berry/berries cave/caves"),
        ["dark", "tall", "ancient", "silent", "mossy", "icy"],
        _pairs("follow/follows/followed gather/gathers/gathered climb/climbs/climbed find/finds/found "
               "hide/hides/hid cross/crosses/crossed"),
        ["under the oak", "by the stream", "deep in the woods", "near the cave", "on the hill"],
    ),
    "castle": _Theme(
        _pairs("king/kings queen/queens knight/knights sword/swords crown/crowns dragon/dragons "
               "servant/servants banner/banners shield/shields gate/gates feast/feasts prince/princes"),
        ["royal", "proud", "silver", "noble", "fierce", "heavy"],
        _pairs("defend/defends/defended serve/serves/served praise/praises/praised ride/rides/rode "
               "fight/fights/fought polish/polishes/polished"),
        ["in the great hall", "on the walls", "beyond the moat", "in the tower", "at the gate"],
    ),
    "school": _Theme(
        _pairs("teacher/teachers student/students book/books lesson/lessons pencil/pencils desk/desks "
               "garden/gardens map/maps song/songs bell/bells question/questions friend/friends"),
        ["clever", "young", "careful", "curious", "patient", "eager"],
        _pairs("read/reads/read write/writes/wrote draw/draws/drew answer/answers/answered "
               "learn/learns/learned teach/teaches/taught"),
        ["in the classroom", "in the library", "by the window", "in the garden", "after the lesson"],
    ),
}
_COMMON_ADJECTIVES = ["little", "big", "good", "old", "happy", "strange"]
_COMMON_TRANSITIVE = _pairs("see/sees/saw want/wants/wanted like/likes/liked "
                            "remember/remembers/remembered bring/brings/brought lose/loses/lost")
_INTRANSITIVE = _pairs("sleep/sleeps/slept laugh/laughs/laughed wait/waits/waited sing/sings/sang "
                       "walk/walks/walked run/runs/ran rest/rests/rested smile/smiles/smiled "
                       "listen/listens/listened work/works/worked")
_SPEECH = _pairs("say/says/said ask/asks/asked whisper/whispers/whispered shout/shouts/shouted "
                 "reply/replies/replied")
_ADVERBS = ["slowly", "quickly", "quietly", "carefully", "happily", "again"]
_NAMES = [("Anna", "she"), ("Tom", "he"), ("Mira", "she"), ("Peter", "he"), ("Lucy", "she"),
          ("Hugo", "he"), ("Clara", "she"), ("Felix", "he"), ("Rosa", "she"), ("Oscar", "he"),
          ("Nina", "she"), ("Jonas", "he")]
_OPENERS = ["In the morning", "At night", "Later", "Soon", "After a while", "That evening",
            "The next day", "At last"]
_CONJUNCTIONS = [", and", ", but", ", so", " because", " while", " when"]
_SINGULAR_DETS = ["the", "the", "the", "a", "a", "this", "that", "every"]
_PLURAL_DETS = ["the", "the", "some", "many", "two", "three", "these", "those"]
_NUMBER_WORDS = ["ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE", "TEN"]
# fmt: on


class _Rng:
    """Draws built only on ``random.Random.random()`` so the stream never changes
    with the Python version (``choice``/``shuffle`` internals have changed before)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed).random

    def below(self, n: int) -> int:
        return min(int(self._random() * n), n - 1)

    def pick(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self._random() < p


@dataclass
class _Paragraph:
    """Per-paragraph state: what stays constant is what a model can learn to track."""

    theme: _Theme
    past: bool
    name: str
    pronoun: str


class _Grammar:
    def __init__(self, rng: _Rng) -> None:
        self.rng = rng

    def verb(self, forms: tuple[str, ...], p: _Paragraph, plural: bool) -> str:
        if p.past:
            return forms[2]
        return forms[0] if plural else forms[1]

    def be(self, p: _Paragraph, plural: bool) -> str:
        if p.past:
            return "were" if plural else "was"
        return "are" if plural else "is"

    def noun_phrase(self, p: _Paragraph, plural: bool) -> str:
        r = self.rng
        noun = r.pick(p.theme.nouns)[1 if plural else 0]
        words = []
        if r.chance(0.35):
            adjectives = p.theme.adjectives if r.chance(0.7) else _COMMON_ADJECTIVES
            words.append(r.pick(adjectives))
        words.append(noun)
        det = r.pick(_PLURAL_DETS if plural else _SINGULAR_DETS)
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return " ".join([det, *words])

    def subject(self, p: _Paragraph) -> tuple[str, bool]:
        """A subject and whether it is plural (for verb agreement)."""
        u = self.rng.below(100)
        if u < 25:
            return p.name, False
        if u < 40:
            return p.pronoun, False
        plural = self.rng.chance(0.35)
        return self.noun_phrase(p, plural), plural

    def clause(self, p: _Paragraph) -> str:
        r = self.rng
        subj, plural = self.subject(p)
        kind = r.below(4)
        if kind == 0:
            forms = r.pick(p.theme.verbs if r.chance(0.75) else _COMMON_TRANSITIVE)
            obj = self.noun_phrase(p, r.chance(0.4))
            out = f"{subj} {self.verb(forms, p, plural)} {obj}"
        elif kind == 1:
            out = f"{subj} {self.verb(r.pick(_INTRANSITIVE), p, plural)}"
            if r.chance(0.5):
                out += " " + r.pick(_ADVERBS)
        elif kind == 2:
            adjectives = p.theme.adjectives if r.chance(0.7) else _COMMON_ADJECTIVES
            very = "very " if r.chance(0.3) else ""
            out = f"{subj} {self.be(p, plural)} {very}{r.pick(adjectives)}"
        else:
            plural = r.chance(0.4)
            out = f"there {self.be(p, plural)} {self.noun_phrase(p, plural)}"
            return out + " " + r.pick(p.theme.places)
        if r.chance(0.4):
            out += " " + r.pick(p.theme.places)
        return out

    def dialogue(self, p: _Paragraph) -> str:
        r = self.rng
        speaker = p.name if r.chance(0.6) else r.pick(_NAMES)[0]
        said = self.verb(r.pick(_SPEECH), p, plural=False)
        noun = r.pick(p.theme.nouns)[0]
        form = r.below(3)
        if form == 0:
            quote = f"Where is the {noun}?"
        elif form == 1:
            quote = f"Have you seen the {noun}?"
        else:
            quote = f"The {noun} is {r.pick(p.theme.places)},"
        return f'"{quote}" {said} {speaker}.'

    def sentence(self, p: _Paragraph) -> str:
        r = self.rng
        u = r.below(100)
        if u < 18:
            return self.dialogue(p)
        if u < 35:
            body = f"{r.pick(_OPENERS)}, {self.clause(p)}"
        elif u < 55:
            body = f"{self.clause(p)}{r.pick(_CONJUNCTIONS)} {self.clause(p)}"
        else:
            body = self.clause(p)
        return body[0].upper() + body[1:] + "."

    def paragraph(self) -> str:
        r = self.rng
        name, pronoun = r.pick(_NAMES)
        theme = _THEMES[r.pick(sorted(_THEMES))]
        p = _Paragraph(theme=theme, past=r.chance(0.7), name=name, pronoun=pronoun)
        # The protagonist is introduced first so the pronouns that follow have a referent.
        first = f"{name} {self.verb(r.pick(_INTRANSITIVE), p, False)} {r.pick(theme.places)}."
        sentences = [first] + [self.sentence(p) for _ in range(3 + r.below(6))]
        return textwrap.fill(" ".join(sentences), width=76)


def generate_corpus(*, seed: int = DEFAULT_CORPUS_SEED, n_chars: int = DEFAULT_CORPUS_CHARS) -> str:
    """Generate English-like text from the seeded grammar.

    Args:
        seed: Seed of the generator; the same seed gives byte-identical text.
        n_chars: Minimum length in characters. Generation stops at the first
            paragraph boundary at or past it, so the text ends with a full
            paragraph and a newline.

    Returns:
        ASCII text of chapters (``"CHAPTER ONE"`` headings) and paragraphs
        separated by blank lines.

    Example:
        >>> text = generate_corpus(seed=0, n_chars=2_000)
        >>> text.startswith("CHAPTER ONE")
        True
    """
    if n_chars < 1:
        raise ValueError(f"n_chars must be >= 1, got {n_chars}")
    grammar = _Grammar(_Rng(seed))
    parts: list[str] = []
    total = 0
    chapter = 0
    while total < n_chars:
        # Chapters of 10-24 paragraphs give long-range, countable structure.
        heading = f"CHAPTER {_chapter_name(chapter)}"
        chapter += 1
        parts.append(heading)
        total += len(heading) + 2
        for _ in range(10 + grammar.rng.below(15)):
            paragraph = grammar.paragraph()
            parts.append(paragraph)
            total += len(paragraph) + 2
            if total >= n_chars:
                break
    return "\n\n".join(parts) + "\n"


def _chapter_name(index: int) -> str:
    """Chapter heading word: ``0 -> "ONE"``; past ten, digits (a table would only add lines)."""
    return _NUMBER_WORDS[index] if index < len(_NUMBER_WORDS) else str(index + 1)


@functools.lru_cache(maxsize=1)
def default_corpus() -> str:
    """The embedded default corpus (seed ``DEFAULT_CORPUS_SEED``, ~400 KB), cached.

    Example:
        >>> default_corpus() == generate_corpus()
        True
    """
    return generate_corpus(seed=DEFAULT_CORPUS_SEED, n_chars=DEFAULT_CORPUS_CHARS)
