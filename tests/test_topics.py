"""Topic and pattern validation, matching and containment (stream/topics.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.errors import BadTopic
from stream.topics import (
    Pattern,
    PatternIndex,
    covers,
    parse_pattern_list,
    validate_pattern,
    validate_topic,
)

segment = st.sampled_from(["a", "b", "news", "sec", "AAPL", "x-1", "_sys", "q_2"])
topics = st.lists(segment, min_size=1, max_size=5).map(".".join)
pattern_segment = st.one_of(segment, st.just("*"))


@st.composite
def patterns(draw):
    parts = draw(st.lists(pattern_segment, min_size=1, max_size=5))
    if draw(st.booleans()):
        parts.append(">")
    return ".".join(parts[-8:])


def reference_match(pattern: str, topic: str, system_rule: bool = True) -> bool:
    """An independent regex-based reading of the NATS rules plus the '_' exclusion."""
    parts = pattern.split(".")
    if system_rule and parts[0] in ("*", ">") and topic.startswith("_"):
        return False
    regex = ""
    for index, part in enumerate(parts):
        sep = r"\." if index else ""
        if part == "*":
            regex += sep + r"[^.]+"
        elif part == ">":
            regex += sep + r"[^.]+(\.[^.]+)*"
        else:
            regex += sep + re.escape(part)
    return re.fullmatch(regex, topic) is not None


def test_valid_topics_pass():
    """Ordinary names, digits, dashes and underscores are topics."""
    for topic in ["news", "news.sec", "quotes.AAPL", "a-b_c.9", "_system.providers", ".".join("a" * 8)]:
        assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    ["", "news.", ".news", "news..sec", "news.*", "news.>", "a b", "ñ", "a" * 201, ".".join(["a"] * 9), 5, None],
)
def test_invalid_topics_raise_bad_topic(topic):
    """Empty segments, wildcards, other characters, too long or too deep: bad_topic naming the field."""
    with pytest.raises(BadTopic) as info:
        validate_topic(topic, "topic")
    assert info.value.code == "bad_topic"
    assert info.value.message.startswith("topic:")


@pytest.mark.parametrize("pattern", [">", "news.>", "*.AAPL", "news.*.8k", "*", "_system.>"])
def test_valid_patterns_pass(pattern):
    """Wildcards in the documented places are accepted."""
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["news.>.x", ">.a", "new*", "news.>>", "", "a..b"])
def test_invalid_patterns_raise_bad_topic(pattern):
    """'>' only last, '*' only as a whole segment."""
    with pytest.raises(BadTopic):
        validate_pattern(pattern)


def test_documented_examples():
    """The spec's examples: news.> matches deeper topics but not news itself; *.AAPL; '_' needs explicit."""
    assert Pattern("news.>").matches("news.sec")
    assert Pattern("news.>").matches("news.sec.8k")
    assert not Pattern("news.>").matches("news")
    assert Pattern("*.AAPL").matches("quotes.AAPL")
    assert not Pattern(">").matches("_system.providers")
    assert not Pattern("*.providers").matches("_system.providers")
    assert Pattern("_system.>").matches("_system.providers")


@given(patterns(), topics)
@settings(max_examples=500)
def test_matching_agrees_with_a_reference(pattern, topic):
    """Pattern.matches equals an independent regex implementation for any pattern and topic."""
    assert Pattern(pattern).matches(topic) == reference_match(pattern, topic)


@given(patterns(), patterns(), topics)
@settings(max_examples=500)
def test_covers_is_sound(outer, inner, topic):
    """If outer covers inner, every topic inner matches is matched by outer (ignoring the '_' rule)."""
    if covers(outer, inner) and reference_match(inner, topic, system_rule=False):
        assert reference_match(outer, topic, system_rule=False)


@given(patterns())
def test_a_pattern_covers_itself_and_everything_is_covered_by_gt(pattern):
    """Reflexive, and '>' grants everything."""
    assert covers(pattern, pattern)
    assert covers(">", pattern)


def test_parse_pattern_list_accepts_lists_and_commas_and_names_the_index():
    """Query strings use commas, WS ops use lists; errors name the offending index."""
    assert parse_pattern_list("news.>, quotes.AAPL") == ["news.>", "quotes.AAPL"]
    assert parse_pattern_list(["a", "a", "b"]) == ["a", "b"]
    with pytest.raises(BadTopic, match=r"topics\[1\]"):
        parse_pattern_list(["ok", "bad..x"])
    with pytest.raises(BadTopic, match="at least one"):
        parse_pattern_list("")


@settings(max_examples=200, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=30, unique=True), st.lists(topics, min_size=1, max_size=10), st.data())
def test_the_pattern_index_matches_exactly_what_each_pattern_matches(held, probes, data):
    """PatternIndex.match gives the same patterns as matching each one, before and after removals,
    and removing every pattern leaves it empty."""
    index: PatternIndex[str] = PatternIndex()
    for text in held:
        index.add(text, text)
    removed = data.draw(st.lists(st.sampled_from(held), unique=True))
    for text in removed:
        index.remove(text)
    kept = [text for text in held if text not in removed]
    for topic in probes:
        assert sorted(index.match(topic)) == sorted(p for p in kept if reference_match(p, topic))
    for text in kept:
        index.remove(text)
    assert len(index) == 0 and index._root.empty()
