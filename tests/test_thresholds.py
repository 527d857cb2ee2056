"""The thresholds file: round trip, TP slicing and every validation error."""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from sparge_serve.thresholds import (
    FORMAT,
    ModelGeometry,
    Thresholds,
    ThresholdsError,
    check_geometry,
    config_hash,
    load_thresholds,
    save_thresholds,
)

L, H, KV, D = 3, 8, 2, 64
GEO = ModelGeometry(L, H, KV, D)


def _random_thresholds(seed: int = 0) -> Thresholds:
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(L, H, generator=g) * 2 - 1
    cdf = torch.rand(L, H, generator=g) * 0.5 + 0.5
    pv = torch.rand(L, H, generator=g) * 20
    is_sparse = torch.ones(L, H, dtype=torch.uint8)
    # head 3 of layer 1 calibrated dense
    sim[1, 3], cdf[1, 3], pv[1, 3], is_sparse[1, 3] = 1.0, 1.0, 50.0, 0
    return Thresholds(sim, cdf, pv, is_sparse, num_kv_heads=KV, head_dim=D, model="tiny",
                      config_hash="abc", l1=0.05, pv_l1=0.07, sim_rule="grid", num_prompts=4,
                      prompts_sha256="ff")


def _write_raw(path, tensors=None, **meta_overrides):
    th = _random_thresholds()
    meta = th.metadata()
    meta.update(meta_overrides)
    meta = {k: v for k, v in meta.items() if v is not None}
    if tensors is None:
        tensors = {n: getattr(th, n) for n in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse")}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_round_trip(tmp_path):
    th = _random_thresholds()
    p = tmp_path / "th.safetensors"
    save_thresholds(p, th)
    got = load_thresholds(p, expect=GEO)
    for name in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse"):
        assert torch.equal(getattr(got, name), getattr(th, name))
    assert (got.num_layers, got.num_heads, got.num_kv_heads, got.head_dim) == (L, H, KV, D)
    assert (got.model, got.config_hash, got.l1, got.pv_l1, got.num_prompts) == (
        "tiny", "abc", 0.05, 0.07, 4)
    assert got.created and got.package_version
    assert got.layer_is_dense(0) is False


def test_digest_is_of_the_bytes_loaded(tmp_path):
    p = tmp_path / "th.safetensors"
    save_thresholds(p, _random_thresholds())
    data = p.read_bytes()
    got = load_thresholds(p)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.for_rank(1, 2).sha256 == got.sha256
    assert "sha256" not in got.metadata() and _random_thresholds().sha256 == ""
    # Saved again (same tensors, new `created`): the digest follows the bytes.
    save_thresholds(tmp_path / "again.safetensors", replace(got, created="2030-01-01"))
    again = load_thresholds(tmp_path / "again.safetensors")
    assert again.sha256 == hashlib.sha256((tmp_path / "again.safetensors").read_bytes()).hexdigest()
    assert again.sha256 != got.sha256


def test_file_is_read_once(tmp_path, monkeypatch):
    p = tmp_path / "th.safetensors"
    save_thresholds(p, _random_thresholds())
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(path),
                                                           real_open(path, *a, **k))[1])
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", None)  # nothing opens it a second time
    load_thresholds(p)
    assert opened == [str(p)]


def test_model_weights_are_refused_from_the_header(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(p), metadata={"format": "pt"})
    with open(p, "ab") as f:  # a body that must never be parsed: the header decides
        f.write(b"\0" * 4096)
    with pytest.raises(ThresholdsError, match="metadata `format` is 'pt'.*not a sparge thresholds"):
        load_thresholds(p)


def test_fifo_is_refused_without_blocking(tmp_path):
    p = tmp_path / "th.safetensors"
    os.mkfifo(p)
    with pytest.raises(ThresholdsError, match="is not a regular file"):
        load_thresholds(p)


def _with_budgets(th: Thresholds, l1=(0.04, 0.05, 0.05), pv=(0.05, 0.07, 0.08)) -> Thresholds:
    return replace(th, l1_budget=torch.tensor(l1, dtype=torch.float32),
                   pv_l1_budget=torch.tensor(pv, dtype=torch.float32))


