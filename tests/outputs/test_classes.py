"""Classes from phrases: the head-noun rules on Kosmos-2-style phrases, lists, mappings and files."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.outputs.labels.classes import Classes, read

# phrase -> (head noun, attribute) with no classes given
TABLE = {
    "a dog": ("dog", ""),
    "the dog": ("dog", ""),
    "the dogs": ("dog", ""),
    "two dogs": ("dog", ""),
    "a brown dog": ("dog", "brown"),
    "A Dog": ("dog", ""),
    "a man in a red shirt": ("man", "in a red shirt"),
    "the people": ("person", ""),
    "people": ("person", ""),
    "two women": ("woman", ""),
    "a pair of shoes": ("shoe", ""),
    "a group of people": ("person", ""),
    "a herd of cows": ("cow", ""),
    "a flock of birds flying": ("bird", "flying"),
    "three children playing on the beach": ("child", "playing on the beach"),
    "a man riding a horse": ("man", "riding a horse"),
    "a woman wearing sunglasses": ("woman", "wearing sunglasses"),
    "sunglasses": ("sunglasses", ""),
    "a pair of jeans": ("jeans", ""),
    "his glasses": ("glasses", ""),
    "a bus": ("bus", ""),
    "two buses": ("bus", ""),
    "a city bus": ("bus", "city"),
    "a camera lens": ("lens", "camera"),
    "a cactus": ("cactus", ""),
    "the knives": ("knife", ""),
    "some leaves": ("leaf", ""),
    "a large white sheep": ("sheep", "large white"),
    "several mice": ("mouse", ""),
    "a man's hat": ("hat", ""),
    "the girl's hair": ("hair", ""),
    "a cat sitting on a couch": ("cat", "sitting on a couch"),
    "a dog that is running": ("dog", "that is running"),
    "a boy and a girl": ("boy", "and a girl"),
    "a red and white stop sign": ("sign", "red and white stop"),
    "salt and pepper shakers": ("shaker", "salt and pepper"),
    "a teddy bear": ("bear", "teddy"),
    "the skis": ("ski", ""),
    "a bowl of fruit": ("bowl", "of fruit"),
    "a plate with food": ("plate", "with food"),
    "an elephant": ("elephant", ""),
    "the snow-covered mountains": ("mountain", "snow-covered"),
    "a 2 story house": ("house", "story"),
    "a couple of kids": ("kid", ""),
    "the giraffes near the trees": ("giraffe", "near the trees"),
    "the sky": ("sky", ""),
    "a dog, a cat": ("dog", ", a cat"),
    "two t-shirts": ("t-shirt", ""),
    "": (None, ""),
    "the": (None, ""),
    "two of them": (None, ""),
    "the one on the left": (None, ""),
    "<patch_index_0044><patch_index_0863>": (None, ""),
}


@pytest.mark.parametrize("phrase", TABLE)
def test_head_nouns_and_attributes(phrase):
    assert Classes(None).of(phrase) == TABLE[phrase]


def test_a_list_takes_every_way_of_saying_the_class():
    classes = Classes(["dogs", "teddy bear", "person"])
    assert classes.names == ["dog", "teddy bear", "person"]
    assert classes.of("a dog") == ("dog", "")
    assert classes.of("two dogs") == ("dog", "")
    assert classes.of("a brown dog") == ("dog", "brown")
    assert classes.of("a brown teddy bear") == ("teddy bear", "brown")
    assert classes.of("the people") == ("person", "")
    assert classes.of("a bear") == (None, "")  # not a teddy bear
    assert classes.of("a man") == (None, "")


def test_a_mapping_adds_synonyms_and_the_longest_wins():
    classes = Classes({"person": ["a man", "a woman", "people"], "dog": ["puppy"], "hot dog": None})
    assert classes.names == ["person", "dog", "hot dog"]
    assert classes.of("a man in a red shirt") == ("person", "in a red shirt")
    assert classes.of("two women") == ("person", "")
    assert classes.of("a small puppy") == ("dog", "small")
    assert classes.of("a hot dog") == ("hot dog", "")
    assert classes.of("a dog") == ("dog", "")


def test_classes_from_a_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("person: [a man, a woman]\ncar: [automobile]\n")
    (tmp_path / "l.yaml").write_text("- dog\n- cat\n")
    assert Classes(str(tmp_path / "c.yaml")).of("a woman") == ("person", "")
    assert Classes(str(tmp_path / "l.yaml")).names == ["dog", "cat"]
    with pytest.raises(ConfigError, match="no such file"):
        Classes(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("42\n")
    with pytest.raises(ConfigError, match="must be a list, a mapping"):
        Classes(str(tmp_path / "bad.yaml"))


def test_empty_classes_and_synonyms_are_refused():
    with pytest.raises(ConfigError, match="empty synonym"):
        Classes({"person": [None]})
    with pytest.raises(ConfigError, match="empty class"):
        Classes(["dog", None])


def test_one_synonym_for_two_classes_is_refused():
    with pytest.raises(ConfigError, match="'a man' is a synonym of both"):
        Classes({"person": ["a man"], "adult": ["a man"]})


def test_the_core_span_is_what_a_noun_chunk_covers():
    assert read("a man in a red shirt").core == ("man",)
    assert read("a man in a red shirt").rest == ("in", "a", "red", "shirt")
