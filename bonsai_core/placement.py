"""Where a text encoder lives during a run: resident on the device, or parked in host memory.

A 4-bit Qwen3-4B text encoder is ~2.3 GB: on a small card it can stay on the device beside the 1-bit
transformer (no copy per prompt), or it must be parked in host memory and lent to the device for each
encode (or streamed layer by layer when even that does not fit). The decisions are plain functions
of byte counts, so they are tested without a GPU; the family measures what they are given
(``torch.cuda.memory_allocated`` once the weights are on the device, ``max_memory_allocated`` after a
run) and the estimate of a run's working memory comes from ``guardrails.estimate_memory_bytes``.

The budget is ``--max-vram GB`` / ``BONSAI_MAX_VRAM_GB`` (and never more than the device has free).
"""

from __future__ import annotations

from dataclasses import dataclass

RESIDENT = "resident"  # on the device for the whole run
PARKED = "parked"      # in (pinned) host memory, lent to the device for each encode
STREAMED = "streamed"  # in host memory, each layer moved to the device for its own forward

GIB = 2**30
HEADROOM = 0.95  # of the budget: allocator fragmentation and CUDA context are not in the counts


@dataclass(frozen=True)
class Placement:
    where: str
    reason: str


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def place_text_encoder(te_bytes: int, run_bytes: int, budget_bytes: int, free_bytes: int | None = None) -> Placement:
    """Keep the text encoder resident when the device holds it beside a whole run.

    ``te_bytes``: the text encoder's weights on the device (measured); ``run_bytes``: the peak of a
    generation without it (the resident weights plus the largest phase's working memory: the
    guardrails' estimate); ``budget_bytes``: the user's budget; ``free_bytes``: what the device has
    free now besides what is already counted in ``run_bytes`` (None: not known, e.g. not CUDA)."""
    limit = budget_bytes if free_bytes is None else min(budget_bytes, free_bytes)
    need = te_bytes + run_bytes
    if need <= HEADROOM * limit:
        return Placement(RESIDENT, f"text encoder {_gib(te_bytes)} + run {_gib(run_bytes)} = {_gib(need)} fits "
                                   f"{_gib(limit)}: kept on the device")
    return Placement(PARKED, f"text encoder {_gib(te_bytes)} + run {_gib(run_bytes)} = {_gib(need)} is more than "
                             f"{_gib(limit)}: parked in host memory, lent to the device for each new prompt")


def place_lent(te_bytes: int, resident_bytes: int, encode_bytes: int, budget_bytes: int,
               free_bytes: int | None = None) -> Placement:
    """For a parked text encoder: can it be lent whole for an encode (``resident_bytes`` already on
    the device, ``encode_bytes`` the encode's activations), or must it be streamed layer by layer."""
    limit = budget_bytes if free_bytes is None else min(budget_bytes, resident_bytes + free_bytes)
    need = resident_bytes + te_bytes + encode_bytes
    if need <= HEADROOM * limit:
        return Placement(PARKED, f"lent whole for the encode: {_gib(need)} within {_gib(limit)}")
    return Placement(STREAMED, f"lending it whole needs {_gib(need)}, more than {_gib(limit)}: streamed layer by layer")


def after_run(placement: Placement, peak_bytes: int | None, budget_bytes: int,
              te_bytes: int | None = None, device_bytes: int | None = None) -> Placement | None:
    """The measured peak of a run against the budget (returns the new placement; None: keep as is).

    A resident text encoder whose run went over the budget is parked for the next runs. A parked one
    (``te_bytes``: what it measured on the device; None: never promote, e.g. after a demotion) is
    kept on the device from the next run on when the run's measured peak plus its weights fits the
    budget: the decision made from the estimate at load is corrected by measurement both ways. The
    parked run's peak already holds the encoder during the encode, so the sum over-counts that
    phase: promoting is the cautious direction. ``device_bytes``: what the device can give this
    process now (its free memory plus what the process holds; None: not known) bounds it too."""
    if peak_bytes is None:
        return None
    if placement.where == RESIDENT:
        if peak_bytes <= budget_bytes:
            return None
        return Placement(PARKED, f"measured peak {_gib(peak_bytes)} with the text encoder on the device is over "
                                 f"the budget {_gib(budget_bytes)}: parked in host memory from the next run on")
    limit = budget_bytes if device_bytes is None else min(budget_bytes, device_bytes)
    if placement.where == PARKED and te_bytes is not None and peak_bytes + te_bytes <= HEADROOM * limit:
        return Placement(RESIDENT, f"measured peak {_gib(peak_bytes)} with the text encoder parked + the text "
                                   f"encoder {_gib(te_bytes)} = {_gib(peak_bytes + te_bytes)} fits "
                                   f"{_gib(limit)}: kept on the device from the next run on")
    return None