def test_round_trip_with_layer_budgets(tmp_path):
    th = _with_budgets(_random_thresholds())
    p = tmp_path / "th.safetensors"
    save_thresholds(p, th)
    got = load_thresholds(p, expect=GEO)
    assert torch.equal(got.l1_budget, th.l1_budget) and torch.equal(got.pv_l1_budget, th.pv_l1_budget)
    assert got.l1_budget.dtype == torch.float32 and (got.l1, got.pv_l1) == (0.05, 0.07)
    assert not {"l1_budget", "pv_l1_budget"} & set(got.metadata())
    # per layer, not per head: every rank keeps the whole vectors
    local = got.for_rank(1, 2)
    assert torch.equal(local.l1_budget, th.l1_budget)
    assert torch.equal(local.pv_l1_budget, th.pv_l1_budget)


def test_file_without_layer_budgets_loads(tmp_path):
    """Files written before the per-layer budget tensors existed still load (format_version 1)."""
    p = _write_raw(tmp_path / "old.safetensors")
    got = load_thresholds(p, expect=GEO)
    assert got.l1_budget is None and got.pv_l1_budget is None and got.l1 == 0.05
    save_thresholds(tmp_path / "again.safetensors", got)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as f:
        assert not {"l1_budget", "pv_l1_budget"} & set(f.keys())
    assert load_thresholds(tmp_path / "again.safetensors").pv_l1_budget is None


def test_defaults_and_dense():
    th = Thresholds.defaults(L, H, KV, D)
    assert torch.all(th.simthreshd1 == 0.6) and torch.all(th.cdfthreshd == 0.98)
    assert torch.all(th.pvthreshd == 50) and torch.all(th.is_sparse == 1)
    assert th.simthreshd1.dtype == torch.float32
    dense = Thresholds.dense(L, H, KV, D)
    assert torch.all(dense.cdfthreshd == 1) and torch.all(dense.simthreshd1 == 1)
    assert torch.all(dense.is_sparse == 0) and dense.layer_is_dense(2)


