"""Direct launches of compiled kernels (sparge_serve.kernels.launch) on the GPU."""

import pytest
import torch

from tests.kernel_inputs import head_vec, make_paged_case


def _prefill(case, **kw):
    from sparge_serve.kernels import sparge_paged_prefill

    hq = case.q.shape[1]
    out = torch.zeros_like(case.q)
    stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    bm = sparge_paged_prefill(case.q, case.key_cache, case.value_cache, case.batch, case.scale,
                              head_vec(0.3, hq, "cuda"), head_vec(0.9, hq, "cuda"),
                              head_vec(8.0, hq, "cuda"), out, stats=stats, **kw)
    return out, stats, bm.count, bm.n_valid


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(map_budget=None), dict(map_budget=1e-9, map_floor=0)],
                         ids=["whole", "chunks"])
def test_direct_launches_equal_triton_launches(kw, monkeypatch):
    """The same outputs through ``JITFunction`` and through the compiled kernels' launchers, and
    the second call launches nothing through ``JITFunction``."""
    from triton.runtime.jit import JITFunction

    import sparge_serve.kernels.launch as launch

    case = make_paged_case([(700, 2000), (300, 300), (1, 900)], 8, 2, 128, 64, torch.bfloat16,
                           "cuda", packed=True)
    launch.set_fast_launch(False)
    try:
        want = _prefill(case, **kw)
    finally:
        launch.set_fast_launch(True)
    _prefill(case, **kw)  # compiles or finds each variant through JITFunction
    jit_run, calls = JITFunction.run, []
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: calls.append(self) or jit_run(
        self, *a, **k))
    got = _prefill(case, **kw)
    torch.cuda.synchronize()
    assert calls == []
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_direct_launches_keep_triton_specialisations():
    """A query tensor off 16-byte alignment gets its own compiled variant, as through
    ``JITFunction``, with the same block map."""
    from sparge_serve.kernels import predict_block_map
    from sparge_serve.kernels.launch import _LAUNCHERS
    from sparge_serve.kernels.predictor import _select_kernel

    case = make_paged_case([(700, 2000)], 8, 2, 128, 64, torch.bfloat16, "cuda", packed=True)
    odd = torch.empty(case.q.numel() + 1, dtype=case.q.dtype, device="cuda")[1:]
    odd = odd.view(case.q.shape).copy_(case.q)
    assert odd.data_ptr() % 16 and not case.q.data_ptr() % 16
    ths = head_vec(0.3, 8, "cuda"), head_vec(0.9, 8, "cuda")
    maps = []
    for q in (case.q, odd, case.q, odd):
        bm = predict_block_map(q, case.key_cache, case.batch, case.scale, *ths)
        maps.append((bm.lut, bm.count))
    variants = {k[1:] for k in _LAUNCHERS[_select_kernel]._compiled}
    assert len(variants) >= 2
    for lut, count in maps[1:]:
        assert torch.equal(count, maps[0][1])
        for r, row in enumerate(count.flatten().tolist()):
            assert torch.equal(lut.flatten(0, 2)[r, :row], maps[0][0].flatten(0, 2)[r, :row])


def test_profiler_hooks_take_the_plain_path(monkeypatch):
    """With a launch hook set (a profiler's; Triton 3.6 keeps hooks in chains that are never
    None), launches go through ``kernel[grid]`` so that the hook sees them."""
    from triton import knobs

    import sparge_serve.kernels.launch as launch

    kernel = _Kernel()
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "FAST", True)
    assert not launch._hooked()
    hook = lambda *args: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert launch._hooked()
        launch.Launcher(kernel)[(3, 1)](1, x=2)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.calls == [((3, 1), (1,), {"x": 2})] and not launch._hooked()


class _Kernel:
    """A stand-in for a JITFunction: only its plain launch may be used."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_fast_launch_setting_takes_the_plain_path(monkeypatch):
    """``set_fast_launch(False)`` (``SpargeConfig.fast_launch``) launches through
    ``kernel[grid]``; ``True`` takes the fast path where Triton's internals are as expected."""
    import sparge_serve.kernels.launch as launch

    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "FAST", True)
    assert launch.internals_problem() is None  # the pinned Triton
    assert launch.fast_path()
    launch.set_fast_launch(False)
    assert not launch.fast_path()
    kernel = _Kernel()
    launch.Launcher(kernel)[(2,)](7)
    assert kernel.calls == [((2,), (7,), {})]


@pytest.mark.parametrize("change", ["signature", "code", "launcher"])
def test_unknown_triton_internals_fall_back_to_plain_launches(change, monkeypatch):
    """A Triton whose ``JITFunction.run`` or compiled-kernel launcher differs from what the fast
    path repeats takes the plain path, and says so once."""
    import logging

    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    import sparge_serve.kernels.launch as launch

    if change == "signature":
        monkeypatch.setattr(JITFunction, "run", lambda self, *args, grid, **kwargs: None)
    elif change == "code":
        def run(self, *args, grid, warmup, **kwargs):  # binds, then launches otherwise
            return self.launch(*args, grid=grid, **kwargs)
        monkeypatch.setattr(JITFunction, "run", run)
    else:
        monkeypatch.delattr(CompiledKernel, "run")
    problem = launch.internals_problem()
    assert problem is not None and ("JITFunction.run" in problem or "CompiledKernel" in problem)
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "FAST", True)
    launch._internals_ok.cache_clear()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    launch.logger.addHandler(handler)
    try:
        kernel = _Kernel()
        for _ in range(3):
            assert not launch.fast_path()
            launch.Launcher(kernel)[(1, 2)](3)
    finally:
        launch.logger.removeHandler(handler)
        launch._internals_ok.cache_clear()
    assert kernel.calls == [((1, 2), (3,), {})] * 3
    assert len(records) == 1 and problem in records[0].getMessage()
