"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU.

    uv run python scripts/aot_compile_check.py            # every kernel, head dim 128, bf16
    uv run python scripts/aot_compile_check.py --only fp8_dot   # the variants so labelled

Triton's compiler and ``ptxas`` (shipped in the triton wheel) need no device, so a kernel that
would not compile for the H100/H200 (a lowering error, a "PassManager::run failed", too much
shared memory) fails here, before any device time is spent. It checks compilation only: speed
and results still need the GPU (``scripts/gpu_session.sh``). Prints one line per kernel variant
with its registers, stack (spills), shared and local memory (``cuobjdump --dump-resource-usage``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles for the GPU")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sparge_serve.kernels import (  # noqa: E402
    attention,
    fa3_tables,
    pooling,
    predictor,
)
from sparge_serve.kernels.geometry import BLKK, BLKQ, PV_SKIP_OFF  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_kernels import FP8_LAUNCHES  # noqa: E402


def _signature(fn, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        elif name == "qk_scale" or name in ("scale", "topk"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resource_usage(cubin: bytes) -> str:
    """``REG:.. STACK:.. SHARED:.. LOCAL:..`` of a cubin, from the cuobjdump in triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", out)
    return m.group(0) if m else "?"


def _runtime_attrs(fn, sig: dict[str, str]) -> dict:
    """The 16-divisibility a launch at the benchmark's shapes specialises on: pointers (torch's
    allocations are 16-byte aligned) except the kernel's ``do_not_specialize_on_alignment`` ones,
    and strides / ``NKB`` / ``num_heads`` (multiples of 16 there) except ``do_not_specialize``.

    NOTE: without these the compiler sees unaligned scalars: the select kernel then compiled to
    187 registers where the launched one has 72 (Nsight Compute)."""
    no_align = set(getattr(fn, "do_not_specialize_on_alignment", ()) or ())
    no_spec = set(getattr(fn, "do_not_specialize", ()) or ())
    names = fn.arg_names
    attrs = {}
    for name, ty in sig.items():
        i = names.index(name)
        if name in no_spec or i in no_spec:
            continue
        aligned_ptr = ty.startswith("*") and name not in no_align and i not in no_align
        int16 = ty == "i32" and (name.startswith("stride_") or name in ("NKB", "num_heads"))
        if aligned_ptr or int16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_kernel(fn, types, constexprs, num_warps, num_stages, arch=90, maxnreg=None) -> str:
    # constexpr parameters left out take their defaults, as at a launch (not runtime arguments)
    defaults = {p.name: p.default for p in fn.params
                if p.is_constexpr and p.name not in constexprs and p.has_default}
    constexprs = {**defaults, **constexprs}
    sig = _signature(fn, types, constexprs)
    src = ASTSource(fn, sig, constexprs, _runtime_attrs(fn, sig))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages,
                                **({"maxnreg": maxnreg} if maxnreg else {})})
    return f"{_resource_usage(k.asm['cubin'])}, {k.metadata.shared} B shared (Triton)"


def _types(dtype: str, d: int, tma: bool, kv: str | None = None,
           q: str | None = None) -> dict[str, str]:
    """Argument types of a layout: ``dtype`` the model's, ``kv``/``q`` the cache's and the
    query's where they differ (``fp8e4nv``: an fp8 cache / quantised query)."""
    kv, q = kv or dtype, q or dtype
    types = {"q_ptr": f"*{q}", "out_ptr": f"*{dtype}"}
    types.update({n: f"*{kv}" for n in ("k_cache_ptr", "v_cache_ptr", "key_cache_ptr",
                                         "vt_ptr")})
    types.update({n: "*fp32" for n in ("pk_ptr", "ksim_ptr", "sim_ptr", "cdf_ptr", "pv_ptr",
                                       "mu_ptr", "ksum_ptr", "q_scale_ptr", "k_scale_ptr",
                                       "v_scale_ptr")})
    types.update({"lut_ptr": "*i16", "stats_ptr": "*i64"})
    if tma:
        types.update({n: f"tensordesc<{kv}[{BLKK},{d}]>" for n in ("k_desc", "v_desc")})
    return types


POOL_SERVED = dict(GROUP=4, GROUP_PAD=4, SKIP_DENSE=True)
"""The key pass as served with the CDF selection (dense KV heads skipped), GQA group 4."""


def _lazy(pv_skip: bool) -> float:
    """The kernel's LAZY at serving, bf16 at head dim 128 with TMA loads (conditional
    rescaling, see attention._row_parts)."""
    return attention._row_parts(None, 128, pv_skip, None, True)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--nkb-pad", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--only", metavar="REGEX",
                    help="compile only the variants whose label matches (re.search); none "
                    "matching is an error")
    args = ap.parse_args()
    d = args.head_dim
    types = _types("bf16", d, True)
    common = dict(GROUP=4, BLOCK_M=BLKQ, BLOCK_N=BLKK, HEAD_DIM=d)
    attn = dict(GROUP=4, BLOCK_Q=BLKQ, BLOCK_N=BLKK, HEAD_DIM=d, PAGE=64, PV_OFF=PV_SKIP_OFF,
                UPCAST=False, USE_TMA=True)
    failed = checked = 0

    def check(label, fn, constexprs, num_warps, num_stages=3, types=types, maxnreg=None):
        nonlocal failed, checked
        if args.only and not re.search(args.only, label):
            return
        checked += 1
        try:
            print(f"ok    {label}: "
                  f"{compile_kernel(fn, types, constexprs, num_warps, num_stages, 90, maxnreg)}")
        except Exception as e:  # noqa: BLE001 - report every variant
            failed += 1
            print(f"FAIL  {label}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")

    check("ksum", pooling._ksum_kernel,
          dict(PAGE=64, BLOCK_N=BLKK, HEAD_DIM=d, CHUNK=pooling.KSUM_CHUNK, **POOL_SERVED), 4)
    check("kblock", pooling._kblock_kernel,
          dict(PAGE=64, BLOCK_N=BLKK, HEAD_DIM=d, **POOL_SERVED), 4)
    for pv, split in ((False, 1), (True, 1), (False, 2)):
        for warps, stages in ((4, 2), (8, 2)):
            check(f"attention pv_skip={pv} split={split} warps={warps}",
                  attention._sparse_attn_kernel,
                  dict(attn, PV_SKIP=pv, SPLIT=split, LAZY=_lazy(pv)), warps, stages)
    for pv in (False, True):  # page ids read one kept block ahead (page_ahead), and without
        for ahead in (False, True):
            check(f"attention pv_skip={pv} split=1 warps=4 stages=3 page_ahead={ahead}",
                  attention._sparse_attn_kernel,
                  dict(attn, PV_SKIP=pv, SPLIT=1, LAZY=_lazy(pv), PAGE_AHEAD=ahead), 4, 3)
    for split in (1, 2):  # the former default: a rescale every block (no lazy rescaling)
        check(f"attention eager rescale split={split} warps=4", attention._sparse_attn_kernel,
              dict(attn, PV_SKIP=False, SPLIT=split, LAZY=0.0), 4, 2)
    check("attention head-major order", attention._sparse_attn_kernel,
          dict(attn, PV_SKIP=False, SPLIT=1, KV_MAJOR=False, LAZY=attention.LAZY_RESCALE),
          4, 2)
    # the other layouts the backend serves, at their launch parameters: fp16, head dim 64, pages
    # that are not a multiple of the key block (pointer loads instead of TMA)
    for dtype, dim, page in (("bf16", 128, 64), ("fp16", 64, 64), ("bf16", 128, 16),
                             ("fp16", 64, 16), ("bf16", 256, 64), ("bf16", 256, 16)):
        tma = page % BLKK == 0
        layout_types = _types(dtype, dim, tma)
        extra = {} if tma else {"k_desc": None, "v_desc": None}
        for pv in (False, True):
            served = attention.attend_params(dim, pv, tma)  # the default launch
            check(f"attention {dtype} D{dim} page {page} pv_skip={pv} served",
                  attention._sparse_attn_kernel,
                  dict(GROUP=4, BLOCK_Q=BLKQ, BLOCK_N=BLKK, HEAD_DIM=dim, PAGE=page,
                       PV_OFF=PV_SKIP_OFF, UPCAST=False, USE_TMA=tma, PV_SKIP=pv,
                       SPLIT=served.split, LAZY=served.lazy_rescale,
                       PAGE_AHEAD=served.page_ahead, **extra),
                  served.num_warps, served.num_stages, types=layout_types,
                  maxnreg=served.maxnreg)
        check(f"kblock {dtype} D{dim} page {page}", pooling._kblock_kernel,
              dict(PAGE=page, BLOCK_N=BLKK, HEAD_DIM=dim, **POOL_SERVED), 4,
              types=layout_types)
    # an fp8 KV cache (--kv-cache-dtype fp8), with the query quantised by the layer or not
    for dim, page, q in ((128, 64, "fp8e4nv"), (128, 64, None), (128, 16, "fp8e4nv"),
                         (64, 64, "fp8e4nv"), (256, 64, "fp8e4nv")):
        tma = page % BLKK == 0
        fp8_types = _types("bf16", dim, tma, kv="fp8e4nv", q=q)
        scaled = dict(Q_SCALED=q is not None, KV_SCALED=True)

        def fp8_attention(use_tma, pv, split, dot, vk, ahead, lazy, vtma, dim=dim, page=page,
                          scaled=scaled):
            """The attention kernel's constexprs over this fp8 layout (the absent descriptors
            and copy None; ``ahead``: ``PAGE_AHEAD``, ``lazy``: ``LAZY``, ``vtma``:
            ``VT_TMA``)."""
            absent = {} if use_tma else {"k_desc": None, "v_desc": None}
            if not vtma:  # V by pointers from the copy, or from the pages: one source absent
                absent["v_desc" if vk else "vt_ptr"] = None
            return dict(GROUP=4, BLOCK_Q=BLKQ, BLOCK_N=BLKK, HEAD_DIM=dim, PAGE=page,
                        PV_OFF=PV_SKIP_OFF, UPCAST=False, USE_TMA=use_tma, PV_SKIP=pv,
                        SPLIT=split, LAZY=lazy, FP8_DOT=dot, V_KMAJOR=vk,
                        PAGE_AHEAD=ahead, VT_TMA=vtma, **scaled, **absent)

        # V's K-major copy by TMA: [D, BLKK] boxes of its 2-D view
        vt_types = dict(fp8_types, v_desc=f"tensordesc<fp8e4nv[{dim},{BLKK}]>")

        for pv in (False, True):
            # fp8_attention: both products in fp8 (an fp8 query only), V read from its
            # K-major copy as served, or from the pages
            variants = ((False, False), (True, True), (True, False)) if q else ((False, False),)
            for dot, vk in variants:
                label = " fp8_dot" + ("" if vk else " (V from the pages)") if dot else ""
                served = attention.attend_params(dim, pv, tma, fp8_dot=dot, v_kmajor=vk)
                check(f"attention fp8 cache q={q or 'bf16'} D{dim} page {page} pv_skip={pv}"
                      f"{label}", attention._sparse_attn_kernel,
                      fp8_attention(tma, pv, served.split, dot, vk, served.page_ahead,
                                    served.lazy_rescale, served.v_tma),
                      served.num_warps, served.num_stages,
                      types=vt_types if served.v_tma else fp8_types, maxnreg=served.maxnreg)
        if dim == 128 and page == 64 and q:
            # the other launches bench_kernels --fp8-sweep times (5 stages, or 3 with the page
            # ids read ahead: three K/V tiles in flight; pointer K loads without TMA; 64-row
            # programs; registers capped)
            served = attention.attend_params(dim, False, True, fp8_dot=True)
            for x in FP8_LAUNCHES:
                kw = x.kwargs
                par = attention.attend_params(dim, False, x.tma, x.split, x.lazy, kw["launch"],
                                              True, None, x.ahead, kw.get("v_tma"))
                if par == served:
                    continue
                check(f"attention fp8 cache q={q} D{dim} page {page} fp8_dot launch {x.name}",
                      attention._sparse_attn_kernel,
                      fp8_attention(x.tma, False, x.split, True, True, x.ahead,
                                    par.lazy_rescale, par.v_tma),
                      x.warps, x.stages, types=vt_types if par.v_tma else fp8_types,
                      maxnreg=x.maxnreg)
        check(f"values K-major copy D{dim} page {page}", pooling._values_kmajor_kernel,
              dict(PAGE=page, BLOCK_N=BLKK, HEAD_DIM=dim), 4,
              types=dict(fp8_types, value_cache_ptr="*u8", vt_ptr="*u8"))
        check(f"ksum fp8 cache D{dim} page {page}", pooling._ksum_kernel,
              dict(PAGE=page, BLOCK_N=BLKK, HEAD_DIM=dim, CHUNK=pooling.KSUM_CHUNK, **POOL_SERVED), 4,
              types=fp8_types)
        check(f"kblock fp8 cache D{dim} page {page}", pooling._kblock_kernel,
              dict(PAGE=page, BLOCK_N=BLKK, HEAD_DIM=dim, **POOL_SERVED), 4, types=fp8_types)
        dc, warps = predictor.select_launch_params(args.nkb_pad[0])
        check(f"select fp8 q={q or 'bf16'} D{dim} NKB_PAD={args.nkb_pad[0]}",
              predictor._select_kernel,
              dict(GROUP=4, BLOCK_M=BLKQ, BLOCK_N=BLKK, HEAD_DIM=dim, NKB_PAD=args.nkb_pad[0],
                   DC=dc, USE_TOPK=False, MASK=False, Q_SCALED=q is not None, K_SCALED=True),
              warps, types=fp8_types)
    for nkb_pad in args.nkb_pad:
        dc, warps = predictor.select_launch_params(nkb_pad)
        for topk in (False, True):
            check(f"select NKB_PAD={nkb_pad} topk={topk}", predictor._select_kernel,
                  dict(common, NKB_PAD=nkb_pad, DC=dc, USE_TOPK=topk, MASK=False), warps)
        # the FA3 path's bit-set maps
        check(f"select NKB_PAD={nkb_pad} bit sets", predictor._select_kernel,
              dict(common, NKB_PAD=nkb_pad, DC=dc, USE_TOPK=False, MASK=True), warps,
              types=dict(types, lut_ptr="*i32"))
        # the other warp count (predict_block_map(select_warps=...), benchmarks)
        w = 12 - warps
        check(f"select NKB_PAD={nkb_pad} warps={w}", predictor._select_kernel,
              dict(common, NKB_PAD=nkb_pad, DC=predictor._select_dc(nkb_pad, w), USE_TOPK=False,
                   MASK=False), w)
    # attention_kernel fa3: the virtual block table (64- and 16-token pages)
    for sub in (1, 4):
        check(f"virtual table SUB={sub}", fa3_tables._virtual_table_kernel,
              dict(GROUP=4, SUB=sub, CHUNK_WORDS=fa3_tables.TABLE_CHUNK_WORDS), 4,
              types=dict(types, bt_ptr="*i32", vbt_ptr="*i32", mask_ptr="*i32"))
    if not checked:
        sys.exit(f"no variant's label matches --only {args.only!r}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
