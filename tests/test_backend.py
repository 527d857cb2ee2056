"""The SPARGE backend on CPU: capability checks, settings/thresholds loading, the metadata builder on
synthetic CommonAttentionMetadata, and the impl's forward (Triton interpreter) vs the reference."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparge_serve.thresholds import Thresholds, ThresholdsError, save_thresholds
from tests.kernel_inputs import quantize_fp8
from tests.vllm_cpu import cpu_engine_config, sparge_setter, validation_reasons

L, HQ, HKV, D, PAGE = 4, 4, 2, 64, 16
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HQ * D,
    "intermediate_size": 512, "num_attention_heads": HQ, "num_key_value_heads": HKV,
    "num_hidden_layers": L, "vocab_size": 1000, "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "head_dim": D,
}


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return cpu_engine_config(path, PAGE)


@pytest.fixture(autouse=True)
def fresh_state(fresh_backend_state):
    """Each test: no cached runtime/metrics object, no SPARGE_* env, no metric files."""


@pytest.fixture
def sparge(vllm_config, monkeypatch):
    """Set the sparge settings of `vllm_config` for one test: sparge(min_sparse_len=..., ...)."""

    # The builder cases below are laid out around a 16K threshold (not the shipped default), with
    # short queries allowed on the sparse path (min_sparse_query_len has its own test below).
    return sparge_setter(vllm_config, monkeypatch, min_sparse_len=16384, min_sparse_query_len=1)


def _builder(vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from sparge_serve.backend.sparge_attn import SpargeAttentionMetadataBuilder

    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                             dtype=torch.bfloat16)
    return SpargeAttentionMetadataBuilder(spec, [f"model.layers.{i}.self_attn.attn"
                                                 for i in range(L)], vllm_config,
                                          torch.device("cpu"))


def _cam(reqs, pad_reqs=0, host_seq_lens=True, seed=0):
    """CommonAttentionMetadata of requests [(query_len, seq_len), ...] (+ padded empty rows)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    reqs = list(reqs) + [(0, 0)] * pad_reqs
    qlens = torch.tensor([q for q, _ in reqs], dtype=torch.int32)
    seq = torch.tensor([s for _, s in reqs], dtype=torch.int32)
    qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qlens, 0)
    pages = [math.ceil(s / PAGE) for _, s in reqs]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sum(pages) + 1, generator=g).to(torch.int32)
    table = torch.zeros(len(reqs), max(pages) + 1, dtype=torch.int32)
    off = 0
    for r, n in enumerate(pages):
        table[r, :n] = perm[off : off + n]
        off += n
    num_tokens = int(qsl[-1])
    slots = torch.zeros(num_tokens, dtype=torch.int64)
    for r, (q, s) in enumerate(reqs):
        pos = torch.arange(s - q, s)
        slots[int(qsl[r]) : int(qsl[r + 1])] = table[r, pos // PAGE].long() * PAGE + pos % PAGE
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq.clone(),
        seq_lens_cpu_upper_bound=seq if host_seq_lens else None, num_reqs=len(reqs),
        num_actual_tokens=num_tokens, max_query_len=int(qlens.max()),
        max_seq_len=int(seq.max()), block_table_tensor=table, slot_mapping=slots,
        num_logits_indices=None)


def _counts(md):
    c = md.counts
    return (c.sparse_tokens, c.dense_tokens, c.sparse_reqs,
            {str(r): n for r, n in c.fallbacks})


# ---- capability checks ----------------------------------------------------------------------


def _reasons(vllm_config, **overrides):
    return validation_reasons(vllm_config, **{"head_size": D, **overrides})


def test_valid_configuration(sparge):
    assert _reasons(sparge()) == []


@pytest.mark.parametrize("override,text", [
    ({"kv_cache_dtype": "fp8_e5m2"}, "--kv-cache-dtype fp8_e5m2 is not supported here; SPARGE "
                                     "serves auto, bfloat16, float16, and fp8 / fp8_e4m3 where "
                                     "FlashAttention 3 runs (Hopper GPUs)"),
    ({"has_sink": True}, "attention sinks are not supported"),
    ({"use_mla": True}, "MLA (multi-head latent attention) models are not supported"),
    ({"attn_type": "encoder_only"}, "attention type encoder_only (encoder / encoder-only / "
                                    "cross attention) is not supported"),
    ({"attn_type": "encoder_decoder"}, "attention type encoder_decoder"),
    ({"head_size": 96}, "head size 96 is not supported by the sparse kernels"),
    ({"dtype": torch.float32}, "dtype not supported"),
])
def test_rejected_configurations(sparge, override, text):
    reasons = _reasons(sparge(), **override)
    assert any(text in r for r in reasons), reasons
    assert all(r.startswith("SPARGE: ") for r in reasons)


def test_model_level_rejections():
    from sparge_serve.backend.capabilities import unsupported_model_reasons

    mc = SimpleNamespace(is_hybrid=True, use_mla=False, is_encoder_decoder=True, uses_alibi=True,
                         hf_text_config=SimpleNamespace(attn_logit_softcapping=50.0))
    vc = SimpleNamespace(model_config=mc,
                         parallel_config=SimpleNamespace(decode_context_parallel_size=2))
    text = " | ".join(unsupported_model_reasons(vc, D, torch.bfloat16))
    for feature in ("hybrid models", "encoder-decoder", "ALiBi", "soft-capping",
                    "decode context parallelism"):
        assert feature in text


