"""The fold rules of ``convert``, shared by its two passes: which modules fold into
which, why a candidate does not, and what the folded module is.

The ``nn.Sequential`` pass (``sequential``) and the pass over traced forward code
(``traced``) find candidates their own way (consecutive children; a value used alone by
the next call) and decide and fold them here:

* a nearest ``nn.Upsample`` then an ``nn.Conv2d``: one ``UpsampleConv2d``
  (``upsample_pair``, ``upsample_refusal``, ``fold_upsample``; the refusal lives in
  ``tritondeconv.folding``, below ``UpsampleConv2d.from_modules``, which applies it too);
* one of our transposed convolutions, then a batch norm, an activation module, or both:
  the convolution with the batch norm in its weight and bias and the activation in its
  epilogue (``block_after``, ``fuse_refusal``, ``fuse``);
* one of our transposed convolutions whose output is concatenated with a skip tensor:
  a ``ConcatUpsample`` (``concat_class``, ``concat_refusal``).

A fold changes the module it is given: the ``nn.Sequential`` pass gives the model's own
(which keeps its identity), the traced pass a new module for the traced model.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn.utils import parametrize

from .. import fusing, nn
from ..folding import fold_refusal as upsample_refusal
from ..folding import has_hooks, integer_scale
from .swap import OURS

__all__ = ["Block", "block_after", "concat_class", "concat_refusal", "fold_upsample", "fuse", "fuse_refusal",
           "upsample_pair", "upsample_refusal"]


def upsample_pair(up: torch.nn.Module | None, conv: torch.nn.Module | None) -> bool:
    """Whether ``up`` then ``conv`` is a candidate fold: a nearest ``Upsample`` then a
    ``Conv2d`` not folded yet (``upsample_refusal`` says whether it folds)."""
    return (isinstance(up, torch.nn.Upsample) and up.mode == "nearest" and isinstance(conv, torch.nn.Conv2d)
            and not isinstance(conv, nn.UpsampleConv2d))


def fold_upsample(up: torch.nn.Upsample, conv: torch.nn.Conv2d) -> None:
    """Make ``conv`` the fold of ``up`` and itself, an ``UpsampleConv2d``, by a change of
    class (the same module: parameters, state-dict keys and state-dict hooks kept;
    ``upsample_refusal`` said it folds)."""
    conv.__class__ = nn.UpsampleConv2d
    conv.scale_factor = integer_scale(up)


@dataclasses.dataclass(frozen=True)
class Block:
    """One of our transposed convolutions and the modules directly after it that fuse
    into it: a batch norm, then an activation (with the epilogue computing it)."""

    conv: torch.nn.Module
    batch_norm: torch.nn.Module | None
    activation: torch.nn.Module | None
    epilogue: tuple[str, float] | None

    @property
    def members(self) -> list[torch.nn.Module]:
        """The convolution, then the modules fused into it, in the order they run."""
        return [m for m in (self.conv, self.batch_norm, self.activation) if m is not None]


def block_after(conv: torch.nn.Module | None, first: torch.nn.Module | None,
                second: torch.nn.Module | None) -> Block | None:
    """The block of ``conv`` when ``first`` runs directly after it and ``second`` directly
    after ``first`` (None where nothing does): a batch norm first, then an activation
    the epilogue computes (either may be missing); None when ``conv`` is not one of our
    transposed convolutions or nothing after it fuses."""
    if not isinstance(conv, OURS):
        return None
    batch_norm = first if isinstance(first, torch.nn.modules.batchnorm._BatchNorm) else None
    activation = second if batch_norm is not None else first
    epilogue = fusing.epilogue_of(activation) if activation is not None else None
    if batch_norm is None and epilogue is None:
        return None
    return Block(conv, batch_norm, activation if epilogue else None, epilogue)


def fuse_refusal(block: Block, registrations: int) -> str | None:
    """Why ``block`` (its convolution registered ``registrations`` times in the model)
    cannot be fused into its convolution, or None."""
    conv = block.conv
    if registrations > 1:
        return "the convolution is also used elsewhere in the model"
    if parametrize.is_parametrized(conv):
        return "the convolution is parametrized"
    if conv.activation is not None:
        return "the convolution already applies an activation"
    if block.batch_norm is not None and (why := fusing.batch_norm_refusal(conv, block.batch_norm)) is not None:
        return why
    if any(has_hooks(module) for module in block.members):
        return "a module of the block has hooks, which would not see the values they see now"
    return None


def fuse(block: Block, conv: torch.nn.Module) -> None:
    """Fold ``block``'s batch norm into ``conv``'s weight and bias (new parameters) and its
    activation into ``conv``'s epilogue; ``conv`` is ``block.conv`` or a copy of it
    (``fuse_refusal`` said the block fuses)."""
    if block.batch_norm is not None:
        fusing.fold_batch_norm(conv, block.batch_norm)
    if block.epilogue:
        conv.activation, conv.negative_slope = block.epilogue


def concat_class(conv: torch.nn.Module) -> type | None:
    """The ``ConcatUpsample`` class that computes ``torch.cat([conv(x), skip], 1)`` in one
    call, or None when ``conv`` is not one of our transposed convolutions."""
    return nn.CONCAT.get(type(conv))


def concat_refusal(conv: torch.nn.Module, registrations: int) -> str | None:
    """Why ``conv`` (registered ``registrations`` times in the model), whose output is
    concatenated, cannot become its ``concat_class``, or None."""
    if registrations > 1:
        return "the convolution is also used elsewhere in the model"
    if has_hooks(conv):
        return "the convolution has hooks, which would see the concatenation"
    return None
