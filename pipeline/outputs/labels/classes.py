"""Classes from Kosmos-2's free-text phrases: "a dog", "the dogs", "two dogs" and "a brown dog" are
all `dog`.

A phrase is read as [determiners and numerals] [modifiers] HEAD [the rest]: the rest starts at the
first preposition, conjunction, relative pronoun or participle ("a man in a red shirt", "a dog
that is running"), and a collective before "of" gives way to what follows ("a pair of shoes",
"a group of people"). Its core is modifiers + HEAD with HEAD made singular ("brown dog"); its
attribute is what is left once the class is taken off ("brown", "in a red shirt").

A class given as a list matches the phrases whose core is the class or ends with it ("dog" takes
"brown dog", "teddy bear" takes "brown teddy bear"); as a mapping, each class also matches its
synonyms, read the same way ({person: [a man, a woman, people]}); the longest match wins. With no
classes, a phrase's class is its head noun.

Singular forms come from `inflect` (imported on first use: about 3 s, see docs/performance/defaults.md),
less the words it gets wrong for our use: nouns ending in -s that are singular ("bus", "lens") and
plurals that name one thing ("jeans", "glasses").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import ConfigError

DETERMINERS = frozenset(
    "a an the this that these those some many several few various numerous all both each every any no "
    "another other one two three four five six seven eight nine ten eleven twelve dozen dozens "
    "his her their its my your our whose".split()
)
# Words that end the noun phrase: what follows describes it.
STOPS = frozenset(
    "in on at with without from near behind under over by for to into onto beside besides between "
    "across through along around against above below beneath inside outside atop among like of off "
    "but while as than that which who whom where when "
    "wearing holding sitting standing lying laying walking running riding playing looking eating "
    "carrying using talking flying swimming jumping hanging parked covered filled made dressed "
    "is are was were being".split()
)
# "a pair of shoes" is shoes: the collective gives way to what follows "of".
COLLECTIVES = frozenset(
    "pair pairs group groups couple herd flock bunch bunches crowd team row rows pile piles stack stacks "
    "set sets lot lots number bundle cluster collection variety line lines school pack swarm".split()
)
# Singular already, where inflect would cut an -s ("bus" -> "bu"), and plurals naming one thing.
SINGULAR = frozenset(
    "bus gas lens canvas cactus octopus virus iris tennis bonus campus census circus focus fungus "
    "hippopotamus walrus asparagus hummus status atlas bias chaos christmas mattress dress glass grass "
    "jeans pants shorts trousers glasses sunglasses eyeglasses goggles scissors clothes tongs pliers "
    "headphones earphones binoculars pajamas overalls leggings tights news series species".split()
)
# Words that stand for a noun without naming one: no class.
PRONOUNS = frozenset("it them they he she him her one ones this that these those itself themselves left right".split())
WORD = re.compile(r"[\w'-]+|[,;:]")
JOINS = frozenset({"and", "or", "&"})  # end the phrase before a determiner ("a boy and a girl"), else join modifiers


@functools.cache
def _inflect():
    import inflect  # 3 s to import: only where a phrase is read

    return inflect.engine()


@functools.cache
def singular(word: str) -> str:
    """`dogs` -> `dog`, `t-shirts` -> `t-shirt` (the last part of a hyphenated word)."""
    first, hyphen, last = word.rpartition("-")
    if word in SINGULAR or last in SINGULAR or len(last) < 3 or not last.isalpha():
        return word
    return first + hyphen + (_inflect().singular_noun(last) or last)


@dataclass(frozen=True)
class Reading:
    """A phrase read: its core (modifiers + head, head singular), head and the rest after the head."""

    core: tuple[str, ...]
    rest: tuple[str, ...]
    head_end: int = 0  # characters of the phrase up to the end of its head noun as written

    @property
    def head(self) -> str:
        return self.core[-1] if self.core else ""


@functools.lru_cache(maxsize=65536)
def read(phrase: str) -> Reading:
    """The phrase's core and rest (see the module's docstring). A phrase with no noun of its own (empty,
    "the", "two of them", "the one on the left", Kosmos-2's location tokens alone) has no core."""
    found = [(m.group().lower().strip("'"), m.end()) for m in WORD.finditer(phrase)]
    found = [(w, end) for w, end in found if w and "patch_index" not in w]
    words = [w for w, _ in found]
    i = 0
    while True:
        while i < len(words) and (words[i] in DETERMINERS or words[i].isdigit() or words[i].endswith("'s")):
            i += 1
        j = i
        while j < len(words) and not _ends(words, j):
            j += 1
        core = words[i:j]
        if core and core[-1] in COLLECTIVES and words[j : j + 1] == ["of"] and j + 1 < len(words):
            i = j + 1
            continue
        break
    if not core or core[-1] in PRONOUNS or not any(c.isalpha() for c in core[-1]):
        return Reading((), tuple(words))
    core[-1] = singular(core[-1])
    return Reading(tuple(core), tuple(words[j:]), found[j - 1][1])


def _ends(words: list[str], j: int) -> bool:
    """Whether the noun phrase ends before words[j]: a stop word or punctuation; "and" only before a
    determiner or a number ("a boy and a girl"), since "a red and white sign" is one sign."""
    w = words[j]
    if w in JOINS:
        nxt = words[j + 1] if j + 1 < len(words) else ""
        return nxt in DETERMINERS or nxt.isdigit() or not nxt
    return w in STOPS or not w[0].isalnum()


def head_noun(phrase: str) -> str:
    return read(phrase).head


class Classes:
    """The classes an export files boxes under, and the phrase -> (class, attribute) rule. `exact`:
    without classes given, a phrase is its own class (an output of task=ground, whose phrases were given)."""

    def __init__(self, spec: list | Mapping | str | None, exact: bool = False):
        self.exact = exact
        spec = _load(spec)
        if isinstance(spec, Mapping):
            pairs = {
                str(k): [str(k), *(v if isinstance(v, list | tuple) else [v] if v else [])] for k, v in spec.items()
            }
            bad = [(k, v) for k, vs in pairs.items() for v in vs if v is None or not str(v).strip()]
            if bad:
                raise ConfigError(f"classes: class {bad[0][0]!r} has an empty synonym; give each as text")
        else:
            if any(c is None or not str(c).strip() for c in spec or []):
                raise ConfigError(f"classes={list(spec)!r} holds an empty class; give each as text")
            pairs = {str(c): [str(c)] for c in spec or []}
        self.names = list(dict.fromkeys(" ".join(read(c).core) or c.strip().lower() for c in pairs))
        self.given = bool(self.names)
        self._synonyms: dict[tuple[str, ...], str] = {}
        for (name, synonyms), key in zip(pairs.items(), [" ".join(read(c).core) for c in pairs]):
            for s in synonyms:
                core = read(s).core
                if core and self._synonyms.setdefault(core, key or name) != (key or name):
                    raise ConfigError(f"classes: {s!r} is a synonym of both {self._synonyms[core]!r} and {key!r}")

    @classmethod
    def of_output(cls, spec: list | Mapping | str | None, settings: dict | None) -> Classes:
        """The classes of an output folder made with `settings`: with task=ground its phrases were given."""
        return cls(spec, exact=(settings or {}).get("task.kind") == "ground")

    def of(self, phrase: str) -> tuple[str | None, str]:
        """(class, attribute) of a phrase; class None where no given class takes it."""
        if self.exact and not self.given:
            return " ".join(phrase.lower().split()) or None, ""
        r = read(phrase)
        if not r.core:
            return None, ""
        if not self.given:
            return r.head, " ".join([*r.core[:-1], *r.rest])
        for n in range(len(r.core), 0, -1):  # the longest synonym that ends the core
            name = self._synonyms.get(r.core[-n:])
            if name is not None:
                return name, " ".join([*r.core[:-n], *r.rest])
        return None, ""


def _load(spec):
    """A list, a mapping, or the path of a YAML file holding either."""
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"classes={spec!r}: no such file; give a list (classes=[dog,cat]) or a YAML file")
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"classes={spec!r} is not YAML: {e}") from None
    if spec is not None and not isinstance(spec, list | tuple | Mapping):
        raise ConfigError(
            f"classes must be a list, a mapping of class to synonyms, or a YAML file of either; got {spec!r}"
        )
    return spec
