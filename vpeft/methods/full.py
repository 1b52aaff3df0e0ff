"""Full fine-tuning: every parameter trains (the upper baseline on cost)."""

from collections.abc import Iterator

from torch import nn

from vpeft.methods._base import Method, head_parameters, register


@register("full")
class FullFineTuning(Method):
    mergeable = True  # the weights are the delta
    runs_alone = "full fine-tuning trains every backbone weight, so runs have no frozen backbone to share"

    def delta_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        head = {id(p) for _, p in head_parameters(model)}
        return ((n, p) for n, p in model.named_parameters() if id(p) not in head)

    def merge(self, model: nn.Module) -> None:
        pass
