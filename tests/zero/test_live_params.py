"""The stage-3 keep plan (engine/zero/live_params.py): reuse distances of one micro-batch's trace, and which
blocks ``stage3_max_reuse_distance`` and ``stage3_max_live_parameters`` keep gathered from forward to
backward. Pure index math, no processes."""

from engine.zero.live_params import kept_blocks, reuse_distances

# outer unit 100 elements, four blocks of 10, 20, 30, 40
NUMEL = [100, 10, 20, 30, 40]


def test_reuse_distance_counts_later_blocks_twice_and_the_head_once():
    # block 4 (last): only the head between its forward and backward; block 3: block 4 twice + head; ...
    assert reuse_distances(NUMEL, computes_head=True) == [-1, 2 * 90 + 100, 2 * 70 + 100, 2 * 40 + 100, 100]
    # a pipeline stage without the head (its output goes to the next stage)
    assert reuse_distances(NUMEL, computes_head=False) == [-1, 180, 140, 80, 0]


def test_kept_blocks_are_the_suffix_reused_within_the_distance():
    keep = lambda d, live=10**9, head=True: kept_blocks(
        NUMEL,
        computes_head=head,
        max_reuse_distance=d,  # noqa: E731
        max_live=live,
    )
    assert keep(0) == set()  # DeepSpeed: distance < max, so 0 releases everything
    assert keep(100) == set() and keep(101) == {4}  # the last block's distance is the head's 100 elements
    assert keep(181) == {3, 4} and keep(10**9) == {1, 2, 3, 4}
    assert keep(0, head=False) == set() and keep(1, head=False) == {4}
    # the outer unit and the kept blocks are all alive at the turn of forward to backward: the cap binds
    assert keep(10**9, live=100 + 40 + 30) == {3, 4}
    assert keep(10**9, live=100 + 40 + 29) == {4}
    assert keep(10**9, live=139) == set()


def test_persistent_blocks_are_skipped():
    # block 2 is all persistent (nothing gathered): it neither stops the suffix nor is kept
    assert kept_blocks([100, 10, 0, 30], computes_head=True, max_reuse_distance=10**9, max_live=10**9) == {1, 3}


def test_plan_predicts_the_saved_gathers(tmp_path):
    """engine.plan's stage-3 traffic drops by the kept blocks' elements once per micro-batch."""
    from engine.planning import stage3_kept_elements, zero_comm_elements_per_step
    from tests.helpers import make_config

    assert zero_comm_elements_per_step(100, 3, micro_batches=2, kept=40) == 2 * (300 - 40)
    model = {"n_layers": 4, "d_model": 32, "n_heads": 4, "seq_len": 16, "vocab_size": 96}
    released = make_config(tmp_path, model=model, zero_optimization={"stage": 3, "stage3_max_reuse_distance": 0})
    assert stage3_kept_elements(released, tp=1, pp=1) == (0, 0.0)
    default = make_config(tmp_path, model=model, zero_optimization={"stage": 3})  # DeepSpeed's 1e9 keeps all
    blocks, kept = stage3_kept_elements(default, tp=1, pp=1)
    assert blocks == 4 and abs(kept - 4 * 12704) <= 0.01 * kept  # 12704 per block (+ a share of the final norm)
