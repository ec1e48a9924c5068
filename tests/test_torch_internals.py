"""The fused backend's private-internals tricks: version gate, self-checks, and falling back.

[Note: private torch internals] and [Note: falling back from the fused backend] describe the
behaviour. A failing C++ compiler is simulated the way a user meets one: Inductor is pointed at
a compiler that exits with an error, and its caches are bypassed so that it has to build.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path

import pytest
import torch

import optimi
from optimi import _fused, _torch_internals, optimizer
from optimi._fused import compilation, dispatch, packing
from tests.cases import OPTIMIZERS
from tests.test_fused import params_on, restore_tricks, spec_id, state_tensors, train_on, tricks  # noqa: F401

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="the fused backend needs torch.compile")

OLDEST, NEWEST = _torch_internals.TESTED_TORCH
IN_TESTED_RANGE = OLDEST <= _torch_internals.torch_version() <= NEWEST


@pytest.fixture
def fresh_fused(monkeypatch):
    """Empty compiled-step and fallback tables, restored afterwards."""
    monkeypatch.setattr(dispatch, "COMPILED", {})
    monkeypatch.setattr(dispatch, "PACKING_FAILED", set())
    monkeypatch.setattr(dispatch, "FELL_BACK", {})


@pytest.fixture
def failing_compiler(tmp_path: Path, fresh_fused):
    """Inductor's C++ compiler replaced by one that always fails; no cache can spare the build."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    compiler = tmp_path / "failing-cxx"
    compiler.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
    compiler.chmod(0o755)
    PyCodeCache.cache_clear()
    with inductor_config.patch({"cpp.cxx": (str(compiler),), "fx_graph_cache": False}):
        yield compiler
    PyCodeCache.cache_clear()


@pytest.fixture
def automatic_fused(monkeypatch):
    """``fused=None`` picks the fused backend for the tests' small groups too."""
    monkeypatch.setattr(optimizer, "FUSED_MIN_ELEMENTS", 0)


def run(optimizer_cls, dtype: torch.dtype, steps: int = 3, **kwargs):
    params = params_on("cpu", dtype)
    opt = optimizer_cls(params, lr=1e-2, weight_decay=0.1, **kwargs)
    train_on(opt, params, 1e-2, steps=steps)
    return state_tensors(opt, params)


def runtime_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# -- the version gate -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.9.1", "2.16.0", "3.0.0"])
def test_tricks_are_off_outside_the_tested_versions(version, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(_torch_internals, "_ENABLED", {})
    monkeypatch.setattr(_torch_internals, "_STATUS", {})
    monkeypatch.delenv("OPTIMI_FUSED_TRICKS", raising=False)
    assert not any(_torch_internals.enabled(name) for name in _torch_internals.TRICKS)
    assert all(f"torch {version} is outside the tested" in s for s in _torch_internals.report().values())


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("none", set()),
        ("all", set(_torch_internals.TRICKS)),
        ("direct_calls, packed_pairs", {"direct_calls", "packed_pairs"}),
    ],
)
def test_the_environment_overrides_the_gate(setting, expected, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    monkeypatch.setattr(_torch_internals, "_ENABLED", {})
    monkeypatch.setattr(_torch_internals, "_STATUS", {})
    monkeypatch.setenv("OPTIMI_FUSED_TRICKS", setting)
    assert {name for name in _torch_internals.TRICKS if _torch_internals.enabled(name)} == expected


def test_an_unknown_trick_in_the_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_torch_internals, "_ENABLED", {})
    monkeypatch.setenv("OPTIMI_FUSED_TRICKS", "direct_calls,warp_drive")
    with pytest.raises(ValueError, match="OPTIMI_FUSED_TRICKS.*warp_drive"):
        _torch_internals.enabled("direct_calls")


