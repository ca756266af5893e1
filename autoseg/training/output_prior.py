"""The output heads' initial bias: the class shares of the training cases (prior initialisation).

nnU-Net starts its heads at bias 0, so an untrained network calls every voxel each class with about
equal probability. On data whose structures fill a few percent of the image (the hippocampus: 2–3 %
a class), the first SGD steps (momentum 0.99) then drive every foreground logit far down, and the run
sits on a plateau where it predicts background only. How long depends on the initial weights drawn:
on most draws of either tool, more than 80 iterations of a budget of a few hundred
(docs/real-data.md). A network whose heads start at the shares the data hold has nothing to unlearn:
it predicts the background share everywhere from the first step, and the Dice term's gradient starts
at once (RetinaNet's prior initialisation, for a softmax or for sigmoid regions). A resumed run takes
its heads from the checkpoint.

The shares come from the fingerprint's voxel counts (each case's labelled voxels over its cropped
volume) of the fold's training cases, so every rank of a distributed run computes the same bias.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from autoseg.core.plan import Plan, foreground_labels
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.preprocessing.fingerprint import load_fingerprint

#: no output starts below this share (or, for a region, above one minus it): a class that no training
#: case holds, or a tiny one, keeps a finite logit the loss can still move.
MIN_SHARE = 1e-3

log = logging.getLogger(__name__)


def class_shares(fingerprint: dict, plan: Plan, case_ids: Sequence[str]) -> list[float] | None:
    """Each network output's share of the voxels of ``case_ids`` (cropped volumes): one per region of a
    region task, else background first and one per foreground label. None when the fingerprint holds
    none of the cases."""
    records = [fingerprint["cases"][c] for c in case_ids if c in fingerprint["cases"]]
    total = sum(math.prod(r["shape_after_crop"]) for r in records)
    if not total:
        return None

    def share(values: Sequence[int]) -> float:
        return sum(r["label_voxels"].get(str(v), 0) for r in records for v in values) / total

    if plan.regions:
        return [share(region.labels) for region in plan.regions]
    foreground = [share([value]) for value in sorted(foreground_labels(plan.labels).values())]
    return [1.0 - sum(foreground), *foreground]


def head_bias(shares: Sequence[float], regions: bool) -> list[float]:
    """The bias that makes an output of zero weights predict ``shares``: log-odds per sigmoid region,
    else the centred log-shares of the softmax."""
    if regions:
        clipped = [min(max(p, MIN_SHARE), 1 - MIN_SHARE) for p in shares]
        return [math.log(p / (1 - p)) for p in clipped]
    logs = [math.log(max(p, MIN_SHARE)) for p in shares]
    return [v - sum(logs) / len(logs) for v in logs]


def initial_head_bias(workspace: DatasetWorkspace, plan: Plan, case_ids: Sequence[str]) -> list[float] | None:
    """The heads' initial bias for training on ``case_ids``; None (nnU-Net's zero bias) without a
    fingerprint that holds them."""
    shares = None
    if workspace.fingerprint.is_file():
        shares = class_shares(load_fingerprint(workspace.fingerprint), plan, case_ids)
    if shares is None:
        log.info("the output heads start at bias 0: the fingerprint has no voxel counts of the training cases")
        return None
    log.info("the output heads start at the training cases' class shares: %s", ", ".join(f"{p:.4g}" for p in shares))
    return head_bias(shares, bool(plan.regions))
