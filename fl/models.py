"""Torch models built from a workflow's `model` spec, and checks of model states against a spec.

A model type is one class: subclass `ModelType`, set `name`, implement `build` (and `initialize`
if its layers are not all nn.Linear). Subclassing registers it (`MODEL_TYPES`). The spec rules
themselves live in `trustmesh.scheduling.workflow.MODEL_CHECKS`, the ones the workflow
processor enforces on chain, so a spec that deployed is a spec we can build and vice versa.

Initialization is a function of the seed only: parameters are created on the meta device (no
global RNG touched) and then filled from a private `torch.Generator`, with PyTorch's default
nn.Linear scheme (kaiming-uniform weights with a = sqrt(5), uniform(+-1/sqrt(fan_in)) biases).
Every node that builds the same spec with the same seed gets bit-identical parameters.

A *state* is an ordered mapping name -> float32 CPU tensor, in the model's state_dict order.
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from trustmesh.scheduling.workflow import MODEL_CHECKS, DefinitionError

MAX_SEED = 2**32 - 1  # what the workflow schema allows; torch and numpy both take it


class ModelSpecError(ValueError):
    """A model spec we cannot build; the message names the field and the rule."""


class StateMismatchError(ValueError):
    """A model state whose names, shapes or dtypes differ from what the spec builds."""


# --------------------------------------------------------------------------- registry


class ModelType:
    """One kind of model. Subclasses with a `name` register themselves in MODEL_TYPES."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in MODEL_TYPES:
                raise TypeError(f"model type {cls.name!r} is registered twice")
            MODEL_TYPES[cls.name] = cls

    def check(self, spec: Mapping) -> None:
        """Raise ModelSpecError unless `spec` is valid; by default the on-chain rule of the type."""
        rule = MODEL_CHECKS.get(self.name)
        if rule is None:
            raise ModelSpecError(
                f"model type {self.name!r} has no rule in trustmesh.scheduling.workflow.MODEL_CHECKS; "
                f"add one there so the workflow processor accepts it"
            )
        try:
            rule(dict(spec), "model")
        except DefinitionError as exc:
            raise ModelSpecError(str(exc)) from None

    def build(self, spec: Mapping, device: str | torch.device) -> nn.Module:
        raise NotImplementedError

    def exact_predictions(self, spec: Mapping, state: Mapping[str, torch.Tensor], x) -> torch.Tensor:
        """The class each row of x gets, computed so that every machine and thread count gets
        the same answer (see `exact_predictions` below); for checks an auditor redoes."""
        raise NotImplementedError(f"model type {self.name!r} has no exact forward pass; update_checks.min_accuracy "
                                  f"cannot be used with it")

    def initialize(self, model: nn.Module, generator: torch.Generator) -> None:
        """PyTorch's default nn.Linear init, drawn from `generator` in module order."""
        for module in model.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, generator)
            elif any(True for _ in module.parameters(recurse=False)):
                raise NotImplementedError(
                    f"{type(self).__name__}.initialize does not know {type(module).__name__}; override it"
                )


MODEL_TYPES: dict[str, type[ModelType]] = {}


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


# --------------------------------------------------------------------------- mlp


class MLP(nn.Module):
    """input_dim -> hidden[0] -> ... -> num_classes, ReLU between layers, logits out.

    Parameter names are layers.{i}.weight / layers.{i}.bias, i = 0..len(hidden): they are part
    of the stored model format, so do not rename them.
    """

    def __init__(self, input_dim: int, hidden: list[int], num_classes: int, device=None):
        super().__init__()
        widths = [input_dim, *hidden, num_classes]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, device=device) for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class MLPType(ModelType):
    name = "mlp"

    def build(self, spec: Mapping, device) -> nn.Module:
        return MLP(spec["input_dim"], list(spec["hidden"]), spec["num_classes"], device=device)

    def exact_predictions(self, spec, state, x):
        h = torch.as_tensor(x, dtype=torch.float64)
        count = len(spec["hidden"]) + 1
        for i in range(count):
            weight = state[f"layers.{i}.weight"].to(torch.float64)
            acc = state[f"layers.{i}.bias"].to(torch.float64).expand(h.shape[0], -1).clone()
            for k in range(weight.shape[1]):  # one input feature at a time: a fixed summation order
                acc = torch.add(acc, torch.mul(h[:, k:k + 1], weight[:, k]))
            h = torch.relu(acc) if i < count - 1 else acc
        return torch.argmax(h, dim=1)  # ties: the first class


