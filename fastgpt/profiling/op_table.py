"""The per-op latency table of ``fastgpt profile``: torch.profiler events grouped by what they compute.

Every op's *self* time is counted once (time inside an op minus time inside
the ops it called), so nothing is counted twice however ops nest. The time is

* on a CPU, self CPU time;
* on CUDA, device time: each GPU kernel (and memcpy/memset) is charged to the
  op that launched it. Device work no op claims is shown under ``other``.

Ops are grouped by name into ``attention`` (PyTorch's fused attention and its
backward, fastgpt's Triton attention and decode ops), ``layernorm``, ``gelu``,
``matmul`` (mm/addmm/bmm/linear and their backward), ``optimizer`` (everything
inside ``Optimizer.step``; train steps only) and ``other`` (embeddings, adds,
copies, the loss, and the Python between ops -- the self time of the pass's
``record_function`` label). An op called by a grouped op belongs to its
caller's group: the bmm inside PyTorch's math attention is attention time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

GROUPS = ("attention", "layernorm", "gelu", "matmul", "optimizer", "other")

# Which fastgpt.ops dispatch functions run inside each group: their paths fill the table's path column.
GROUP_DISPATCH_OPS = {
    "attention": ("causal_attention", "cached_attention"),
    "layernorm": ("layer_norm", "dropout_add_layer_norm"),
    "gelu": ("gelu", "linear_gelu"),
}

_MATMUL_ATEN = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                "aten::_addmm_activation", "aten::addmv", "aten::mv", "aten::dot"}
_MATMUL_AUTOGRAD = ("MmBackward", "AddmmBackward", "BmmBackward", "BaddbmmBackward", "MvBackward",
                    "AddmvBackward", "LinearBackward")
_AUTOGRAD_PREFIX = "autograd::engine::evaluate_function: "
_OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
PYTHON_ROW = "(python between ops)"
UNCLAIMED_ROW = "(device work no op launched)"


def op_group(name: str) -> str:
    """The group of one op by its profiler name (the optimizer group needs ancestry: see ``build_op_table``)."""
    if name.startswith(_OPTIMIZER_PREFIXES):
        return "optimizer"
    bare = name[len(_AUTOGRAD_PREFIX):] if name.startswith(_AUTOGRAD_PREFIX) else name
    lower = bare.lower()
    if any(key in lower for key in ("attention", "scaled_dot_product", "scaleddotproduct", "attn", "fmha")):
        return "attention"
    if "layer_norm" in lower or "layernorm" in lower:
        return "layernorm"
    if "gelu" in lower:
        return "gelu"
    if bare in _MATMUL_ATEN or bare.startswith(_MATMUL_AUTOGRAD):
        return "matmul"
    return "other"


def op_path(name: str, group: str) -> str:
    """Which implementation one profiled op is: fastgpt's Triton ops are the ``fastgpt::`` ones."""
    if name.startswith("fastgpt::"):
        return "triton"
    if name.startswith("("):
        return ""
    if group in GROUP_DISPATCH_OPS:
        return "eager"
    return "torch"


@dataclass
class OpRow:
    name: str
    group: str
    calls: float      # per pass
    ms: float         # per pass
    path: str


@dataclass
class OpGroup:
    name: str
    ms: float = 0.0   # per pass
    ops: list[OpRow] = field(default_factory=list)


@dataclass
class OpTable:
    """Self time per pass, by group and op. ``basis`` is ``"self CPU"`` or ``"self device"``."""

    basis: str
    passes: int
    groups: list[OpGroup]
    note: Optional[str] = None

    @property
    def total_ms(self) -> float:
        return sum(g.ms for g in self.groups)

    def share(self, ms: float) -> float:
        total = self.total_ms
        return ms / total if total > 0 else 0.0

    def group(self, name: str) -> Optional[OpGroup]:
        return next((g for g in self.groups if g.name == name), None)

    def to_dict(self) -> dict:
        return {
            "basis": self.basis, "passes": self.passes, "total_ms_per_pass": self.total_ms, "note": self.note,
            "groups": [{"name": g.name, "ms_per_pass": g.ms, "share": self.share(g.ms),
                        "ops": [{"name": o.name, "calls_per_pass": o.calls, "ms_per_pass": o.ms,
                                 "share": self.share(o.ms), "path": o.path} for o in g.ops]}
                       for g in self.groups],
        }


