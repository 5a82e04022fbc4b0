"""The server side of the unlearn experiment's registry methods (gradient_ascent, neggrad_plus, l1_sparse,
random_label, salun, scrub): FedAvg rounds whose clients each run the method locally (`client.unlearning_local`).

`LocalUnlearnFedAvg` is the unlearning phase's strategy when `unlearn.method` is one of `LOCAL_METHODS`
(`server.experiments.unlearning` picks it): it sends `train.unlearn_local` messages (to the same clients
`UnlearnFedAvg` would) whose train config names the method (`unlearn-method`) and the round's place in the phase
(`phase-round` 1 .. `phase-rounds`), and it averages the replies as FedAvg does (example-weighted mean of the
clients' unlearned models). The phase starts from the trained model (the experiment's `on_start` does nothing for
these methods).

Invariants: the first round this strategy configures is the phase's first (`first_round`), so `phase-round` counts
from it; for scrub, every train message also carries the teacher, the global model at the phase's start, as the
`teacher` record (one more float32 copy of the model down per message: the scrub rounds' down bytes double).
Both are in `state_dict()`, so a resumed phase goes on with the same numbering and teacher.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from client.unlearning_local import LOCAL_METHODS, LOCAL_TRAIN_MESSAGE, TEACHER_RECORD
from fedsparse import sparse
from server.experiments.unlearning import UnlearnFedAvg


class LocalUnlearnFedAvg(UnlearnFedAvg):
    """FedAvg over the clients' local runs of one registry unlearning method (module docstring).

    Parameters (keyword only, besides UnlearnFedAvg's)
    --------------------------------------------------
    method : the registry method the clients run, one of `LOCAL_METHODS`.
    phase_rounds : the number of rounds of the unlearning phase (`unlearn.rounds`).
    """

    message_type = LOCAL_TRAIN_MESSAGE

    def __init__(self, *, method: str, phase_rounds: int, **kwargs) -> None:
        if method not in LOCAL_METHODS:
            raise ValueError(f"method must be one of {', '.join(LOCAL_METHODS)}, got {method!r}")
        if phase_rounds < 1:
            raise ValueError(f"phase_rounds must be >= 1, got {phase_rounds}")
        super().__init__(**kwargs)
        self.method, self.phase_rounds = method, phase_rounds
        self.first_round: int | None = None  # the run's round number of the phase's first round
        self.teacher: dict[str, torch.Tensor] | None = None  # scrub: the global model at the phase start

    @classmethod
    def config_arguments(cls, cfg: dict) -> dict:
        """UnlearnFedAvg's arguments plus the method and the phase's rounds."""
        return {**super().config_arguments(cfg), "method": cfg["unlearn.method"], "phase_rounds": cfg["unlearn.rounds"]}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> list[Message]:
        """UnlearnFedAvg's messages; the first call fixes the phase's first round (and scrub's teacher)."""
        if self.first_round is None:
            self.first_round = server_round
            if self.method == "scrub":
                self.teacher = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        return super().configure_train(server_round, arrays, config, grid)

    def train_config(self, server_round: int, extra: ConfigRecord | None = None) -> ConfigRecord:
        """UnlearnFedAvg's train config plus `unlearn-method`, `phase-round` and `phase-rounds`."""
        config = super().train_config(server_round, extra)
        first = server_round if self.first_round is None else self.first_round
        config["unlearn-method"] = self.method
        config["phase-round"] = server_round - first + 1
        config["phase-rounds"] = self.phase_rounds
        return config

    def train_content(self, server_round: int, state: sparse.State, config: ConfigRecord | None = None
                      ) -> RecordDict:
        """The model and train config, plus the teacher record for scrub."""
        content = super().train_content(server_round, state, config)
        if self.teacher is not None:
            content[TEACHER_RECORD] = ArrayRecord({k: v.clone() for k, v in self.teacher.items()})
        return content

    def state_dict(self) -> dict:
        """The phase's first round and scrub's teacher."""
        return {**super().state_dict(), "first-round": self.first_round, "teacher": self.teacher}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        super().load_state_dict(state)
        self.first_round, self.teacher = state.get("first-round"), state.get("teacher")
