"""Machine unlearning as library functions over models and in-memory data, usable without Flower.

Every method has one signature, `unlearn(model, retain, forget, cfg) -> model`: `model` is the trained original
(left unchanged), `retain` and `forget` are `ArrayData`, `cfg` an `UnlearnConfig`; it returns a new model of the
same architecture. `UNLEARNING_METHODS` maps each method's name to it. Localization (`localization.py`) builds freeze
masks; any method runs localized on one through `UnlearnConfig.mask`. Evaluation: `evaluate.py`.
"""

from __future__ import annotations

from torch import nn

from fedsparse.unlearning.core import ArrayData, Mask, UnlearnConfig, UnlearnFn
from fedsparse.unlearning.methods.deletion_by_localization import deletion_by_localization
from fedsparse.unlearning.methods.finetune import finetune
from fedsparse.unlearning.methods.gradient_ascent import gradient_ascent
from fedsparse.unlearning.methods.l1_sparse import l1_sparse
from fedsparse.unlearning.methods.neggrad_plus import neggrad_plus
from fedsparse.unlearning.methods.random_label import random_label
from fedsparse.unlearning.methods.retrain import retrain
from fedsparse.unlearning.methods.salun import salun
from fedsparse.unlearning.methods.scrub import scrub

UNLEARNING_METHODS: dict[str, UnlearnFn] = {
    "retrain": retrain,
    "finetune": finetune,
    "gradient_ascent": gradient_ascent,
    "neggrad_plus": neggrad_plus,
    "l1_sparse": l1_sparse,
    "random_label": random_label,
    "salun": salun,
    "scrub": scrub,
    "del": deletion_by_localization,
}


def unlearn(method: str, model: nn.Module, retain: ArrayData, forget: ArrayData, cfg: UnlearnConfig) -> nn.Module:
    """Run the method registered as `method`; raises ValueError naming the known methods for an unknown name."""
    if method not in UNLEARNING_METHODS:
        raise ValueError(f"unknown unlearning method '{method}'; known: {', '.join(UNLEARNING_METHODS)}")
    return UNLEARNING_METHODS[method](model, retain, forget, cfg)


__all__ = ["UNLEARNING_METHODS", "ArrayData", "Mask", "UnlearnConfig", "UnlearnFn", "unlearn"]