def event_group(event) -> str:
    """The group of a profiled op: that of its outermost grouped caller, else its own name's.

    So the matmuls and softmax inside PyTorch's math attention count as
    attention, and everything AdamW runs as optimizer.
    """
    group = "other"
    node = event
    while node is not None:
        own = op_group(node.name)
        if own == "optimizer":
            return own
        if own != "other":
            group = own
        node = getattr(node, "cpu_parent", None)
    return group


def _backward_root(event):
    node = event
    while node is not None:
        if node.name.startswith(_AUTOGRAD_PREFIX):
            return node
        node = getattr(node, "cpu_parent", None)
    return None


def _grouper(cpu_events: list) -> Callable:
    """event -> group, sending backward ops to their forward op's group.

    Autograd runs a forward op's backward under ``autograd::engine::evaluate_function:
    XBackward0``, whose (fwd_thread, sequence_nr) are those of the forward op: so the
    BmmBackward0 of a bmm inside math attention is attention time too.
    """
    forward: dict[tuple[int, int], str] = {}
    for event in cpu_events:
        seq = getattr(event, "sequence_nr", -1)
        if seq >= 0 and _backward_root(event) is None:
            group = event_group(event)
            if group != "other" or (event.thread, seq) not in forward:
                forward[(event.thread, seq)] = group

    def group_of(event) -> str:
        own = event_group(event)
        root = _backward_root(event)
        if root is None:
            return own
        key = (getattr(root, "fwd_thread", None), getattr(root, "sequence_nr", -1))
        return forward.get(key, "other") if forward.get(key, "other") != "other" else own

    return group_of


def _is_device(event) -> bool:
    return getattr(event.device_type, "name", str(event.device_type)) != "CPU"


def build_op_table(events: Iterable, passes: int, *, device_time: bool) -> OpTable:
    """Group torch.profiler ``FunctionEvent``s (``prof.events()``) into an ``OpTable``, per pass.

    ``device_time``: charge GPU kernel time to launching ops (CUDA) instead of
    using self CPU time.
    """
    events = list(events)
    cpu_events = [e for e in events if not _is_device(e) and not e.is_async]
    # A record_function label also appears as a GPU "user annotation" spanning its
    # kernels, linked to the label's CPU event: never count that span as a kernel.
    annotations = {e.name for e in cpu_events if getattr(e, "is_user_annotation", False)}
    group_of = _grouper(cpu_events)
    us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in cpu_events:
        if device_time:
            spent = sum(k.duration for k in event.kernels if k.name != event.name and k.name not in annotations)
        else:
            spent = event.self_cpu_time_total
        group = group_of(event)
        # A label's own self time is the Python that ran between the ops inside it.
        name = PYTHON_ROW if getattr(event, "is_user_annotation", False) and group == "other" else event.name
        key = f"{group}\0{name}"
        us[key] += spent
        calls[key] += 1
    if device_time:
        launched = sum(us.values())
        on_device = sum(e.time_range.elapsed_us() for e in events
                        if _is_device(e) and not e.is_async and e.name not in annotations)
        if on_device - launched > 0.005 * max(on_device, 1.0):
            key = f"other\0{UNCLAIMED_ROW}"
            us[key] += on_device - launched
            calls[key] += 0
        if on_device == 0:
            table = build_op_table(events, passes, device_time=False)
            table.note = "the profiler recorded no device kernels, so this is self CPU time"
            return table

    table_groups = {name: OpGroup(name) for name in GROUPS}
    for key, spent in us.items():
        group, name = key.split("\0", 1)
        if device_time and spent == 0:
            continue  # ops that launch no kernel (views, shape logic) cost no device time
        row = OpRow(name=name, group=group, calls=calls[key] / passes, ms=spent / 1000 / passes,
                    path=op_path(name, group))
        table_groups[group].ops.append(row)
        table_groups[group].ms += row.ms
    for g in table_groups.values():
        g.ops.sort(key=lambda o: o.ms, reverse=True)
    # Every group is listed (an empty one says the op never ran), the optimizer's only in train steps.
    kept = [g for g in table_groups.values() if g.name != "optimizer" or g.ops]
    return OpTable(basis="self device" if device_time else "self CPU", passes=passes, groups=kept)