@pytest.mark.parametrize("kwargs,text", [
    ({"alibi_slopes": [1.0] * HQ}, "ALiBi"),
    ({"logits_soft_cap": 30.0}, "soft-capping"),
    ({"attn_type": "encoder"}, "attention type encoder"),
    ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype 'fp8_e5m2' (supported: auto, bfloat16, "
                                     "float16, and fp8 / fp8_e4m3"),
    ({"sinks": torch.zeros(HQ)}, "attention sinks"),
    ({"chunk_lookback": 2}, "attention options ['chunk_lookback']"),
    ({"head_size": 80}, "head size 80 (the sparse kernels support [64, 128, 256])"),
])
def test_impl_rejects_unsupported_layers(sparge, kwargs, text):
    from vllm.config import set_current_vllm_config

    from sparge_serve.backend.sparge_attn import SpargeAttentionImpl

    args = dict(num_heads=HQ, head_size=D, scale=D**-0.5, num_kv_heads=HKV, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    args.update(kwargs)
    with set_current_vllm_config(sparge()), pytest.raises(ValueError, match="SPARGE") as ei:
        SpargeAttentionImpl(**args)
    assert text in str(ei.value) and "FLASH_ATTN" in str(ei.value)


def test_preferred_page_size_only_when_sparse_can_run(sparge, monkeypatch):
    """64-token pages (TMA in the sparse kernel) only where a request can take the sparse path;
    otherwise vLLM's default, which decodes a little faster."""
    from vllm.config import set_current_vllm_config

    from sparge_serve.backend.capabilities import PREFERRED_PAGE_SIZE
    from sparge_serve.backend.sparge_attn import SpargeAttentionBackend

    def preferred(vc):
        with set_current_vllm_config(vc):
            return SpargeAttentionBackend.get_preferred_block_size(16)

    vc = sparge(min_sparse_len=1024)
    assert vc.model_config.max_model_len >= 1024
    assert preferred(vc) == PREFERRED_PAGE_SIZE == 64
    assert preferred(sparge(min_sparse_len=vc.model_config.max_model_len + 1)) == 16
    assert preferred(sparge(min_sparse_len=1024, mode="dense")) == 16
    assert SpargeAttentionBackend.get_preferred_block_size(16) == 64  # no config: sparse default


def test_builder_sets_the_processs_kernel_launches(sparge, monkeypatch):
    """``fast_launch`` (env ``SPARGE_FAST_LAUNCH``) decides this process's kernel launches: the
    metadata builder sets it from the settings."""
    import sparge_serve.kernels.launch as launch

    monkeypatch.setattr(launch, "FAST", True)
    _builder(sparge(fast_launch=False))
    assert launch.FAST is False
    _builder(sparge())
    assert launch.FAST is True


def test_profiling_reserves_the_sparse_scratch(sparge):
    """vLLM sizes the KV cache from its profiling forward: the sparse path's worst case must be
    in it whenever a request can take the sparse path."""
    from sparge_serve.kernels import prefill_scratch_bytes

    vc = sparge(min_sparse_len=1024, min_sparse_query_len=512)
    impl = _impl(vc)
    sc, max_len = vc.scheduler_config, vc.model_config.max_model_len
    reqs = min(sc.max_num_seqs, sc.max_num_batched_tokens // 512)
    rows = 2 * sc.max_num_batched_tokens * HQ * D * 2
    two = impl.sparse_scratch_bytes()
    assert two == rows + prefill_scratch_bytes(HQ, HKV, D, reqs, sc.max_num_batched_tokens,
                                               max_len)
    whole = _impl(sparge(min_sparse_len=1024, min_sparse_query_len=512, map_budget=None))
    assert whole.sparse_scratch_bytes() == rows + prefill_scratch_bytes(
        HQ, HKV, D, reqs, sc.max_num_batched_tokens, max_len, map_budget=None) >= two
    fa3 = _impl(sparge(min_sparse_len=1024, min_sparse_query_len=512, attention_kernel="fa3"))
    page = vc.cache_config.block_size or 64
    # (layers with the PV skip run the Triton kernel's chunks)
    assert fa3.sparse_scratch_bytes() == rows + max(prefill_scratch_bytes(
        HQ, HKV, D, reqs, sc.max_num_batched_tokens, max_len, fa3_page_size=page), two - rows)
    assert _impl(sparge(min_sparse_len=max_len + 1)).sparse_scratch_bytes() == 0
    assert _impl(sparge(mode="dense")).sparse_scratch_bytes() == 0


def test_kv_cache_layout_is_flash_attentions(sparge):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    from sparge_serve.backend.sparge_attn import SpargeAttentionBackend

    assert SpargeAttentionBackend.get_kv_cache_shape(10, PAGE, HKV, D) == (
        FlashAttentionBackend.get_kv_cache_shape(10, PAGE, HKV, D))
    with set_current_vllm_config(sparge()):
        for layers in (False, True):
            assert SpargeAttentionBackend.get_kv_cache_stride_order(layers) == (
                FlashAttentionBackend.get_kv_cache_stride_order(layers))
    assert SpargeAttentionBackend.forward_includes_kv_cache_update is False


# ---- settings and thresholds ----------------------------------------------------------------


def test_without_thresholds_every_layer_attends_densely(sparge, vllm_log):
    """No thresholds setting: dense thresholds for every head (so every layer runs dense and no
    scratch is reserved), one warning naming the fix; ``"untuned"`` runs the published untuned
    thresholds without it."""
    from sparge_serve.backend.runtime import load_runtime, sparse_scratch_bytes

    vc = sparge(thresholds=None)
    rt = load_runtime(vc)
    assert load_runtime(vc) is rt
    assert rt.source == "none" and all(rt.thresholds.layer_is_dense(i) for i in range(L))
    assert vllm_log.text.count("no thresholds file given") == 1
    assert "sparge-calibrate" in vllm_log.text and '"thresholds": "untuned"' in vllm_log.text
    assert sparse_scratch_bytes(vc, rt, HQ, HKV, D) == 0
    impl = _impl(vc)
    impl.bind("model.layers.1.self_attn.attn", "cpu")
    assert impl.dense_layer
    vc = sparge(thresholds="untuned")
    rt = load_runtime(vc)
    assert rt.source == "untuned" and rt.thresholds.num_heads == HQ
    assert torch.all(rt.thresholds.cdfthreshd == 0.98) and torch.all(rt.thresholds.is_sparse == 1)
    assert sparse_scratch_bytes(vc, rt, HQ, HKV, D) > 0
    assert vllm_log.text.count("no thresholds file given") == 1


def test_thresholds_file_loaded_and_validated(sparge, tmp_path):
    from sparge_serve.backend.runtime import load_runtime

    good = tmp_path / "good.safetensors"
    save_thresholds(good, Thresholds.defaults(L, HQ, HKV, D, cdfthreshd=0.9))
    rt = load_runtime(sparge(thresholds=str(good)))
    assert rt.source == str(good) and torch.all(rt.thresholds.cdfthreshd == 0.9)

    wrong = tmp_path / "wrong.safetensors"
    save_thresholds(wrong, Thresholds.defaults(L, HQ, 1, D))
    with pytest.raises(ThresholdsError, match=r"num_kv_heads = 1 in the file.*num_kv_heads = 2"):
        load_runtime(sparge(thresholds=str(wrong)))
    with pytest.raises(ThresholdsError, match="no such file"):
        load_runtime(sparge(thresholds=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match=r"`dense_layers`.*\[7\]"):
        load_runtime(sparge(dense_layers=[7]))


def test_env_overrides_additional_config(sparge, monkeypatch):
    from sparge_serve.backend.runtime import load_runtime

    monkeypatch.setenv("SPARGE_MODE", "dense")
    assert load_runtime(sparge(mode="sparse")).config.mode == "dense"


def _impl(vllm_config, num_heads=HQ, num_kv_heads=HKV, kv_cache_dtype="auto"):
    from vllm.config import set_current_vllm_config

    from sparge_serve.backend.sparge_attn import SpargeAttentionImpl

    with set_current_vllm_config(vllm_config):
        return SpargeAttentionImpl(num_heads, D, D**-0.5, num_kv_heads, None, None,
                                   kv_cache_dtype)


def test_attention_kernel_fa3_needs_flash_attention_3(sparge, monkeypatch):
    """``attention_kernel: fa3`` is refused at bind (engine start) without FlashAttention 3, and
    layers with the PV skip keep the Triton kernel."""
    import sparge_serve.backend.sparge_attn as sa

    impl = _impl(sparge(attention_kernel="fa3"))
    with pytest.raises(ValueError, match=r"needs FlashAttention 3.*Fix: use \"attention_kernel\""):
        impl.bind("model.layers.1.self_attn.attn", "cpu")
    monkeypatch.setattr(sa, "fa3_serves", lambda head_size: True)
    impl = _impl(sparge(attention_kernel="fa3"))
    impl._fa = object()  # stands in for FlashAttentionImpl on this CPU-only machine
    impl.bind("model.layers.1.self_attn.attn", "cpu")
    assert impl.fa3_attention == (not impl.pv_skip)
    # over an fp8 cache FA3 multiplies an fp8 query: one the layer does not quantise is refused
    impl = _impl(sparge(attention_kernel="fa3"), kv_cache_dtype="fp8")
    impl._fa, impl.supports_quant_query_input = object(), False
    with pytest.raises(ValueError, match=r"with the query quantised to fp8\).*Fix: use "
                                         r"\"attention_kernel\": \"auto\""):
        impl.bind("model.layers.1.self_attn.attn", "cpu")


def test_bind_layer_index_tp_slice_and_dense_layers(sparge, tmp_path):
    g = torch.Generator().manual_seed(0)
    th = Thresholds(torch.rand(L, HQ, generator=g), torch.rand(L, HQ, generator=g) * 0.5 + 0.5,
                    torch.rand(L, HQ, generator=g) * 10, torch.ones(L, HQ, dtype=torch.uint8),
                    num_kv_heads=HKV, head_dim=D)
    path = tmp_path / "th.safetensors"
    save_thresholds(path, th)
    vc = sparge(thresholds=str(path), dense_layers=1)
    # Tensor parallel 2, rank 1: heads 2..3 of global layer 3 (a pipeline-parallel rank's name).
    impl = _impl(vc, num_heads=HQ // 2, num_kv_heads=HKV // 2)
    impl.bind("model.layers.3.self_attn.attn", torch.device("cpu"), tp=(1, 2))
    assert impl.layer_index == 3 and not impl.dense_layer
    assert torch.equal(impl._cdfthreshd, th.cdfthreshd[3, 2:4])
    assert torch.equal(impl._simthreshd1, th.simthreshd1[3, 2:4])
    assert torch.equal(impl._pvthreshd, th.pvthreshd[3, 2:4])
    impl0 = _impl(vc)
    impl0.bind("model.layers.0.self_attn.attn", torch.device("cpu"))
    assert impl0.dense_layer  # dense_layers = 1
    with pytest.raises(ValueError, match="2 query heads on this rank.*4 per rank"):
        _impl(vc, num_heads=2, num_kv_heads=1).bind("model.layers.1.attn", "cpu", tp=(0, 1))


def test_bind_all_dense_layer_and_draft_layer(sparge, tmp_path):
    th = Thresholds.defaults(L, HQ, HKV, D)
    dense = Thresholds.dense(L, HQ, HKV, D)
    mixed = Thresholds(th.simthreshd1.clone(), th.cdfthreshd.clone(), th.pvthreshd.clone(),
                       th.is_sparse.clone(), num_kv_heads=HKV, head_dim=D)
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse"):
        getattr(mixed, name)[2] = getattr(dense, name)[2]
    path = tmp_path / "th.safetensors"
    save_thresholds(path, mixed)
    vc = sparge(thresholds=str(path))
    impl = _impl(vc)
    impl.bind("model.layers.2.self_attn.attn", "cpu")
    assert impl.dense_layer  # every head of layer 2 calibrated dense
    draft = _impl(vc)
    draft.bind("model.layers.9.self_attn.attn", "cpu")  # beyond the model: e.g. an EAGLE layer
    assert draft.dense_layer and draft.layer_index is None


def test_separate_draft_model_layers_run_dense(sparge, tmp_path):
    """A draft model (speculative decoding) is another model: never validated against or given
    the target's thresholds, whatever its layer names."""
    from vllm.compilation.backends import set_model_tag

    wrong = tmp_path / "wrong.safetensors"
    save_thresholds(wrong, Thresholds.defaults(L, HQ, 1, D))  # does not fit the model
    vc = sparge(thresholds=str(wrong))
    with pytest.raises(ThresholdsError, match="num_kv_heads"):
        _impl(vc)  # the target's layers validate the file
    for tag in ("draft_model", "eagle_head"):
        with set_model_tag(tag):
            draft = _impl(vc, num_heads=2, num_kv_heads=1)
        assert draft.runtime is None and draft.draft_tag == tag
        draft.bind(f"{tag}.model.layers.0.self_attn.attn", "cpu", stats=object())
        assert draft.dense_layer and draft.layer_index is None and draft._stats is None


def test_mode_dense_makes_every_layer_dense(sparge):
    impl = _impl(sparge(mode="dense"))
    impl.bind("model.layers.3.self_attn.attn", "cpu")
    assert impl.dense_layer


# ---- metadata builder -----------------------------------------------------------------------


def test_select_sparse_requests():
    from sparge_serve.backend.split import select_sparse_requests

    qsl = np.array([0, 1, 101, 104, 204])
    seq = np.array([500, 500, 500, 99])
    got = select_sparse_requests(qsl, seq, min_sparse_len=100, max_decode_query_len=3)
    assert got.tolist() == [False, True, False, False]


def test_cudagraph_support_is_single_token_decode():
    from vllm.v1.attention.backend import AttentionCGSupport

    from sparge_serve.backend.sparge_attn import SpargeAttentionMetadataBuilder

    assert SpargeAttentionMetadataBuilder.get_cudagraph_support(None, None) is (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)


def test_decode_only_step(sparge):
    b = _builder(sparge())
    md = b.build(0, _cam([(1, 20000), (1, 30000), (1, 5)]))
    assert md.sparse is None and md.all_dense is None and md.counts is None
    assert md.seq_lens.tolist() == [20000, 30000, 5]


def test_mixed_batch_noncontiguous(sparge):
    # decode | chunked prefill after a prefix | short prefill | decode | prefix hit (100 new
    # tokens after 16284 cached) | exactly min_sparse_len
    reqs = [(1, 20000), (5000, 20000), (300, 300), (1, 30), (100, 16384), (2048, 16384)]
    cam = _cam(reqs, pad_reqs=2)
    b = _builder(sparge())
    md = b.build(7, cam)
    sp = md.sparse
    assert sp.req_index.tolist() == [1, 4, 5]
    assert sp.batch.query_start_loc.tolist() == [0, 5000, 5100, 7148]
    assert sp.batch.seq_lens.tolist() == [20000, 16384, 16384]
    assert torch.equal(sp.batch.block_table, cam.block_table_tensor[[1, 4, 5]])
    assert (sp.batch.max_query_len, sp.batch.max_seq_len, sp.num_tokens) == (5000, 20000, 7148)
    qsl = cam.query_start_loc_cpu.tolist()
    expected = [t for r in (1, 4, 5) for t in range(qsl[r], qsl[r + 1])]
    assert sp.token_index.tolist() == expected
    # The dense call skips the sparse requests; dense layers get the untouched batch.
    assert md.seq_lens.tolist() == [20000, 0, 300, 30, 0, 0, 0, 0]
    assert md.all_dense.seq_lens.tolist() == [20000, 20000, 300, 30, 16384, 16384, 0, 0]
    assert md.has_dense and md.use_cascade is False
    assert _counts(md) == (7148, 300, 3, {"short_prompt": 1})


def test_contiguous_sparse_requests_use_views(sparge):
    cam = _cam([(1, 50), (4096, 20000), (1000, 17000), (1, 17000)])
    md = _builder(sparge()).build(0, cam)
    sp = md.sparse
    assert sp.token_index is None  # q/out rows are used in place, absolute offsets
    assert sp.batch.query_start_loc.tolist() == cam.query_start_loc_cpu[1:4].tolist()
    assert sp.batch.seq_lens.tolist() == [20000, 17000]
    assert md.seq_lens.tolist() == [50, 0, 0, 17000]
    assert _counts(md) == (5096, 0, 2, {})


def test_pure_sparse_step_skips_dense_call(sparge):
    md = _builder(sparge(min_sparse_len=1024)).build(0, _cam([(3000, 3000)], pad_reqs=3))
    assert md.sparse.req_index.tolist() == [0] and not md.has_dense


def test_min_sparse_len_setting(sparge):
    cam = _cam([(600, 600), (500, 1100)])
    assert _builder(sparge(min_sparse_len=1000)).build(0, cam).sparse.req_index.tolist() == [1]
    assert _builder(sparge(min_sparse_len=5000)).build(0, cam).sparse is None


def test_min_sparse_query_len_setting(sparge):
    """A short chunk on a long context (a follow-up turn after a cached prefix) runs dense."""
    cam = _cam([(100, 60000), (600, 60000), (1, 60000)])
    md = _builder(sparge(min_sparse_query_len=512)).build(0, cam)
    assert md.sparse.req_index.tolist() == [1]
    assert _counts(md) == (600, 100, 1, {"short_prompt": 1})
    assert _builder(sparge(min_sparse_query_len=64)).build(0, cam).sparse.req_index.tolist() == [
        0, 1]


def test_select_sparse_requests_min_query_len():
    from sparge_serve.backend.split import select_sparse_requests

    qsl = np.array([0, 100, 700])
    seq = np.array([60000, 60000])
    got = select_sparse_requests(qsl, seq, min_sparse_len=100, min_sparse_query_len=512)
    assert got.tolist() == [False, True]


def test_every_layer_dense_builds_no_sparse_batch(sparge, monkeypatch):
    """Without a thresholds setting every layer is dense, so the builder splits nothing off (one
    dense call over the step) and the metrics count the eligible requests as dense layers'."""
    from types import SimpleNamespace

    import sparge_serve.backend.sparge_attn as sa

    cam = _cam([(4096, 20000), (10, 10)])
    for thresholds, split in ((None, False), ("untuned", True)):
        vc = sparge(thresholds=thresholds)
        layers = {f"model.layers.{i}.self_attn.attn": SimpleNamespace(impl=_impl(vc))
                  for i in range(L)}
        monkeypatch.setattr(sa, "get_layers_from_vllm_config",
                            lambda *a, layers=layers, **k: layers)
        md = _builder(vc).build(0, cam)
        assert (md.sparse is not None) == split, thresholds
        assert _counts(md) == (4096, 10, 1, {"short_prompt": 1})
        if not split:
            assert md.seq_lens.tolist() == [20000, 10] and md.all_dense is None


def test_mode_dense_builds_no_sparse_batch(sparge):
    md = _builder(sparge(mode="dense")).build(0, _cam([(4096, 20000), (10, 10)]))
    assert md.sparse is None
    assert _counts(md) == (0, 4106, 0, {"short_prompt": 1, "mode_dense": 1})


def test_spec_decode_rows_stay_dense(sparge):
    b = _builder(sparge())
    b.max_decode_query_len = 4  # 3 speculative tokens
    md = b.build(0, _cam([(4, 20000), (4, 20000), (300, 20000)]))
    assert md.sparse.req_index.tolist() == [2]


def test_no_host_seq_lens_runs_dense(sparge, vllm_log):
    md = _builder(sparge()).build(0, _cam([(4096, 20000)], host_seq_lens=False))
    assert md.sparse is None
    assert _counts(md) == (0, 4096, 0, {"unsupported": 1})
    assert "without a host copy of seq_lens" in vllm_log.text


def test_too_long_context_runs_dense(sparge):
    b = _builder(sparge())
    b.max_sparse_seq_len = 30000
    md = b.build(0, _cam([(4096, 40000), (4096, 20000)]))
    assert md.sparse.req_index.tolist() == [1]
    assert _counts(md)[3] == {"unsupported": 1}


def test_no_counting_for_capture_and_drafts(sparge):
    b = _builder(sparge())
    cam = _cam([(4096, 20000)])
    assert b.build(0, cam, fast_build=True).counts is None
    assert b.build_for_cudagraph_capture(cam).counts is None
    assert b.build(0, cam).counts is not None


def test_step_split_is_shared_by_the_steps_builders_and_follows_refilled_buffers(sparge):
    """The builders of one step's KV cache groups classify its requests once; a runner that
    refills the same host buffers in place for the next step gets that step's split."""
    cfg = sparge()
    first, second = _builder(cfg), _builder(cfg)
    cam = _cam([(4096, 20000), (300, 300)])
    a, b = first.build(0, cam), second.build(0, cam)
    assert a.counts is b.counts and _counts(a) == (4096, 300, 1, {"short_prompt": 1})
    assert a.sparse.req_index.tolist() == b.sparse.req_index.tolist() == [0]
    # next step, same tensors refilled in place: the short prompt now comes first
    nxt = _cam([(300, 300), (4096, 20000)])
    cam.query_start_loc_cpu.copy_(nxt.query_start_loc_cpu)
    cam.seq_lens_cpu_upper_bound.copy_(nxt.seq_lens_cpu_upper_bound)
    cam.seq_lens.copy_(nxt.seq_lens)
    md = second.build(0, cam)
    assert md.sparse.req_index.tolist() == [1] and md.counts is not a.counts
    assert _counts(md) == (4096, 300, 1, {"short_prompt": 1})
    # a long context that no longer fits the sparse path: every request dense
    cam.seq_lens_cpu_upper_bound[1] = 10**9
    md = first.build(0, cam)
    assert md.sparse is None and _counts(md)[0] == 0


# ---- forward (Triton interpreter on CPU) ------------------------------------------------------


def _dense_double(calls):
    """Stands in for FlashAttention on CPU: causal attention of every request with seq_len > 0
    (zeros for seq_len 0, as FlashAttention writes), over the paged cache."""
    from sparge_serve.reference import dense_causal_attention_ref, gather_paged_kv

    def dense(layer, query, key, value, kv_cache, md, output):
        calls.append(md)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
        qsl = md.query_start_loc.tolist()
        for r, s in enumerate(md.seq_lens.tolist()):
            rows = slice(qsl[r], qsl[r + 1])
            if s == 0:
                output[rows] = 0
                continue
            k, v = gather_paged_kv(key_cache, value_cache, md.block_table[r], s)
            output[rows] = dense_causal_attention_ref(query[rows], k, v, D**-0.5).to(output.dtype)

    return dense


def _paged_inputs(cam, dtype, seed=0, sink=False):
    g = torch.Generator().manual_seed(seed)
    num_pages = int(cam.block_table_tensor.max()) + 1
    phys = torch.randn(num_pages, PAGE, HKV, 2 * D, generator=g)  # NHD physical layout
    query = torch.randn(cam.num_actual_tokens, HQ, D, generator=g)
    if sink:  # an attention sink (first keys aligned with every query): the PV skip triggers
        vec = torch.randn(HKV, D, generator=g)
        vec = vec / vec.norm(dim=-1, keepdim=True) * D**0.5 * 1.5
        phys[cam.block_table_tensor[:, 0].long(), :4, :, :D] += vec
        query += 0.8 * vec.repeat_interleave(HQ // HKV, 0)
    phys, query = phys.to(dtype), query.to(dtype)
    kv_cache = phys.permute(0, 2, 1, 3)  # vLLM's logical (blocks, Hkv, page, 2*D) view
    return query, kv_cache, phys


def _run_forward(vc, reqs, dense_layer_name="model.layers.2.self_attn.attn", sink=False):
    from sparge_serve.metrics import SpargeStats

    cam = _cam(reqs)
    b = _builder(vc)
    md = b.build(0, cam)
    query, kv_cache, phys = _paged_inputs(cam, torch.float16, sink=sink)
    stats = SpargeStats(L, "cpu", "tiny", sink_dir=None, start_writer=False)
    impl = _impl(vc)
    impl.bind(dense_layer_name, "cpu", stats)
    calls = []
    impl._dense = _dense_double(calls)
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    out = torch.full_like(query, float("nan"))
    impl.forward(layer, query, None, None, kv_cache, md, out)
    return cam, md, query, phys, out, calls, stats, impl


@pytest.mark.parametrize("reqs,pv", [
    ([(1, 40), (150, 300), (20, 20), (130, 260)], None),  # sparse requests 1, 3: gathered
    ([(200, 400), (70, 270), (1, 33)], 4.0),  # sparse requests 0, 1: contiguous; PV skip
], ids=["gather", "contiguous-pv"])
def test_forward_matches_reference(sparge, tmp_path, reqs, pv):
    from sparge_serve.kernels import PrefillBatch
    from sparge_serve.reference import paged_prefill_ref

    settings = {"min_sparse_len": 256}
    if pv is not None:
        path = tmp_path / "pv.safetensors"
        save_thresholds(path, Thresholds.defaults(L, HQ, HKV, D, simthreshd1=-1.0,
                                                  cdfthreshd=0.9, pvthreshd=pv))
        settings["thresholds"] = str(path)
    vc = sparge(**settings)
    cam, md, query, phys, out, calls, stats, impl = _run_forward(vc, reqs, sink=pv is not None)
    assert not impl.dense_layer and md.sparse is not None
    assert impl.pv_skip is (pv is not None)
    # Dense call: once, over the non-sparse requests only.
    assert len(calls) == 1 and calls[0] is md
    key_cache, value_cache = phys.split(D, dim=-1)
    full = PrefillBatch(cam.query_start_loc, cam.seq_lens, cam.block_table_tensor,
                        cam.max_query_len, cam.max_seq_len)
    th = impl.runtime.thresholds
    ref_args = (key_cache.contiguous(), value_cache.contiguous())
    ths = (D**-0.5, th.simthreshd1[2], th.cdfthreshd[2], th.pvthreshd[2])
    ref, _, _ = paged_prefill_ref(query, *ref_args, full, *ths)
    qsl = cam.query_start_loc_cpu.tolist()
    sparse_rows = torch.zeros(cam.num_actual_tokens, dtype=torch.bool)
    ref_stats = torch.zeros(3, dtype=torch.int64)
    for r in md.sparse.req_index.tolist():
        sparse_rows[qsl[r] : qsl[r + 1]] = True
        one = PrefillBatch(full.query_start_loc[r : r + 2], full.seq_lens[r : r + 1],
                           full.block_table[r : r + 1], cam.max_query_len, cam.max_seq_len)
        ref_stats += paged_prefill_ref(query, *ref_args, one, *ths)[2]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[sparse_rows].float(), ref[sparse_rows], atol=2e-2, rtol=2e-2)
    # Dense rows came from the dense call and were not touched by the sparse kernels.
    dense_ref = torch.empty_like(out)
    _dense_double([])(None, query, None, None, phys.permute(0, 2, 1, 3), md.all_dense, dense_ref)
    assert torch.equal(out[~sparse_rows], dense_ref[~sparse_rows])
    # Block counts went to this layer's row; token counts are host-side.
    blocks = stats.blocks[2]
    assert blocks[0] > 0 and 0 < blocks[1] <= blocks[0]
    assert blocks.tolist() == ref_stats.tolist()
    if pv is not None:
        assert blocks[2] > 0, "the PV skip never triggered"
    assert stats.blocks[[0, 1, 3]].abs().sum() == 0
    sparse_tokens = int(sparse_rows.sum())
    prompt_tokens = sum(q for q, _ in reqs if q > 1)
    assert stats._tokens[2] == [sparse_tokens, prompt_tokens - sparse_tokens]


def _record_specializations(monkeypatch) -> dict[str, set[str]]:
    """Stub the sparse kernels' launches (no run) and record, per kernel, each launch's Triton
    specialisation key as a GPU (sm_90) would compute it: the arguments' types, their 16-byte
    alignment / divisibility and value-1 attributes, the constexprs and the launch options."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from sparge_serve.kernels import attention, pooling, predictor

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    seen: dict[str, set[str]] = {}

    def recorder(kernel):
        jit = JITFunction(kernel.fn, **kernel.kwargs)  # the interpreter keeps the decorator args
        binder = create_function_from_signature(jit.signature, jit.params, backend)

        def run(*args, grid, warmup, **kwargs):
            _, specialization, options = binder(*args, **kwargs)
            seen.setdefault(kernel.fn.__name__, set()).add(
                repr((specialization, sorted(options.items()))))

        return run

    for k in (pooling._ksum_kernel, pooling._kblock_kernel, predictor._select_kernel,
              attention._sparse_attn_kernel):
        monkeypatch.setattr(k, "run", recorder(k))
    return seen


@pytest.mark.parametrize("chunks", [False, True], ids=["one-chunk", "head-chunks"])
def test_serving_compiles_no_kernel_variant_beyond_the_warm_up(sparge, tmp_path, monkeypatch,
                                                               chunks):
    """Every sparse-kernel launch of real steps (mixed batches whose sparse requests are slices of
    the step's metadata at odd offsets, gathered and contiguous, layers with and without the PV
    skip) has a Triton specialisation that the start-up warm-up already compiled. On an H200,
    vLLM's JIT monitor caught serving recompile all four kernels: the step's block-table /
    ``seq_lens`` slices were not 16-byte aligned like the warm-up's tensors. ``head-chunks``:
    every step in one-head chunks (views of q/out/the cache at head offsets, one KV head)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from sparge_serve.backend.runtime import warm_up_kernels

    path = tmp_path / "mixed.safetensors"
    th = Thresholds.defaults(L, HQ, HKV, D)
    th.pvthreshd[1:3, 1] = 4.0  # layers 1 and 2 use the PV skip
    save_thresholds(path, th)
    settings = dict(min_sparse_len=256, thresholds=str(path))
    if chunks:
        from sparge_serve.backend import runtime
        from sparge_serve.kernels import plan

        monkeypatch.setattr(plan, "MIN_BUDGET_BYTES", 0)
        monkeypatch.setattr(runtime, "_WARMED", set())  # (map_budget is not in its key)
        settings["map_budget"] = 1e-9  # one query head a chunk
    vc = sparge(**settings)
    seen = _record_specializations(monkeypatch)
    impls = []
    for layer in range(L):
        impl = _impl(vc)
        impl.bind(f"model.layers.{layer}.self_attn.attn", "cpu", None)
        impl._dense = lambda *args: None
        impls.append(impl)
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                             dtype=torch.float16)
    with set_current_vllm_config(vc):
        warm_up_kernels(vc, impls[0].runtime, spec, impls, torch.device("cpu"))
    warm = {name: set(keys) for name, keys in seen.items()}
    assert len(warm) == 4 and not any(i.pv_skip for i in impls[::3])
    b = _builder(vc)
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    for reqs in ([(1, 40), (150, 300), (20, 20), (130, 260)],  # gathered rows
                 [(1, 40), (1, 50), (1, 60), (300, 300), (260, 700)],  # contiguous, offset 3
                 [(5, 9), (400, 400)],  # offset 1
                 [(1000, 1100)]):
        cam = _cam(reqs)
        md = b.build(0, cam)
        assert md.sparse is not None
        query, kv_cache, _ = _paged_inputs(cam, torch.float16)
        for impl in impls:
            impl.forward(layer, query, None, None, kv_cache, md, torch.empty_like(query))
    for name, keys in seen.items():
        assert keys <= warm[name], f"{name}: variants compiled after the warm-up:\n" + "\n".join(
            keys - warm[name])


def test_step_is_planned_once_and_layers_only_launch(sparge, monkeypatch):
    """The builder plans the step's sparse prefill once (``plan_prefill``, carried in the
    metadata); each layer's forward launches through ``run_prefill`` and runs no argument
    check."""
    from sparge_serve.kernels import attention, checks, plan, predictor, prefill
    from sparge_serve.metrics import SpargeStats

    plans = []
    real_plan = plan.plan_prefill
    monkeypatch.setattr(plan, "plan_prefill", lambda *a, **k: plans.append(1) or real_plan(
        *a, **k))
    vc = sparge(min_sparse_len=256)
    cam = _cam([(1, 40), (150, 300), (20, 20), (130, 260)])
    md = _builder(vc).build(0, cam)
    assert len(plans) == 1 and md.plan is not None and md.plan.batch is md.sparse.batch
    assert (md.plan.num_heads, md.plan.num_kv_heads, md.plan.head_dim) == (HQ, HKV, D)

    def refuse(*args, **kwargs):
        raise AssertionError("a layer's forward ran an argument check")

    for module in (attention, checks, predictor, prefill):
        for name in dir(module):
            if name.startswith("check_"):
                monkeypatch.setattr(module, name, refuse)
    query, kv_cache, _ = _paged_inputs(cam, torch.float16)
    stats = SpargeStats(L, "cpu", "tiny", sink_dir=None, start_writer=False)
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    outs = []
    for i in range(2):
        impl = _impl(vc)
        impl.bind(f"model.layers.{i}.self_attn.attn", "cpu", stats)
        impl._dense = _dense_double([])
        outs.append(torch.full_like(query, float("nan")))
        impl.forward(layer, query, None, None, kv_cache, md, outs[-1])
    assert len(plans) == 1 and torch.equal(outs[0], outs[1])
    assert stats.blocks[0, 0] > 0 and torch.equal(stats.blocks[0], stats.blocks[1])


def test_fa3_plan_serves_layers_with_and_without_pv_skip(sparge, tmp_path, monkeypatch):
    """With ``attention_kernel: fa3`` one plan serves the step: a layer without the PV skip
    attends through FA3 (emulated on the CPU), a layer with it through the plan's Triton
    chunks, each as the same layer under the Triton kernel."""
    import sparge_serve.backend.sparge_attn as sa
    import sparge_serve.kernels.fa3 as fa3
    from sparge_serve.metrics import SpargeStats
    from tests.test_virtual import fa3_emulation

    monkeypatch.setattr(sa, "fa3_serves", lambda head_size: True)
    monkeypatch.setattr(fa3, "fa3_paged_forward", fa3_emulation)
    path = tmp_path / "mixed.safetensors"
    th = Thresholds.defaults(L, HQ, HKV, D, simthreshd1=-1.0, cdfthreshd=0.9)
    th.pvthreshd[1] = 4.0  # layer 1 uses the PV skip, layer 2 does not
    save_thresholds(path, th)
    cam = _cam([(1, 40), (150, 300), (20, 20), (130, 260)])
    query, kv_cache, _ = _paged_inputs(cam, torch.float16, sink=True)
    layer = SimpleNamespace(_k_scale=torch.ones(1), _v_scale=torch.ones(1))
    outs = {}
    for kernel in ("triton", "fa3"):
        vc = sparge(min_sparse_len=256, thresholds=str(path), attention_kernel=kernel)
        md = _builder(vc).build(0, cam)
        assert (md.plan.fa3 is not None) == (kernel == "fa3")
        stats = SpargeStats(L, "cpu", "tiny", sink_dir=None, start_writer=False)
        for index in (1, 2):
            impl = _impl(vc)
            impl._fa = object()  # stands in for FlashAttentionImpl on this CPU-only machine
            impl.bind(f"model.layers.{index}.self_attn.attn", "cpu", stats)
            impl._dense = _dense_double([])
            assert impl.fa3_attention == (kernel == "fa3" and index == 2)
            out = torch.full_like(query, float("nan"))
            impl.forward(layer, query, None, None, kv_cache, md, out)
            outs[kernel, index] = out
        outs[kernel] = stats.blocks.clone()
    assert torch.equal(outs["fa3", 1], outs["triton", 1])  # the same Triton launches
    assert not torch.isnan(outs["fa3", 2]).any()
    torch.testing.assert_close(outs["fa3", 2].float(), outs["triton", 2].float(), atol=2e-3,
                               rtol=2e-3)
    assert torch.equal(outs["fa3"][1:3, :2], outs["triton"][1:3, :2])  # same block maps
    assert outs["fa3"][1, 2] > 0 and outs["fa3"][2, 2] == 0  # PV skips in layer 1 only


def test_head_chunks_serve_like_one_chunk(sparge, tmp_path, monkeypatch):
    """A step run in one-head chunks (``map_budget``) writes the same output and block counts
    as the whole-map run."""
    from sparge_serve.kernels import plan

    path = tmp_path / "pv.safetensors"
    save_thresholds(path, Thresholds.defaults(L, HQ, HKV, D, simthreshd1=-1.0, cdfthreshd=0.9,
                                              pvthreshd=4.0))
    reqs = [(1, 40), (150, 300), (20, 20), (130, 260)]
    whole = _run_forward(sparge(min_sparse_len=256, thresholds=str(path), map_budget=None),
                         reqs, sink=True)
    monkeypatch.setattr(plan, "MIN_BUDGET_BYTES", 0)
    split = _run_forward(sparge(min_sparse_len=256, thresholds=str(path), map_budget=1e-9),
                         reqs, sink=True)
    assert split[1].plan.triton.plan.heads == 1 and whole[1].plan.triton.plan.heads == HQ
    assert not torch.isnan(split[4]).any() and torch.equal(split[4], whole[4])
    assert torch.equal(split[6].blocks, whole[6].blocks) and split[6].blocks[2, 2] > 0


def test_dense_layer_runs_whole_batch_dense(sparge):
    vc = sparge(min_sparse_len=256, dense_layers=[2])
    cam, md, query, phys, out, calls, stats, impl = _run_forward(vc, [(150, 300), (20, 20)])
    assert impl.dense_layer and md.sparse is not None
    assert len(calls) == 1 and calls[0] is md.all_dense
    assert calls[0].seq_lens.tolist() == [300, 20]
    assert not torch.isnan(out).any()
    assert stats.blocks.abs().sum() == 0
    assert stats._tokens[2] == [0, 170]
    assert stats.snapshot()["fallbacks"]["dense_layer"] == 1


def test_profile_run_without_metadata(sparge):
    impl = _impl(sparge())
    out = torch.ones(3, HQ, D)
    assert impl.forward(None, out, None, None, None, None, out) is out
    assert torch.all(out == 0)


def test_unbound_layer_refuses_sparse_work(sparge):
    vc = sparge(min_sparse_len=256)
    md = _builder(vc).build(0, _cam([(150, 300)]))
    impl = _impl(vc)
    impl.dense_layer = False
    query, kv_cache, _ = _paged_inputs(_cam([(150, 300)]), torch.float16)
    with pytest.raises(RuntimeError, match="never bound"):
        impl.forward(None, query, None, None, kv_cache, md, torch.empty_like(query))


def test_calibration_capture_reports_and_runs_dense(sparge):
    from sparge_serve.backend import capture
    from sparge_serve.metrics import SpargeStats
    from sparge_serve.reference import gather_paged_kv

    vc = sparge(min_sparse_len=256)
    reqs = [(1, 40), (150, 300), (20, 20), (130, 260)]
    cam = _cam(reqs)
    md = _builder(vc).build(0, cam)
    query, kv_cache, phys = _paged_inputs(cam, torch.float16)
    impl = _impl(vc)
    impl.bind("model.layers.1.self_attn.attn", "cpu",
              SpargeStats(L, "cpu", "tiny", sink_dir=None, start_writer=False))
    calls, got = [], []
    impl._dense = _dense_double(calls)
    with capture.sink_installed(lambda layer, q, k, v, info: got.append((layer, q, k, v, info))):
        impl.forward(None, query, None, None, kv_cache, md, torch.empty_like(query))
    assert len(calls) == 1 and calls[0] is md.all_dense  # everything dense while capturing
    assert [(g[0], g[4].request, g[4].query_len, g[4].seq_len) for g in got] == [
        (1, 0, 150, 300), (1, 1, 130, 260)]
    qsl = cam.query_start_loc_cpu.tolist()
    key_cache, value_cache = phys.split(D, dim=-1)
    k_ref, v_ref = gather_paged_kv(key_cache, value_cache, cam.block_table_tensor[3], 260)
    assert torch.equal(got[1][1], query[qsl[3] : qsl[4]])
    assert torch.equal(got[1][2], k_ref) and torch.equal(got[1][3], v_ref)


# ---- fp8 KV cache -------------------------------------------------------------------------------


def test_fp8_kv_cache_where_flash_attention_3_serves_it(sparge, monkeypatch):
    """fp8 / fp8_e4m3 pass where FLASH_ATTN takes them (FA3 on Hopper), and only there."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    text = "fp8 / fp8_e4m3 where FlashAttention 3 runs"
    for dtype in ("fp8", "fp8_e4m3"):  # no FlashAttention 3 on this CPU machine
        assert any(text in r for r in _reasons(sparge(), kv_cache_dtype=dtype))
    monkeypatch.setattr(FlashAttentionBackend, "supports_kv_cache_dtype",
                        classmethod(lambda cls, v: v in ("auto", "fp8", "fp8_e4m3")))
    for dtype in ("fp8", "fp8_e4m3"):
        assert _reasons(sparge(), kv_cache_dtype=dtype) == []
    assert any("fp8_e5m2 is not supported" in r
               for r in _reasons(sparge(), kv_cache_dtype="fp8_e5m2"))


def test_fp8_kv_cache_with_fa3_attention_passes_the_start_checks(sparge, monkeypatch):
    """``attention_kernel: fa3`` serves an fp8 cache (FA3's fp8 forward over the kept blocks)."""
    from sparge_serve.backend.runtime import load_runtime
    from sparge_serve.plugin import check_sparge_config

    vc = sparge(attention_kernel="fa3")
    monkeypatch.setattr(vc.cache_config, "cache_dtype", "fp8")
    monkeypatch.setattr("sparge_serve.plugin.uses_sparge", lambda _: True)
    check_sparge_config(vc)
    assert load_runtime(vc).config.attention_kernel == "fa3"


@pytest.mark.parametrize("q_fp8", [False, True])
def test_fp8_forward_equals_the_dequantised_cache(sparge, q_fp8):
    """The backend's sparse path on an fp8 cache (bytes, as vLLM allocates it; a query the layer
    quantised or not) gives the output of the same step on the dequantised fp16 cache, bit for
    bit: the cache views, the scales and the output dtype reach the kernels."""
    reqs = [(1, 40), (150, 300), (20, 20), (130, 260)]  # sparse requests 1, 3: gathered rows
    vc = sparge(min_sparse_len=256)
    cam = _cam(reqs)
    md = _builder(vc).build(0, cam)
    query, _, phys = _paged_inputs(cam, torch.float16)
    (k8, ks), (v8, vs) = (quantize_fp8(x, pow2=True) for x in (phys[..., :D], phys[..., D:]))
    deq_q, q_scale = query, torch.ones(1)
    if q_fp8:
        query, q_scale = quantize_fp8(query, pow2=True)
        deq_q = (query.float() * q_scale).half()
    phys8 = torch.cat([k8, v8], -1).view(torch.uint8)  # vLLM allocates an fp8 cache as bytes
    deq = torch.cat([k8.float() * ks, v8.float() * vs], -1).half()
    outs = []
    for dtype, q, cache in (("fp8", query, phys8), ("auto", deq_q, deq)):
        impl = _impl(vc, kv_cache_dtype=dtype)
        impl.bind("model.layers.1.self_attn.attn", "cpu")
        impl._dense = lambda *a: None  # the dense requests' rows stay NaN: compared apart
        layer = SimpleNamespace(_k_scale=ks, _v_scale=vs, _q_scale=q_scale)
        out = torch.full((cam.num_actual_tokens, HQ, D), float("nan"), dtype=torch.float16)
        impl.forward(layer, q, None, None, cache.permute(0, 2, 1, 3), md, out)
        outs.append(out)
    assert md.sparse.token_index is not None
    rows = md.sparse.token_index
    assert not torch.isnan(outs[0][rows]).any()
    assert torch.equal(outs[0][rows], outs[1][rows])


def test_auto_kernel_attends_an_fp8_cache_through_fa3(sparge, monkeypatch, tmp_path):
    """``attention_kernel: auto`` (the default) over an fp8 cache where FlashAttention 3 serves
    (emulated on the CPU): the step's plan and the layer take the FA3 path, fed the fp8 query
    and the layer's scales, and give the Triton kernel's output on the dequantised fp16 cache
    within fp16 rounding. Over the fp16 cache ``auto`` takes FA3 too. A layer whose thresholds
    use the PV skip keeps it, and the Triton kernel, over either cache and under
    ``attention_kernel: fa3``."""
    import sparge_serve.backend.runtime as runtime
    import sparge_serve.backend.sparge_attn as sa
    import sparge_serve.kernels.fa3 as fa3
    from tests.test_virtual import fa3_emulation

    monkeypatch.setattr(sa, "get_flash_attn_version", lambda **kw: 3)  # builds the dense FA impl
    monkeypatch.setattr(sa, "fa3_serves", lambda head_size: True)
    monkeypatch.setattr(runtime, "fa3_serves", lambda head_size: True)
    monkeypatch.setattr(fa3, "fa3_paged_forward", fa3_emulation)
    cam = _cam([(1, 40), (150, 300), (20, 20), (130, 260)])
    query, _, phys = _paged_inputs(cam, torch.float16)
    (k8, ks), (v8, vs) = (quantize_fp8(x, pow2=True) for x in (phys[..., :D], phys[..., D:]))
    query8, q_scale = quantize_fp8(query, pow2=True)
    deq_q = (query8.float() * q_scale).half()
    phys8 = torch.cat([k8, v8], -1).view(torch.uint8)
    deq = torch.cat([k8.float() * ks, v8.float() * vs], -1).half()
    layer = SimpleNamespace(_k_scale=ks, _v_scale=vs, _q_scale=q_scale)
    outs = {}
    for dtype, q, cache, kernel in (("fp8", query8, phys8, "auto"), ("auto", deq_q, deq, "auto"),
                                    ("auto", deq_q, deq, "triton")):
        vc = sparge(min_sparse_len=256, attention_kernel=kernel)
        monkeypatch.setattr(vc.cache_config, "cache_dtype", dtype)
        md = _builder(vc).build(0, cam)
        assert (md.plan.fa3 is not None) == (kernel == "auto")
        impl = _impl(vc, kv_cache_dtype=dtype)
        impl._fa = object()  # stands in for FlashAttentionImpl on this CPU-only machine
        impl.bind("model.layers.1.self_attn.attn", "cpu")
        assert impl.fa3_attention == (kernel == "auto")
        impl._dense = lambda *a: None  # the dense requests' rows stay NaN: compared apart
        out = torch.full((cam.num_actual_tokens, HQ, D), float("nan"), dtype=torch.float16)
        impl.forward(layer, q, None, None, cache.permute(0, 2, 1, 3), md, out)
        outs[dtype, kernel] = out[md.sparse.token_index]
    triton = outs["auto", "triton"].float()
    assert not torch.isnan(outs["fp8", "auto"]).any()
    torch.testing.assert_close(outs["fp8", "auto"].float(), triton, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(outs["auto", "auto"].float(), triton, atol=2e-3, rtol=2e-3)
    path = tmp_path / "pv.safetensors"
    th = Thresholds.defaults(L, HQ, HKV, D, simthreshd1=-1.0, cdfthreshd=0.9)
    th.pvthreshd[1] = 4.0  # layer 1 uses the PV skip
    save_thresholds(path, th)
    for kernel, dtype in (("auto", "fp8"), ("auto", "auto"), ("fa3", "fp8")):
        vc = sparge(min_sparse_len=256, thresholds=str(path), attention_kernel=kernel)
        impl = _impl(vc, kv_cache_dtype=dtype)
        impl._fa = object()
        impl.bind("model.layers.1.self_attn.attn", "cpu")
        assert (impl.fa3_attention, impl.pv_skip) == (False, True), (kernel, dtype)
        assert bool((impl._pvthreshd < 50).any())


def test_fp8_attention_plans_fp8_products_for_layers_with_fp8_queries(sparge, monkeypatch):
    """``fp8_attention`` with an fp8 cache: the step's plan multiplies in fp8 where the layers'
    queries arrive in fp8 (FlashAttention present), and is refused where they do not. Under
    ``attention_kernel: auto`` its layers take the Triton kernel where FA3 serves too (FA3
    emulated as present)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    import sparge_serve.backend.runtime as runtime
    import sparge_serve.backend.sparge_attn as sa
    from sparge_serve.backend.runtime import prefill_plan_args

    monkeypatch.setattr(sa, "fa3_serves", lambda head_size: True)
    monkeypatch.setattr(runtime, "fa3_serves", lambda head_size: True)

    vc = sparge(min_sparse_len=256, fp8_attention=True)
    monkeypatch.setattr(vc.cache_config, "cache_dtype", "fp8")
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D, dtype=torch.uint8)
    impl = _impl(vc, kv_cache_dtype="fp8")
    impl.bind("model.layers.1.self_attn.attn", "cpu")
    cfg = impl.runtime.config
    with pytest.raises(ValueError, match="fp8_attention needs queries quantised to fp8"):
        prefill_plan_args(vc, cfg, spec, [impl], torch.device("cpu"))
    impl.supports_quant_query_input = True  # as with FlashAttention 3
    impl._fa = object()  # stands in for FlashAttentionImpl on this CPU-only machine
    impl.bind("model.layers.1.self_attn.attn", "cpu")
    assert impl.fa3_attention is False
    args = prefill_plan_args(vc, cfg, spec, [impl], torch.device("cpu"))
    assert args["fp8_dot"] is True and args["dtype"] == vc.model_config.dtype
    assert args["attention"] == "triton"
    assert prefill_plan_args(vc, cfg, spec, [], torch.device("cpu"))["attention"] == "triton"
    monkeypatch.setattr(vc.cache_config, "cache_dtype", "auto")
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=D,
                             dtype=torch.bfloat16)
    assert prefill_plan_args(vc, cfg, spec, [impl], torch.device("cpu"))["fp8_dot"] is False
