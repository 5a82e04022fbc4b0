"""TACT: non-local merging with per-task variance correction (Sharma, Roy, Dziugaite 2024, arXiv:2410.12766).

After merging experts that do not share an initialisation, the merged model's activations collapse in variance.
TACT keeps, per task t, the expert's per-channel statistics (mean, std) at chosen layers, measured on task t's
data, and corrects the merged model's activations at those layers, per task, to match them:
`x -> (x - mu_merged,t) / sigma_merged,t * sigma_t + mu_t`, where the merged statistics are measured on task t's
calibration data with the corrections of earlier layers already active. Every task also keeps its own head.

`TACTModel` wraps any merged `nn.Module`; the corrections are forward hooks (`AffineHooks`), the heads replace the
output of the named head module. Invariant: with task t active, the corrected layers' per-channel mean and std on
task t's calibration batches equal the expert's (`fit_corrections`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fedsparse.merging.statistics import (
    AffineHooks,
    ChannelAffine,
    ChannelStats,
    fit_corrections,
    record_channel_stats,
)


def expert_statistics(expert: nn.Module, layers: Sequence[str], batches: Sequence[torch.Tensor],
                      channel_dim: int = 1) -> dict[str, ChannelStats]:
    """The expert's per-channel mean and std at `layers` on its task's batches (what a client would send)."""
    return record_channel_stats(expert, layers, batches, channel_dim)


class TACTModel(nn.Module):
    """A merged model with one set of activation corrections and one head per task.

    `add_task` fits a task's corrections; `forward(x, task)` runs the merged model with that task's corrections
    and head. The wrapped model's own parameters are shared by all tasks and never modified.
    """

    def __init__(self, merged: nn.Module, layers: Sequence[str], head: str | None = None,
                 channel_dim: int = 1) -> None:
        """`layers`: module names to correct, in forward order; `head`: name of the module whose output each task
        replaces with its own head's (None: no per-task heads)."""
        super().__init__()
        if head is not None and head in layers:
            raise ValueError(f"the head '{head}' cannot also be a corrected layer")
        self.merged = merged
        self.layers = list(layers)
        self.head_name = head
        self.channel_dim = channel_dim
        self.heads = nn.ModuleDict()
        self.corrections: dict[str, dict[str, ChannelAffine]] = {}
        self.active_task: str | None = None
        self._hooks = AffineHooks(merged, self.layers, channel_dim)
        if head is not None:
            dict(merged.named_modules())[head].register_forward_hook(self._replace_head_output)

    def _replace_head_output(self, _module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.active_task is not None and self.active_task in self.heads:
            return self.heads[self.active_task](*inputs)
        return output

    def add_task(self, task: str, target: dict[str, ChannelStats], calibration: Sequence[torch.Tensor],
                 head: nn.Module | None = None) -> None:
        """Fit task `task`'s corrections so that the merged model's statistics on `calibration` (task inputs)
        equal `target` (the expert's, from `expert_statistics`), and keep `head` (copied) as the task's head."""
        missing = [name for name in self.layers if name not in target]
        if missing:
            raise ValueError(f"target statistics lack layers {missing}")
        if head is not None:
            if self.head_name is None:
                raise ValueError("this TACTModel was built without a head module name")
            self.heads[task] = copy.deepcopy(head)
        self.use_task(None)
        self.corrections[task] = fit_corrections(self.merged, {name: target[name] for name in self.layers},
                                                 calibration, self.channel_dim)

    def use_task(self, task: str | None) -> None:
        """Make `task`'s corrections and head active (None: the plain merged model)."""
        if task is not None and task not in self.corrections:
            raise ValueError(f"unknown task '{task}'; known: {', '.join(self.corrections)}")
        self.active_task = task
        self._hooks.set(self.corrections[task] if task is not None else {})

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """The merged model's output for `x` with `task`'s corrections and head (default: the active task)."""
        if task is not None and task != self.active_task:
            self.use_task(task)
        return self.merged(x)
