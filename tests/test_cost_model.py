"""The cost model: the tiles it ranks first for a layer's shape on an H100, a full wave
and no spill preferred, and what a first call times of its ranking."""
import pytest
import torch
from reference import FAMILIES

from tritondeconv.kernels import cost, launcher, phase_gemm, tuning
from tritondeconv.kernels.common import INTERPRETING
from tritondeconv.kernels.cost import Part, Problem, prune
from tritondeconv.kernels.tuning import config

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

H100 = launcher.H100

# A first call on NCHW input races the input as given against a channels-last copy; only
# in the interpreter is nothing timed, so only there does a call on meta tensors get
# through to the launch these tests read.
needs_untimed_calls = pytest.mark.skipif(
    not INTERPRETING, reason="the input's layout race times its candidates outside the interpreter")


def _ranked_on_h100(family: str, call) -> tuple[list[dict], Problem]:
    """The candidates an H100 would rank for ``family``'s launch in ``call()`` (the
    launch's own problem, the family's GPU table, pruned and ranked as the launcher does)."""
    requests = []
    with launcher.intercept(choose=lambda request, candidates: requests.append(request) or candidates[0]):
        call()
    request = next(r for r in requests if r.family == family)
    problem = request.problem()
    table = FAMILIES[family]
    (c_a, c_b) = (problem.parts[0].depth, problem.parts[0].columns) if family == "phase_gemm" else \
        (problem.parts[0].rows, problem.parts[0].columns)
    pruned = prune(table(c_a, c_b, interpreter=False), problem, H100.shared_memory)
    return cost.rank(pruned, problem, H100.machine), problem


def _forward(n, c_in, c_out, size, k=4, s=2, p=1, groups=1, dtype=torch.bfloat16):
    x = torch.empty(n, c_in, size, size, dtype=dtype, device="meta")
    w = torch.empty(c_in, c_out // groups, k, k, dtype=dtype, device="meta")
    return lambda: launcher_only_forward(x, w, s, p, groups)


def launcher_only_forward(x, w, s, p, groups):
    """The forward's launch on meta tensors (nothing runs: the launch is replaced)."""
    out = torch.empty(x.shape[0], w.shape[1] * groups, (x.shape[2] - 1) * s - 2 * p + w.shape[2],
                      (x.shape[3] - 1) * s - 2 * p + w.shape[3], dtype=x.dtype, device="meta")
    with launcher.intercept(launch=lambda request, config: None):
        phase_gemm.phase_gemm(out[:, :, None], x[:, :, None], w[:, :, None], None,
                              (1, s, s), (0, p, p), (1, 1, 1), groups, transposed=True, allow_tf32=False)


@pytest.mark.parametrize("n, c_in, c_out, size, expect", [
    pytest.param(8, 64, 3, 64, "dot16", id="rgb-output-layer"),
    pytest.param(8, 24, 24, 32, "rows64-128", id="24-channels"),
    pytest.param(16, 256, 128, 32, "wide", id="wide-layer"),
    pytest.param(1, 64, 64, 4, "small-rows", id="tiny-image"),
    pytest.param(8, 8, 8, 32, "fma", id="depthwise"),
])
@needs_untimed_calls
def test_cost_model_ranks_the_tiles_a_shape_needs(n, c_in, c_out, size, expect):
    groups = 8 if expect == "fma" else 1
    ranked, problem = _ranked_on_h100("phase_gemm", _forward(n, c_in, c_out, size, groups=groups))
    timed = ranked[:tuning.TIMED]
    best = ranked[0]
    if expect == "dot16":  # 3 output channels: a 16-wide tensor-core tile, ranked above every FMA tile
        assert cost.uses_dot(best, problem) and best["BLOCK_N"] == 16
    elif expect == "rows64-128":  # 17-32 channels: 64- and 128-row tiles, 32 wide, on offer and timed
        assert {c["BLOCK_M"] for c in ranked if c["BLOCK_N"] == 32} >= {64, 128}
        assert any(c["BLOCK_N"] == 32 and c["BLOCK_M"] >= 64 for c in timed)
    elif expect == "wide":
        assert best["BLOCK_N"] >= 64 and best["BLOCK_M"] >= 128 and best["BLOCK_K"] >= 32
    elif expect == "small-rows":  # 1 x 4 x 4 pixels per phase: 16 rows, no 128-row tile pays
        assert best["BLOCK_M"] <= 64
    else:  # one channel in, one out per group: FMA only
        assert not any(cost.uses_dot(c, problem) for c in ranked)
    assert 1 <= len(timed) <= 6


def test_cost_model_prefers_a_full_wave_and_no_spill():
    problem = Problem((Part(1, 132 * 128, 128, 64, 9),), 2, "bfloat16", ("BLOCK_N", "BLOCK_K"))
    machine = H100.machine
    # 132*128 rows: 128-row tiles make exactly one tile per SM; 256-row tiles leave half the SMs idle.
    assert (cost.estimate(config(128, 128, 64, 8, 3), problem, machine)
            < cost.estimate(config(256, 128, 64, 8, 3), problem, machine))
    # A tile whose accumulator alone needs 256 registers per thread is ranked last.
    spilling = config(256, 256, 64, 4, 2)
    assert cost.registers_per_thread(spilling, problem) > 255
    assert cost.rank([spilling, config(128, 128, 64, 8, 3)], problem, machine)[0]["BLOCK_M"] == 128
    # With the GPU unknown, the ranking keeps the list's order.
    assert cost.rank([spilling, config(128, 128, 64, 8, 3)], problem, None)[0] is spilling


@needs_untimed_calls
def test_a_k_equals_s_layer_times_the_best_of_both_variants():
    """The k = s layer offers the phase GEMMs and the one GEMM: its first call times the
    cost model's best of each (an H100's ranking), so the tuner's pick is never slower
    than tuning either variant alone would find."""
    requests = []
    with launcher.intercept(choose=lambda request, candidates: requests.append(request) or candidates[0]):
        _forward(16, 64, 64, 32, k=2, s=2, p=0)()
    (request,) = requests
    problem = request.problem()
    table = phase_gemm.configs(64, 64, 64 * 4, interpreter=False)
    ranked = cost.rank(prune(table, problem, H100.shared_memory), problem, H100.machine)
    timed = tuning.first_timed(ranked, request.variants)
    for one_gemm in (False, True):
        alone = [c for c in ranked if c["ONE_GEMM"] == one_gemm]
        assert len(alone) > tuning.TIMED and all(c in timed for c in alone[:tuning.TIMED])
    assert len(timed) == 2 * tuning.TIMED and timed == [c for c in ranked if c in timed] and timed[0] == ranked[0]
