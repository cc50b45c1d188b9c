"""Misbehaving participants, for tests and benchmarks of the robust strategies only.

Never on by default: a node poisons an update only when it is started with an explicit attack
(`trustmesh compute-node --attack OWNER=MODE[:PARAM]`, `trustmesh iot-node --attack MODE`), and
says so in its log for every update it poisons and in its status line. The modes:

    scale:K       the update (local model - global model) multiplied by K (default 100)
    sign_flip     the update negated: global - (local - global)
    noise:SIGMA   Gaussian noise of standard deviation SIGMA (default 1) added to every weight
    label_flip    trains on labels C - 1 - y (the data is poisoned, not the update)
    free_rider    returns the global model unchanged (no training contributes)

Deterministic, like honest training: the noise comes from a generator seeded with the task's
training seed, so two runs of a benchmark poison alike.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

MODES = {"scale": 100.0, "sign_flip": None, "noise": 1.0, "label_flip": None, "free_rider": None}


class AttackError(ValueError):
    """An attack spec that cannot be one; the message says what would be."""


@dataclass(frozen=True)
class Attack:
    mode: str
    param: float | None = None

    def __str__(self) -> str:
        return self.mode if self.param is None else f"{self.mode}:{self.param:g}"

    def poison_labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels this participant trains on."""
        return (num_classes - 1 - y).astype(y.dtype) if self.mode == "label_flip" else y

    def poison_update(self, global_state: Mapping, local_state: Mapping, seed: int) -> OrderedDict:
        """The model this participant reports, from the global model it started from and the one
        it trained (float32 tensors by name)."""
        import torch

        if self.mode in ("label_flip",):
            return OrderedDict(local_state)
        out = OrderedDict()
        generator = torch.Generator().manual_seed(seed % (1 << 63))
        for name, local in local_state.items():
            start = global_state[name].to(torch.float64)
            delta = local.to(torch.float64) - start
            if self.mode == "scale":
                value = start + self.param * delta
            elif self.mode == "sign_flip":
                value = start - delta
            elif self.mode == "noise":
                value = local.to(torch.float64) + self.param * torch.randn(local.shape, generator=generator,
                                                                           dtype=torch.float64)
            else:  # free_rider
                value = start
            out[name] = value.to(torch.float32)
        return out


def parse_attack(text: str) -> Attack:
    """"scale:100", "sign_flip", "noise:0.5", "label_flip", "free_rider"."""
    mode, _, param = text.strip().partition(":")
    if mode not in MODES:
        raise AttackError(f"attack {text!r}: the mode must be one of {', '.join(MODES)} (e.g. scale:100)")
    if MODES[mode] is None:
        if param:
            raise AttackError(f"attack {mode} takes no parameter; got {text!r}")
        return Attack(mode)
    try:
        value = float(param) if param else MODES[mode]
    except ValueError:
        raise AttackError(f"attack {text!r}: {param!r} is not a number") from None
    if not np.isfinite(value) or (mode == "noise" and value <= 0):
        raise AttackError(f"attack {text!r}: the parameter must be a finite number{' > 0' if mode == 'noise' else ''}")
    return Attack(mode, value)


def parse_targeted(text: str) -> tuple[str, Attack]:
    """"OWNER=MODE[:PARAM]": the data owner (an IoT node's public key) whose updates are poisoned."""
    owner, sep, spec = text.partition("=")
    if not sep or not owner.strip():
        raise AttackError(f"attack {text!r}: write OWNER=MODE[:PARAM], OWNER the data owner's public key "
                          f"(e.g. 02ab…=scale:100)")
    return owner.strip(), parse_attack(spec)
