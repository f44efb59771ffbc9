"""CUDA graphs: capture what a model runs once, replay it for almost no host time.

A class of calls' first call tunes its kernels (times candidates, a second or more),
which cannot happen during a capture: there the tuner takes the cost model's pick
untimed, with a warning, and remembers nothing.  So run each class once before
capturing: ``warm_up(model, *inputs)`` runs the model's forward and backward on
example inputs outside any capture (tuning and preparing every layer of ours in it),
leaving its parameters' gradients as they were.  ``torch.cuda.make_graphed_callables``
and ``torch.compile(mode="reduce-overhead")`` warm up themselves (a few eager runs
before they capture), so they need it only to keep tuning out of their own timings.

What a graph records is replayed as recorded: the weights are read (and, where the
kernels read them packed, packed) inside the graph, so a replay after an optimizer's
in-place update sees the new weights.
"""
from __future__ import annotations

import torch


def warm_up(model: torch.nn.Module, *inputs, backward: bool = True) -> None:
    """Run ``model(*inputs)`` once, and with ``backward`` its backward too (of the sum of
    every output that requires grad, towards the parameters and inputs that require
    it), outside CUDA-graph capture: every class of calls it makes is tuned and prepared
    for the captures and replays to come.  The gradients are computed and dropped: no
    parameter's ``.grad`` changes."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("warm_up: call it before capturing, not during a CUDA-graph capture")
    outputs = model(*inputs)
    if not backward or not torch.is_grad_enabled():
        return
    outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))
               if isinstance(o, torch.Tensor) and o.requires_grad]
    wanted = [t for t in (*model.parameters(), *inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if outputs and wanted:
        torch.autograd.grad([o.sum() for o in outputs], wanted, allow_unused=True)
