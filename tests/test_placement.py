"""Where the text encoder lives (bonsai_core/placement.py): the decisions, from byte counts, each
case worked by hand (GiB = 2**30 bytes, 5% headroom)."""

from bonsai_core import placement
from bonsai_core.placement import PARKED, RESIDENT, STREAMED, Placement

GIB = 2**30


def test_a_4bit_qwen3_stays_resident_within_4_gib():
    # Qwen3-4B at 4 bits ~2.3 GiB + a 1024^2 run of the 1-bit transformer ~1.4 GiB = 3.7 <= 0.95 * 4 = 3.8
    p = placement.place_text_encoder(int(2.3 * GIB), int(1.4 * GIB), 4 * GIB)
    assert p.where == RESIDENT and "fits" in p.reason


def test_a_bf16_qwen3_is_parked_within_6_gib():
    p = placement.place_text_encoder(int(7.5 * GIB), int(1.4 * GIB), 6 * GIB)
    assert p.where == PARKED and "parked in host memory" in p.reason


def test_the_headroom_and_the_free_memory_count():
    assert placement.place_text_encoder(int(2.5 * GIB), int(1.4 * GIB), 4 * GIB).where == PARKED  # 3.9 > 0.95 * 4
    assert placement.place_text_encoder(1 * GIB, 1 * GIB, 80 * GIB, free_bytes=2 * GIB).where == PARKED
    assert placement.place_text_encoder(1 * GIB, 1 * GIB, 80 * GIB, free_bytes=3 * GIB).where == RESIDENT


def test_lent_whole_or_streamed():
    # 1.0 on the device + 2.3 lent + 0.5 activations = 3.8 <= 3.8
    assert placement.place_lent(int(2.3 * GIB), 1 * GIB, GIB // 2, 4 * GIB).where == PARKED
    p = placement.place_lent(int(7.5 * GIB), 1 * GIB, GIB // 2, 4 * GIB)
    assert p.where == STREAMED and "layer by layer" in p.reason
    # the device's free memory limits too
    assert placement.place_lent(int(2.3 * GIB), 1 * GIB, GIB // 2, 80 * GIB, free_bytes=2 * GIB).where == STREAMED


def test_a_run_measured_over_the_budget_parks_a_resident_text_encoder():
    res = Placement(RESIDENT, "")
    assert placement.after_run(res, int(3.9 * GIB), 4 * GIB) is None
    new = placement.after_run(res, int(4.2 * GIB), 4 * GIB)
    assert new.where == PARKED and "measured peak 4.20 GiB" in new.reason
    assert placement.after_run(Placement(PARKED, ""), 9 * GIB, 4 * GIB) is None  # nothing to move
    assert placement.after_run(res, None, 4 * GIB) is None  # not measurable: keep


def test_a_parked_text_encoder_comes_onto_the_device_when_the_measured_run_leaves_room():
    parked = Placement(PARKED, "estimate")
    # the H100 numbers: parked 1024x1024 peak 3.58 GiB + 1.54 GiB encoder = 5.12 <= 0.95 x 6
    new = placement.after_run(parked, int(3.58 * GIB), 6 * GIB, te_bytes=int(1.54 * GIB))
    assert new.where == RESIDENT and "= 5.12 GiB fits 6.00 GiB" in new.reason
    assert placement.after_run(parked, int(3.58 * GIB), 5 * GIB, te_bytes=int(1.54 * GIB)) is None  # 5.12 > 4.75
    assert placement.after_run(parked, int(3.58 * GIB), 6 * GIB, te_bytes=None) is None  # size unknown / demoted
    assert placement.after_run(parked, None, 6 * GIB, te_bytes=GIB) is None
    # the device's own room bounds it too (another program holds part of the card)
    assert placement.after_run(parked, int(3.58 * GIB), 6 * GIB, te_bytes=int(1.54 * GIB), device_bytes=5 * GIB) is None
