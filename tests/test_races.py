"""Races at a layer's first call, through the ops: the auto backend against aten per
op, NCHW input against its channels-last copy, one inside the other; each remembered,
and raced again once forgotten; and the backend switch's names."""
import pytest
import torch
from reference import assert_close, input_copies, narrow_layer

import tritondeconv
from tritondeconv.kernels import launcher, tuning
from tritondeconv.kernels.common import observe_launches

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@pytest.mark.parametrize("winner", ["aten", "tritondeconv"])
def test_auto_backend_races_aten_per_op_and_remembers(device, first_calls, winner):
    x, w, ref = narrow_layer(device)
    x.requires_grad_()
    calls = []

    def clock(run):
        with observe_launches() as launched:
            run()
        ours = bool(launched)  # aten's run launches no kernel
        calls.append(ours)
        return 1.0 if ours == (winner == "aten") else 0.5

    tritondeconv.set_backend("auto")
    with launcher.intercept(tune=True, clock=clock):
        with observe_launches():
            out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
            out.backward(torch.ones_like(out))
        timed = len(calls)
        with observe_launches() as again:
            out2 = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert_close(out, ref, "float64", 0)
    assert_close(out2, ref, "float64", 0)
    raced = {t.key[0] for t in tuning.tuning_report() if t.kernel == "backend"}
    assert {"conv_transpose2d", "conv_transpose_input_grad"} <= raced
    assert len(calls) == timed  # remembered: the second forward times nothing
    assert bool(again) == (winner == "tritondeconv")


def _layout_clock(winner: str, timed: list):
    """A clock under which run ``winner`` (``"staged"``: the one that copies its input)
    is the faster; it records which run it timed (True: the staged one)."""
    def clock(run):
        with observe_launches() as launched:
            run()
        staged = input_copies(launched) > 0
        timed.append(staged)
        return 0.5 if staged == (winner == "staged") else 1.0
    return clock


@pytest.mark.parametrize("winner", ["staged", "gathered"])
def test_nchw_input_races_a_channels_last_copy_and_remembers(device, first_calls, winner):
    """On NCHW input with 16 or more channels, a layer's first call times the phase GEMM
    on the input as given and on a channels-last copy of it, keeps the faster, and its
    later calls take that one without timing anything."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=device)
    ref = torch.nn.functional.conv_transpose2d(x, w, None, 2, 1)
    timed = []
    with launcher.intercept(tune=True, clock=_layout_clock(winner, timed)):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
        with observe_launches() as again:
            out2 = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert sorted(timed) == [False, True]  # each run timed once, the second call timed nothing
    assert_close(out, ref, "float64", 0)
    assert_close(out2, ref, "float64", 0)
    assert (input_copies(again) > 0) == (winner == "staged")
    entry = tuning.tuning_report()[-1]
    assert (entry.kernel, entry.config) == ("input_layout", {"backend": winner})


def test_a_forgotten_race_is_raced_again(device, first_calls, monkeypatch, tmp_path):
    """``forget_tunings`` forgets the input-layout race too (whose answer the launch
    plan also keeps): with a cache file that has not seen the layer either, the next
    call races again, and keeps the new answer."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=device)
    for winner in ("staged", "gathered"):
        monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path / winner))
        timed = []
        with launcher.intercept(tune=True, clock=_layout_clock(winner, timed)):
            tritondeconv.conv_transpose2d(x, w, None, 2, 1)
            with observe_launches() as again:
                tritondeconv.conv_transpose2d(x, w, None, 2, 1)
        assert sorted(timed) == [False, True] and (input_copies(again) > 0) == (winner == "staged"), winner
        launcher.forget_tunings()


@pytest.mark.parametrize("winner", ["staged", "gathered"])
def test_weight_gradient_races_channels_last_copies_and_remembers(device, first_calls, winner):
    """With NCHW input and grad_output of 16 or more channels, the weight gradient's first
    call times its GEMM on the operands as given and on channels-last copies of both,
    keeps the faster, and its later calls take that one without timing anything."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    gy = torch.randn(2, 16, 8, 8, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 4, 4, dtype=torch.float64, device=device)
    ref = torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], [1, 1], [1, 1], True, [0, 0], 1,
                                              [False, True, False])[1]
    timed = []
    with launcher.intercept(tune=True, clock=_layout_clock(winner, timed)):
        got = torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [4, 4], [2, 2], [1, 1], [1, 1], 1)
        with observe_launches() as again:
            got2 = torch.ops.tritondeconv.conv_transpose_weight_grad(x, gy, [4, 4], [2, 2], [1, 1], [1, 1], 1)
    assert sorted(timed) == [False, True]  # each run timed once, the second call timed nothing
    assert_close(got, ref, "float64", 0)
    assert_close(got2, ref, "float64", 0)
    assert input_copies(again) == (2 if winner == "staged" else 0)
    entry = tuning.tuning_report()[-1]
    assert (entry.kernel, entry.config) == ("operand_layout", {"backend": winner})


def test_auto_backend_times_a_layer_whose_kernels_race_a_copy(device, first_calls):
    """Under the ``auto`` backend, timing our kernels on NCHW input runs the race
    between the input as given and its channels-last copy inside the race with aten:
    both complete (each race tunes under its own family) and the result is right."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, device=device)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, device=device)
    tritondeconv.set_backend("auto")
    with launcher.intercept(tune=True, clock=lambda run: (run(), 1.0)[1]):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert_close(out, torch.nn.functional.conv_transpose2d(x, w, None, 2, 1), "float64", 0)
    assert {t.kernel for t in tuning.tuning_report()[-2:]} == {"input_layout", "backend"}


def test_backend_switch_refuses_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of triton, auto"):
        tritondeconv.set_backend("cudnn")
    assert tritondeconv.get_backend() == "triton"
