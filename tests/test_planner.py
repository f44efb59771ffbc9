"""The phase planner against brute force, its multiply-add counts, and the explain CLI."""
import itertools
import subprocess
import sys

import pytest
import torch

import tritondeconv
from tritondeconv.explain import main as explain_main
from tritondeconv.kernels.planner import output_size, phase_taps, plan, plan_axis

AXES = [
    pytest.param(n, k, s, p, d, extra, id=f"n{n}-k{k}-s{s}-p{p}-d{d}-op{extra}")
    for n, k, s, d in itertools.product((1, 4, 7), range(1, 6), range(1, 5), (1, 2, 3))
    for p in (0, 1, 3)
    for extra in range(max(s, d))
    if output_size(n, k, s, p, d, extra) > 0
]


@pytest.mark.parametrize("n, k, s, p, d, extra", AXES)
def test_phases_match_brute_force(n, k, s, p, d, extra):
    """Every output lies in exactly one phase, and the phase's taps (read at their
    offsets) are exactly the (input, tap) pairs that scatter onto that output."""
    axis = plan_axis(n, k, s, p, d, extra)
    assert axis.size_out == output_size(n, k, s, p, d, extra)
    owners = [ph for o in range(axis.size_out) for ph in axis.phases if o in ph.out_indices]
    assert len(owners) == axis.size_out
    for o, ph in zip(range(axis.size_out), owners):
        u = (o + p) // s
        gathered = {(u - off, t) for t, off in zip(ph.taps, ph.offsets) if 0 <= u - off < n}
        scattered = {(i, t) for i in range(n) for t in range(k) if i * s - p + t * d == o}
        assert gathered == scattered, f"output {o}"
    # The one-GEMM variant's condition holds only where every output gathers exactly one
    # pair, and wherever that holds with one tap per phase.
    pairs = [sum(i * s - p + t * d == o for i in range(n) for t in range(k)) for o in range(axis.size_out)]
    one_tap = all(len(ph.taps) == 1 for ph in axis.phases if ph.count)
    assert axis.one_pair_each() == (one_tap and all(count == 1 for count in pairs))


KERNEL_AXES = [pytest.param(*a, id=f"n{a[0]}-k{a[1]}-s{a[2]}-p{a[3]}-d{a[4]}-op{a[5]}") for a in [
    (4, 3, 2, 1, 1, 1), (7, 4, 2, 1, 1, 0), (4, 5, 3, 1, 1, 2), (7, 2, 4, 0, 1, 3), (4, 1, 3, 0, 1, 0),
    (7, 3, 2, 1, 2, 1), (7, 4, 4, 3, 2, 1), (4, 5, 3, 0, 3, 2), (7, 3, 3, 1, 3, 0), (4, 4, 4, 1, 3, 3),
    (7, 5, 1, 3, 2, 0), (1, 4, 2, 0, 1, 1),
]]


@pytest.mark.fma_only("one channel in and out: each output is read as a code of the (input, tap) pairs it gathered")
@pytest.mark.parametrize("n, k, s, p, d, extra", KERNEL_AXES)
def test_the_kernel_gathers_what_the_planner_plans(device, n, k, s, p, d, extra):
    """The kernel's own phase arithmetic against the planner's taps and offsets: input
    pixel i holds i + 1 and tap t weighs 1000**t, so output o = sum_t 1000**t * (i_t + 1)
    spells out exactly which input each tap brought to it (float64, exact)."""
    axis = plan_axis(n, k, s, p, d, extra)
    x = torch.arange(1, n + 1, dtype=torch.float64, device=device).reshape(1, 1, n)
    w = (1000.0 ** torch.arange(k, dtype=torch.float64, device=device)).reshape(1, 1, k)
    out = tritondeconv.conv_transpose1d(x, w, None, s, p, extra, 1, d)[0, 0].tolist()
    for o, value in enumerate(out):
        code, gathered = round(value), set()
        for t in range(k):
            code, digit = divmod(code, 1000)
            if digit:
                gathered.add((digit - 1, t))
        ph = next(ph for ph in axis.phases if o in ph.out_indices)
        u = (o + p) // s
        planned = {(u - off, t) for t, off in zip(ph.taps, ph.offsets) if 0 <= u - off < n}
        assert gathered == planned, f"output {o} (phase {ph.residue})"


