"""Bad input: PyTorch's exception type and a message naming the argument, for both ops.

Checked on CPU and meta tensors (the argument checks run before any kernel, and the
fake implementation runs the same checks), and on CUDA where there is one.
"""
import pytest
import torch

import tritondeconv

OPS = [tritondeconv.conv_transpose2d, tritondeconv.naive_conv_transpose2d]


def _args(**change):
    """A valid call (x 2x4x5x5, w 4x3x3x3, stride 2) with some arguments changed."""
    args = dict(input=torch.randn(2, 4, 5, 5), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(3), stride=2,
                padding=1, output_padding=1, groups=1, dilation=1)
    args.update(change)
    return args


BAD_INPUTS = {
    # name: (arguments, exception type, message pattern)
    "input 2-D": (_args(input=torch.randn(4, 5)), RuntimeError, r"input to be 3-D \(unbatched\) or 4-D"),
    "input 5-D": (_args(input=torch.randn(1, 2, 4, 5, 5)), RuntimeError, r"input to be 3-D \(unbatched\) or 4-D"),
    "input not a tensor": (_args(input=[1.0]), TypeError, "input"),
    "weight 3-D": (_args(weight=torch.randn(4, 3, 3)), RuntimeError, "weight to be 4-D"),
    "channel mismatch": (_args(input=torch.randn(2, 3, 5, 5)), RuntimeError, "input to have 4 channels"),
    "groups not dividing channels": (_args(groups=3), RuntimeError, "groups=3.*divisible"),
    "zero groups": (_args(groups=0), RuntimeError, "non-positive groups"),
    "zero stride": (_args(stride=0, output_padding=0), RuntimeError, "non-positive stride"),
    "negative stride": (_args(stride=(2, -1), output_padding=0), RuntimeError, "non-positive stride"),
    "zero dilation": (_args(dilation=0), RuntimeError, "non-positive dilation"),
    "negative padding": (_args(padding=-1), RuntimeError, "negative padding"),
    "negative output_padding": (_args(output_padding=-1), RuntimeError, "negative output_padding"),
    "output_padding = stride": (_args(output_padding=2), RuntimeError,
                                "output_padding must be smaller than either stride or dilation"),
    "output_padding >= stride and dilation": (_args(stride=1, output_padding=1), RuntimeError,
                                              "output_padding must be smaller"),
    "stride of three values": (_args(stride=(1, 2, 3)), RuntimeError, "stride"),
    "non-positive output size": (_args(stride=1, padding=4, output_padding=0), RuntimeError,
                                 "output size is non-positive"),
    "empty spatial input": (_args(input=torch.randn(2, 4, 0, 5)), RuntimeError, "input"),
    "bias of wrong size": (_args(bias=torch.randn(4)), RuntimeError, "bias to be 1-D with 3 elements"),
    "weight dtype": (_args(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), RuntimeError,
                     "weight to have the input's dtype"),
    "bias dtype": (_args(bias=torch.randn(3, dtype=torch.float16)), RuntimeError, "bias to have the input's dtype"),
    "integer input": (_args(input=torch.ones(2, 4, 5, 5, dtype=torch.int64),
                            weight=torch.ones(4, 3, 3, 3, dtype=torch.int64), bias=None),
                      RuntimeError, "input has dtype torch.int64"),
    "weight on another device": (_args(weight=torch.randn(4, 3, 3, 3, device="meta")), RuntimeError,
                                 "weight to be on the input's device"),
    "bias on another device": (_args(bias=torch.randn(3, device="meta")), RuntimeError,
                               "bias to be on the input's device"),
}


@pytest.mark.parametrize("op", OPS, ids=["conv_transpose2d", "naive"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(op, case):
    args, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        op(**args)


ON_ANOTHER_DEVICE = pytest.mark.skip(reason="the odd tensor out is the meta one here")


@pytest.mark.parametrize("case", [pytest.param(c, marks=ON_ANOTHER_DEVICE) if c.endswith("on another device") else c
                                  for c, (a, _, _) in BAD_INPUTS.items() if isinstance(a["input"], torch.Tensor)])
def test_bad_input_on_meta(case):
    """The fake implementation refuses the same calls (so torch.compile does too)."""
    args, error, pattern = BAD_INPUTS[case]
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=pattern):
        tritondeconv.conv_transpose2d(**meta)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_tensors_on_cpu_and_cuda():
    args = _args(weight=torch.randn(4, 3, 3, 3, device="cuda"))
    with pytest.raises(RuntimeError, match="weight to be on the input's device"):
        tritondeconv.conv_transpose2d(**args)
