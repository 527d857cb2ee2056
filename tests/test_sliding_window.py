"""Sliding-window models on CPU: a tiny Gemma 3-shaped model (sliding and full layers) is served,
its windowed layers run dense FlashAttention with their window (never the sparse path, no
thresholds), its full layers keep the sparse path; Gemma 2's logit soft-capping stays refused."""

from __future__ import annotations

import math

import pytest
import torch

from sparge_serve.thresholds import Thresholds, save_thresholds
from tests.vllm_cpu import cpu_engine_config, sparge_setter, validation_reasons

L, HQ, HKV, D, PAGE, WINDOW = 4, 4, 2, 64, 16, 128
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SCALAR = 48  # Gemma 3's query_pre_attn_scalar: the layer's scale is SCALAR**-0.5


def _name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def _engine_config(path, config):
    config.save_pretrained(path)
    return cpu_engine_config(path, PAGE)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A 4-layer Gemma 3 text model (sliding, full, sliding, full) with random weights."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=1000, hidden_size=HQ * D, intermediate_size=512, num_hidden_layers=L,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
        max_position_embeddings=65536, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        query_pre_attn_scalar=SCALAR, torch_dtype="bfloat16")
    path = tmp_path_factory.mktemp("tiny_gemma3")
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return _engine_config(path, config)


@pytest.fixture(autouse=True)
def fresh_state(fresh_backend_state):
    """Each test: no cached runtime/metrics object, no SPARGE_* env, no metric files."""


@pytest.fixture
def sparge(gemma3, monkeypatch):
    return sparge_setter(gemma3, monkeypatch, min_sparse_len=1024, min_sparse_query_len=1)


def _reasons(vllm_config, **overrides):
    return validation_reasons(vllm_config,
                              **{"head_size": D, "has_sliding_window": True, **overrides})


def _impl(vllm_config, layer: int, **kwargs):
    from vllm.config import set_current_vllm_config

    from sparge_serve.backend.sparge_attn import SpargeAttentionImpl

    window = WINDOW if LAYER_TYPES[layer] == "sliding_attention" else None
    args = dict(num_heads=HQ, head_size=D, scale=SCALAR**-0.5, num_kv_heads=HKV,
                alibi_slopes=None, sliding_window=window, kv_cache_dtype="auto")
    args.update(kwargs)
    with set_current_vllm_config(vllm_config):
        return SpargeAttentionImpl(**args)


def test_gemma3_configuration_is_accepted(sparge):
    from sparge_serve.backend.sparge_attn import SpargeAttentionBackend

    vc = sparge()
    assert vc.model_config.hf_text_config.layer_types == LAYER_TYPES
    assert SpargeAttentionBackend.supports_sliding_window()
    assert _reasons(vc) == []


def test_windowed_layers_run_dense_flash_attention_with_their_window(sparge, monkeypatch):
    """The dense FlashAttentionImpl of a windowed layer has the window (as FLASH_ATTN sets it);
    a full layer's has none; the layer's scale is the one vLLM gives (query_pre_attn_scalar)."""
    import sparge_serve.backend.sparge_attn as sa

    monkeypatch.setattr(sa, "get_flash_attn_version", lambda **kw: 2)
    vc = sparge()
    windowed, full = _impl(vc, 0), _impl(vc, 1)
    assert isinstance(windowed._fa, sa.FlashAttentionImpl)
    assert windowed._fa.sliding_window == windowed.sliding_window == (WINDOW - 1, 0)
    assert full._fa.sliding_window == full.sliding_window == (-1, -1)
    assert windowed.scale == full.scale == windowed._fa.scale == SCALAR**-0.5
    assert windowed.sparse_scratch_bytes() == 0


def _thresholds_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    th = Thresholds(torch.rand(L, HQ, generator=g), torch.rand(L, HQ, generator=g) * 0.5 + 0.5,
                    torch.rand(L, HQ, generator=g) * 10, torch.ones(L, HQ, dtype=torch.uint8),
                    num_kv_heads=HKV, head_dim=D)
    path = tmp_path / "th.safetensors"
    save_thresholds(path, th)
    return th, path


