"""perf/plot.py's command line and figures, on small synthetic CSVs with the benchmark's
columns: usage and its errors, the summary figure per GPU, speedup axes labelled as
ratios with 1x drawn, losses told apart from wins."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="perf/plot.py needs matplotlib")
import matplotlib.pyplot as plt
from matplotlib.colors import to_hex

PERF = Path(__file__).parent.parent / "perf"
sys.path.insert(0, str(PERF))
try:
    import plot
finally:
    sys.path.remove(str(PERF))

HEADER = ["gpu", "rank", "shape", "dtype", "layout", "pass", "method", "median_ms", "tflops", "gbps", "pct_roofline",
          "tuning_s", "rel_error", "peak_tflops", "copy_gbps", "versions", "date"]
GPU, VERSIONS, DATE = "NVIDIA H200", "torch 2.11.0+cu130, triton 3.6.0, cuDNN 91900", "2026-11-30"
DCGAN = "DCGAN 128x128x16x16->64 k4 s2 p1"
UNET = "U-Net 16x256x128x128->128 k2 s2 p0"
# (shape, layout, pass): {method: milliseconds}; ours loses to cuDNN on DCGAN (0.5x),
# wins on U-Net (2x, 2.5x, 3x), and beats the naive op in the forward.
TIMES = {
    (DCGAN, "channels_last", "fwd"): {"tritondeconv": 1.0, "cudnn": 0.5, "naive": 3.0},
    (UNET, "channels_last", "fwd"): {"tritondeconv": 1.0, "cudnn": 2.0, "naive": 4.0},
    (UNET, "nchw", "fwd"): {"tritondeconv": 1.0, "cudnn": 2.5},
    (DCGAN, "channels_last", "fwd+bwd"): {"tritondeconv": 2.0, "cudnn": 1.0},
    (UNET, "channels_last", "fwd+bwd"): {"tritondeconv": 1.0, "cudnn": 3.0},
}


def write_csv(path: Path, gpu: str = GPU) -> Path:
    """A bench.csv with the benchmark's columns holding the cells of ``TIMES`` in bf16."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        for (shape, layout, pass_), methods in TIMES.items():
            for method, ms in methods.items():
                writer.writerow({"gpu": gpu, "rank": "2-D", "shape": shape, "dtype": "bf16", "layout": layout,
                                 "pass": pass_, "method": method, "median_ms": ms, "tflops": 10 / ms,
                                 "gbps": 100 / ms, "pct_roofline": 5, "tuning_s": "", "rel_error": 1e-3,
                                 "peak_tflops": 700, "copy_gbps": 4000, "versions": VERSIONS, "date": DATE})
    return path


def run_plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PERF / "plot.py"), *args], check=False, capture_output=True, text=True)


def panel(fig, title: str):
    """The summary's axes whose title starts with ``title``."""
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(title)]
    return ax


def tick_labels(ax) -> list[str]:
    ax.figure.canvas.draw()
    return [t.get_text() for t in ax.get_yticklabels()]


@pytest.fixture
def summary(tmp_path):
    fig = plot.summary_figure(plot.load(write_csv(tmp_path / "bench.csv")), tmp_path / "bench.csv")
    yield fig
    plt.close(fig)


def test_help_prints_usage():
    run = run_plot("--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: perf/plot.py")
    assert all(option in run.stdout for option in ("--out DIR", "--no-summary", "csv"))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist; python perf/bench.py writes one"),
    ("a,b\n1,2\n", "not a bench.csv (no column gpu"),
    ("\n".join([",".join(HEADER)]), "has a header and no rows"),
])
def test_a_csv_that_cannot_be_drawn_is_a_usage_error_of_one_line(tmp_path, content, message):
    path = tmp_path / "bench.csv"
    if content is not None:
        path.write_text(content)
    run = run_plot(str(path))
    assert run.returncode == 2 and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert errors == [run.stderr.splitlines()[-1]] and str(path) in errors[0] and message in errors[0], run.stderr
    assert not list(tmp_path.glob("*.png"))


def test_out_takes_one_csv(tmp_path):
    run = run_plot(str(write_csv(tmp_path / "a.csv")), str(write_csv(tmp_path / "b.csv")), "--out", str(tmp_path))
    assert run.returncode == 2 and "--out takes one CSV" in run.stderr.splitlines()[-1]