@pytest.mark.skipif(not IN_TESTED_RANGE, reason="the tricks are off on an untested torch")
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=spec_id)
def test_every_trick_engages_and_passes_its_self_check(spec, fresh_fused, monkeypatch):
    """On a tested torch each optimizer's bf16 and fp32 steps use every trick, with no warning."""
    monkeypatch.setattr(_torch_internals, "_STATUS", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.bfloat16, torch.float32):
            params = params_on("cpu", dtype)
            opt = spec.optimi_cls(params, lr=spec.lr, fused=True, **spec.kwargs)
            train_on(opt, params, spec.lr, steps=2)
    assert runtime_warnings(caught) == []
    assert set(_torch_internals.report().values()) == {"engaged"}
    steps = dispatch.COMPILED.values()
    assert all(step.direct is not None for step in steps if step.capture)
    assert any(step.packed for step in steps) and sum(step.hoisted_statements for step in steps) > 0


# -- self-checks ----------------------------------------------------------------------------------


def test_a_direct_call_that_disagrees_with_dynamo_is_switched_off(fresh_fused, monkeypatch):
    """A captured graph that writes the wrong bits is caught before it touches a real tensor."""
    real = compilation.compile_capturing_graphs

    def capture_a_graph_that_writes_nothing(graph, example_inputs, options):
        compiled, plan, _ = real(graph, example_inputs, options)
        return compiled, plan, lambda arguments: None

    tricks(monkeypatch, direct_calls=True)
    expected = run(optimi.AdamW, torch.float32, fused=True)
    monkeypatch.setattr(dispatch, "COMPILED", {})
    monkeypatch.setattr(compilation, "compile_capturing_graphs", capture_a_graph_that_writes_nothing)
    with pytest.warns(RuntimeWarning, match="'direct_calls' optimization failed its self-check"):
        actual = run(optimi.AdamW, torch.float32, fused=True)
    assert not _torch_internals.enabled("direct_calls")
    assert _torch_internals.report()["direct_calls"].startswith("off: self-check failed")
    for a, b in zip(expected, actual):
        assert torch.equal(a, b)


def test_a_packed_kernel_that_disagrees_with_its_rule_runs_the_plain_kernel(fresh_fused, monkeypatch):
    """A packed kernel that stores wrong halves is caught on a scratch row; the plain kernel runs."""
    tricks(monkeypatch, packed_pairs=False)
    expected = run(optimi.AdamW, torch.bfloat16, fused=True)
    monkeypatch.setattr(dispatch, "COMPILED", {})
    tricks(monkeypatch, packed_pairs=True)
    real_pack = packing.pack

    def pack_losing_odd_halves(even, odd):
        # only while compiling: the eager run of the rule keeps the real packing
        return real_pack(even, torch.zeros_like(odd) if torch.compiler.is_compiling() else odd)

    monkeypatch.setattr(packing, "pack", pack_losing_odd_halves)
    with pytest.warns(RuntimeWarning, match="'packed_pairs' optimization failed its self-check"):
        actual = run(optimi.AdamW, torch.bfloat16, fused=True)
    assert not _torch_internals.enabled("packed_pairs")
    for a, b in zip(expected, actual):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_packed_kernels_are_kept_only_where_they_are_faster(fresh_fused, monkeypatch):
    """The once-per-process speed check keeps the plain kernel where packed pairs run slower."""
    tricks(monkeypatch, packed_pairs=False)
    expected = run(optimi.AdamW, torch.bfloat16, fused=True)
    monkeypatch.setattr(dispatch, "COMPILED", {})
    tricks(monkeypatch, packed_pairs=True)
    monkeypatch.setattr(compilation, "_PACKED_SPEED_CHECKED", False)
    monkeypatch.setattr(compilation, "_SPEED_CHECK_WORDS", 1 << 12)
    real_run = compilation.CompiledStep._run_compiled

    def packed_runs_slowly(self, *args):
        time.sleep(0.005)
        return real_run(self, *args)

    # the speed check runs the packed kernel through _run_compiled, the plain one through __call__
    monkeypatch.setattr(compilation.CompiledStep, "_run_compiled", packed_runs_slowly)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = run(optimi.AdamW, torch.bfloat16, fused=True)
    assert runtime_warnings(caught) == []  # a slower kernel is a choice, not a failure
    assert _torch_internals.report()["packed_pairs"].startswith("off: slower than the plain kernel")
    assert not any(step.packed and step.dynamo_calls > 1 for step in dispatch.COMPILED.values())
    for a, b in zip(expected, actual):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