def test_windowed_layers_are_never_bound_to_thresholds(sparge, tmp_path):
    th, path = _thresholds_file(tmp_path)  # every layer sparse in the file
    vc = sparge(thresholds=str(path))
    for i, kind in enumerate(LAYER_TYPES):
        impl = _impl(vc, i)
        impl.bind(_name(i), torch.device("cpu"))
        assert impl.layer_index == i  # counted under its layer
        if kind == "sliding_attention":
            assert impl.dense_layer and impl._cdfthreshd is None and impl._simthreshd1 is None
        else:
            assert not impl.dense_layer
            assert torch.equal(impl._cdfthreshd, th.cdfthreshd[i])
            assert torch.equal(impl._simthreshd1, th.simthreshd1[i])


def _cam(reqs):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qlens = torch.tensor([q for q, _ in reqs], dtype=torch.int32)
    seq = torch.tensor([s for _, s in reqs], dtype=torch.int32)
    qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qlens, 0)
    pages = [math.ceil(s / PAGE) for _, s in reqs]
    table = torch.arange(len(reqs) * max(pages), dtype=torch.int32).view(len(reqs), -1)
    num_tokens = int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq.clone(),
        seq_lens_cpu_upper_bound=seq, num_reqs=len(reqs), num_actual_tokens=num_tokens,
        max_query_len=int(qlens.max()), max_seq_len=int(seq.max()), block_table_tensor=table,
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64), num_logits_indices=None)


class _Stats:
    def __init__(self):
        self.prefill, self.fallbacks = [], []

    def count_prefill(self, layer, sparse, dense):
        self.prefill.append((layer, sparse, dense))

    def count_fallback(self, reason, n):
        self.fallbacks.append((str(reason), n))


