"""How many tokens a draft model drafts next (``draft_schedule``; transformers'
``num_assistant_tokens_schedule``).

``"constant"`` drafts ``num_draft_tokens`` every step, as mlx-lm does. ``"heuristic"``
is transformers' rule for its assistant models: after a step that accepted every draft
the next chain is 2 tokens longer, after one that did not, 1 shorter; here it starts at
``num_draft_tokens``, which also caps it, and never goes below 1. A run of text the
draft model predicts well gets long chains; elsewhere the chain shrinks, and each draft
not made is a draft-model pass saved. Each call starts anew (transformers'
``"heuristic_transient"``: a server's requests do not steer each other). The length
depends on earlier steps only, so the drafts stay a proposal fixed before the step's
verification, and output stays exact (greedy) or distributed as the model's (sampling).
No MLX here.
"""

from typing import Optional

SCHEDULES = ("constant", "heuristic")


def check_draft_schedule(schedule: Optional[str]) -> None:
    """Refuses a ``draft_schedule`` other than ``None`` or one of :data:`SCHEDULES`."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"draft_schedule={schedule!r}: choose one of {SCHEDULES}.")


def next_length(length: int, accepted: int, drafted: int, most: int) -> int:
    """The heuristic schedule's next chain length, after a step that verified ``drafted``
    draft-model levels of a chain ``length`` long and accepted ``accepted`` of them.

    Example:
        >>> next_length(3, 3, 3, 8), next_length(7, 7, 7, 8), next_length(8, 8, 8, 8)
        (5, 8, 8)
        >>> next_length(5, 2, 5, 8), next_length(1, 0, 1, 8)
        (4, 1)

    A step that verified fewer levels than the length (the draft model was unsure, or
    ``max_tokens`` was near) judges those: ``next_length(6, 2, 2, 8)`` is 8.
    """
    if drafted <= 0:  # (no draft-model levels were verified: nothing learned)
        return length
    return min(most, length + 2) if accepted >= drafted else max(1, length - 1)


class DraftLength:
    """The length of a draft model's next chain under a ``draft_schedule``.

    Example:
        >>> n = DraftLength(4, "heuristic")
        >>> n.now
        4
        >>> n.update(accepted=1, drafted=4); n.now
        3
        >>> n.update(accepted=3, drafted=3); n.now
        4
        >>> constant = DraftLength(4, "constant")
        >>> constant.update(accepted=0, drafted=4); constant.now
        4
    """

    def __init__(self, most: int, schedule: Optional[str] = None):
        check_draft_schedule(schedule)
        self.most, self.schedule = most, schedule or "constant"
        self.now = most

    def update(self, accepted: int, drafted: int) -> None:
        """After a step that verified ``drafted`` draft-model levels and accepted
        ``accepted`` of them."""
        if self.schedule == "heuristic":
            self.now = next_length(self.now, accepted, drafted, self.most)