@pytest.mark.parametrize("tp_size,kv_heads", [(1, 2), (2, 2), (4, 2), (8, 8), (4, 1)])
def test_for_rank(tp_size, kv_heads):
    th = replace(_random_thresholds(), num_kv_heads=kv_heads)
    per = H // tp_size
    slices = [th.for_rank(r, tp_size) for r in range(tp_size)]
    for r, s in enumerate(slices):
        assert s.num_heads == per and s.num_layers == L
        assert s.num_kv_heads == max(1, kv_heads // tp_size)
        assert torch.equal(s.cdfthreshd, th.cdfthreshd[:, r * per:(r + 1) * per])
        assert s.head_offset == r * per
    assert torch.equal(torch.cat([s.simthreshd1 for s in slices], dim=1), th.simthreshd1)


def test_for_rank_errors():
    th = _random_thresholds()
    with pytest.raises(ValueError, match="divisible"):
        th.for_rank(0, 3)
    with pytest.raises(ValueError, match="tp_rank"):
        th.for_rank(2, 2)
    with pytest.raises(ThresholdsError, match="sliced"):
        save_thresholds("/nonexistent/x.safetensors", th.for_rank(1, 2))


def test_config_hash_stable():
    a = {"hidden_size": 64, "num_attention_heads": 4, "_name_or_path": "/a",
         "transformers_version": "4.1", "rope_scaling": {"type": "linear", "factor": 2.0}}
    b = {"rope_scaling": {"factor": 2.0, "type": "linear"}, "num_attention_heads": 4,
         "hidden_size": 64, "_name_or_path": "/b", "transformers_version": "4.9"}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64
    assert config_hash(a) != config_hash({**a, "hidden_size": 128})


def test_config_hash_mismatch_warns(caplog):
    th = _random_thresholds()
    with caplog.at_level("WARNING", logger="sparge_serve.thresholds"):
        check_geometry(th, replace(GEO, config_hash="other"))
    assert "config_hash" in caplog.text


# ---- every load error ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ThresholdsError, match="no such file.*Fix:"):
        load_thresholds(tmp_path / "nope.safetensors")


def test_directory(tmp_path):
    with pytest.raises(ThresholdsError, match="not a regular file"):
        load_thresholds(tmp_path)


def test_pickle_refused(tmp_path):
    p = tmp_path / "th.pt"
    p.write_bytes(pickle.dumps({"simthreshd1": [0.5]}))
    with pytest.raises(ThresholdsError, match="not a readable safetensors.*pickled"):
        load_thresholds(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "th.safetensors"
    save_thresholds(p, _random_thresholds())
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ThresholdsError, match="not a readable safetensors"):
        load_thresholds(p)


@pytest.mark.parametrize("meta,match", [
    ({"format": "something-else"}, "not a sparge thresholds file"),
    ({"format": None}, "not a sparge thresholds file"),
    ({"format_version": "2"}, "format_version '2' is not supported"),
    ({"num_kv_heads": None}, "metadata key `num_kv_heads` is missing"),
    ({"head_dim": "sixty-four"}, "`head_dim` = 'sixty-four' is not an integer"),
    ({"blkq": "0"}, "`blkq` = 0 must be positive"),
    ({"num_heads": "4"}, r"shape \[3, 8\] but the metadata says"),
    ({"l1": "small"}, "`l1` = 'small' is not a number"),
    ({"l1": "nan"}, r"metadata `l1` = nan is not a number in \(0, 1\]"),
    ({"pv_l1": "inf"}, r"metadata `pv_l1` = inf is not a number in \(0, 1\]"),
    ({"l1": "0"}, r"metadata `l1` = 0.0 is not a number in \(0, 1\]"),
    ({"l1": "-0.05"}, r"metadata `l1` = -0.05 is not a number in \(0, 1\]"),
    ({"pv_l1": "1.5"}, r"metadata `pv_l1` = 1.5 is not a number in \(0, 1\]"),
    ({"pv_l1": "0.05"}, r"metadata `pv_l1` = 0.05 is not above `l1` = 0.05"),
    ({"num_prompts": "-3"}, r"metadata `num_prompts` = -3 is not an integer >= 0"),
    ({"num_prompts": "4.5"}, r"`num_prompts` = '4.5' is not an integer"),
    ({"num_kv_heads": "3"}, "not a multiple of num_kv_heads"),
])
def test_bad_metadata(tmp_path, meta, match):
    p = _write_raw(tmp_path / "th.safetensors", **meta)
    with pytest.raises(ThresholdsError, match=match) as ei:
        load_thresholds(p)
    assert str(p) in str(ei.value) and "Fix:" in str(ei.value)


def test_no_metadata(tmp_path):
    p = tmp_path / "th.safetensors"
    save_file({"simthreshd1": torch.zeros(L, H)}, str(p))
    with pytest.raises(ThresholdsError, match="not a sparge thresholds file"):
        load_thresholds(p)


def _tensors(**changes):
    th = _random_thresholds()
    t = {n: getattr(th, n).clone() for n in ("simthreshd1", "cdfthreshd", "pvthreshd", "is_sparse")}
    for k, v in changes.items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    return t


def _set(name, idx, value):
    t = getattr(_random_thresholds(), name).clone()
    t[idx] = value
    return t


@pytest.mark.parametrize("changes,match", [
    ({"pvthreshd": None}, r"missing tensor\(s\) \['pvthreshd'\]"),
    ({"extra": torch.zeros(L, H)}, r"unexpected tensor\(s\) \['extra'\]"),
    ({"cdfthreshd": torch.full((L, H), 0.9, dtype=torch.float16)}, "dtype torch.float16"),
    ({"is_sparse": torch.ones(L, H)}, "`is_sparse` has dtype torch.float32"),
    ({"simthreshd1": torch.zeros(L, H + 1)}, r"shape \[3, 9\]"),
    ({"simthreshd1": _set("simthreshd1", (0, 1), float("nan"))}, "NaN/inf.*layer 0, head 1"),
    ({"pvthreshd": _set("pvthreshd", (2, 0), float("inf"))}, "NaN/inf.*layer 2, head 0"),
    ({"cdfthreshd": _set("cdfthreshd", (0, 0), 0.0)}, r"`cdfthreshd` value 0 .* in \(0, 1\]"),
    ({"cdfthreshd": _set("cdfthreshd", (0, 0), 1.5)}, r"`cdfthreshd` value 1.5"),
    ({"simthreshd1": _set("simthreshd1", (1, 1), -1.5)}, r"`simthreshd1` value -1.5.*\[-1, 1\]"),
    ({"pvthreshd": _set("pvthreshd", (1, 1), -2.0)}, r"`pvthreshd` value -2.*>= 0"),
    ({"is_sparse": _set("is_sparse", (0, 0), 2)}, "other than 0 and 1"),
    ({"pvthreshd": _set("pvthreshd", (1, 3), 10.0)}, "marked dense.*pvthreshd=10"),
])
def test_bad_tensors(tmp_path, changes, match):
    p = _write_raw(tmp_path / "th.safetensors", tensors=_tensors(**changes))
    with pytest.raises(ThresholdsError, match=match) as ei:
        load_thresholds(p)
    assert str(p) in str(ei.value) and "Fix:" in str(ei.value)


def _budget(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


_GOOD_L1, _GOOD_PV = _budget(0.04, 0.05, 0.05), _budget(0.05, 0.07, 0.08)


@pytest.mark.parametrize("budgets,match", [
    ({"l1_budget": _GOOD_L1}, r"`l1_budget` is present but `pv_l1_budget` is not"),
    ({"pv_l1_budget": _GOOD_PV}, r"`pv_l1_budget` is present but `l1_budget` is not"),
    ({"l1_budget": _budget(0.04, 0.05), "pv_l1_budget": _GOOD_PV},
     r"`l1_budget` has shape \[2\], expected \[num_layers\] = \[3\]"),
    ({"l1_budget": _GOOD_L1, "pv_l1_budget": torch.full((L, H), 0.07)},
     r"`pv_l1_budget` has shape \[3, 8\]"),
    ({"l1_budget": _budget(0.04, 0.05, 0.05, dtype=torch.float64), "pv_l1_budget": _GOOD_PV},
     "`l1_budget` has dtype torch.float64"),
    ({"l1_budget": _budget(0.04, float("nan"), 0.05), "pv_l1_budget": _GOOD_PV},
     "`l1_budget` has 1 NaN/inf.*layer 1"),
    ({"l1_budget": _GOOD_L1, "pv_l1_budget": _budget(0.05, 0.07, float("inf"))},
     "`pv_l1_budget` has 1 NaN/inf.*layer 2"),
    ({"l1_budget": _budget(0.0, 0.05, 0.05), "pv_l1_budget": _GOOD_PV},
     r"`l1_budget` value 0 at layer 0 is out of range; it must be in \(0, 1\]"),
    ({"l1_budget": _GOOD_L1, "pv_l1_budget": _budget(0.05, 1.5, 0.08)},
     r"`pv_l1_budget` value 1.5 at layer 1 is out of range"),
    ({"l1_budget": _GOOD_L1, "pv_l1_budget": _budget(0.05, 0.05, 0.08)},
     "layer 1 has pv_l1_budget 0.05 <= l1_budget 0.05"),
])
def test_bad_layer_budgets(tmp_path, budgets, match):
    p = _write_raw(tmp_path / "th.safetensors", tensors={**_tensors(), **budgets})
    with pytest.raises(ThresholdsError, match=match) as ei:
        load_thresholds(p)
    assert str(p) in str(ei.value) and "Fix:" in str(ei.value)


def test_bad_layer_budgets_in_memory():
    th = _random_thresholds()
    with pytest.raises(ThresholdsError, match="<in-memory Thresholds>.*`pv_l1_budget` is a list"):
        replace(th, l1_budget=_GOOD_L1, pv_l1_budget=[0.05, 0.07, 0.08])
    with pytest.raises(ThresholdsError, match="pv_l1_budget 0.04 <= l1_budget 0.04"):
        _with_budgets(th, pv=(0.04, 0.07, 0.08))


@pytest.mark.parametrize("field,value", [
    ("num_layers", 4), ("num_heads", 16), ("num_kv_heads", 8), ("head_dim", 128),
    ("blkq", 64), ("blkk", 128),
])
def test_geometry_mismatch(tmp_path, field, value):
    p = tmp_path / "th.safetensors"
    save_thresholds(p, _random_thresholds())
    with pytest.raises(ThresholdsError, match=f"{field} = .* in the file .*'tiny'.*Fix:"):
        load_thresholds(p, expect=replace(GEO, **{field: value}))


def test_in_memory_validation():
    with pytest.raises(ThresholdsError, match="<in-memory Thresholds>.*NaN"):
        Thresholds.defaults(L, H, KV, D, cdfthreshd=float("nan"))
    with pytest.raises(ThresholdsError, match="`head_dim` = 0"):
        Thresholds.defaults(L, H, KV, 0)
    with pytest.raises(ThresholdsError, match=r"<in-memory Thresholds>.*`l1` = nan"):
        replace(_random_thresholds(), l1=float("nan"))
    with pytest.raises(ThresholdsError, match=r"`num_prompts` = -1 is not an integer >= 0"):
        replace(_random_thresholds(), num_prompts=-1)
    with pytest.raises(ThresholdsError, match=r"`pv_l1` = 0.04 is not above `l1` = 0.05"):
        replace(_random_thresholds(), pv_l1=0.04)
    assert replace(_random_thresholds(), l1=None, pv_l1=None).l1 is None
    assert FORMAT == "sparge-thresholds"