def test_every_figure_is_written_beside_the_csv_or_into_out(tmp_path):
    csv_path = write_csv(tmp_path / "bench.csv")
    run = run_plot(str(csv_path))
    assert run.returncode == 0, run.stderr
    for name in ("summary.png", "speedup_cudnn.png", "speedup_naive.png", "roofline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
        assert str(tmp_path / name) in run.stdout
    out = tmp_path / "figures" / "h200"
    assert run_plot(str(csv_path), "--out", str(out), "--no-summary").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["roofline.png", "speedup_cudnn.png", "speedup_naive.png"]


def test_speedup_axes_read_as_ratios_with_1x_drawn(summary):
    ax = panel(summary, "forward over cuDNN")
    assert ax.get_yscale() == "log"
    assert {"0.25×", "0.5×", "1×", "2×", "4×"} <= set(tick_labels(ax))
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())
    assert ax.get_ylabel() == "speedup over cuDNN\n(do_bench median)"
    # The naive column reaches 4x: its axis shares nothing with cuDNN's but the labels.
    assert "4×" in tick_labels(panel(summary, "forward over naive op"))


def test_each_layer_is_one_bar_rising_from_1x_or_hanging_faded_below_it(summary):
    ax = panel(summary, "forward over cuDNN")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DCGAN 128→64\n16² k4s2", "U-Net 256→128\n128² k2s2"]
    bars = sorted(ax.patches, key=lambda p: p.get_x())
    tops = [round(p.get_y() + p.get_height(), 6) for p in bars]
    assert tops == [0.5, 2.0, 2.5] and all(p.get_y() == 1.0 for p in bars)
    assert [p.get_alpha() for p in bars] == [plot.LOSS_ALPHA, 1.0, 1.0]
    assert [p.get_hatch() or "" for p in bars] == ["", "", plot.LAYOUT_HATCHES["nchw"]]
    assert {to_hex(p.get_facecolor()) for p in bars} == {to_hex(plot.DTYPE_COLOURS["bf16"])}
    assert "3 cells, geometric mean 1.36×" in ax.get_title()


def test_the_summary_has_forward_and_training_over_cudnn_and_the_naive_op(summary):
    titles = [ax.get_title() for ax in summary.axes]
    assert [t.split(":")[0] for t in titles] == [
        "forward over cuDNN", "forward over naive op", "training (forward+backward) over cuDNN",
        "training (forward+backward) over naive op"]
    training = panel(summary, "training (forward+backward) over cuDNN")
    assert [round(p.get_y() + p.get_height(), 6) for p in training.patches] == [0.5, 3.0]
    empty = panel(summary, "training (forward+backward) over naive op")
    assert not empty.patches and "no fwd+bwd cells with the naive op" in empty.texts[0].get_text()
    texts = [t.get_text() for t in summary.texts]
    assert any(GPU in t and VERSIONS in t and DATE in t for t in texts)
    assert any(t.startswith("source: ") and "bench.csv" in t and "do_bench median" in t for t in texts)
    legend = [t.get_text() for t in summary.legends[0].get_texts()]
    assert legend == ["bf16", "channels_last", "nchw", "below 1×: tritondeconv slower"]


def test_a_cpu_interpreter_csv_says_it_is_a_smoke_run(tmp_path):
    rows = plot.load(write_csv(tmp_path / "bench.csv", gpu="cpu-interpreter-x86_64"))
    fig = plot.summary_figure(rows)
    assert any("CPU interpreter smoke run, not a speed measurement" in t.get_text() for t in fig.texts)
    assert (panel(fig, "forward over aten (CPU)").get_ylabel()
            == "speedup over aten (CPU)\n(wall-clock median, interpreter)")
    plt.close(fig)
    fig = plot.speedup_figure(rows, "naive")
    assert "smoke run" in fig.get_suptitle()
    plt.close(fig)


@pytest.mark.parametrize("values, ticks", [
    ([0.6, 1.5], [0.25, 0.5, 1, 2, 4]),
    ([0.1, 10.0], [0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16]),
    ([2.0**-15, 2.0], [2.0**e for e in range(-14, 3, 2)]),
])
def test_ticks_are_powers_of_two_covering_the_data(values, ticks):
    assert plot.ratio_ticks(values) == ticks
    assert 1 in plot.ratio_ticks(values)


def test_ratio_labels():
    assert [plot.ratio_label(v) for v in (0.125, 0.25, 0.5, 1, 2, 8, 1 / 64)] == [
        "0.125×", "0.25×", "0.5×", "1×", "2×", "8×", "1/64×"]
    assert plot.layer_label("3D-U-Net 2x256x16x32x32->128 k2 s2 p0") == "3D-U-Net 256→128\n16×32² k2s2"
    assert plot.layer_label("quick-1d 2x8x7->4 k4 s2 p1") == "quick-1d 8→4\n7 k4s2"
    assert plot.layer_label("something else") == "something else"
