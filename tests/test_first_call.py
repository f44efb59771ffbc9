"""A first call's tuning: only the cost model's best candidates timed (a share for each
kernel variant), compiled concurrently before any is timed, spilling and failing ones
dropped, a winner that disagrees with the default not kept; and the same through the
ops and the launcher's seam: tuned once and remembered, forgotten and tuned again, a
faulty kernel caught, nothing runnable falling back to aten."""
import threading

import pytest
import torch
from reference import assert_close, narrow_layer

import tritondeconv
from tritondeconv.kernels import launcher, tuning
from tritondeconv.kernels.common import configured
from tritondeconv.kernels.tuning import Tuner, config

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

MANY = [config(16 * (i + 1), 16, 16) for i in range(10)]  # ten candidates, ranked in this order


def _fast(c: dict) -> float:
    return 10.0 / c["BLOCK_M"]  # larger tiles faster: the last candidate is the fastest


def test_only_the_cost_models_best_are_timed_unless_exhaustive(cache_dir):
    timed = []
    tuner = Tuner("ranked", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])
    assert tuner.pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True) == MANY[tuning.TIMED - 1]
    assert timed == MANY[:tuning.TIMED]
    timed.clear()
    with configured(autotune="exhaustive"):
        assert tuner.pick("Fake GPU", ("k2",), lambda: MANY, lambda c: c, tune=True) == MANY[-1]
    assert timed == MANY
    timed.clear()
    with configured(autotune="0"):
        assert tuner.pick("Fake GPU", ("k3",), lambda: MANY, lambda c: c) == MANY[0] and timed == []


def test_each_kernel_variant_gets_its_own_timed_share(cache_dir):
    """Where the candidates hold several kernel variants (a compile-time constant set or
    not), a first call times the best ``TIMED`` of each, in rank order, and can pick any."""
    variant = [dict(c, V=i % 4 == 3) for i, c in enumerate(MANY + [config(16 * (i + 11), 16, 16) for i in range(14)])]
    timed = []
    tuner = Tuner("variants", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])
    chosen = tuner.pick("Fake GPU", ("k",), lambda: variant, lambda c: c, tune=True, variants=("V",))
    plain, with_v = [c for c in variant if not c["V"]], [c for c in variant if c["V"]]
    assert timed == [c for c in variant if c in plain[:tuning.TIMED] + with_v[:tuning.TIMED]]
    assert chosen == with_v[tuning.TIMED - 1]  # the fastest timed: past the overall best 6
    assert tuning.first_timed(variant, ("V",), 0) == variant


def test_candidates_compile_concurrently_before_any_is_timed(cache_dir):
    events = []
    together = threading.Barrier(2, timeout=30)  # two compiles must be under way at once

    def compile_(c):
        if c in MANY[:2]:
            together.wait()
        events.append(("compile", c["BLOCK_M"]))
        return tuning.Compiled(n_regs=64, n_spills=0, shared=0)

    def clock(run):
        config = run()
        events.append(("time", config["BLOCK_M"]))
        return _fast(config)

    Tuner("parallel", None, clock).pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True, compile=compile_)
    kinds = [kind for kind, _ in events]
    assert kinds.count("compile") == tuning.TIMED and kinds == sorted(kinds)  # every compile before the first timing
    (entry,) = [t for t in tuning.tuning_report() if t.kernel == "parallel"]
    assert all(t.compile_s is not None and t.compile_s >= 0 for t in entry.timings)


def test_spilling_and_failing_candidates_are_dropped_but_never_the_last(cache_dir, caplog):
    spills = {16: 0, 32: 8, 48: 0, 64: 0, 80: 0, 96: 0}

    def compile_(c):
        if c["BLOCK_M"] == 48:
            raise RuntimeError("PassManager::run failed")
        return tuning.Compiled(n_regs=255, n_spills=spills[c["BLOCK_M"]], shared=0)

    timed = []
    tuner = Tuner("filters", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = tuner.pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True, compile=compile_)
    assert chosen == MANY[5] and [c["BLOCK_M"] for c in timed] == [16, 64, 80, 96]
    assert "PassManager::run failed" in caplog.text
    notes = {t.config["BLOCK_M"]: t.note for t in tuning.tuning_report()[-1].timings}
    assert notes[32] == "spills 8 registers" and notes[48].startswith("failed to compile")
    # Every candidate spills: the least spilling ones are still timed.
    timed.clear()
    chosen = tuner.pick("Fake GPU", ("k2",), lambda: MANY[:3], lambda c: c, tune=True,
                        compile=lambda c: tuning.Compiled(255, {16: 4, 32: 2, 48: 2}[c["BLOCK_M"]], 0))
    assert chosen == MANY[2] and [c["BLOCK_M"] for c in timed] == [32, 48]


def test_a_compile_step_failing_for_every_candidate_falls_back_to_timing_them(cache_dir, caplog):
    """If compiling ahead fails for all (an API that moved, not the candidates), the
    candidates are still timed (each compiled at its launch) rather than all dropped."""
    timed = []
    tuner = Tuner("compile-step", None, lambda run: (timed.append(run()), _fast(timed[-1]))[1])

    def broken(c):
        raise AttributeError("'CompiledKernel' object has no attribute 'n_spills'")
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = tuner.pick("Fake GPU", ("k",), lambda: MANY, lambda c: c, tune=True, compile=broken)
    assert chosen == MANY[tuning.TIMED - 1] and timed == MANY[:tuning.TIMED]
    assert "compiling ahead failed for every candidate" in caplog.text


