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
@pytest.mark.parametrize("kw", [dict(map_budget=None), dict(map_budget=1e-9, map_floor=0),
                                dict(fused=True)], ids=["whole", "chunks", "fused"])
def test_direct_launches_equal_triton_launches(kw, monkeypatch):
    """The same outputs through ``JITFunction`` and through the compiled kernels' launchers, and
    the second call launches nothing through ``JITFunction``."""
    from triton.runtime.jit import JITFunction

    import sparge_serve.kernels.launch as launch

    case = make_paged_case([(700, 2000), (300, 300), (1, 900)], 8, 2, 128, 64, torch.bfloat16,
                           "cuda", packed=True)
    monkeypatch.setattr(launch, "FAST", False)
    want = _prefill(case, **kw)
    monkeypatch.setattr(launch, "FAST", True)
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

    calls = []

    class Kernel:  # a stand-in for a JITFunction: only its plain launch may be used
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(launch, "FAST", True)
    assert not launch._hooked()
    hook = lambda *args: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert launch._hooked()
        launch.Launcher(Kernel())[(3, 1)](1, x=2)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert calls == [((3, 1), (1,), {"x": 2})] and not launch._hooked()