def test_windowed_kv_cache_group_is_never_planned_sparse(sparge, tmp_path):
    """vLLM gives windowed layers a SlidingWindowSpec group: its steps run dense with the
    window in the metadata (FlashAttention's builder) and count as dense-layer fallbacks; a full
    group's long prefill takes the sparse path."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from sparge_serve.backend.sparge_attn import SpargeAttentionMetadataBuilder

    vc = sparge()
    window_spec = SlidingWindowSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                                    dtype=torch.bfloat16, sliding_window=WINDOW)
    full_spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                                  dtype=torch.bfloat16)
    cam = _cam([(2048, 4096), (1, 300)])
    windowed = SpargeAttentionMetadataBuilder(window_spec, [_name(0), _name(2)], vc,
                                              torch.device("cpu")).build(0, cam)
    assert windowed.sparse is None and windowed.plan is None
    assert tuple(windowed.sliding_window) == (WINDOW - 1, 0)
    assert windowed.seq_lens.tolist() == [4096, 300]
    c = windowed.counts
    assert (c.sparse_tokens, c.dense_tokens, c.sparse_reqs) == (2048, 0, 1)  # decode rows are not prompt tokens
    full = SpargeAttentionMetadataBuilder(full_spec, [_name(1), _name(3)], vc,
                                          torch.device("cpu")).build(0, cam)
    assert full.sparse is not None and full.sparse.req_index.tolist() == [0]
    assert tuple(full.sliding_window) == (-1, -1)

    # The windowed layer's forward: dense over the whole batch, counted dense with its reason.
    impl = _impl(vc, 0)
    stats = _Stats()
    impl.bind(_name(0), torch.device("cpu"), stats)
    calls = []
    impl._dense = lambda layer, q, k, v, kv, md, out: calls.append(md)
    q = torch.zeros(cam.num_actual_tokens, HQ, D, dtype=torch.bfloat16)
    impl.forward(None, q, q[:, :HKV], q[:, :HKV], torch.zeros(1), windowed, torch.empty_like(q))
    assert calls == [windowed]
    assert stats.prefill == [(0, 0, 2048)] and stats.fallbacks == [("dense_layer", 1)]


def test_groups_that_never_run_sparse_share_one_build_a_step(sparge):
    """vLLM's GPUModelRunner builds a KV-cache spec's metadata once a step and gives the spec's
    other groups a copy with their block table and slot mapping (``update_block_table``), as
    under FLASH_ATTN: windowed groups (Gemma 3 has five) take part, the copy being the other
    group's build of the same step; a full group that may run sparse builds its own (its
    sub-batch and plan carry its block table)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from sparge_serve.backend.sparge_attn import SpargeAttentionMetadataBuilder

    vc = sparge()
    window_spec = SlidingWindowSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                                    dtype=torch.bfloat16, sliding_window=WINDOW)
    full_spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                                  dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    first, second = (SpargeAttentionMetadataBuilder(window_spec, [_name(i)], vc, cpu)
                     for i in (0, 2))
    full = SpargeAttentionMetadataBuilder(full_spec, [_name(1), _name(3)], vc, cpu)
    assert first.supports_update_block_table and second.supports_update_block_table
    assert not full.supports_update_block_table
    cam = _cam([(2048, 4096), (1, 300)])
    md = first.build(0, cam)
    table, slots = cam.block_table_tensor + 1000, cam.slot_mapping + 7
    copied = second.update_block_table(md, table, slots)
    built = second.build(0, cam.replace(block_table_tensor=table, slot_mapping=slots))
    assert type(copied) is type(built)
    assert copied.block_table is table and copied.slot_mapping is slots
    assert md.block_table is cam.block_table_tensor  # the first group's build is untouched
    for name in ("num_actual_tokens", "max_query_len", "max_seq_len", "sliding_window",
                 "causal"):
        assert getattr(copied, name) == getattr(built, name), name
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        assert torch.equal(getattr(copied, name), getattr(built, name)), name
    assert copied.sparse is None and copied.counts is md.counts
    assert vars(copied.counts) == vars(built.counts)


def test_gemma2_soft_capping_is_still_refused(tmp_path):
    """Gemma 2 (sliding windows and logit soft-capping): refused naming soft-capping only."""
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=1000, hidden_size=HQ * D, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, sliding_window=WINDOW,
        attn_logit_softcapping=50.0, torch_dtype="bfloat16")
    config.architectures = ["Gemma2ForCausalLM"]
    vc = _engine_config(tmp_path / "tiny_gemma2", config)
    vc.additional_config = {"sparge": {}}
    reasons = " | ".join(_reasons(vc))
    assert "soft-capping" in reasons and "sliding" not in reasons, reasons
    with pytest.raises(ValueError, match="SPARGE") as ei:
        _impl(vc, 0, logits_soft_cap=50.0)
    assert "soft-capping (50.0)" in str(ei.value) and "sliding" not in str(ei.value)


def test_mixed_windows_turn_off_the_ahead_of_time_schedule(sparge, monkeypatch):
    """As FlashAttention's builder does for its own layers: several windows in the model (Gemma
    3: window and none) leave no single window for FA3's ahead-of-time schedule."""
    from types import SimpleNamespace

    import sparge_serve.backend.sparge_attn as sa

    vc = sparge()
    layers = {_name(i): SimpleNamespace(impl=_impl(vc, i)) for i in range(L)}
    monkeypatch.setattr(sa, "get_layers_from_vllm_config", lambda _vc, _cls, names=None: {
        n: layer for n, layer in layers.items() if names is None or n in names})
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                             dtype=torch.bfloat16)
    b = sa.SpargeAttentionMetadataBuilder(spec, [_name(1), _name(3)], vc, torch.device("cpu"))
    assert b.aot_schedule is False and b.aot_sliding_window == (-1, -1)
    assert [layers[_name(i)].impl.dense_layer for i in range(L)] == [True, False, True, False]
