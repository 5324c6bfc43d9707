"""The long-tail baselines BTM is compared with, one recipe each. Five are options of the `long_tail` objective
(any method, `thrifty train --objective SPEC`); cRT re-trains the classifier of a finished `ce` run
(`retrain_classifier` with `Stage2Config.crt()`); BTM is `BTMRun` (stage 1 = the `mixup` recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from thrifty.longtail.stage2 import Stage2Config


@dataclass(frozen=True)
class Baseline:
    name: str
    objective: str  # the long_tail objective spec that trains it
    reference: str
    after: str | None = None  # re-trains the classifier of this baseline's model (two-stage recipes)
    stage2: Stage2Config | None = None


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("ce", "long_tail", "cross-entropy, instance-balanced batches"),
        Baseline(
            "cb-reweight",
            "long_tail:criterion=cb,beta=0.9999",
            "class-balanced loss, effective-number weights (Cui et al. 2019)",
        ),
        Baseline("cb-resample", "long_tail:balance=class", "class-balanced sampler (class-aware sampling), CE"),
        Baseline(
            "logit-adjust",
            "long_tail:criterion=logit_adjust,tau=1.0",
            "logit-adjusted loss (Menon et al. 2021); tau = 1 is Balanced Softmax (Ren et al. 2020)",
        ),
        Baseline(
            "crt",
            "long_tail",
            "decoupled classifier re-training (Kang et al. 2020): the ce model's head re-initialised and re-trained "
            "on class-balanced batches, backbone frozen",
            after="ce",
            stage2=Stage2Config.crt(),
        ),
        Baseline("mixup", "long_tail:mixup=0.2", "input mixup, alpha 0.2 (MiSLAS stage 1 = BTM's theta0)"),
    )
}
