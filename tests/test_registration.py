"""The ops are proper torch.library citizens: schema, fake (meta) implementation,
opcheck, and torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch
from reference import assert_close, fresh_seed, reference

import tritondeconv

OPS = {
    "conv_transpose2d": torch.ops.tritondeconv.conv_transpose2d,
    "naive": torch.ops.tritondeconv.naive_conv_transpose2d,
}


def _layout(t, channels_last):
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def _sample(device, dtype=torch.float64, channels_last=False):
    x = torch.randn(2, 4, 3, 5, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(4, 3, 3, 2, device=device, dtype=dtype), torch.randn(6, device=device, dtype=dtype)


@pytest.mark.parametrize("op", list(OPS))
def test_opcheck(device, op):
    """Schema, fake implementation (shapes and strides), dispatch and autograd registration."""
    x, w_grouped, b = _sample(device)
    w = torch.randn(4, 6, 3, 2, device=device, dtype=x.dtype)
    samples = [
        (x, w_grouped, b, [2, 1], [1, 0], [1, 0], 2, [1, 2]),
        (x.contiguous(memory_format=torch.channels_last), w, None, [3, 3], [0, 0], [0, 0], 1, [1, 1]),
        (x[0], w),  # unbatched, every default
    ]
    for args in samples:
        torch.library.opcheck(OPS[op], args)
    if op == "conv_transpose2d":  # and its autograd, through the gradient ops
        for args in samples:
            grads = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(OPS[op], grads)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_opcheck_gradient_ops(device, groups, channels_last):
    """The internal gradient ops, with their own autograd (double backward), over groups
    and both layouts."""
    x = _layout(torch.randn(2, 4, 3, 5, device=device, dtype=torch.float64), channels_last).requires_grad_()
    w = torch.randn(4, 6 // groups, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    # k3x2 s2 p1 op1
    gy = _layout(torch.randn(2, 6, 6, 9, device=device, dtype=torch.float64), channels_last).requires_grad_()
    geometry = ([2, 2], [1, 1], [1, 1], groups)
    torch.library.opcheck(torch.ops.tritondeconv.conv_transpose_input_grad, (gy, w, [3, 5], *geometry))
    torch.library.opcheck(torch.ops.tritondeconv.conv_transpose_weight_grad, (x, gy, [3, 2], *geometry))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_meta_tensors(op, channels_last):
    x, w, b = _sample("meta", torch.float16, channels_last)
    out = OPS[op](x, w, b, 2, 1, 1, 2, 1)
    ref = torch.nn.functional.conv_transpose2d(x, w, b, 2, 1, 1, 2, 1)  # aten's own meta kernel
    assert out.device.type == "meta" and out.dtype == torch.float16 and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_single_ints_and_defaults():
    """A single int is accepted wherever aten accepts one, and defaults match aten's."""
    x, w, _ = _sample("meta")
    w = torch.randn(4, 6, 3, 2, device="meta", dtype=x.dtype)
    assert OPS["conv_transpose2d"](x, w).shape == torch.Size([2, 6, 5, 6])
    assert OPS["conv_transpose2d"](x, w, None, 2, 1, 1, 1, 1).shape == OPS["conv_transpose2d"](
        x, w, None, [2, 2], [1, 1], [1, 1], 1, [1, 1]
    ).shape


