"""The fuzzer in CI: corrupted tiny checkpoints of every kind, through every entry point.

Every outcome must be a ``BonsaiError`` or a correct load: no other exception, no hang (a timeout
per case), no memory blow-up (an address-space limit per case), and no corrupted input loaded
where a check can see the corruption. The CI run is short and seeded; a long one is
``BONSAI_FUZZ_CASES=1200 pytest tests/test_fuzz.py`` (or ``benchmarks/reliability_campaign.py``).
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz_harness import MUTATIONS, build_bases, plan, run_campaign, summary

CASES = int(os.environ.get("BONSAI_FUZZ_CASES", "40"))
SEED = int(os.environ.get("BONSAI_FUZZ_SEED", "2026"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return build_bases(tmp_path_factory.getbasetemp() / "fuzz-bases")  # shared with test_kill.py


def test_the_plan_covers_every_kind_and_entry_point_once_the_cycle_is_long_enough():
    pairs = {(k, e) for k in MUTATIONS for e in MUTATIONS[k][1]}
    planned = {(k, e) for _, k, e in plan(2000, SEED)}
    assert planned == pairs
    assert plan(50, SEED) == plan(50, SEED)  # seeded: the same cases every run


def test_every_corrupted_checkpoint_is_refused_with_a_bonsai_error_or_loads_correctly(bases, tmp_path):
    outcomes = run_campaign(bases, tmp_path / "work", CASES, seed=SEED, timeout=20.0)
    bad = [o for o in outcomes if o.bad]
    print("\n" + summary(outcomes))
    assert not bad, "\n".join(f"{o.kind} via {o.entry}: {o.detail} -> {o.label}: {o.message}" for o in bad[:10])
    assert sum(o.result == "refused" for o in outcomes) >= CASES // 2  # the corruptions really were seen
