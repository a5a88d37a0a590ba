"""The overfitting verdict: a pure function of the loss history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .spec import OverfittingSpec
from .steps import LossPoint, OverfittingVerdict


def overfitting_verdict(history: Sequence[LossPoint], spec: OverfittingSpec | None = None) -> OverfittingVerdict:
    """`overfitting` when eval loss rose for `patience` consecutive evaluations past its minimum while
    train loss kept falling, or when the final eval-train gap exceeds `gapThreshold`; else `ok`.
    `unknown` when there are fewer than two evaluations."""
    spec = spec or OverfittingSpec()
    evals = [(p.step, p.eval_loss) for p in history if p.eval_loss is not None]
    trains = [(p.step, p.train_loss) for p in history if p.train_loss is not None]
    if len(evals) < 2:
        return OverfittingVerdict(verdict="unknown", reason=f"only {len(evals)} evaluation(s); need at least 2")
    min_index = min(range(len(evals)), key=lambda i: (evals[i][1], i))
    min_step, min_loss = evals[min_index]
    after = evals[min_index + 1 :]
    rises = 0
    previous = min_loss
    for _, loss in after:
        if loss is not None and previous is not None and loss > previous:
            rises += 1
            previous = loss
        else:
            break
    train_at_min = _last_at_or_before(trains, min_step)
    train_last = trains[-1][1] if trains else None
    train_falling = train_at_min is not None and train_last is not None and train_last < train_at_min
    final_gap = None
    if train_last is not None and evals[-1][1] is not None:
        final_gap = round(float(evals[-1][1]) - float(train_last), 6)

    def verdict(kind: Literal["ok", "overfitting"], reason: str) -> OverfittingVerdict:
        return OverfittingVerdict(
            verdict=kind,
            reason=reason,
            min_eval_loss=min_loss,
            min_eval_step=min_step,
            rises_after_min=rises,
            final_gap=final_gap,
        )

    if rises >= spec.patience and train_falling:
        return verdict(
            "overfitting",
            f"eval loss rose {rises} evaluations in a row after its minimum {min_loss:.4f} at step {min_step} "
            f"while train loss fell from {train_at_min:.4f} to {train_last:.4f}",
        )
    if final_gap is not None and final_gap > spec.gap_threshold:
        return verdict(
            "overfitting",
            f"final eval loss exceeds train loss by {final_gap:.4f} (> {spec.gap_threshold})",
        )
    return verdict(
        "ok",
        f"eval loss rose {rises} time(s) after its minimum (patience {spec.patience}); "
        f"final gap {final_gap if final_gap is not None else 'n/a'} (threshold {spec.gap_threshold})",
    )


def _last_at_or_before(points: Sequence[tuple[int, float | None]], step: int) -> float | None:
    value = None
    for s, loss in points:
        if s <= step:
            value = loss
    if value is None and points:
        value = points[0][1]
    return value