class _Decoder(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(4, 3, 4, 4, device=device, dtype=torch.float64), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        h = torch.relu(tritondeconv.conv_transpose2d(x, self.w1, None, 2, 1))
        return tritondeconv.naive_conv_transpose2d(h, self.w2, None, 2, 1, 1)


def test_compile_fullgraph(device):
    seed = fresh_seed()
    model = _Decoder(device)
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    h = torch.relu(reference(x, model.w1, None, 2, 1, 0, 1, 1))
    assert_close(out, reference(h, model.w2, None, 2, 1, 1, 1, 1), "float64", seed)


EVERY_OP = {
    "conv_transpose1d": (torch.ops.tritondeconv.conv_transpose1d, 1),
    "conv_transpose2d": (torch.ops.tritondeconv.conv_transpose2d, 2),
    "conv_transpose3d": (torch.ops.tritondeconv.conv_transpose3d, 3),
    "naive_conv_transpose2d": (torch.ops.tritondeconv.naive_conv_transpose2d, 2),
    "conv_transpose2d_fused": (torch.ops.tritondeconv.conv_transpose2d_fused, 2),
    **{f"conv_transpose (rank {rank}, epilogue)": (torch.ops.tritondeconv.conv_transpose, rank) for rank in (1, 2, 3)},
}
WITH_EPILOGUE = ("conv_transpose2d_fused", *(f"conv_transpose (rank {rank}, epilogue)" for rank in (1, 2, 3)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", list(EVERY_OP))
def test_opcheck_every_op(device, name, groups, channels_last):
    """Every op's fake implementation matches its real output exactly (sizes, strides,
    dtype, device), with and without autograd, over groups and both layouts; and the
    gradient ops too, as the op's backward calls them."""
    op, rank = EVERY_OP[name]
    x = _layout(torch.randn(2, 4, *(3,) * rank, device=device, dtype=torch.float64), channels_last)
    w = torch.randn(4, 4 // groups, *(2,) * rank, device=device, dtype=torch.float64)
    b = torch.randn(4, device=device, dtype=torch.float64)
    args = [x, w, b, [2] * rank, [1] * rank, [1] * rank, groups, [1] * rank]
    if name in WITH_EPILOGUE:
        out_shape = torch.ops.aten.convolution(x, w, b, [2] * rank, [1] * rank, [1] * rank,
                                               True, [1] * rank, groups).shape
        args += ["silu", 0.01, torch.randn(out_shape, device=device, dtype=torch.float64)]
    torch.library.opcheck(op, tuple(args))
    if name != "naive_conv_transpose2d":  # the baseline is forward only
        grads = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, grads)


class _Block(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.up = tritondeconv.nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=groups,
                                                  dtype=torch.float64)

    def forward(self, x):
        return torch.relu(self.up(x)).square().sum()


@pytest.mark.parametrize("groups", [1, 2])
def test_compile_training_with_inductor(device, groups):
    """``torch.compile(fullgraph=True)`` with the default backend (inductor) trains:
    forward and backward, the gradients as in eager PyTorch."""
    seed = fresh_seed()
    model = _Block(groups).to(device)
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    loss = torch.compile(model, fullgraph=True)(x)
    loss.backward()
    ref_model = torch.nn.ConvTranspose2d(4, 4, 3, 2, 1, 1, groups=groups, dtype=torch.float64).to(device)
    ref_model.load_state_dict(model.up.state_dict())
    xr = x.detach().clone().requires_grad_()
    ref = torch.relu(ref_model(xr)).square().sum()
    ref.backward()
    assert_close(loss.detach().reshape(1), ref.detach().reshape(1), "float64", seed)
    assert_close(x.grad, xr.grad, "float64", seed)
    assert_close(model.up.weight.grad, ref_model.weight.grad, "float64", seed)


# ---------------------------------------------------------------- the public functions' short cut
# On plain tensors with nothing watching, the public functions call the op's autograd
# kernel without a trip through the dispatcher; whatever a dispatcher key or mode would
# observe must still see the op.

def _observed(call, kind: str) -> list:
    """What a ``TorchDispatchMode`` (``kind="dispatch"``) or a ``TorchFunctionMode``
    (``"function"``) sees while ``call()`` runs."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    def record(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return func(*args, **(kwargs or {}))

    base, hook = {"dispatch": (TorchDispatchMode, "__torch_dispatch__"),
                  "function": (TorchFunctionMode, "__torch_function__")}[kind]
    seen = []
    with type("Record", (base,), {hook: record})():
        call()
    return seen


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", ["no-grad", "grad", "inference-mode"])
def test_what_watches_a_call_sees_the_op(device, mode):
    grad = mode == "grad"
    x, w, b = _sample(device)
    x, w = x.requires_grad_(grad), w.requires_grad_(grad)
    op = torch.ops.tritondeconv.conv_transpose.default
    input_grad = torch.ops.tritondeconv.conv_transpose_input_grad.default

    def call():
        with torch.inference_mode(mode == "inference-mode"):
            y = tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1, 2)
        if grad:
            y.sum().backward()

    assert op in _observed(call, "dispatch")
    assert op in _observed(call, "function")
    if grad:  # the backward's gradient ops too
        assert input_grad in _observed(call, "dispatch")
    with torch.autocast(device, dtype=torch.bfloat16):  # autocast's kernel casts the float32 call
        assert tritondeconv.conv_transpose2d(x.float(), w.float(), b.float(), 2, 1, 1, 2).dtype == torch.bfloat16
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fake:
        y = tritondeconv.conv_transpose2d(fake.from_tensor(x), fake.from_tensor(w), fake.from_tensor(b), 2, 1, 1, 2)
    assert y.shape == torch.nn.functional.conv_transpose2d(x.detach(), w.detach(), b, 2, 1, 1, 2).shape
    traced = torch.jit.trace(lambda x, w, b: tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1, 2),
                             (x.detach(), w.detach(), b), check_trace=False)
    assert "tritondeconv::conv_transpose" in str(traced.graph)


def test_the_short_cut_computes_what_the_op_computes(device):
    seed = fresh_seed()
    x, w, b = _sample(device)
    x, w = x.requires_grad_(), w.requires_grad_()
    ours = tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1, 2)
    via_op = torch.ops.tritondeconv.conv_transpose2d(x, w, b, [2, 2], [1, 1], [1, 1], 2, [1, 1])
    assert torch.equal(ours, via_op), f"seed {seed}"
    gy = torch.randn_like(ours)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ours, (x, w), gy),
                                                  torch.autograd.grad(via_op, (x, w), gy))), f"seed {seed}"
    assert_close(ours, reference(x, w, b, 2, 1, 1, 2, 1), "float64", seed)
    with torch.inference_mode():  # (normal tensors, then inference tensors)
        for args in ((x, w, b), (x.detach().clone(), w.detach().clone(), b.clone())):
            ours = tritondeconv.conv_transpose2d(*args, 2, 1, 1, 2)
            via_op = torch.ops.tritondeconv.conv_transpose2d(*args, [2, 2], [1, 1], [1, 1], 2, [1, 1])
            assert ours.is_inference() and torch.equal(ours, via_op), f"seed {seed}"
    with torch._C._AutoDispatchBelowAutograd():  # autograd excluded, grad mode on: nothing is recorded
        ours = tritondeconv.conv_transpose2d(x, w, b, 2, 1, 1, 2)
        via_op = torch.ops.tritondeconv.conv_transpose2d(x, w, b, [2, 2], [1, 1], [1, 1], 2, [1, 1])
    assert ours.grad_fn is None and via_op.grad_fn is None and torch.equal(ours, via_op), f"seed {seed}"


# ---------------------------------------------------------------- FLOP counts


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_flop_counter_counts_what_it_counts_for_pytorchs_layer(device, rank, groups, batched):
    """``torch.utils.flop_counter.FlopCounterMode`` counts our forward and gradients as it
    counts PyTorch's convolution and its backward on the same shapes (so MFU reports
    agree), the naive baseline as the convolution it computes."""
    from torch.utils.flop_counter import FlopCounterMode

    ours = getattr(tritondeconv, f"conv_transpose{rank}d")
    theirs = getattr(torch.nn.functional, f"conv_transpose{rank}d")
    x = torch.randn(2, 4, *(3,) * rank, device=device, dtype=torch.float64, requires_grad=True)
    x = x if batched else x[0].detach().requires_grad_()
    w = torch.randn(4, 6 // groups, *(2,) * rank, device=device, dtype=torch.float64, requires_grad=True)

    def counted(function, backward: bool = True) -> int:
        with FlopCounterMode(display=False) as mode:
            y = function(x if backward else x.detach(), w if backward else w.detach(), None, 2, 1, 1, groups)
            if backward:
                y.sum().backward()
        return mode.get_total_flops()

    assert counted(ours) == counted(theirs) > 0
    if rank == 2:
        assert counted(tritondeconv.naive_conv_transpose2d, backward=False) == counted(theirs, backward=False) > 0
