"""``convert``'s pass over every ``nn.Sequential`` in a model: the fold rules (``rules``)
applied to consecutive children, in place.  A fold keeps the convolution module (its
class changes, or its parameters for a batch norm's fold) and gives the places of the
modules folded into it to ``Identity`` modules, so the model stays the same object."""
from __future__ import annotations

import collections
import itertools

import torch

from . import rules


def _registrations(model: torch.nn.Module) -> collections.Counter:
    """How many times each module (by id) is registered as a child in ``model``."""
    return collections.Counter(
        id(child) for module in model.modules() for child in module._modules.values() if child is not None)


def _sequentials(model: torch.nn.Module) -> list[tuple[str, torch.nn.Sequential, list[str]]]:
    """Every ``nn.Sequential`` in ``model``: the prefix that names its children, it, and
    its children's names (taken before anything is replaced)."""
    return [(f"{name}." if name else "", seq, list(seq._modules))
            for name, seq in model.named_modules() if isinstance(seq, torch.nn.Sequential)]


def fold_upsamples(model: torch.nn.Module, left: list[str]) -> int:
    """Fold every ``Upsample(mode="nearest")`` directly followed by a ``Conv2d`` inside an
    ``nn.Sequential``: the upsampler's place takes an ``Identity`` and the convolution
    becomes an ``UpsampleConv2d`` (``rules.fold_upsample``).  A pair that does not fold
    (its convolution registered elsewhere too, hooks, ...) is left and named in
    ``left``.  Returns how many pairs were folded."""
    registrations = _registrations(model)
    folded = 0
    for prefix, seq, names in _sequentials(model):
        for a, b in itertools.pairwise(names):
            up, conv = seq._modules[a], seq._modules[b]
            if not rules.upsample_pair(up, conv):
                continue
            why = rules.upsample_refusal(up, conv, registrations[id(conv)])
            if why is None:
                seq._modules[a] = torch.nn.Identity()
                rules.fold_upsample(up, conv)
                folded += 1
            else:
                left.append(f"{prefix}{a}+{b} ({why})")
    return folded


def fuse(model: torch.nn.Module, left: list[str]) -> int:
    """In every ``nn.Sequential``: fold each batch norm that directly follows one of our
    transposed convolutions into it, and the activation module after them (or directly
    after the convolution) into its epilogue (``rules.fuse``); their places take
    ``Identity`` modules.  A block that does not fuse is left and named in ``left``.
    Returns how many convolutions took something in."""
    registrations = _registrations(model)
    fused = 0
    for prefix, seq, names in _sequentials(model):
        for i, name in enumerate(names):
            following = [seq._modules[n] for n in names[i + 1:i + 3]]
            following += [None] * (2 - len(following))
            block = rules.block_after(seq._modules[name], *following)
            if block is None:
                continue
            members = names[i:i + len(block.members)]
            why = rules.fuse_refusal(block, registrations[id(block.conv)])
            if why is not None:
                left.append(f"{prefix}{'+'.join(members)} ({why})")
                continue
            rules.fuse(block, block.conv)
            for folded in members[1:]:
                seq._modules[folded] = torch.nn.Identity()
            fused += 1
    return fused