# --------------------------------------------------------------------------- public API


def exact_predictions(spec: Mapping, state: Mapping[str, torch.Tensor], x) -> torch.Tensor:
    """Predicted classes of the rows of x, reproducible on every machine: float64, every multiply
    and add one correctly rounded elementwise operation in a fixed order (a BLAS matmul sums in
    an order that depends on the thread count and the CPU), argmax ties to the first class."""
    return model_type(spec).exact_predictions(spec, state, x)


def model_type(spec: Any) -> ModelType:
    """The registered type of `spec`, after checking the spec against that type's rules."""
    if not isinstance(spec, Mapping):
        raise ModelSpecError(f"model spec must be a map like {{'type': 'mlp', ...}}, got {type(spec).__name__}")
    name = spec.get("type")
    if name not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise ModelSpecError(f"model.type must be one of {known}; got {name!r}")
    kind = MODEL_TYPES[name]()
    kind.check(spec)
    return kind


def check_seed(seed: Any, field: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ModelSpecError(f"{field} must be an integer between 0 and {MAX_SEED}; got {seed!r}")
    return seed


def build_model(spec: Mapping, *, seed: int) -> nn.Module:
    """A freshly initialized model for `spec`; equal (spec, seed) give bit-identical parameters."""
    kind = model_type(spec)
    generator = torch.Generator().manual_seed(check_seed(seed))
    # Built on the meta device so construction draws nothing from the global RNG.
    model = kind.build(spec, "meta").to_empty(device="cpu")
    kind.initialize(model, generator)
    return model


def model_shapes(spec: Mapping) -> OrderedDict[str, tuple[int, ...]]:
    """name -> shape of every state entry, in state_dict order, without allocating parameters."""
    return OrderedDict(_shapes_of(json.dumps(spec, sort_keys=True, separators=(",", ":"))))


@functools.lru_cache(maxsize=64)
def _shapes_of(canonical_spec: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Every model check asks this: building even a meta-device module costs ~1 ms, a canonical
    # JSON key microseconds. Specs are few (one per workflow), so a small cache holds them all.
    spec = json.loads(canonical_spec)
    meta = model_type(spec).build(spec, "meta")
    return tuple((name, tuple(t.shape)) for name, t in meta.state_dict().items())


def parameter_count(spec_or_model: Mapping | nn.Module) -> int:
    """Number of scalar parameters (what a stored model costs: 4 bytes each)."""
    if isinstance(spec_or_model, nn.Module):
        return sum(p.numel() for p in spec_or_model.parameters())
    return sum(math.prod(shape) for shape in model_shapes(spec_or_model).values())


def spec_digest(spec: Mapping) -> str:
    """sha256 hex of the spec as canonical JSON (sorted keys, no spaces): names the architecture."""
    from .model_format import spec_sha256

    model_type(spec)
    return spec_sha256(spec)


def state_of(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A detached float32 copy of the model's state, in state_dict order."""
    return OrderedDict(
        (name, t.detach().to("cpu", torch.float32, copy=True).contiguous())
        for name, t in model.state_dict().items()
    )


def check_state(spec: Mapping, state: Any) -> OrderedDict[str, torch.Tensor]:
    """`state` reordered to the spec's state_dict order, or StateMismatchError saying what differs."""
    if not isinstance(state, Mapping):
        raise StateMismatchError(f"a model state must be a map name -> tensor, got {type(state).__name__}")
    shapes = model_shapes(spec)
    missing = [n for n in shapes if n not in state]
    extra = [str(n) for n in state if n not in shapes]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
    for name, shape in shapes.items():
        tensor = state.get(name)
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name} is a {type(tensor).__name__}, not a tensor")
        elif tensor.dtype != torch.float32:
            problems.append(f"{name} is {tensor.dtype}, not torch.float32")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{name} has shape {list(tensor.shape)}, the spec needs {list(shape)}")
    if problems:
        raise StateMismatchError(
            f"model state does not fit model spec {_describe(spec)}: {'; '.join(problems)}"
        )
    return OrderedDict((name, state[name]) for name in shapes)


def load_state(model: nn.Module, spec: Mapping, state: Mapping) -> nn.Module:
    """Copy a checked state into `model` (built from the same spec)."""
    model.load_state_dict(check_state(spec, state), strict=True)
    return model


def _describe(spec: Mapping) -> str:
    shown = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return shown if len(shown) <= 120 else shown[:117] + "..."
