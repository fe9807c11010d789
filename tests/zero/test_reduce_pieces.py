"""Reduce pieces (engine/zero/pieces.py): a bucket spanning several units is reduce-scattered one unit at a
time, with per-rank sizes that add up to the whole padded bucket. Pure index math, no processes."""

from engine.zero.pieces import plan_pieces

# members in bucket order: unit 2 (5 elements), unit 1 (4), unit 2 (3), unit 1 (2); 14 elements padded to 16
OFFSETS, SIZES, UNITS = [0, 5, 9, 12], [5, 4, 3, 2], [2, 1, 2, 1]


def _plan(rank: int, dp: int = 4):
    return plan_pieces(OFFSETS, SIZES, UNITS, padded_numel=16, dp_size=dp, dp_rank=rank)


def test_pieces_follow_backward_and_cover_the_padded_bucket_once():
    high, low = _plan(0)
    assert (high.members, low.members) == ((0, 2), (1, 3))  # the later unit first: backward completes it first
    assert high.ranges == ((0, 5), (9, 12)) and high.positions == (0, 5)
    assert low.ranges == ((5, 9), (12, 16)) and low.positions == (0, 4)  # + the padding (14, 16), merged
    # shards of 4: [0,4) [4,8) [8,12) [12,16)
    assert high.splits == (4, 1, 3, 0) and low.splits == (0, 3, 1, 4)
    assert sum(high.splits) + sum(low.splits) == 16 and not high.whole and not low.whole


def test_each_rank_receives_exactly_its_shard():
    for rank in range(4):
        covered = []
        for piece in _plan(rank):
            at = 0
            for lo, hi, offset in piece.mine:
                assert offset == at
                at += hi - lo
                covered += range(lo, hi)
            assert at == piece.splits[rank]
        assert sorted(covered) == list(range(4)), rank  # the whole shard, each element once


def test_one_unit_is_one_even_piece():
    (piece,) = plan_pieces([0, 5], [5, 4], [3, 3], padded_numel=10, dp_size=2, dp_rank=1)
    assert piece.whole and piece.ranges == ((0, 10),) and piece.splits == (5, 5)
    assert piece.mine == ((0, 5, 0),)
