"""SIGKILLs at random moments of convert, import, export-gguf and generate, in CI (a few of them; the
long campaign is ``benchmarks/reliability_campaign.py kill``): never a half-written output, never a
lost model under ``--overwrite``, nothing left behind once the next run is done."""

from __future__ import annotations

import os

from tests.fuzz_harness import build_bases
from tests.kill_harness import kill_campaign

KILLS = int(os.environ.get("BONSAI_KILLS", "8"))


def test_killed_runs_leave_no_half_written_output_no_lost_model_and_nothing_after_the_next_run(tmp_path_factory,
                                                                                               tmp_path):
    bases = build_bases(tmp_path_factory.getbasetemp() / "fuzz-bases")  # shared with test_fuzz.py
    counts, by_op, problems, trials = kill_campaign(bases, tmp_path, KILLS, 6 * KILLS, seed=7, log=lambda m: None)
    assert not problems, problems
    assert counts["killed"] == KILLS
    assert counts["half-written"] == counts["lost model under --overwrite"] == 0
    assert counts["leftovers after the next run"] == 0
