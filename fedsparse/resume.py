"""Reading a run folder back for `resume`: its `config.json` and `checkpoint.pt`, checked before anything starts.

Invariants:
- A damaged file (empty, truncated, garbage, wrong structure) raises `ResumeError` naming that file; nothing here
  returns a half-read checkpoint.
- A resumed run may differ from the saved one only in `config.RESUME_CHANGEABLE` (how long and where it runs) and
  `config.RESUME_IGNORED` (the folder itself, so a copied folder resumes); anything else is refused by name, and
  `num-rounds` may not fall below the rounds already done.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsparse.config import RESUME_CHANGEABLE, SCHEMA, ConfigError, flatten, resume_conflicts

log = logging.getLogger("fedsparse")

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_KEYS = ("config", "state", "rows", "failures", "oneoff", "strategy")


class ResumeError(ConfigError):
    """A run folder that cannot be resumed as asked; the message names the file or the keys."""


@dataclass(frozen=True)
class Checkpoint:
    """What `checkpoint.pt` holds: the config it was made with, the global model, the rows of the rounds done,
    the failures so far, the one-off traffic and the strategy's own state."""

    config: dict[str, Any]
    state: dict[str, Any]
    rows: list[dict]
    failures: list[dict]
    oneoff: dict[str, int]
    strategy: dict[str, Any]
    experiment: dict[str, Any] = field(default_factory=dict)  # the experiment's state_dict (absent before phases)

    @property
    def rounds_done(self) -> int:
        return len(self.rows)


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and check `path` (a `checkpoint.pt`); raises ResumeError naming the file when it is damaged."""
    import torch

    try:
        raw = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # pickle, zip and torch raise many types for a damaged file
        raise ResumeError(f"cannot resume: {path} is damaged ({type(err).__name__}: {err}); "
                          "delete it to start over") from err
    if not isinstance(raw, dict) or any(k not in raw for k in CHECKPOINT_KEYS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ResumeError(f"cannot resume: {path} is not a fedsparse checkpoint (expected the entries "
                          f"{', '.join(CHECKPOINT_KEYS)}; found {found})")
    kinds = {"config": dict, "state": dict, "rows": list, "failures": list, "oneoff": dict, "strategy": dict}
    for name, kind in kinds.items():
        if not isinstance(raw[name], kind):
            raise ResumeError(f"cannot resume: {path} is damaged: its '{name}' is a {type(raw[name]).__name__}, "
                              f"not a {kind.__name__}")
    experiment = raw.get("experiment", {})
    if not isinstance(experiment, dict):
        raise ResumeError(f"cannot resume: {path} is damaged: its 'experiment' is a {type(experiment).__name__}, "
                          "not a dict")
    return Checkpoint(**{k: raw[k] for k in CHECKPOINT_KEYS}, experiment=experiment)


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    """The settings saved in `run_dir/config.json`, without keys the schema no longer has; ResumeError naming
    the file when it is missing, unreadable or not a JSON object."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise ResumeError(f"cannot resume {run_dir}: no {CONFIG_FILE} there, nothing to resume")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResumeError(f"cannot resume: {path} is damaged ({err})") from err
    if not isinstance(saved, dict):
        raise ResumeError(f"cannot resume: {path} holds a JSON {type(saved).__name__}, not an object of settings")
    saved = flatten(saved)  # a run saved before the sparse.* namespace had flat names
    dropped = sorted(k for k in saved if k not in SCHEMA)
    if dropped:
        log.warning("%s: ignoring settings this version no longer has: %s", path, ", ".join(dropped))
    return {k: v for k, v in saved.items() if k in SCHEMA}


def check_resume(checkpoint: Checkpoint, cfg: dict[str, Any], path: Path) -> None:
    """Refuse, naming the keys, a resume whose settings differ from the checkpoint's beyond what may change."""
    saved = flatten(checkpoint.config)
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        changes = ", ".join(f"{k} {saved.get(k, SCHEMA[k].default)!r} -> {cfg[k]!r}" for k in conflicts)
        raise ResumeError(f"cannot resume from {path}: it was made with other settings ({changes}); on resume only "
                          f"{', '.join(RESUME_CHANGEABLE)} may change (num-rounds only upwards)")
    if cfg["num-rounds"] < checkpoint.rounds_done:
        raise ResumeError(f"config key 'num-rounds': {cfg['num-rounds']} is fewer than the {checkpoint.rounds_done} "
                          f"rounds {path} already holds")


def load_for_resume(cfg: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint in `cfg['output-dir']`, checked against `cfg`; None when there is none yet (the run then
    starts from round 1). Raises ResumeError for a damaged file or refused settings."""
    path = Path(cfg["output-dir"]) / CHECKPOINT_FILE
    if not path.exists():
        return None
    checkpoint = read_checkpoint(path)
    check_resume(checkpoint, cfg, path)
    return checkpoint
