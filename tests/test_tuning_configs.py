"""Which configurations a launch is offered: the paths each kernel family offers by
shape, every offered configuration computing the same result, pruning to the problem
and the GPU, and the keys that tell one shape class from another."""
import pytest
import torch
import triton
from reference import (
    DTYPES,
    FAMILIES,
    TOLERANCES,
    assert_close,
    fresh_seed,
    layout,
    reference,
    relative_error,
    tile_sides,
)

import tritondeconv
from tritondeconv.kernels import launcher
from tritondeconv.kernels.cost import Part, Problem, prune
from tritondeconv.kernels.tuning import config

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _uses_dot(c: dict, family: str) -> bool:
    """Whether a configuration multiplies on tensor cores (both of its GEMM's channel tiles >= 16)."""
    return min(tile_sides(family, c)) >= 16


# (reduced channels, produced channels) -> which paths are offered, first path first.
PATHS = [
    pytest.param(1, 1, ["fma"], id="depthwise"),
    pytest.param(64, 3, ["dot", "fma"], id="few-output-channels"),
    pytest.param(3, 64, ["dot", "fma"], id="few-input-channels"),
    pytest.param(64, 64, ["dot"], id="wide"),
]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("c_red, c_col, paths", PATHS)
def test_paths_offered_by_shape(family, c_red, c_col, paths):
    # weight_grad's configs take (C_in, C_out); for the forward those are (reduced, produced).
    offered = FAMILIES[family](c_red, c_col)
    kinds = ["dot" if _uses_dot(c, family) else "fma" for c in offered]
    assert [k for i, k in enumerate(kinds) if k not in kinds[:i]] == paths
    for c in offered:
        if not _uses_dot(c, family):  # FMA tiles are exactly as wide as narrow channel counts
            sides = ("BLOCK_K", "BLOCK_N") if family == "phase_gemm" else ("BLOCK_M", "BLOCK_N")
            assert all(c[side] == min(triton.next_power_of_2(ch), 16) for side, ch in zip(sides, (c_red, c_col)))


def _each_offered_config(family: str, run):
    """``run()`` once per configuration the ``family``'s launcher offers its tuner (pruned
    and ranked as the launcher does); the outputs."""
    offered, outputs, index = [], [], 0
    while index == 0 or index < len(offered[0]):
        def choose(request, candidates, chosen=index):
            if request.family != family:
                return candidates[0]
            offered.append(candidates)
            return candidates[chosen]
        with launcher.intercept(choose=choose):
            outputs.append(run())
        index += 1
    return outputs


SHAPES = [  # (N, C_in, C_out, groups): one per path
    pytest.param(2, 4, 4, 4, id="depthwise"),
    pytest.param(2, 20, 3, 1, id="few-output-channels"),
    pytest.param(2, 3, 20, 1, id="few-input-channels"),
    pytest.param(2, 20, 18, 1, id="wide"),
]


@pytest.mark.interpreter_subset({"precision": "float64"}, reason="interpreter suite: one precision on CPU")
@pytest.mark.parametrize("precision", ["float64", "bfloat16"], indirect=True)
@pytest.mark.parametrize("n, c_in, c_out, groups", SHAPES)
def test_every_offered_config_is_correct(device, precision, n, c_in, c_out, groups):
    """Forward and weight gradient with each configuration the tuner could pick."""
    seed = fresh_seed()
    dtype = DTYPES[precision]
    size = 5 if device == "cpu" else 17
    x = layout(torch.randn(n, c_in, size, size + 2, device=device).to(dtype), "channels_last")
    w = torch.randn(c_in, c_out // groups, 4, 4, device=device).to(dtype)
    b = torch.randn(c_out, device=device).to(dtype)
    args = (2, 1, 0, groups)
    ref = reference(x, w, b, *args, 1)
    # The phase GEMM's, and where the layer has few channels per group (the depthwise
    # one), the grouped kernel's: each forced onto its side of their race.
    forward = {"phase_gemm": False, "grouped": True} if groups > 1 else {"phase_gemm": False}
    for family, grouped in forward.items():
        with launcher.intercept(only=(("grouped", grouped),)):
            outputs = _each_offered_config(family, lambda: tritondeconv.conv_transpose2d(x, w, b, *args))
        for out in outputs:
            assert_close(out, ref, precision, seed)

    gy = torch.randn(ref.shape, device=device).to(dtype)
    w_ref = w.double().requires_grad_()
    torch.nn.functional.conv_transpose2d(x.double(), w_ref, None, *args).backward(gy.double())
    for grad_w in _each_offered_config(
        "weight_grad",
        lambda: torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [4, 4], [2, 2], [1, 1], [1, 1], groups),
    ):
        assert relative_error(grad_w, w_ref.grad) <= TOLERANCES[precision], f"seed {seed}"


