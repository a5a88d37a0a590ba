"""Resolve what a step gets from the layers that may set it: the model, the comparison, the chart. Pure.

Both the step inputs (`step_inputs.py`: a model's GPU count and memory, its training settings) and the
rendered pods (`rendering.py`: placement, image) read these, so neither reaches into the other.
"""

from __future__ import annotations

from ftc_api.spec import FineTuneComparisonSpec, ModelSpec, Placement, TrainingSpec
from ftc_api.steps import StepKind

from .config import OperatorConfig

_PLACEMENT_FIELDS = tuple(Placement.model_fields)


def effective_placement(config: OperatorConfig, spec: FineTuneComparisonSpec, model: ModelSpec | None = None) -> Placement:
    """Each placement field from the first layer that sets it: model, comparison, chart."""
    layers = [p for p in ((model.placement if model else None), spec.placement, config.placement) if p is not None]
    values = {}
    for f in _PLACEMENT_FIELDS:
        values[f] = next((getattr(p, f) for p in layers if getattr(p, f) is not None), None)
    return Placement(**values)


def effective_training(spec: FineTuneComparisonSpec, model: ModelSpec) -> TrainingSpec:
    """Shared training settings with this model's overrides applied."""
    if model.training is None:
        return spec.training
    overrides = {k: v for k, v in model.training.model_dump().items() if v is not None}
    return spec.training.model_copy(update=overrides)


def image_for(config: OperatorConfig, spec: FineTuneComparisonSpec, step: str) -> tuple[str, str]:
    """The image a step runs and its pull policy: the comparison's, else the chart's."""
    images = spec.images
    if step in (StepKind.GENERATE, StepKind.SCORE, StepKind.EVALUATE):
        image = (images.evaluator if images else None) or config.evaluator_image
    else:
        image = (images.trainer if images else None) or config.trainer_image
    return image, (images.pull_policy if images and images.pull_policy else config.image_pull_policy)


def refusals(config: OperatorConfig, spec: FineTuneComparisonSpec) -> list[str]:
    """What the spec asks that the chart does not allow (its images and ServiceAccounts allowlists), as
    `field: message` lines naming the value and the chart value to change; empty when nothing is refused."""
    out: list[str] = []
    images = spec.images
    for field, image in (("trainer", images.trainer if images else None), ("evaluator", images.evaluator if images else None)):
        if image and not config.image_allowed(image):
            out.append(
                f"spec.images.{field}: the image {image!r} is not allowed by the operator's chart "
                f"(allowed: {', '.join(config.images_allowed())}); name one of these, or add it to the chart value "
                "config.allowedImages"
            )
    accounts = [("spec.placement", spec.placement)]
    accounts += [(f"spec.models[{i}].placement", m.placement) for i, m in enumerate(spec.models)]
    for where, placement in accounts:
        account = placement.service_account_name if placement else None
        if account and account not in config.service_accounts_allowed():
            out.append(
                f"{where}.serviceAccountName: the ServiceAccount {account!r} is not allowed by the operator's chart "
                f"(allowed: {', '.join(config.service_accounts_allowed())}); name one of these, or add it to the chart "
                "value config.allowedServiceAccounts"
            )
    return out


JOBSET_INSTALL = (
    "install JobSet v0.12.0 or newer (kubectl apply --server-side -f "
    "https://github.com/kubernetes-sigs/jobset/releases/download/v0.12.0/manifests.yaml; the operator finds it at "
    "its next resync)"
)


def jobset_refusals(config: OperatorConfig, spec: FineTuneComparisonSpec, jobset_available: bool) -> list[str]:
    """The models whose train step needs JobSet (placement.nodes > 1) when the cluster does not serve its API
    (`jobset_available`: jobset.x-k8s.io/v1alpha2 JobSets are served), as `field: message` lines naming what to
    install; empty otherwise."""
    if jobset_available:
        return []
    out = []
    for i, model in enumerate(spec.models):
        nodes = effective_placement(config, spec, model).nodes or 1
        if nodes > 1:
            where = f"spec.models[{i}].placement.nodes" if model.placement and model.placement.nodes else "spec.placement.nodes"
            out.append(
                f"{where}: model {model.name} trains on {nodes} nodes, which needs JobSet (jobset.x-k8s.io/v1alpha2), "
                f"and this cluster does not serve it: {JOBSET_INSTALL}; or set nodes: 1"
            )
    return out