@pytest.mark.parametrize("stride", range(1, 7))
def test_phase_taps_from_the_modular_inverse_match_a_search(stride):
    """The closed form (every (s/g)-th tap from (r/g)*inv mod (s/g)) against a search."""
    for kernel_size, dilation, residue in itertools.product(range(1, 9), range(1, 7), range(stride)):
        searched = [kk for kk in range(kernel_size) if kk * dilation % stride == residue]
        assert list(phase_taps(residue, kernel_size, stride, dilation)) == searched, (kernel_size, dilation, residue)


def test_worked_example_k3_s2_p1():
    """k=3, s=2, p=1: even outputs use tap 1 only, odd outputs taps 0 and 2."""
    axis = plan_axis(4, 3, 2, 1)
    by_parity = {ph.out_start % 2: ph.taps for ph in axis.phases}
    assert by_parity == {0: (1,), 1: (0, 2)}


def test_phases_without_taps():
    """k < s, or gcd(d, s) > 1, leaves phases with no taps (their outputs are bias only)."""
    assert [len(ph.taps) for ph in plan_axis(4, 1, 3).phases] == [1, 0, 0]
    assert [len(ph.taps) for ph in plan_axis(4, 3, 2, dilation=2).phases] == [3, 0]


@pytest.mark.parametrize(
    "size, k, s, p, expected",
    [
        # 1-D k3 s2 p1, 4 inputs -> 7 outputs: naive 7*3 = 21; decomposed 3 odd outputs x 2 taps
        # + 4 even outputs x 1 tap = 10; useful: 12 (input, tap) pairs less 2 landing outside.
        (4, 3, 2, 1, {"naive": 21, "decomposed": 10, "useful": 10}),
        # k4 s2 p1, 4 inputs -> 8 outputs: naive 32, decomposed 8 x 2 = 16, useful 16 - 2 = 14.
        (4, 4, 2, 1, {"naive": 32, "decomposed": 16, "useful": 14}),
        # k2 s2 (no overlap): every output has exactly one tap, all useful.
        (5, 2, 2, 0, {"naive": 20, "decomposed": 10, "useful": 10}),
    ],
)
def test_mac_counts_1d(size, k, s, p, expected):
    assert plan((size,), (k,), (s,), (p,), (1,), (0,)).macs(1, 1, 1) == expected


def test_mac_counts_scale_with_channels_and_stride():
    p = plan((32, 32), (4, 4), (2, 2), (1, 1), (1, 1), (0, 0))
    macs = p.macs(batch=8, in_channels=64, out_channels=32, groups=2)
    assert macs["naive"] == 8 * 32 * 32 * 64 * 64 * 16  # N * C_out * C_in/g * H_out * W_out * k^2
    assert macs["naive"] == 4 * macs["decomposed"]  # s^2 with k % s == 0
    assert macs["useful"] <= macs["decomposed"]
    assert len(p.phases) == 4 and p.output_shape == (64, 64)


def test_plan_refuses_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        plan_axis(4, 3, 0)
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        plan((4, 4), (3,), (2, 2), (1, 1), (1, 1), (0, 0))


def test_explain_prints_the_decomposition(capsys):
    assert explain_main(["--kernel-size", "3", "--stride", "2", "--padding", "1"]) == 0
    out = capsys.readouterr().out
    assert "phase r=1: 8 outputs [0, 2, 4" in out and "taps [0, 2]" in out
    assert "naive zero-insertion 2,025; decomposed 484" in out
    assert out.rstrip().endswith("counted from the plan; no Triton kernel was run "
                                 "(python -m tritondeconv.demo runs one)")
    assert "ran:" not in out


def test_explain_module_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "tritondeconv.explain", "--kernel-size", "2", "--stride", "2", "--dilation", "2"],
        capture_output=True, text=True, check=True,
    )
    assert "no taps: bias only" in proc.stdout


