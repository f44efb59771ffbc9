"""Where users go one step off the well-trodden path: tensor strides of every argument,
PyTorch's precision switches, the output's memory format, argument types, degenerate
shapes, autocast and function transforms, each matched against PyTorch's own
behaviour (values in float64, exceptions by type)."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, fresh_seed, on_path, reference

import tritondeconv
from tritondeconv.arguments import format_strides
from tritondeconv.kernels.common import observe_launches

FUNCTIONS = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
TORCH_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def restride(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values through a view of another kind: ``"contiguous"``; ``"sliced"`` (every
    other element of every axis of a larger tensor); ``"offset"`` (a non-zero storage
    offset); ``"expanded"`` (zero strides: ``t``'s values are first made constant along
    its last axis, which is then expanded from one element)."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "sliced":
        big = torch.full([2 * s for s in t.shape], float("nan"), dtype=t.dtype, device=t.device)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        return view.copy_(t)
    if kind == "offset":
        flat = torch.full((t.numel() + 3,), float("nan"), dtype=t.dtype, device=t.device)
        return flat[3:].view(t.shape).copy_(t)
    if kind == "expanded":
        return t.narrow(-1, 0, 1).clone().expand(t.shape)
    raise ValueError(kind)


STRIDE_KINDS = ["sliced", "offset", "expanded"]


# ---------------------------------------------------------------- 1. strides


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("kind", STRIDE_KINDS)
@pytest.mark.parametrize("argument", ["input", "weight", "bias", "residual", "grad_output"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_tensor_argument_is_read_through_its_strides(device, rank, argument, kind):
    """Forward and backward read every tensor through its own strides and storage
    offset, zero strides included (a residual expanded along an axis, say); a bias whose
    stride is not 1, from a contiguous copy."""
    seed = fresh_seed()
    c_in, c_out, groups = 4, 6, 2
    x = torch.randn(2, c_in, *(3,) * rank, device=device, dtype=torch.float64)
    w = torch.randn(c_in, c_out // groups, *(3,) * rank, device=device, dtype=torch.float64)
    b = torch.randn(c_out, device=device, dtype=torch.float64)
    geometry = (2, 1, 1, groups, 1)
    ref = reference(x, w, b, *geometry)
    r = torch.randn_like(ref) if argument == "residual" else None
    values = {"input": x, "weight": w, "bias": b, "residual": r}
    if argument in values:
        values[argument] = restride(values[argument], kind)
    x, w, b, r = (values[k].detach().requires_grad_() if values[k] is not None else None
                  for k in ("input", "weight", "bias", "residual"))
    epilogue = {"residual": r} if r is not None else {}
    out = FUNCTIONS[rank](x, w, b, *geometry, **epilogue)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = reference(xr, wr, br, *geometry) + (0 if r is None else r.detach())
    assert_close(out, ref.detach(), "float64", seed)
    grad = torch.randn_like(ref)
    if argument == "grad_output":
        grad = restride(grad, kind)
    out.backward(grad)
    ref.backward(grad)
    for ours, theirs in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert_close(ours, theirs, "float64", seed)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("kind", STRIDE_KINDS)
def test_upsample_conv2d_reads_strided_bias_and_input(device, kind):
    seed = fresh_seed()
    x = restride(torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64), kind)
    w = torch.randn(6, 4, 3, 3, device=device, dtype=torch.float64)
    b = restride(torch.randn(6, device=device, dtype=torch.float64), kind)
    out = tritondeconv.upsample_conv2d(x, w, b, 2, 1)
    assert_close(out, F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1), "float64", seed)


# ---------------------------------------------------------------- 2. precision and non-finite values


PRECISION_SETTINGS = {
    # name: (settings applied in order, whether aten's convolution may use TF32)
    "legacy allow_tf32 on": ([("cudnn", "allow_tf32", True)], True),
    "legacy allow_tf32 off": ([("cudnn", "allow_tf32", False)], False),
    "conv ieee": ([("cudnn.conv", "fp32_precision", "ieee")], False),
    "conv tf32": ([("cudnn.conv", "fp32_precision", "tf32")], True),
    "conv none, cudnn ieee": ([("cudnn.conv", "fp32_precision", "none"), ("cudnn", "fp32_precision", "ieee")], False),
    "conv none, cudnn tf32": ([("cudnn.conv", "fp32_precision", "none"), ("cudnn", "fp32_precision", "tf32")], True),
    "all none, global tf32": ([("cudnn.conv", "fp32_precision", "none"), ("cudnn", "fp32_precision", "none"),
                               ("", "fp32_precision", "tf32")], True),
    "all none": ([("cudnn.conv", "fp32_precision", "none"), ("cudnn", "fp32_precision", "none"),
                  ("", "fp32_precision", "none")], False),
}


@pytest.fixture
def restore_precision():
    saved = [(backend, op, torch._C._get_fp32_precision_getter(backend, op))
             for backend, op in (("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"))]
    legacy = torch._C._get_cudnn_allow_tf32()
    yield
    torch._C._set_cudnn_allow_tf32(legacy)
    for backend, op, value in saved:
        torch._C._set_fp32_precision_setter(backend, op, value)


def _apply(settings):
    for where, attribute, value in settings:
        module = torch.backends
        for part in filter(None, where.split(".")):
            module = getattr(module, part)
        setattr(module, attribute, value)


@pytest.mark.usefixtures("restore_precision")
@pytest.mark.parametrize("setting", list(PRECISION_SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tf32_is_decided_as_aten_decides_and_never_raises(device, setting, dtype):
    settings, tf32 = PRECISION_SETTINGS[setting]
    _apply(settings)
    seed = fresh_seed()
    x = torch.randn(2, 16, 3, 3, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device=device, dtype=dtype, requires_grad=True)
    with observe_launches() as launches:
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
        out.backward(torch.randn_like(out))
    expected = "tf32" if tf32 and dtype == torch.float32 else "ieee"
    assert [launch.constants["INPUT_PRECISION"] for launch in launches] == [expected] * 3
    assert_close(out, reference(x, w, None, 2, 1, 0, 1, 1), "tf32" if expected == "tf32" else str(dtype)[6:], seed)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("channels", [4, 16], ids=["fma", "tensor-core"])
def test_non_finite_input_reaches_exactly_pytorchs_outputs(device, value, channels):
    """NaN/Inf in the input reach the outputs PyTorch's reach and no others, on the
    FMA tiles (4 channels) and the tensor-core tiles (16), forward and input gradient."""
    x = torch.randn(2, channels, 5, 4, device=device, dtype=torch.float32)
    x[1, channels // 2, 2, 1] = value
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=torch.float32)
    with observe_launches() as launches, on_path("tensor-core" if channels >= 16 else "fma"):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1)
    path = {launch.constants["BLOCK_N"] >= 16 and launch.constants["BLOCK_K"] >= 16 for launch in launches}
    assert path == {channels >= 16}  # the path under test ran
    ref = F.conv_transpose2d(x.cpu().double(), w.cpu().double(), None, 2, 1, 1)
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(out).cpu(), test(ref))


@pytest.mark.parametrize("path", ["tensor-core", "fma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_values_near_the_dtypes_range_overflow_where_pytorchs_do(device, dtype, path):
    """Products past the dtype's largest value become infinities exactly where PyTorch's
    (computed on the CPU in the same dtype) do, and the rest stay equal to its values:
    one input pixel at 3/4 of the range meets weights of 2 (overflow) and of 1/4.  Every
    value has at most two significant bits, so products and sums are exact in every
    precision a GPU may multiply float32 in (TF32 keeps 10 bits), as in PyTorch's."""
    finfo = torch.finfo(dtype)
    big = 1.5 * 2.0 ** math.floor(math.log2(finfo.max))  # 3/4 of the next power of two: exact in TF32
    channels = 16 if path == "tensor-core" else 4
    x = torch.zeros(1, channels, 4, 4, dtype=dtype)
    x[0, 1, 1, 2] = big
    x[0, 2, 2, 1] = -big
    w = torch.full((channels, channels, 3, 3), 0.25, dtype=dtype)
    w[1, :, 0, :] = 2.0
    ref = F.conv_transpose2d(x, w, None, 2, 1, 1)
    with on_path(path):
        out = tritondeconv.conv_transpose2d(x.to(device), w.to(device), None, 2, 1, 1).cpu()
    assert torch.isinf(ref).any() and torch.isfinite(ref).any()
    for test in (torch.isposinf, torch.isneginf, torch.isnan):
        assert torch.equal(test(out), test(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(out[finite], ref[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_subnormal_inputs_give_pytorchs_subnormal_outputs(device, dtype):
    """Subnormal inputs times exact weights: the outputs are PyTorch's, bit for bit (not
    flushed to zero)."""
    tiny = torch.finfo(dtype).tiny / 8  # below the smallest normal number
    x = torch.zeros(1, 16, 3, 3, dtype=dtype)
    x[0, 3, 1, 1] = tiny
    x[0, 5, 0, 2] = -3 * tiny
    w = torch.ones(16, 16, 2, 2, dtype=dtype)
    ref = F.conv_transpose2d(x, w, None, 2)
    out = tritondeconv.conv_transpose2d(x.to(device), w.to(device), None, 2).cpu()
    assert (ref.abs() < torch.finfo(dtype).tiny).all() and ref.abs().max() > 0
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- 8. degenerate shapes


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", [
    *(pytest.param(case, marks=pytest.mark.no_kernel("an empty tensor has nothing to launch for"))
      for case in ("zero output channels", "zero input channels", "zero spatial size")),
    "zero batch",  # its weight gradient still launches (a reduction over no pixels, to zeros)
])
def test_degenerate_shapes_behave_as_pytorch(device, rank, case):
    c_in, c_out, n, size = 4, 3, 2, 3
    if case == "zero output channels":
        c_out = 0
    elif case == "zero input channels":
        c_in = 0
    elif case == "zero spatial size":
        size = 0
    else:
        n = 0
    make = lambda *shape: torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w = make(n, c_in, *(size,) * rank), make(c_in, c_out, *(2,) * rank)
    empty = lambda x, w: x.new_empty(n, 0, *(2 * size,) * rank)  # noqa: E731  (k = s = 2: twice the input's size)
    _behaves_as(lambda x, w: FUNCTIONS[rank](x, w, None, 2), lambda x, w: TORCH_FUNCTIONS[rank](x, w, None, 2),
                empty, x, w)


def _behaves_as(ours, theirs, without_convolution, *inputs) -> None:
    """``ours(*inputs)`` raises PyTorch's exception type where ``theirs(*inputs)`` (PyTorch
    on the same device) raises, and otherwise returns PyTorch's output (an empty one, or
    a copy of a concatenated tensor) with PyTorch's gradients for ``inputs``, exactly.
    Where PyTorch's forward works but its backward raises (on CUDA, cuDNN refuses a
    weight without output channels), the gradients are what they are by definition:
    those of ``without_convolution(*inputs)``, the same computation with the empty
    convolution's output not depending on the inputs (zeros, or empty)."""
    try:
        expected = theirs(*inputs)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            ours(*inputs)
        return
    out = ours(*inputs)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    try:
        pytorchs = torch.autograd.grad(expected, inputs, grad)
    except RuntimeError:
        pytorchs = torch.autograd.grad(without_convolution(*inputs), inputs, grad, allow_unused=True,
                                       materialize_grads=True)
    for mine, theirs_ in zip(torch.autograd.grad(out, inputs, grad), pytorchs):
        assert torch.equal(mine, theirs_)


@pytest.mark.no_kernel("an output without channels has nothing to launch for")
@pytest.mark.parametrize("way", ["module", "upsample_conv", "concat", "compiled"])
def test_zero_output_channels_behave_as_pytorch_on_each_device(device, way):
    """A weight without output channels: PyTorch's CPU kernels refuse it, its CUDA ones
    return an empty output with zero gradients; its ``conv2d`` (so an upsampling
    followed by a convolution) refuses it everywhere.  Each way in does what PyTorch's
    twin does on the device under test."""
    new = lambda *shape: torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)  # noqa: E731
    inputs = (new(2, 4, 3, 3),)
    if way == "upsample_conv":
        ours = tritondeconv.nn.UpsampleConv2d(4, 0, 3, scale_factor=2, padding=1)
        conv = torch.nn.Conv2d(4, 0, 3, padding=1).to(device, torch.float64)
        theirs = lambda x: conv(F.interpolate(x, scale_factor=2))  # noqa: E731
    elif way == "concat":
        ours = tritondeconv.nn.ConcatUpsample2d(4, 0, 2, 2)
        up = torch.nn.ConvTranspose2d(4, 0, 2, 2).to(device, torch.float64)
        theirs = lambda x, skip: torch.cat([up(x), skip], 1)  # noqa: E731
        inputs = (*inputs, new(2, 3, 6, 6))
    else:
        ours = tritondeconv.nn.ConvTranspose2d(4, 0, 2, 2)
        theirs = torch.nn.ConvTranspose2d(4, 0, 2, 2).to(device, torch.float64)
    ours = ours.to(device, torch.float64)
    if way == "compiled":
        ours = torch.compile(ours, fullgraph=True, backend="aot_eager")
    empty = lambda x: x.new_empty(2, 0, 6, 6)  # noqa: E731
    _behaves_as(ours, theirs, (lambda x, skip: torch.cat([empty(x), skip], 1)) if way == "concat" else empty, *inputs)


# ---------------------------------------------------------------- 9. memory format


def _formatted(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` [N, C, *spatial] contiguous, channels-last, or with channels innermost
    through a permutation (``"permuted"``; for unbatched tensors, the same strides
    with the batch axis dropped)."""
    if kind == "contiguous":
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_kind, w_kind", list(itertools.product(["contiguous", "permuted"], repeat=2)))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_output_memory_format_follows_pytorchs_rule(device, rank, dtype, x_kind, w_kind, batched):
    x = _formatted(torch.randn(2, 4, *(3,) * rank, device=device, dtype=dtype), x_kind)
    x = x if batched else x[0]
    w = _formatted(torch.randn(4, 5, *(2,) * rank, device=device, dtype=dtype), w_kind)
    ours = FUNCTIONS[rank](x, w, None, 2)
    theirs = TORCH_FUNCTIONS[rank](x, w, None, 2)
    if device == "cpu" and rank == 3 and dtype == torch.float32 and not batched and w_kind == "permuted":
        # aten's CPU picks between two backends here by a size heuristic, which decides
        # the layout; ours follows the rule of the batched case.
        theirs = TORCH_FUNCTIONS[rank](x.unsqueeze(0).expand(2, *x.shape), w, None, 2)[0]
    assert ours.stride() == theirs.stride()


@pytest.mark.parametrize("dims, memory_format", [(3, torch.contiguous_format), (3, torch.channels_last),
                                                  (4, torch.contiguous_format), (4, torch.channels_last),
                                                  (5, torch.contiguous_format), (5, torch.channels_last_3d)])
def test_new_tensors_get_torchs_strides_for_their_memory_format(dims, memory_format):
    """``format_strides``, by which the ops lay out every tensor they make (their fakes'
    too), gives ``torch.empty``'s strides, empty and size-1 axes included; a 3-D tensor
    in ``channels_last`` is a contiguous ``[N, W, C]`` tensor, permuted."""
    for shape in itertools.product((0, 1, 2, 3), repeat=dims):
        if dims == 3 and memory_format == torch.channels_last:
            expected = torch.empty(shape[0], shape[2], shape[1], device="meta").permute(0, 2, 1).stride()
        else:
            expected = torch.empty(shape, device="meta", memory_format=memory_format).stride()
        assert format_strides(shape, memory_format) == expected, shape


# ---------------------------------------------------------------- 10. argument types


INT_LIKE = {"int": 2, "numpy int": np.int64(2), "0-d tensor": torch.tensor(2), "list of numpy ints": [np.int32(2)] * 2,
            "tuple with a 0-d tensor": (2, torch.tensor(2))}
NOT_INT = {"float": 2.0, "string": "2", "bool": True, "list with a float": [2, 2.0], "float tensor": torch.tensor(2.0),
           "numpy bool": np.bool_(True)}


@pytest.mark.parametrize("argument", ["stride", "padding", "output_padding", "groups", "dilation"])
@pytest.mark.parametrize("value", list(INT_LIKE))
def test_integer_likes_are_accepted_as_pytorch_accepts_them(argument, value):
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 2, 3, 3)
    given = INT_LIKE[value]
    if argument == "groups":
        if isinstance(given, (list, tuple)):
            pytest.skip("groups is a single integer")
        given = type(given)(1) if not isinstance(given, torch.Tensor) else torch.tensor(1)
    kwargs = {"stride": 2, "padding": 1, "output_padding": 1, argument: given}
    if argument == "output_padding":
        kwargs["output_padding"] = given if not isinstance(given, (list, tuple)) else given
        kwargs["stride"], kwargs["dilation"] = 3, 1
    assert tritondeconv.conv_transpose2d(x, w, **kwargs).shape == F.conv_transpose2d(x, w, **kwargs).shape


@pytest.mark.parametrize("argument", ["stride", "padding", "output_padding", "groups", "dilation"])
@pytest.mark.parametrize("value", list(NOT_INT))
def test_non_integers_raise_pytorchs_type_error(argument, value):
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 2, 3, 3)
    with pytest.raises(TypeError, match=f"argument '{argument}'"):
        F.conv_transpose2d(x, w, **{argument: NOT_INT[value]})
    with pytest.raises(TypeError, match=f"argument '{argument}'"):
        tritondeconv.conv_transpose2d(x, w, **{argument: NOT_INT[value]})


# ---------------------------------------------------------------- 4. autocast


def _autocast_devices():
    return [pytest.param("cpu", torch.bfloat16, id="cpu-bf16", marks=pytest.mark.skipif(
                not tritondeconv.backends.runs_triton(torch.device("cpu")),
                reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=[
                pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]),
            pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[
                pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])]


@pytest.mark.parametrize("autocast_device, autocast_dtype", _autocast_devices())
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "fused"])
def test_autocast_casts_as_for_atens_convolution(autocast_device, autocast_dtype, epilogue):
    """An fp32 module fed a low-precision activation under autocast: the op runs in the
    region's dtype and returns it, as aten's conv_transpose does; float64 is not cast."""
    seed = fresh_seed()
    module = tritondeconv.nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, device=autocast_device,
                                             activation="relu" if epilogue else None)
    x = torch.randn(2, 16, 4, 4, device=autocast_device).to(autocast_dtype)
    with torch.autocast(autocast_device, dtype=autocast_dtype), observe_launches() as launches:
        out = module(x)
        expected = torch.nn.functional.conv_transpose2d(x, module.weight, module.bias, 2, 1)
        as_double = tritondeconv.conv_transpose2d(x.double(), module.weight.double(), None, 2, 1)
    assert launches and out.dtype == expected.dtype == autocast_dtype
    assert as_double.dtype == torch.float64
    ref = reference(x, module.weight.to(autocast_dtype), module.bias.to(autocast_dtype), 2, 1, 0, 1, 1)
    precision = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[autocast_dtype]
    assert_close(out, ref.relu() if epilogue else ref, precision, seed)
    out.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------- 5. function transforms


def _pair(device, rank=2, channels=4):
    x = torch.randn(2, channels, *(3,) * rank, device=device, dtype=torch.float64)
    w = torch.randn(channels, 3, *(3,) * rank, device=device, dtype=torch.float64)
    b = torch.randn(3, device=device, dtype=torch.float64)
    return x, w, b


TRANSFORMS = ["grad", "jacrev", "jacfwd", "jvp", "forward_ad", "vmap", "vmap of grad", "hessian"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("rank", [1, 2])
def test_function_transforms_match_pytorchs(device, transform, rank):
    """Every ``torch.func`` transform of the public function gives what the same transform
    of PyTorch's function gives (in float64), with no fallback warning."""
    fresh_seed()
    x, w, b = _pair(device, rank)
    x = x[:1]

    def run(fn):
        f = lambda x, w, b: fn(x, w, b, 2, 1, 1)  # noqa: E731
        if transform == "grad":
            return torch.func.grad(lambda *a: f(*a).square().sum(), argnums=(0, 1, 2))(x, w, b)
        if transform == "jacrev":
            return torch.func.jacrev(f, argnums=(0, 1))(x, w, b)
        if transform == "jacfwd":
            return torch.func.jacfwd(f, argnums=(0, 2))(x, w, b)
        if transform == "jvp":
            return torch.func.jvp(f, (x, w, b), (torch.ones_like(x), torch.ones_like(w), torch.ones_like(b)))
        if transform == "forward_ad":
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                out = f(fwAD.make_dual(x, torch.ones_like(x)), w, fwAD.make_dual(b, torch.ones_like(b)))
                return tuple(fwAD.unpack_dual(out))
        if transform == "vmap":
            return torch.func.vmap(f, in_dims=(0, None, None))(torch.stack([x, 2 * x]), w, b)
        if transform == "vmap of grad":
            g = torch.func.grad(lambda x, w, b: f(x, w, b).square().sum(), argnums=1)
            return torch.func.vmap(g, in_dims=(0, None, None))(torch.stack([x, 2 * x]), w, b)
        if transform == "hessian":
            return torch.func.hessian(lambda x: f(x, w, b).square().sum())(x[..., :2])
        raise ValueError(transform)

    torch._C._functorch._set_vmap_fallback_enabled(False)  # an op without a batching rule raises
    try:
        ours = run(FUNCTIONS[rank])
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)
    theirs = run(TORCH_FUNCTIONS[rank])
    for o, t in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)):
        assert o.shape == t.shape
        assert torch.allclose(o, t, rtol=1e-10, atol=1e-10)


@pytest.mark.no_kernel("the op refuses before any launch")
@pytest.mark.parametrize("transform", ["jvp", "forward_ad"])
def test_forward_mode_on_the_op_itself_raises_instead_of_dropping_tangents(device, transform):
    x, w, _ = _pair(device)
    op = torch.ops.tritondeconv.conv_transpose2d
    with pytest.raises(RuntimeError, match="forward-mode AD .* not supported on the op itself"):
        if transform == "jvp":
            torch.func.jvp(lambda a: op(a, w, None, [2, 2]), (x,), (torch.ones_like(x),))
        else:
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                op(fwAD.make_dual(x, torch.ones_like(x)), w, None, [2, 2])
