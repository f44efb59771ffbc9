"""Decoder blocks in one pass: the U-Net concatenation written by the kernel
(``ConcatUpsample``), ``out=`` on the functions, and ``convert(model, fuse=True)``
turning a traced ``torch.cat([up(x), skip], 1)`` into one.  Numeric checks compare
with PyTorch's two-step form in float64."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import allocated_during, assert_close, computed_as, fresh_seed, layout, same_layout

import tritondeconv
from tritondeconv.arguments import overlaps_itself
from tritondeconv.kernels.common import observe_launches

F64 = torch.float64
CONCAT = {1: tritondeconv.nn.ConcatUpsample1d, 2: tritondeconv.nn.ConcatUpsample2d, 3: tritondeconv.nn.ConcatUpsample3d}
TORCH_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
OUR_FUNCTIONS = {1: tritondeconv.conv_transpose1d, 2: tritondeconv.conv_transpose2d, 3: tritondeconv.conv_transpose3d}
SPATIAL = {1: (5,), 2: (3, 4), 3: (2, 2, 3)}


def _up_and_skip(device, rank, dtype, kind, skip_kind, skip_channels=3, groups=1, activation=None):
    """A ConcatUpsample (16 channels: the tensor-core tiles), an input and a skip
    tensor of the output's size; the skip has its own layout."""
    module = CONCAT[rank](16, 16, 4, 2, 1, groups=groups, activation=activation, device=device, dtype=dtype)
    x = layout(torch.randn(2, 16, *SPATIAL[rank], device=device, dtype=dtype), kind)
    out_spatial = [2 * s for s in SPATIAL[rank]]
    skip = layout(torch.randn(2, skip_channels, *out_spatial, device=device, dtype=dtype), skip_kind)
    return module, x, skip


def _two_steps(module, x, skip):
    """What the module replaces, in PyTorch (float64)."""
    rank = x.dim() - 2
    up = TORCH_FUNCTIONS[rank](x.double(), module.weight.double(), module.bias.double(), module.stride,
                               module.padding, module.output_padding, module.groups, module.dilation)
    if module.activation == "silu":
        up = F.silu(up)
    return torch.cat([up, skip.double()], 1)


@pytest.mark.parametrize("rank, kind, skip_kind, dtype, groups, activation", [
    (2, "nchw", "nchw", F64, 1, None), (2, "channels_last", "channels_last", F64, 2, "silu"),
    (2, "channels_last", "nchw", F64, 1, None), (2, "nchw", "strided", torch.float32, 1, "silu"),
    (1, "nchw", "nchw", F64, 1, None), (3, "channels_last", "channels_last", F64, 1, "silu"),
])
def test_concat_upsample_is_the_concatenation_of_its_convolution_and_skip(device, rank, kind, skip_kind, dtype, groups,
                                                                          activation):
    """Values, gradients of every input and parameter, and the memory format
    ``torch.cat`` gives, with one kernel launch in the forward."""
    seed = fresh_seed()
    module, x, skip = _up_and_skip(device, rank, dtype, kind, skip_kind, groups=groups, activation=activation)
    x.requires_grad_()
    skip.requires_grad_()
    with observe_launches() as launches:
        out = module(x, skip)
    assert len(launches) == 1 and launches[0].kernel in ("phase_gemm", "grouped")  # (grouped: groups of 2 channels)
    expected = _two_steps(module, x, skip)
    precision = computed_as(dtype, device)
    assert_close(out, expected.to(dtype), precision, seed)
    with torch.no_grad():  # PyTorch's own two steps in this dtype, for the layout
        two_steps = torch.cat([TORCH_FUNCTIONS[rank](x, module.weight, None, 2, 1, 0, groups), skip], 1)
    assert same_layout(out, two_steps)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, skip, module.weight, module.bias), grad)
    theirs = torch.autograd.grad(expected, (x, skip, module.weight, module.bias), grad.double())
    for a, b in zip(ours, theirs):  # input, skip, weight, bias
        assert_close(a, b.to(dtype), precision, seed)


