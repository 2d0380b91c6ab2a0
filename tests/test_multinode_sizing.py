"""The sizing table of docs/multinode.md: computed by one function, checked here against the page and arithmetic."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tpm_fed.broker.sizing import BYTES_PER_PARAMETER, HEADROOM, size, sizing_table, sizings

DOCS = Path(__file__).parent.parent / "docs" / "multinode.md"


def test_the_docs_hold_exactly_the_computed_table():
    text = DOCS.read_text()
    table = re.search(r"<!-- sizing-table:[^\n]*-->\n(.*?)\n<!-- /sizing-table -->", text, re.S).group(1)
    assert table == sizing_table()


@pytest.mark.parametrize("sizing", sizings(),
                         ids=lambda s: f"{s.model}-{s.precision}-{s.gpu_gb:.0f}GB-x{s.gpus_per_node}")
def test_each_row_holds_its_weights_with_the_headroom_and_no_node_to_spare(sizing):
    usable = sizing.gpu_gb * (1 - HEADROOM)
    assert sizing.weights_gb == sizing.parameters * BYTES_PER_PARAMETER[sizing.precision] / 1e9
    assert sizing.weights_per_gpu_gb <= usable  # the headroom is kept on every GPU
    assert sizing.nodes * sizing.gpus_per_node >= sizing.gpus
    if sizing.nodes > 1:  # one node fewer could not hold the weights
        assert (sizing.nodes - 1) * sizing.gpus_per_node * usable < sizing.weights_gb
        assert sizing.tensor_parallel == sizing.gpus_per_node and sizing.pipeline_parallel == sizing.nodes
    else:  # the fewest power-of-two GPUs that hold them
        assert sizing.tensor_parallel // 2 * usable < sizing.weights_gb or sizing.tensor_parallel == 1


def test_the_figures_operators_quote():
    assert size("405B", 405e9, "bf16", 80, 8).weights_gb == 810  # "about 810 GB for its weights alone"
    assert size("405B", 405e9, "bf16", 80, 8).nodes == 2
    assert size("405B", 405e9, "bf16", 80, 4).nodes == 4  # Polaris-like nodes of 4
    assert size("70B", 70e9, "bf16", 80, 8).nodes == 1
    assert math.isclose(size("1T", 1e12, "bf16", 80, 8).weights_per_node_gb, 400)