# -- falling back when compiling fails --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_automatic_fused_falls_back_to_the_for_loop_once(dtype, failing_compiler, automatic_fused):
    """``fused=None``: one warning naming the cause, the for-loop's bits, no retry on later steps."""
    expected = run(optimi.AdamW, dtype, steps=4, foreach=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = run(optimi.AdamW, dtype, steps=4)
    messages = runtime_warnings(caught)
    assert len(messages) == 1, messages
    assert f"torch {torch.__version__}" in messages[0] and "for_loop backend" in messages[0]
    assert "C++ compiler" in messages[0] or "failing-cxx" in messages[0] or "Cxx" in messages[0]
    assert list(_fused.fallen_back_configurations().values()) == ["for_loop"]
    for a, b in zip(expected, actual):
        assert torch.equal(a, b)


def test_explicit_fused_raises_naming_the_version_and_cause(failing_compiler):
    params = params_on("cpu", torch.float32)
    before = [p.detach().clone() for p in params]
    opt = optimi.AdamW(params, lr=1e-2, fused=True)
    with pytest.raises(_fused.FusedCompileError, match=rf"torch {re.escape(torch.__version__)}.*fused=True") as raised:
        train_on(opt, params, 1e-2, steps=1)
    assert "InvalidCxxCompiler" in str(raised.value) or "compiler" in str(raised.value).lower()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing was written
    assert _fused.fallen_back_configurations() == {}


def test_explicit_fused_raises_after_an_automatic_fallback_too(failing_compiler, automatic_fused):
    """A configuration that fell back for one optimizer still raises for an explicit ``fused=True``."""
    with pytest.warns(RuntimeWarning, match="for_loop backend"):
        run(optimi.AdamW, torch.float32, steps=1)
    with pytest.raises(_fused.FusedCompileError, match="fused=True"):
        run(optimi.AdamW, torch.float32, steps=1, fused=True)


@pytest.mark.parametrize("fused", [None, True])
def test_fallback_under_gradient_release(fused, failing_compiler, automatic_fused):
    """Under gradient release too: ``None`` steps each parameter with the for-loop, ``True`` raises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    reference.load_state_dict(model.state_dict())
    ref_opt = optimi.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    opt = optimi.AdamW(model.parameters(), lr=1e-2, fused=fused, gradient_release=True)
    optimi.prepare_for_gradient_release(model, opt)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    if fused:
        with pytest.raises(_fused.FusedCompileError, match="fused=True"):
            torch.nn.functional.mse_loss(model(x), y).backward()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.nn.functional.mse_loss(model(x), y).backward()
            torch.nn.functional.mse_loss(reference(x), y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
    assert len(runtime_warnings(caught)) == 1
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    optimi.remove_gradient_release(model)


def test_cuda_style_fallback_runs_foreach(failing_compiler, automatic_fused):
    """A failed configuration runs the backend the optimizer names: on CUDA foreach, checked here.

    StableAdamW's fused order has a reduction rule (its first pass); foreach runs it as well.
    """
    expected = run(optimi.StableAdamW, torch.float32, steps=3, foreach=True)
    params = params_on("cpu", torch.float32)
    opt = optimi.StableAdamW(params, lr=1e-2, weight_decay=0.1)
    opt._fused_fallback = lambda group, backend: "foreach"  # what a CUDA group gets
    with pytest.warns(RuntimeWarning, match="foreach backend"):
        train_on(opt, params, 1e-2, steps=3)
    assert set(_fused.fallen_back_configurations().values()) == {"foreach"}
    # the fused pass order composed from the same rules: equal to rounding
    for a, b in zip(expected, state_tensors(opt, params)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# -- logging --------------------------------------------------------------------------------------


def test_a_compile_is_logged_with_its_duration(fresh_fused, caplog):
    with caplog.at_level(logging.INFO, logger="optimi"):
        run(optimi.SGD, torch.float32, steps=2, fused=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "optimi"]
    assert any(line.startswith("optimi: compiling the fused _sgd_update (cpu, float32)") for line in lines), lines
    assert any(" step in " in line and line.endswith(" s") for line in lines), lines
    assert len(lines) == 2  # the second step compiles nothing