def test_concat_upsample_gradients_are_differentiable_again(device):
    """Second derivatives (through the gradients of input and weight, with respect to
    input, weight and the incoming gradient) equal PyTorch's two steps'."""
    seed = fresh_seed()
    module, x, skip = _up_and_skip(device, 2, F64, "nchw", "nchw", activation="silu")
    x.requires_grad_()
    v = torch.randn(2, 19, 6, 8, device=device, dtype=F64, requires_grad=True)
    u = (torch.randn_like(x), torch.randn_like(module.weight))
    second = []
    for block in (lambda: module(x, skip), lambda: _two_steps(module, x, skip)):
        gx, gw = torch.autograd.grad(block(), (x, module.weight), v, create_graph=True)
        second.append(torch.autograd.grad((gx * u[0]).sum() + (gw * u[1]).sum(), (x, module.weight, v)))
    for ours, theirs in zip(*second):  # input, weight, incoming gradient
        assert_close(ours, theirs, "float64", seed)


def test_concat_upsample_holds_one_output_less_than_the_two_steps(device):
    """Peak memory of the block beyond its inputs: the concatenation (and the packed
    weight), where the two steps hold the convolution's output besides."""
    module, x, skip = _up_and_skip(device, 2, torch.float32, "channels_last", "channels_last", skip_channels=16)
    up = tritondeconv.nn.ConvTranspose2d(16, 16, 4, 2, 1, device=device)
    up.load_state_dict(module.state_dict())
    with torch.no_grad():
        module(x, skip), torch.cat([up(x), skip], 1)  # compile, tune and pack the weight first
        fused, fused_bytes, rounding = allocated_during(lambda: module(x, skip), device)
        _, two_steps_bytes, _ = allocated_during(lambda: torch.cat([up(x), skip], 1), device)
    output_bytes = fused[:, :16].numel() * fused.element_size()
    assert fused_bytes <= two_steps_bytes - output_bytes + rounding, (fused_bytes, two_steps_bytes, output_bytes)


def test_concat_upsample_compiles_without_graph_breaks(device):
    seed = fresh_seed()
    module, x, skip = _up_and_skip(device, 2, F64, "channels_last", "channels_last", activation="silu")
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    with torch.no_grad():
        assert_close(compiled(x, skip), _two_steps(module, x, skip), "float64", seed)


@pytest.mark.no_kernel("refused before any launch")
@pytest.mark.parametrize("case, error, match", [
    ("unbatched", RuntimeError, "batched input"),
    ("wrong spatial size", RuntimeError, "expected skip of size"),
    ("wrong batch", RuntimeError, "expected skip of size"),
    ("dtype", RuntimeError, "expected skip to have the input's dtype"),
    ("not a tensor", TypeError, "argument 'skip' must be Tensor"),
])
def test_concat_upsample_refuses_a_skip_that_does_not_fit(device, case, error, match):
    module, x, skip = _up_and_skip(device, 2, F64, "nchw", "nchw")
    if case == "unbatched":
        x = x[0]
    elif case == "wrong spatial size":
        skip = skip[..., 1:]
    elif case == "wrong batch":
        skip = skip[:1]
    elif case == "dtype":
        skip = skip.float()
    elif case == "not a tensor":
        skip = skip.tolist()
    with pytest.raises(error, match=match):
        module(x, skip)


# ---------------------------------------------------------------- out=


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("into", ["whole", "channel slice"])
def test_out_writes_into_the_tensor_given_and_returns_it(device, rank, into):
    seed = fresh_seed()
    x = torch.randn(2, 16, *SPATIAL[rank], device=device, dtype=F64)
    w = torch.randn(16, 8, *(3,) * rank, device=device, dtype=F64)
    b = torch.randn(8, device=device, dtype=F64)
    expected = TORCH_FUNCTIONS[rank](x, w, b, 2, 1, 1)
    buffer = torch.full((2, 8 if into == "whole" else 13, *expected.shape[2:]), float("nan"), device=device, dtype=F64)
    out = buffer if into == "whole" else buffer[:, 2:10]
    result = OUR_FUNCTIONS[rank](x, w, b, 2, 1, 1, out=out)
    assert result is out
    assert_close(out, expected, "float64", seed)
    if into == "channel slice":
        assert buffer[:, :2].isnan().all() and buffer[:, 10:].isnan().all()  # nothing written outside it


