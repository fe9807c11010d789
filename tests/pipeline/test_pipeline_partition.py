"""Partition: balanced contiguous chunks, Megatron's interleaved placement, refused layouts."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.pipeline.partition import partition_layers


def test_layers_split_evenly_extras_to_earlier_stages() -> None:
    assert partition_layers(8, stages=4).sizes() == [2, 2, 2, 2]
    assert partition_layers(10, stages=4).sizes() == [3, 3, 2, 2]
    part = partition_layers(10, stages=4)
    assert [list(c.layers) for c in part.chunks] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [(c.has_embedding, c.has_head) for c in part.chunks] == [
        (True, False),
        (False, False),
        (False, False),
        (False, True),
    ]


def test_virtual_stages_place_chunk_k_on_device_k_mod_p() -> None:
    part = partition_layers(16, stages=4, virtual_stages=2)
    assert part.sizes() == [2] * 8
    dev1 = part.chunks_of(1)
    assert [(c.index, c.local, c.start, c.stop) for c in dev1] == [(1, 0, 2, 4), (5, 1, 10, 12)]
    assert part.chunks_of(3)[-1].has_head and part.chunks_of(0)[0].has_embedding


def test_parameter_balance_counts_embedding_and_head() -> None:
    # A heavy head (e.g. a big vocabulary) pushes layers off the last stage.
    part = partition_layers(8, stages=2, method="parameters", layer_params=[10] * 8, embedding_params=0, head_params=40)
    assert part.sizes() == [6, 2]  # 60 vs 20 + 40
    uneven = partition_layers(5, stages=2, method="parameters", layer_params=[1, 1, 1, 1, 5])
    assert uneven.sizes() == [4, 1]
    # equal weights reproduce the layer split
    assert partition_layers(10, stages=4, method="parameters", layer_params=[7] * 10).sizes() == [3, 3, 2, 2]


def test_more_chunks_than_layers_is_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        partition_layers(6, stages=4, virtual_stages=2)
    assert str(err.value) == (
        "model.n_layers=6 cannot fill parallel.pipeline=4 x parallel.virtual_stages=2 = 8 pipeline chunks "
        "(each needs at least one layer) (hint: use at most 6 stages x virtual stages, or more layers)"
    )


def test_parameters_method_needs_one_count_per_layer() -> None:
    with pytest.raises(ValueError, match=r"needs 4 layer parameter counts, got 3"):
        partition_layers(4, stages=2, method="parameters", layer_params=[1, 2, 3])