def test_a_winner_that_disagrees_with_the_default_is_not_kept(cache_dir, caplog):
    good = torch.randn(64, dtype=torch.float64)
    fastest = MANY[tuning.TIMED - 1]
    order = iter(MANY[:tuning.TIMED])  # the tuner times in ranked order
    with caplog.at_level("WARNING", logger="tritondeconv"):
        chosen = Tuner("checked").pick("Fake GPU", ("k",), lambda: MANY,
                                       lambda c: good + 1e-3 if c == fastest else good.clone(), tune=True,
                                       clock=lambda run: (run(), _fast(next(order)))[1])
    assert chosen == MANY[0] and "disagrees" in caplog.text


def test_agreement_is_up_to_summation_order_with_the_same_nan_and_inf():
    good = torch.randn(64, dtype=torch.float64)
    assert tuning.agree(good, good + 1e-12) and not tuning.agree(good, good + 1e-3)
    nan, inf = good.clone(), good.clone()
    nan[3], inf[5] = float("nan"), float("inf")
    assert not tuning.agree(good, nan) and tuning.agree(nan, nan.clone())
    assert not tuning.agree(good, inf) and not tuning.agree(inf, -inf) and tuning.agree(inf, inf.clone())
    half = good.half()
    assert tuning.agree(half, (half.float() * (1 + 1e-3)).half())


# ---------------------------------------------------------------- the same, through the ops

def _recording_launches(launched: list, corrupt=None):
    """A launch hook that runs the real kernel, records each configuration, and (for
    ``corrupt(config)``) then overwrites one output element."""
    def launch(request, config):
        launcher.run_kernel(request, config)
        launched.append((request.family, config))
        if corrupt is not None and corrupt(config):
            request.output[(0,) * request.output.dim()] += 1.0
    return launch


def _fma(config: dict) -> bool:
    return config["BLOCK_N"] < 16


def _described(config: dict) -> tuple:
    """A configuration as a value that can be compared and collected."""
    return tuple(sorted(config.items()))


@pytest.mark.fma_only("the fake clock makes the FMA tile win the tuning: the launch that computes the result is FMA")
def test_a_first_call_tunes_through_the_seam_and_remembers(device, first_calls):
    x, w, ref = narrow_layer(device)
    launched = []
    clock = lambda run: (run(), 0.5 if _fma(launched[-1][1]) else 1.0)[1]  # noqa: E731 (FMA "faster")
    with launcher.intercept(tune=True, clock=clock, launch=_recording_launches(launched)):
        assert_close(tritondeconv.conv_transpose2d(x, w, None, 2, 1), ref, "float64", 0)
        tuned = len(launched)
        tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    entry = tuning.tuning_report()[-1]
    timed = {_described(trial.config) for trial in entry.timings if not trial.note}
    assert entry.kernel == "phase_gemm" and _fma(entry.config) and len(timed) >= 2  # (how many: the device's table)
    assert timed == {_described(config) for _, config in launched[:tuned]}  # each timed through the seam
    assert _fma(launched[-1][1]) and len(launched) == tuned + 1  # the second call: one launch, nothing timed


@pytest.mark.fma_only("the fake clock makes the FMA tile win one of the tunings")
def test_a_forgotten_tuning_is_tuned_again(device, first_calls, monkeypatch, tmp_path):
    """``forget_tunings`` forgets a layer's configuration everywhere it is kept (the
    launch plan keeps it too): with a cache file that has not seen the layer either, the
    next call tunes again and keeps the new winner."""
    x, w, ref = narrow_layer(device)
    for fma_wins in (True, False):
        monkeypatch.setenv("TRITONDECONV_CACHE_DIR", str(tmp_path / str(fma_wins)))
        launched = []
        # (the clock runs inside this iteration's ``intercept``: bind this iteration's values)
        clock = lambda run, launched=launched, fma_wins=fma_wins: (  # noqa: E731
            run(), 0.5 if _fma(launched[-1][1]) == fma_wins else 1.0)[1]
        with launcher.intercept(tune=True, clock=clock, launch=_recording_launches(launched)):
            tritondeconv.conv_transpose2d(x, w, None, 2, 1)
            tuned = len(launched)
            assert_close(tritondeconv.conv_transpose2d(x, w, None, 2, 1), ref, "float64", 0)
        assert tuned > 2 and len(launched) == tuned + 1 and _fma(launched[-1][1]) == fma_wins, fma_wins
        launcher.forget_tunings()


def test_a_kernel_that_disagrees_is_caught_by_the_first_tuning(device, first_calls, caplog):
    """Fault injection: the FMA tile (timed fastest) corrupts one output element; the
    winner check keeps the tensor-core tile, and the result is right."""
    x, w, ref = narrow_layer(device)
    launched = []
    clock = lambda run: (run(), 0.5 if _fma(launched[-1][1]) else 1.0)[1]  # noqa: E731
    with caplog.at_level("WARNING", logger="tritondeconv"), \
            launcher.intercept(tune=True, clock=clock, launch=_recording_launches(launched, corrupt=_fma)):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    assert_close(out, ref, "float64", 0)
    assert not _fma(tuning.tuning_report()[-1].config) and "disagrees" in caplog.text


@pytest.mark.no_kernel("every launch is made to fail, so aten computes the call")
def test_no_runnable_candidate_falls_back_to_aten_with_one_warning(device, first_calls):
    x, w, ref = narrow_layer(device)

    def launch(request, config):
        raise RuntimeError("injected: no configuration runs")

    with launcher.intercept(tune=True, clock=lambda run: (run(), 1.0)[1], launch=launch), \
            pytest.warns(UserWarning, match="computed by aten's convolution instead"):
        out = tritondeconv.conv_transpose2d(x, w, None, 2, 1)
    torch.testing.assert_close(out, ref)