@pytest.mark.no_kernel("out= refused before any launch")
@pytest.mark.parametrize("case, match", [
    ("shape", r"expected out to have the output's size \[2, 8, 6, 8\]"),
    ("dtype", "expected out to have the input's dtype"),
    ("self-overlapping", "more than one element of out refers to a single memory location"),
    ("requires grad", "don't support automatic differentiation"),
])
def test_out_follows_pytorchs_rules(device, case, match):
    x = torch.randn(2, 16, 3, 4, device=device, dtype=F64)
    w = torch.randn(16, 8, 3, 3, device=device, dtype=F64)
    out = torch.empty(2, 8, 6, 8, device=device, dtype=F64)
    if case == "shape":
        out = out[..., 1:]
    elif case == "dtype":
        out = out.float()
    elif case == "self-overlapping":
        out = out[..., :1].expand(out.shape)
    elif case == "requires grad":
        w.requires_grad_()
    with pytest.raises(RuntimeError, match=match):
        tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1, out=out)


@pytest.mark.parametrize("case", ["a slice beside the input", "a slice across the input"])
def test_out_sharing_a_buffer_with_the_input_is_decided_by_elements(device, case):
    """``out`` and the input are slices of one buffer (a concatenation written in
    place): sharing no element, the result is written as aten's ``out=`` writes it;
    sharing some, aten computes the result apart and then copies it, and so do we."""
    seed = fresh_seed()
    buffer = torch.randn(2, 24, 6, 8, device=device, dtype=F64)
    w = torch.randn(16, 8, 3, 3, device=device, dtype=F64)
    channels = slice(0, 8) if case == "a slice beside the input" else slice(4, 12)
    theirs = buffer.clone()
    torch.ops.aten.convolution.out(theirs[:, 8:, :3, :4], w, None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1,
                                   out=theirs[:, channels])
    out = buffer[:, channels]
    assert tritondeconv.conv_transpose2d(buffer[:, 8:, :3, :4], w, None, 2, 1, 1, out=out) is out
    assert_close(buffer, theirs, "float64", seed)


@pytest.mark.parametrize("shape, strides", [((2, 8), (0, 1)), ((3, 3), (2, 1)), ((3, 2), (2, 3)), ((4, 4), (8, 2)),
                                            ((2, 3, 2), (1, 4, 2))])
def test_an_out_overlapping_itself_is_told_by_its_elements(shape, strides):
    """Whether two elements of ``out`` share memory, against counting the memory
    locations its strides reach: also where the strides alone do not tell (neither
    sorted nor zero)."""
    out = torch.empty(64, dtype=F64).as_strided(shape, strides)
    locations = {sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*map(range, shape))}
    assert overlaps_itself(out) == (len(locations) < out.numel())


def test_out_resizes_an_empty_tensor(device):
    x = torch.randn(2, 16, 3, 4, device=device, dtype=F64)
    w = torch.randn(16, 8, 3, 3, device=device, dtype=F64)
    out = torch.empty(0, device=device, dtype=F64)
    assert tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1, out=out) is out
    assert_close(out, F.conv_transpose2d(x, w, None, 2, 1, 1), "float64", fresh_seed())


# ---------------------------------------------------------------- convert(fuse=True)


class _UNetUp(torch.nn.Module):
    """A U-Net decoder step written as forward code: deconv, batch norm, ReLU, then the
    skip connection concatenated after it."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(16, 16, 2, 2, dtype=F64)
        self.bn = torch.nn.BatchNorm2d(16, dtype=F64)
        self.act = torch.nn.ReLU()
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x, skip):
        return torch.cat([self.act(self.bn(self.up(x))), skip], dim=1)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_fuse_turns_a_traced_concatenation_into_one_pass(device, kind):
    seed = fresh_seed()
    model = _UNetUp().to(device).eval()
    x = layout(torch.randn(2, 16, 3, 3, device=device, dtype=F64), kind)
    skip = layout(torch.randn(2, 4, 6, 6, device=device, dtype=F64), kind)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x, skip)
        fused, count = tritondeconv.convert(model, fuse=True, return_count=True)
        assert count == 1 + 2  # converted; fused with the batch norm and ReLU; concatenating
        assert type(fused.up) is tritondeconv.nn.ConcatUpsample2d and fused.up.activation == "relu"
        assert "cat" not in fused.code
        with observe_launches() as launches:
            out = fused(x, skip)
        assert len(launches) == 1
        assert_close(out, expected, "float64", seed)
        assert same_layout(out, expected)
        assert_close(model(x, skip), expected, "float64", seed)  # the model passed in still computes as before
