"""Cutting a generated row back to what its request asked for."""

from __future__ import annotations

from functions.backends.stopping import finish_row

VOCAB = {1: "a", 2: "b", 3: ".", 4: " ", 9: "<eos>"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def finish(ids, max_new_tokens=10, stop=()):
    return finish_row(ids, max_new_tokens=max_new_tokens, eos_token_ids={9}, stop=list(stop), decode=decode)


def test_length():
    done = finish([1, 2, 1, 2], max_new_tokens=3)
    assert (done.text, done.token_ids, done.finish_reason) == ("aba", [1, 2, 1], "length")


def test_eos_is_not_returned_and_ends_the_row():
    done = finish([1, 9, 2, 2])
    assert (done.text, done.token_ids, done.finish_reason) == ("a", [1], "eos")


def test_stop_string_cuts_text_and_tokens():
    done = finish([1, 2, 3, 4, 1], stop=[".", "zz"])
    assert (done.text, done.token_ids, done.finish_reason) == ("ab", [1, 2, 3], "stop")


def test_stop_string_spanning_tokens():
    done = finish([1, 2, 1, 2], stop=["ba"])
    assert (done.text, done.token_ids, done.finish_reason) == ("a", [1, 2, 1], "stop")


def test_stop_after_max_tokens_does_not_count():
    done = finish([1, 2, 3], max_new_tokens=2, stop=["."])
    assert done.finish_reason == "length"
    assert done.token_ids == [1, 2]