def test_explain_plot_writes_a_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the test and perf extras install it)")
    path = tmp_path / "decomposition.png"
    assert explain_main(["--kernel-size", "3", "--stride", "2", "--padding", "1", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plan_takes_ints_or_tuples_as_pytorch_does():
    assert plan(8, 3, 2, 1).output_shape == (15,)
    assert plan((8, 6), 3, 2, 1).output_shape == (15, 11)
    assert plan((4, 8, 6), (3, 3, 3), 2).output_shape == (9, 17, 13)
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        plan((8, 6), (3, 3, 3), 2)


@pytest.mark.parametrize("args, names, phases", [
    (["--kernel-size", "4", "--stride", "2", "--rank", "1"], ["length"], "2 phases in 1-D"),
    (["--kernel-size", "3", "--stride", "2"], ["height", "width"], "4 phases in 2-D"),
    (["--kernel-size", "3", "3", "3", "--stride", "2"], ["depth", "height", "width"], "8 phases in 3-D"),
    (["--kernel-size", "3", "--stride", "3", "2", "1", "--input-size", "4", "5", "6"], ["depth", "height", "width"],
     "6 phases in 3-D"),
], ids=["1-D", "2-D", "3-D", "3-D per axis"])
def test_explain_handles_every_rank(capsys, args, names, phases):
    assert explain_main(args) == 0
    out = capsys.readouterr().out
    labels = [line.split(":")[0] for line in out.splitlines()]
    assert [label for label in labels if label in ("length", "depth", "height", "width")] == names
    assert phases in out
    assert out.startswith("o: an output index") and "u = (o + padding - r) / stride" in out  # every symbol defined


def test_explain_counts_in_singular_and_plural(capsys):
    explain_main(["--kernel-size", "3", "--stride", "2", "--padding", "1", "--input-size", "1"])
    out = capsys.readouterr().out
    assert "1 output [" in out and "1 tap [1]" in out and "2 taps [0, 2]" in out
    assert "1 outputs" not in out and "1 taps" not in out


@pytest.mark.parametrize("args, message", [
    (["--kernel-size", "4", "--stride", "2", "--output-padding", "2"],
     "output_padding must be smaller than either stride or dilation"),
    (["--kernel-size", "3", "--in-channels", "3", "--groups", "2"], "in_channels must be divisible by groups"),
    (["--kernel-size", "3", "--out-channels", "3", "--groups", "3", "--in-channels", "6", "--out-channels", "4"],
     "out_channels must be divisible by groups"),
    (["--kernel-size", "3", "3", "--stride", "1", "1", "1"], "--kernel-size needs 1 or 3 values for a 3-D geometry"),
    (["--kernel-size", "5", "--input-size", "1", "--padding", "3"], "output size"),
    (["--kernel-size", "3", "3", "3", "3"], "1, 2 or 3 spatial axes, but a size argument has 4 values"),
], ids=["output_padding", "in_channels", "out_channels", "ranks", "empty output", "four axes"])
def test_explain_refuses_what_the_op_refuses(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        explain_main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_explain_plot_legend_colours_and_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the test and perf extras install it)")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from tritondeconv.explain import figure
    fcn = figure(plan((4, 4), 16, 8, 4))  # FCN's k16 s8: 64 phases
    (legend,) = fcn.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 64 and labels[0] == "r=(0,0)" and labels[-1] == "r=(7,7)"
    assert len({to_hex(h.get_facecolor()) for h in legend.legend_handles}) == 64  # every phase its own colour
    kernel_axes = fcn.axes[1]
    assert len(kernel_axes.texts) == 0 and "labels omitted" in kernel_axes.get_title()  # 256 taps: no unreadable labels
    plt.close(fcn)
    dilated = figure(plan((8, 8), 3, 2, 1, 2))
    assert "dilation 2x2" in dilated.get_suptitle() and len(dilated.legends[0].get_texts()) == 4
    assert len(dilated.axes[1].texts) == 9
    plt.close(dilated)
    with pytest.raises(SystemExit):
        explain_main(["--kernel-size", "3", "--stride", "2", "--plot", str(tmp_path / "missing" / "x.png")])
    assert "--plot cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        explain_main(["--kernel-size", "3", "3", "3", "--stride", "2", "--plot", str(tmp_path / "x.png")])
    assert "--plot draws 2-D geometries" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        explain_main(["--kernel-size", "3", "--stride", "2", "--plot", str(tmp_path / "x.txt")])
    assert exit_.value.code == 2 and "extension names the picture's format, one of" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
