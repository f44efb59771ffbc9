"""``convert``'s pass over a model's forward code as ``torch.fx`` traces it: the fold
rules (``rules``) applied to calls whose value is used alone by the next call, in a
``torch.fx.GraphModule`` sharing the model's modules.  A fold puts a new module at the
convolution's path in the traced model (sharing the convolution's parameters unless a
batch norm's fold makes new ones), so the model passed in keeps its modules and computes
as before."""
from __future__ import annotations

import collections
import copy

import torch

from .. import nn
from . import rules
from .swap import OURS


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, keeping our modules whole (as it keeps ``torch.nn``'s)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*OURS, nn.UpsampleConv2d)) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: torch.nn.Module, left: list[str]) -> torch.fx.GraphModule | None:
    """``model``'s forward code as ``torch.fx`` traces it (sharing ``model``'s modules),
    or None: for a module the tracer keeps whole (a single layer: nothing to fold in
    it), and, named in ``left``, when it does not trace."""
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        return None
    try:
        graph = tracer.trace(model)
    except Exception as error:  # noqa: BLE001 (any tracing failure: the forward stays as written)
        left.append("the forward code (not traceable by torch.fx: "
                    f"{type(error).__name__}: {str(error).splitlines()[0]})")
        return None
    return torch.fx.GraphModule(tracer.root, graph)


def _registrations(traced: torch.fx.GraphModule) -> collections.Counter:
    """How many times each module (by path) is called in the traced forward code."""
    return collections.Counter(node.target for node in traced.graph.nodes if node.op == "call_module")


def _replace_module(traced: torch.fx.GraphModule, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(traced.get_submodule(parent), name, module)


def _copy_of(conv: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new module of class ``cls`` with ``conv``'s attributes and parameters, held in
    its own table (so the traced model can replace them; the original keeps ``conv``)."""
    copied = copy.copy(conv)
    copied._parameters = dict(conv._parameters)
    copied.__class__ = cls
    return copied


def _upsampler(node: torch.fx.Node, traced: torch.fx.GraphModule) -> torch.nn.Module | None:
    """What computes ``node``'s value, as a module: the module it calls, or, for an
    ``F.interpolate(x, scale_factor=..., mode="nearest")`` call, the ``nn.Upsample``
    computing the same; None for anything else."""
    if node.op == "call_module":
        return traced.get_submodule(node.target)
    if node.op != "call_function" or node.target is not torch.nn.functional.interpolate:
        return None
    normalized = torch.fx.operator_schemas.normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None
    kwargs = normalized.kwargs
    if kwargs.get("mode", "nearest") != "nearest" or kwargs.get("size") is not None or kwargs.get("antialias"):
        return None
    scale = kwargs.get("scale_factor")
    if not isinstance(scale, (int, float, tuple, list)) or isinstance(scale, bool):
        return None
    return torch.nn.Upsample(scale_factor=tuple(scale) if isinstance(scale, (tuple, list)) else scale, mode="nearest")


def _fold_upsamples(traced: torch.fx.GraphModule, left: list[str]) -> int:
    """Fold every nearest upsampling (``F.interpolate`` or an ``nn.Upsample`` called in
    ``forward``) whose only use is a ``Conv2d`` module's input into a new
    ``UpsampleConv2d`` module (``UpsampleConv2d.from_modules``: the convolution's
    parameters shared).  Returns how many pairs were folded."""
    graph = traced.graph
    registrations = _registrations(traced)
    folded = 0
    for node in list(graph.nodes):
        source = node.args[0] if len(node.args) == 1 else None
        if node.op != "call_module" or node.kwargs or not isinstance(source, torch.fx.Node):
            continue
        up, conv = _upsampler(source, traced), traced.get_submodule(node.target)
        if not rules.upsample_pair(up, conv):
            continue
        why = "the upsampled tensor is used elsewhere too" if len(source.users) > 1 else \
            rules.upsample_refusal(up, conv, registrations[node.target])
        if why is not None:
            left.append(f"{source.name}+{node.target} in the forward code ({why})")
            continue
        _replace_module(traced, node.target, nn.UpsampleConv2d.from_modules(up, conv))
        node.args = (source.args[0],)
        graph.erase_node(source)
        folded += 1
    return folded


def _sole_user(node: torch.fx.Node | None) -> torch.fx.Node | None:
    """The module call that alone uses ``node``'s value, as its only argument, or None."""
    if node is None or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_module" and user.args == (node,) and not user.kwargs else None


def _fuse(traced: torch.fx.GraphModule, left: list[str]) -> int:
    """Fuse each block of ``rules.block_after`` (a batch-norm module that alone uses one
    of our transposed convolutions' output, and an activation module that alone uses
    theirs) into a copy of the convolution (``rules.fuse``).  Returns how many
    convolutions took something in."""
    graph = traced.graph
    registrations = _registrations(traced)
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        first = _sole_user(node)
        second = _sole_user(first)
        block = rules.block_after(*(traced.get_submodule(n.target) if n is not None else None
                                    for n in (node, first, second)))
        if block is None:
            continue
        chain = [first, second][:len(block.members) - 1]  # the calls folded in
        why = rules.fuse_refusal(block, registrations[node.target])
        if why is not None:
            left.append(f"{'+'.join(n.target for n in [node, *chain])} in the forward code ({why})")
            continue
        fused_conv = _copy_of(block.conv, type(block.conv))
        rules.fuse(block, fused_conv)
        _replace_module(traced, node.target, fused_conv)
        for folded in chain:
            folded.replace_all_uses_with(node)
            graph.erase_node(folded)
        fused += 1
    return fused


def _concatenated_upsampling(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(up, skip)`` where ``node`` is ``torch.cat([up, skip], 1)`` (or ``dim=1``), else
    None.  (Read off the call directly: ``torch.fx``'s argument normalisation finds
    ``cat``'s two schemas ambiguous on some PyTorch versions.)"""
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat) or len(node.args) > 2 \
            or set(node.kwargs) - {"tensors", "dim"}:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(tensors, (list, tuple)) or len(tensors) != 2 \
            or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return None
    return tensors[0], tensors[1]


def _concatenate(traced: torch.fx.GraphModule, left: list[str]) -> int:
    """Turn each ``torch.cat([up(x), skip], 1)`` whose first tensor is one of our
    transposed convolutions' output, used there alone, into one call of a copy of that
    convolution of its ``rules.concat_class``.  Returns how many were turned."""
    graph = traced.graph
    registrations = _registrations(traced)
    turned = 0
    for cat in list(graph.nodes):
        pair = _concatenated_upsampling(cat)
        if pair is None or pair[0].op != "call_module":
            continue
        up, skip = pair
        conv = traced.get_submodule(up.target)
        cls = rules.concat_class(conv)
        if cls is None or len(up.args) != 1 or up.kwargs or len(up.users) != 1:
            continue
        why = rules.concat_refusal(conv, registrations[up.target])
        if why is not None:
            left.append(f"{up.target}+{cat.name} in the forward code ({why})")
            continue
        _replace_module(traced, up.target, _copy_of(conv, cls))
        up.args = (up.args[0], skip)
        cat.replace_all_uses_with(up)
        graph.erase_node(cat)
        turned += 1
    return turned


def rewrite(model: torch.nn.Module, left: list[str], fuse: bool, fold_upsample: bool) -> tuple[torch.nn.Module, int]:
    """Trace ``model`` and, in its forward code, with ``fuse``, fuse blocks and then turn
    concatenations, and with ``fold_upsample``, fold upsamplings; what does not fold is
    named in ``left``.  Returns the traced model and how many folds it holds, or
    ``(model, 0)`` when nothing folded (or the model is a single layer, or does not
    trace)."""
    traced = _trace(model, left)
    if traced is None:
        return model, 0
    changed = (_fuse(traced, left) + _concatenate(traced, left) if fuse else 0) + \
        (_fold_upsamples(traced, left) if fold_upsample else 0)
    if not changed:
        return model, 0
    traced.graph.lint()
    traced.recompile()
    return traced, changed