def _problem(rows: int, columns: int, depth: int, element_size: int = 2) -> Problem:
    return Problem((Part(1, rows, columns, depth, 1),), element_size, "float16", ("BLOCK_N", "BLOCK_K"))


def test_prune_fits_tiles_to_the_problem_and_the_gpu():
    candidates = [config(128, 128, 64, num_stages=4), config(128, 16, 64), config(64, 64, 16),
                  config(32, 16, 16, num_stages=2), config(128, 4, 16, num_stages=2)]
    # Three output channels: no tensor-core tile wider than 16 (tl.dot's minimum), the FMA tile as wide as 4.
    assert prune(candidates, _problem(4096, 3, 256), None) == [candidates[1], candidates[3], candidates[4]]
    # Few rows: no 128-row tensor-core tile for 40 rows (the FMA path's only tile stays).
    assert prune(candidates, _problem(40, 64, 256), None) == [candidates[2], candidates[3], candidates[4]]
    # Shared memory: 4 stages × (128×64 + 64×128) × 4 bytes = 256 KiB does not fit in 228 KiB.
    assert candidates[0] not in prune(candidates, _problem(4096, 256, 256, 4), 228 * 1024)
    assert candidates[0] in prune(candidates, _problem(4096, 256, 256, 2), 228 * 1024)
    # Nothing fits: the smallest candidate, never an empty list.
    assert prune(candidates, _problem(4096, 256, 256, 8), 1024) == [candidates[3]]


def test_phase_gemm_key_separates_shape_classes(device):
    """One tuning per layout, dtype, groups and size bucket; image sizes in one bucket share it."""
    keys = []
    with launcher.intercept(choose=lambda request, candidates: keys.append(request.key) or candidates[0]):
        for shape, kind, dtype, groups in [((2, 4, 6, 6), "nchw", torch.float64, 1),
                                           ((2, 4, 6, 6), "channels_last", torch.float64, 1),
                                           ((2, 4, 6, 7), "nchw", torch.float64, 1),
                                           ((2, 4, 6, 6), "nchw", torch.float32, 1),
                                           ((2, 4, 12, 12), "nchw", torch.float64, 1),
                                           ((2, 8, 6, 6), "nchw", torch.float64, 2)]:
            x = layout(torch.randn(shape, dtype=dtype, device=device), kind)
            w = torch.randn(shape[1], 3, 3, 3, dtype=dtype, device=device)
            tritondeconv.conv_transpose2d(x, w, None, 2, 1, 1, groups)
    nchw, channels_last, wider, fp32, larger, grouped = keys
    assert len({nchw, channels_last, fp32, larger, grouped}) == 5
    assert nchw == wider  # rows per phase 2*6*6 and 2*6*7 share the bucket 128


def test_weight_grad_key_holds_the_geometry(device):
    """The weight gradient's key tells apart what decides which pixels hit: kernel size,
    padding, dilation (and groups), not only channels and stride."""
    keys = []
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    def choose(request, candidates):
        if request.family == "weight_grad":
            keys.append(request.key)
        return candidates[0]
    with launcher.intercept(choose=choose):
        for k, p, d, g in [(3, 1, 1, 1), (4, 1, 1, 1), (3, 0, 1, 1), (3, 1, 2, 1), (3, 1, 1, 2)]:
            w = torch.randn(4, 4 // g, k, k, dtype=torch.float64, device=device)
            gy = torch.randn(tritondeconv.conv_transpose2d(x, w, None, 2, p, 0, g, d).shape,
                             dtype=torch.float64, device=device)
            torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [k, k], [2, 2], [p, p], [d, d], g)
    assert len(set(keys)) == 5
