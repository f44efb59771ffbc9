"""The weight as the kernels read it, packed once and kept while the weight is unchanged.

The kernels read a weight tap's ``[reduction, columns]`` tile along contiguous memory,
so the weight ``[C_in, C_out/g, *k]`` is repacked with its column channel axis
innermost (``pack``).  Repacking on every call would cost a copy of the weight per call,
so ``PackedWeights`` keeps the packed copy of each weight it has seen:

* keyed by the weight tensor's identity (a weak reference, never its address: an
  address is reused once a tensor dies) and the packing asked for;
* valid while the tensor's version counter, storage, shape, strides, dtype and device
  are unchanged (every in-place update through the tensor, an optimizer step or
  ``load_state_dict``, bumps the version), repacked otherwise;
* dropped when the weight dies, and the least recently used dropped beyond
  ``CAPACITY`` weights;
* never kept for an inference tensor (it has no version counter) or during CUDA-graph
  capture (the graph must record the packing, so that a replay after an in-place update
  reads the new weight);
* the copy is made outside inference mode, so that calls outside it can use it.

A weight being trained changes every step, so while autograd records a call or runs
its backward (``trained``) the copy of a weight that requires grad is made but not
kept: training holds no second copy of its weights.  Under ``torch.compile`` the
compiled forward packs through here outside autograd, and keeps one copy per weight
between steps.  A change made through ``weight.data`` bypasses the version
counter: ``tritondeconv.clear_weight_cache(model)`` forgets the model's copies.
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict

import torch

from .kernels.common import capturing
from .layout import strides_in_order

CAPACITY = 256  # weights whose packed copies are kept


@functools.lru_cache(maxsize=1024)
def packed_strides(shape: tuple, columns: int) -> tuple:
    """The strides of a weight of ``shape`` ``[C_in, C_out/g, *k]`` packed for
    ``columns``: the taps outermost (in order), then the other channel axis, then axis
    ``columns`` with stride 1."""
    return strides_in_order(shape, (columns, 1 - columns, *range(len(shape) - 1, 1, -1)))


def pack(weight: torch.Tensor, columns: int) -> torch.Tensor:
    """The weight ``[C_in, C_out/g, *k]`` with axis ``columns`` (the GEMM's columns: 1,
    C_out, in the forward; 0, C_in, in the input gradient) innermost and the other
    channel axis next: same logical shape, new strides.  A weight whose columns are
    already contiguous (unit stride, or one column; a ``channels_last`` weight's output
    channels are) is read as it is: each of the kernel's weight tiles is then rows of
    contiguous columns, as in the packed copy, and no copy is made."""
    if weight.shape[columns] == 1 or weight.stride(columns) == 1:
        return weight
    strides = packed_strides(tuple(weight.shape), columns)
    return torch.empty_strided(weight.shape, strides, dtype=weight.dtype, device=weight.device).copy_(weight)


class PackedWeights:
    """The packed copies of weights (see the module docstring); ``copies`` counts the
    copies made, for tests and tools."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.copies = 0
        self._entries: OrderedDict[tuple[int, int], tuple[weakref.ref, tuple, torch.Tensor | None]] = OrderedDict()
        self._lock = threading.RLock()  # re-entrant: a weight may die (and drop its entry) while the lock is held
        self._training = ThreadDepth()

    def get(self, weight: torch.Tensor, columns: int) -> torch.Tensor:
        """``weight`` packed for ``columns`` (``pack``), from the kept copy when it is
        current.  Inside ``trained``, a weight that requires grad is about to change: its
        kept copy is used once more if current, and dropped."""
        if weight.is_inference() or capturing(weight):
            return self._pack(weight, columns)
        key = (id(weight), columns)
        keep = not (weight.requires_grad and self._training.depth)
        if not keep and key not in self._entries:  # (the common case in training: nothing kept to drop)
            return self._pack(weight, columns)
        state = (weight._version, weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, weight.device)
        with self._lock:
            entry = self._entries.get(key) if keep else self._entries.pop(key, None)
            if entry is not None and entry[0]() is weight and entry[1] == state:
                if keep:
                    self._entries.move_to_end(key)
                return weight if entry[2] is None else entry[2]
        if not keep:
            return self._pack(weight, columns)
        with torch.inference_mode(False):
            packed = self._pack(weight.detach(), columns)
        ref = weakref.ref(weight, lambda dead, key=key: self._drop(key, dead))
        with self._lock:
            # A weight already laid out as packed is remembered as such (None): no copy kept.
            self._entries[key] = (ref, state, None if packed.data_ptr() == weight.data_ptr() else packed)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return weight if packed.data_ptr() == weight.data_ptr() else packed

    def trained(self) -> ThreadDepth:
        """A context in which no copy is kept of a weight that requires grad (autograd's
        recorded calls and their backward); contexts nest, per thread."""
        return self._training

    def __len__(self) -> int:
        """How many packed copies (or already-packed weights) are kept."""
        return len(self._entries)

    def forget(self, weight: torch.Tensor) -> int:
        """Drop the copies kept for ``weight``; returns how many there were."""
        with self._lock:
            keys = [key for key in ((id(weight), 0), (id(weight), 1))
                    if key in self._entries and self._entries[key][0]() is weight]
            for key in keys:
                del self._entries[key]
        return len(keys)

    def _pack(self, weight: torch.Tensor, columns: int) -> torch.Tensor:
        packed = pack(weight, columns)
        if packed.data_ptr() != weight.data_ptr():
            self.copies += 1
        return packed

    def _drop(self, key: tuple[int, int], dead: weakref.ref) -> None:
        """The weight of ``key`` died: drop its entry (unless the key now belongs to a
        new tensor that reuses the address)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is dead:
                del self._entries[key]


class ThreadDepth(threading.local):
    """A per-thread nesting depth and the context that counts it: ``with depth:`` is one
    level more in this thread for the block; ``depth.depth`` is 0 in a thread that never
    entered (a class default: reading it raises nothing, where ``getattr`` with a default
    on a plain ``threading.local`` pays for a caught exception on every miss)."""

    depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc) -> None:
        self.depth -= 1


PACKED = PackedWeights()
