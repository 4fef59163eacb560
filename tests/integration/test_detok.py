"""Incremental detokenization and stop strings, with a real byte-level BPE tokenizer that splits characters."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtws.detok import IncrementalDetokenizer, TextStream

TEXT = "ROMEO: caf\u00e9 \u65e5\u672c\u8a9e \U0001F600\U0001F680 na\u00efve \u0928\u092e\u0938\u094d\u0924\u0947 end"


@pytest.fixture(scope="module")
def tok(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _stream(tok, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    d = IncrementalDetokenizer(tok)
    deltas = [d.push(i) for i in tok.encode(text)]
    deltas.append(d.flush())
    return deltas


def test_tokenizer_really_splits_characters(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode("\U0001F600")
    assert len(ids) > 1  # an emoji spans several byte tokens: the case that must not leak U+FFFD


def test_deltas_never_split_a_character(tok) -> None:  # type: ignore[no-untyped-def]
    deltas = _stream(tok, TEXT)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT == tok.decode(tok.encode(TEXT))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_concatenated_deltas_equal_the_decoded_text(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    deltas = _stream(tok, text)
    assert "".join(deltas) == tok.decode(tok.encode(text))
    assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in text


def _run_stop(tok, text: str, stop: tuple[str, ...]) -> tuple[str, bool]:  # type: ignore[no-untyped-def]
    s = TextStream(tok, stop)
    out = []
    for i in tok.encode(text):
        piece, stopped = s.push(i)
        out.append(piece)
        if stopped:
            return "".join(out), True
    out.append(s.flush())
    return "".join(out), False


def test_stop_string_cuts_before_it(tok) -> None:  # type: ignore[no-untyped-def]
    text = "Good night, good night!\n\nParting is such sweet sorrow"
    assert _run_stop(tok, text, ("\n\n",)) == ("Good night, good night!", True)
    assert _run_stop(tok, text, ("sweet", "night")) == ("Good ", True)
    assert _run_stop(tok, text, ("absent",)) == (text, False)


def test_partial_stop_prefix_is_held_then_released(tok) -> None:  # type: ignore[no-untyped-def]
    s = TextStream(tok, ("xyz!",))
    emitted = "".join(s.push(i)[0] for i in tok.encode("abc xy"))
    assert not emitted.endswith("xy")  # could still become the stop string
    assert emitted + s.flush() == "abc xy"


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab \n\u00e9", max_size=30), st.text(alphabet="ab \n", min_size=1, max_size=3))
def test_stop_matches_str_find(tok, text: str, stop: str) -> None:  # type: ignore[no-untyped-def]
    out, stopped = _run_stop(tok, text, (stop,))
    i = text.find(stop)
    if i >= 0:
        assert (out, stopped) == (text[:i], True)
    else:
        assert (out, stopped) == (text, False)
