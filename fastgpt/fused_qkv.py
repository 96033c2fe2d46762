"""Query, key and value as one parameter, behind the seed's three ``nn.Linear`` layers.

``MultiHeadAttention`` keeps one (3·d_out, d_in) weight and one (3·d_out) bias
in ``att.qkv`` (``FusedQKV``), so its forward is one matmul for all three
projections, in training as in inference, under autograd, torch.compile, DDP
and FSDP alike: there is one ordinary parameter, nothing to detect.

``att.W_query``, ``att.W_key`` and ``att.W_value`` stay where the seed's code
looks for them, as ``QKVPart`` layers (``nn.Linear`` subclasses, so LoRA code
that wraps every ``nn.Linear`` still finds them) that own no parameter:

* ``part.weight`` / ``part.bias`` are views of their rows of the fused tensors;
  ``part(x)`` computes that projection alone (a wrapper such as LoRA calls it).
* Assigning ``part.weight = nn.Parameter(t)`` -- the seed's weight loader does --
  copies ``t`` into those rows (shape checked; the fused parameter keeps its
  dtype, device and ``requires_grad``).
* ``state_dict()`` lists ``W_query.weight``, ``W_query.bias``, ``W_key.weight``,
  ... with the seed's shapes and order (the parts save them; ``att.qkv`` saves
  nothing), and ``load_state_dict`` loads them back, strictly, into the rows.
  ``att.qkv.weight`` / ``att.qkv.bias`` are accepted too (torch.distributed's
  state-dict helpers add a model's own parameter names); the parts, loaded
  after ``att.qkv``, win when both are given.

Seeded construction draws the seed's numbers: each part initialises its rows
with ``nn.Linear``'s own ``reset_parameters``, query, key, value in turn.

Gradients live on the fused parameter: ``att.qkv.weight.grad`` (rows 0..d_out
query, then key, then value); ``seed_named_grads(model)`` lists them under the
seed's parameter names.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn

PROJECTIONS = ("W_query", "W_key", "W_value")  # the seed's names, in its order (= row blocks of the fused weight)


class FusedQKV(nn.Module):
    """The one (3·d_out, d_in) weight and (3·d_out) bias (or None) of query, key and value."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.in_features, self.part_features = d_in, d_out
        self.weight = nn.Parameter(torch.empty(3 * d_out, d_in))
        self.bias = nn.Parameter(torch.empty(3 * d_out)) if bias else None

    def rows(self, index: int) -> slice:
        return slice(index * self.part_features, (index + 1) * self.part_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features=3×{self.part_features}, bias={self.bias is not None}"

    # The parts save and load these tensors under the seed's names.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Our own names are optional (the parts report what is missing), so load
        # whatever is there the usual way and drop only the "missing" complaints.
        missing_here: list[str] = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_here, unexpected_keys,
                                      error_msgs)

    def load_rows(self, kind: str, index: int, value, key: str, assign: bool, error_msgs: list) -> None:
        """Copy one part's checkpoint tensor ``value`` (saved under ``key``) into its rows of ``kind``."""
        param = getattr(self, kind)
        expected = (self.part_features, self.in_features) if kind == "weight" else (self.part_features,)
        if not isinstance(value, torch.Tensor):
            error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                              f"object from checkpoint but received {type(value)}")
            return
        if tuple(value.shape) != expected:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                              f"checkpoint, the shape in current model is {torch.Size(expected)}.")
            return
        with torch.no_grad():
            if assign and (param.is_meta or value.dtype != param.dtype or value.device != param.device):
                param = self._rebuilt(kind, value.dtype, value.device)
            try:
                _copy_rows(param, self.rows(index), value)
            except Exception as err:  # what torch reports for a failed copy (dtype, device, ...)
                error_msgs.append(f'While copying the parameter named "{key}", whose dimensions in the model are '
                                  f"{tuple(expected)} and whose dimensions in the checkpoint are "
                                  f"{tuple(value.shape)}, an exception occurred : {err.args}.")

    def _rebuilt(self, kind: str, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        # assign=True hands the model the checkpoint's tensors, dtype and device included.
        # One part cannot become the fused parameter, so the fused tensor moves to
        # the checkpoint's dtype and device instead, keeping any rows it holds.
        old = getattr(self, kind)
        new = torch.empty(old.shape, dtype=dtype, device=device)
        if not old.is_meta:
            new.copy_(old)
        param = nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(self, kind, param)
        return param


def _copy_rows(param: torch.Tensor, rows: slice, value: torch.Tensor) -> None:
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        # FSDP2 shards parameters as DTensors, whose slices are copies: gather
        # the whole tensor, write the rows, and shard it again the same way.
        from torch.distributed.tensor import Replicate

        full = param.full_tensor()
        full[rows].copy_(value.full_tensor() if isinstance(value, dtensor) else value)
        mesh = param.device_mesh
        param.copy_(dtensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
                    .redistribute(mesh, param.placements))
    else:
        param[rows].copy_(value)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


class QKVPart(nn.Linear):
    """``W_query``, ``W_key`` or ``W_value``: an ``nn.Linear`` over rows ``index`` of a ``FusedQKV``.

    It owns no parameter. ``fused`` is held as a plain reference, not a
    submodule, so the fused parameter is listed once, under ``att.qkv``.
    """

    def __init__(self, fused: FusedQKV, index: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = fused.in_features, fused.part_features
        object.__setattr__(self, "fused", fused)
        object.__setattr__(self, "index", index)
        self.reset_parameters()  # nn.Linear's initialisers, on these rows

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.fused.rows(self.index)]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        bias = self.fused.bias
        return None if bias is None else bias[self.fused.rows(self.index)]

    def __setattr__(self, name, value):
        if name in ("weight", "bias"):
            self._assign(name, value)
        else:
            super().__setattr__(name, value)

    def _assign(self, kind: str, value) -> None:
        name = PROJECTIONS[self.index]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}.{kind} must be a tensor (an nn.Parameter), got {type(value).__name__}: it is "
                            "one third of the fused query/key/value parameter and cannot be removed")
        if kind == "bias" and self.fused.bias is None:
            raise ValueError(f"this model has no query/key/value biases (config qkv_bias=False), so {name}.bias "
                             "cannot be set; build the model with qkv_bias=True to load biases")
        current = getattr(self, kind)
        if value.shape != current.shape:
            raise ValueError(f"{name}.{kind} has shape {tuple(current.shape)}; got a tensor of shape "
                             f"{tuple(value.shape)}")
        with torch.no_grad():  # the new values go into this part's rows of the fused parameter
            _copy_rows(getattr(self.fused, kind), self.fused.rows(self.index), value)

    def _kinds(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.fused.bias is not None else ("weight",)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for kind in self._kinds():
            value = getattr(self, kind)
            destination[prefix + kind] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        assign = local_metadata.get("assign_to_params_buffers", False)
        kinds = self._kinds()
        for kind in kinds:
            key = prefix + kind
            if key in state_dict:
                self.fused.load_rows(kind, self.index, state_dict[key], key, assign, error_msgs)
            else:
                missing_keys.append(key)
        if strict:
            unexpected_keys.extend(key for key in state_dict
                                   if key.startswith(prefix) and key[len(prefix):] not in kinds)


def seed_named_grads(model: nn.Module) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(name, gradient) for every parameter of the seed's model, in its order and under its names.

    The query/key/value gradients are views of the fused parameter's gradient
    (None before any backward). Compare gradients with the seed's model this way.
    """
    parts = {f"{name}.{kind}": module for name, module in model.named_modules() if isinstance(module, QKVPart)
             for kind in module._kinds()}
    for name, value in model.state_dict(keep_vars=True).items():
        if name in parts:
            part = parts[name]
            kind = name.rsplit(".", 1)[1]
            grad = getattr(part.fused, kind).grad
            yield name, None if grad is None else grad[part.fused.rows(part.index)]
        elif isinstance(value, nn.Parameter):
            yield name, value.grad
