"""``tpm trace --logit-lens`` prints the text tokens stand for, not byte-level BPE pieces.

The demo tokenizer is byte-level BPE: its vocabulary writes " is" as 'Ġis'.
A reader wants the text, with the leading space visible: '·is'.
"""

from __future__ import annotations

import numpy as np

from tpm_fed.cli.trace import lens_lines, shown_token
from tpm_fed.interventions import LogitLens

PROMPT = "The cell divides and the"


def test_lens_texts_are_the_tokenizer_decoding_of_each_id(runtime, reference_model):
    _, tokenizer = reference_model
    result = runtime.trace(PROMPT, logit_lens=LogitLens(top_k=3)).result()
    lens = result.logit_lens()
    ids = np.array(lens.ids)
    assert np.array(lens.texts).shape == ids.shape
    for layer in range(ids.shape[0]):
        assert lens.texts[layer][-1] == [tokenizer.decode([int(i)]) for i in ids[layer, -1]]
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert result.prompt_texts[0] == [tokenizer.decode([i]) for i in prompt_ids]
    assert "".join(result.prompt_texts[0]).endswith(PROMPT)
    # The pieces differ from the texts exactly where the vocabulary marks a space (the byte-level 'Ġ').
    assert any(p.startswith("Ġ") for p in result.prompt_tokens[0])
    assert not any("Ġ" in t for t in result.prompt_texts[0])


def test_printed_lens_shows_text_with_a_visible_space(runtime):
    result = runtime.trace(PROMPT, logit_lens=LogitLens(top_k=3)).result()
    lines = lens_lines(result, 0)
    printed = "\n".join(lines)
    assert "Ġ" not in printed
    assert lines[0].startswith("[0] logit lens at the last token '·the'")
    lens = result.logit_lens()
    assert len(lines) == 1 + len(lens.texts)
    for layer, row in enumerate(lens.texts):
        assert all(shown_token(text) in lines[1 + layer] for text in row[-1])
    assert any("'·" in line for line in lines[1:])  # some top token starts with a space, shown as '·'


def test_shown_token_marks_spaces_and_escapes_control_characters():
    assert shown_token(" is") == "'·is'"
    assert shown_token("  ") == "'··'"
    assert shown_token("\n") == "'\\n'"
    assert shown_token("cell") == "'cell'"
