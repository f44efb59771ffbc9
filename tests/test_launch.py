"""The lean launch (``launcher.PreparedLaunch``): a class's repeated launches go straight to
the kernel Triton's JIT compiled for its first, with the arguments the JIT passes, and
only where the JIT would pick that same kernel; everything else goes through the JIT."""
import random

import torch
from reference import fresh_seed
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel, make_backend
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import tritondeconv
from tritondeconv.kernels import launcher


class _StandIn(CompiledKernel):
    """A compiled kernel whose launcher records its launches instead of running them."""

    def __init__(self):  # (nothing of Triton's is loaded: no GPU is needed)
        self.launches = []
        self.module, self.function, self.packed_metadata = None, 1234, ("metadata",)

    @property
    def run(self):
        return lambda *args: self.launches.append(args)


class _RecordingJit:
    """A JIT function with the real kernel's parameters whose launches record what they
    are passed."""

    def __init__(self, kernel):
        self.arg_names, self.calls = kernel.arg_names, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _requests(device, count: int) -> list:
    """``(request, config)`` of every launch of ``count`` random layers' forward and
    backward (both kernel families, the split sum among them), as their launchers make
    them (the launches themselves replaced)."""
    seen = []
    rng = random.Random(fresh_seed())
    with launcher.intercept(launch=lambda request, config: seen.append((request, config))):
        for _ in range(count):
            rank, groups = rng.choice((1, 2, 3)), rng.choice((1, 2))
            c_in, c_out = groups * rng.choice((1, 3, 8)), groups * rng.choice((1, 4, 16))
            dtype = rng.choice((torch.float16, torch.float32, torch.float64))
            x = torch.randn(rng.choice((1, 3)), c_in, *(rng.choice((2, 5)) for _ in range(rank)), device=device,
                            dtype=dtype)
            if rank > 1 and rng.random() < 0.5:
                x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels contiguous
            w = torch.randn(c_in, c_out // groups, *(rng.choice((1, 2, 3)),) * rank, device=device, dtype=dtype)
            x.requires_grad_(), w.requires_grad_()
            function = getattr(tritondeconv, f"conv_transpose{rank}d")
            y = function(x, w, torch.randn(c_out, device=device, dtype=dtype), rng.choice((1, 2)), 0, 0, groups)
            torch.autograd.grad(y, (x, w), torch.ones_like(y))
    return seen


def _moved(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s shape, strides and values one element past a 16-byte boundary."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    moved = torch.empty(span + 1, dtype=t.dtype, device=t.device).as_strided(t.shape, t.stride(), 1)
    return moved.copy_(t)


def test_the_lean_launch_passes_the_jits_arguments(device):
    """A prepared launch hands the compiled kernel's launcher the grid the JIT completes
    to three axes, the current stream, the kernel and its metadata, then every parameter
    in the signature's order, as the JIT binds them (the tensors as their addresses, the
    compile-time ones included); a tensor at another 16-byte alignment, or a launch hook
    of Triton's, sends the launch through the JIT, with the same arguments."""
    for request, config in _requests(device, 3):
        compiled, jit = _StandIn(), _RecordingJit(request.kernel)
        request.kernel = jit
        prepared = launcher.PreparedLaunch(request, config, compiled)
        tensors = request.args[:request.pointers]
        prepared.launch(*tensors)
        ((grid_x, grid_y, grid_z, stream, function, metadata, enter_metadata, enter, leave, *arguments),) = \
            compiled.launches
        values = {**request.constants, **config}
        expected = (*(t.data_ptr() for t in tensors), *request.args[request.pointers:],
                    *(values[name] for name in jit.arg_names[len(request.args):]))
        assert (grid_x, grid_y, grid_z) == (*request.grid(values), 1, 1)[:3]
        assert (stream, function, metadata, enter_metadata, enter, leave) == (0, 1234, ("metadata",), None, None, None)
        assert tuple(arguments) == expected and len(arguments) == len(jit.arg_names)
        assert not jit.calls
        prepared.launch(*tensors[:-1], _moved(tensors[-1]))
        knobs.runtime.launch_enter_hook.add(print)
        try:
            prepared.launch(*tensors)
        finally:
            knobs.runtime.launch_enter_hook.remove(print)
        assert len(compiled.launches) == 1 and len(jit.calls) == 2
        for grid, args, kwargs in jit.calls:
            assert grid == (grid_x, grid_y, grid_z) and args[request.pointers:] == expected[request.pointers:]
            assert kwargs == {k: v for k, v in config.items() if k not in jit.arg_names}


def _jit_key(kernel, arguments: tuple, options: dict) -> str:
    """The cache key under which Triton's JIT, compiling for an H100 (sm_90), looks up the
    kernel for these arguments: what it specialises on (the tensors' dtypes and the
    16-byte alignment of their addresses, each integer's value where it is 1 or
    divisibility by 16, the constants) and the options."""
    # (the interpreter's, as the JIT sees it)
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, specialisation, compile_options = binder(*arguments, **options, debug=False)
    return compute_cache_key({}, specialisation, compile_options)


def test_the_lean_launch_takes_the_jits_kernel_exactly_where_the_jit_would(device):
    """For random requests of both kernel families, and random new tensors for each (a
    fresh tensor, or a view one element past a 16-byte boundary, for each argument), a
    prepared launch goes straight to its compiled kernel exactly where Triton's JIT,
    compiling for sm_90, would look up the same kernel as for the request's own
    tensors, and through the JIT everywhere else."""
    rng = random.Random(fresh_seed())
    for request, config in _requests(device, 8):
        compiled, kernel = _StandIn(), request.kernel
        options = {**request.constants, **config}
        first = _jit_key(kernel, request.args, options)
        request.kernel = _RecordingJit(kernel)
        prepared = launcher.PreparedLaunch(request, config, compiled)
        for _ in range(4):
            tensors = [_moved(t) if rng.random() < 0.3 else t.clone() for t in request.args[:request.pointers]]
            lean = len(compiled.launches)
            prepared.launch(*tensors)
            same = _jit_key(kernel, (*tensors, *request.args[request.pointers:]), options) == first
            assert (len(compiled.launches) > lean) == same
