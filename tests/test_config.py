"""SpargeConfig: parsing of --additional-config '{"sparge": ...}' + SPARGE_* env, every error."""

from types import SimpleNamespace

import pytest

from sparge_serve import config
from sparge_serve.config import (
    DEFAULT_MIN_SPARSE_LEN,
    DEFAULT_MIN_SPARSE_QUERY_LEN,
    SpargeConfig,
    env_flag,
    parse_bool,
)


def test_defaults():
    cfg = SpargeConfig.from_dict(None, env={})
    assert cfg == SpargeConfig()
    assert (cfg.thresholds, cfg.min_sparse_len, cfg.dense_layers, cfg.mode, cfg.topk) == (
        None, DEFAULT_MIN_SPARSE_LEN, 0, "sparse", None)
    assert cfg.min_sparse_query_len == DEFAULT_MIN_SPARSE_QUERY_LEN
    assert cfg.enabled and not cfg.is_dense_layer(0) and cfg.fast_launch


def test_removed_fused_option_is_an_unknown_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fused'\].*Fix: use only"):
        SpargeConfig.from_dict({"fused": True}, env={})


@pytest.mark.parametrize("text,value", [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" ON ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False)])
def test_parse_bool_spellings(text, value):
    assert parse_bool(text, "SPARGE_X") is value


@pytest.mark.parametrize("text", ["2", "y", "enabled", "-1", "tru", ""])
def test_parse_bool_refuses_the_rest(text):
    with pytest.raises(ValueError, match=r"SPARGE_X=.* is not a boolean.*1/true/yes/on"):
        parse_bool(text, "SPARGE_X")


def test_env_flag_default_and_value():
    assert env_flag("SPARGE_FAST_LAUNCH", True, {}) is True
    assert env_flag("SPARGE_FAST_LAUNCH", True, {"SPARGE_FAST_LAUNCH": " "}) is True
    assert env_flag("SPARGE_FAST_LAUNCH", True, {"SPARGE_FAST_LAUNCH": "false"}) is False
    with pytest.raises(ValueError, match="SPARGE_FAST_LAUNCH='fasle'"):
        env_flag("SPARGE_FAST_LAUNCH", True, {"SPARGE_FAST_LAUNCH": "fasle"})


@pytest.fixture
def warned(monkeypatch, vllm_log):
    monkeypatch.setattr(config, "_WARNED_ENV", set())
    return vllm_log


def test_unknown_env_var_warns_with_closest_name(warned):
    env = {"SPARGE_MODEE": "dense", "SPARGE_FAST_LAUNCH": "1", "SPARGE_TEST_MODEL": "m",
           "SPARGE_TEST_LOG_DIR": "/l", "SPARGE_TEST_CHILD_TIMEOUT": "9",
           "SPARGE_TEST_REPORT": "r.json", "SPARGE_MODE": "sparse", "OTHER_MODEE": "x",
           "SPARGE_XYZZY": "1"}
    SpargeConfig.from_dict(None, env=env)
    SpargeConfig.from_dict(None, env=env)  # once per variable
    # (a record can reach caplog twice: through the "vllm" logger and through the root logger)
    lines = [r.getMessage() for r in dict.fromkeys(warned.records) if r.levelname == "WARNING"]
    assert lines == [
        "sparge config: unknown environment variable SPARGE_MODEE is ignored; did you mean "
        "SPARGE_MODE?",
        "sparge config: unknown environment variable SPARGE_XYZZY is ignored; the sparge "
        "variables are " + ", ".join(sorted(config.ENV_VARS.values())),
    ]


def test_known_env_vars_are_not_warned_about(warned):
    env = {var: "" for var in (*config.ENV_VARS.values(), *config.OTHER_ENV_VARS)}
    SpargeConfig.from_dict(None, env=env)
    assert not [r for r in warned.records if r.levelname == "WARNING"]


def test_attention_kernel_from_dict_env_and_errors():
    assert SpargeConfig.from_dict(None, env={}).attention_kernel == "auto"
    assert SpargeConfig.from_dict({"attention_kernel": "fa3"}, env={}).attention_kernel == "fa3"
    env = {"SPARGE_ATTENTION_KERNEL": "triton"}
    assert SpargeConfig.from_dict({"attention_kernel": "fa3"}, env=env).attention_kernel == "triton"
    with pytest.raises(ValueError, match=r"`attention_kernel` \(env SPARGE_ATTENTION_KERNEL\) = "
                       r"'fa2' is not one of \['auto', 'triton', 'fa3'\].*Fix:"):
        SpargeConfig.from_dict({}, env={"SPARGE_ATTENTION_KERNEL": "fa2"})


@pytest.mark.parametrize("kernel, fp8_attention, fa3_available, fa3", [
    ("auto", False, True, True), ("auto", False, False, False), ("auto", True, True, False),
    ("triton", False, True, False), ("fa3", False, True, True), ("fa3", True, True, True)])
def test_attention_kernel_auto_takes_fa3_where_it_serves(kernel, fp8_attention, fa3_available,
                                                         fa3):
    """``auto`` attends through FA3 wherever it serves the layer (the faster path over both
    caches) but with ``fp8_attention``, whose fp8 products the Triton kernel takes faster than
    FA3's fp8 forward; ``triton`` and ``fa3`` are what they say (``fa3`` without FA3 is refused
    at bind)."""
    cfg = SpargeConfig(attention_kernel=kernel, fp8_attention=fp8_attention)
    assert cfg.fa3_attention(fa3_available) is fa3


def test_fp8_attention_from_dict_and_env_and_its_cache_dtype():
    assert SpargeConfig.from_dict(None, env={}).fp8_attention is False
    cfg = SpargeConfig.from_dict({}, env={"SPARGE_FP8_ATTENTION": "yes"})
    assert cfg.fp8_attention is True
    cfg.check_kv_cache_dtype("fp8")
    with pytest.raises(ValueError, match=r"`fp8_attention` \(config\) is true but the KV cache "
                       r"is not fp8 \(--kv-cache-dtype auto\).*Fix: serve with --kv-cache-dtype "
                       r"fp8"):
        cfg.check_kv_cache_dtype("auto")
    SpargeConfig().check_kv_cache_dtype("fp8_e4m3")
    SpargeConfig(attention_kernel="fa3").check_kv_cache_dtype("fp8")  # FA3's fp8 forward


def test_fast_launch_from_dict_and_env():
    assert SpargeConfig.from_dict(None, env={}).fast_launch is True
    assert SpargeConfig.from_dict({"fast_launch": False}, env={}).fast_launch is False
    env = {"SPARGE_FAST_LAUNCH": "on"}
    assert SpargeConfig.from_dict({"fast_launch": False}, env=env).fast_launch is True
    with pytest.raises(ValueError, match=r"`fast_launch` \(additional_config\) = 'no' is not a "
                       r"boolean.*Fix: use true .* or false"):
        SpargeConfig.from_dict({"fast_launch": "no"}, env={})


def test_map_budget_from_dict_and_env():
    assert SpargeConfig.from_dict(None, env={}).map_budget == 0.015
    assert SpargeConfig.from_dict({"map_budget": None}, env={}).map_budget is None
    assert SpargeConfig.from_dict({"map_budget": 1}, env={}).map_budget == 1.0
    assert SpargeConfig.from_dict({}, env={"SPARGE_MAP_BUDGET": "0.02"}).map_budget == 0.02
    assert SpargeConfig.from_dict({}, env={"SPARGE_MAP_BUDGET": "None"}).map_budget is None


def test_min_sparse_query_len_from_dict_env_and_errors():
    assert SpargeConfig.from_dict({"min_sparse_query_len": 128}, env={}).min_sparse_query_len == 128
    env = {"SPARGE_MIN_SPARSE_QUERY_LEN": "2048"}
    assert SpargeConfig.from_dict({"min_sparse_query_len": 128}, env=env).min_sparse_query_len \
        == 2048
    with pytest.raises(ValueError, match=r"`min_sparse_query_len` .*not a positive integer"):
        SpargeConfig.from_dict({"min_sparse_query_len": 0}, env={})
    with pytest.raises(ValueError, match=r"SPARGE_MIN_SPARSE_QUERY_LEN.*not an integer"):
        SpargeConfig.from_dict(None, env={"SPARGE_MIN_SPARSE_QUERY_LEN": "short"})


def test_full_dict():
    cfg = SpargeConfig.from_dict({"thresholds": "/x.safetensors", "min_sparse_len": 4096,
                                  "dense_layers": [5, 1, 1], "mode": "dense", "topk": 1},
                                 env={})
    assert cfg.thresholds == "/x.safetensors" and cfg.min_sparse_len == 4096
    assert cfg.dense_layers == (1, 5) and cfg.is_dense_layer(5) and not cfg.is_dense_layer(2)
    assert cfg.mode == "dense" and not cfg.enabled and cfg.topk == 1.0
    assert cfg.to_dict()["dense_layers"] == [1, 5]
    hash(cfg)  # frozen + hashable (the backend caches per config)


def test_first_n_dense_layers():
    cfg = SpargeConfig(dense_layers=2)
    assert [cfg.is_dense_layer(i) for i in range(4)] == [True, True, False, False]


def test_env_overrides_json():
    env = {"SPARGE_THRESHOLDS": "/env.safetensors", "SPARGE_MIN_SPARSE_LEN": "8192",
           "SPARGE_MODE": "dense", "SPARGE_DENSE_LAYERS": "0, 3"}
    cfg = SpargeConfig.from_dict({"thresholds": "/json", "min_sparse_len": 1, "mode": "sparse"},
                                 env=env)
    assert (cfg.thresholds, cfg.min_sparse_len, cfg.mode, cfg.dense_layers) == (
        "/env.safetensors", 8192, "dense", (0, 3))


@pytest.mark.parametrize("text,expected", [("3", 3), ("[1, 2]", (1, 2)), ("4,0", (0, 4))])
def test_env_dense_layers_forms(text, expected):
    assert SpargeConfig.from_dict({}, env={"SPARGE_DENSE_LAYERS": text}).dense_layers == expected


def test_empty_env_is_ignored():
    cfg = SpargeConfig.from_dict({"min_sparse_len": 100}, env={"SPARGE_MIN_SPARSE_LEN": " "})
    assert cfg.min_sparse_len == 100


def test_from_vllm_config():
    vc = SimpleNamespace(additional_config={"sparge": {"min_sparse_len": 512}, "other": 1,
                                            "kv_transfer": {"mode": "x"}})
    assert SpargeConfig.from_vllm_config(vc, env={}).min_sparse_len == 512
    assert SpargeConfig.from_vllm_config(SimpleNamespace(additional_config=None),
                                         env={}) == SpargeConfig()


@pytest.mark.parametrize("additional,right", [
    ({"mode": "dense"}, """'{"sparge": {"mode": "dense"}}'"""),
    ({"mode": "dense", "other_plugin": 1}, """'{"sparge": {"mode": "dense"}}'"""),
    ({"sparge": {"min_sparse_len": 8}, "thresholds": "/t"},
     """'{"sparge": {"min_sparse_len": 8, "thresholds": "/t"}}'"""),
    ({"SPARGE": {"mode": "dense"}}, """'{"sparge": {"mode": "dense"}}'"""),
    ({"Sparge": {"fast_launch": False}}, """'{"sparge": {"fast_launch": false}}'"""),
])
def test_misplaced_options_are_refused_with_the_right_form(additional, right):
    with pytest.raises(ValueError, match="Fix: pass --additional-config ") as ei:
        SpargeConfig.from_vllm_config(SimpleNamespace(additional_config=additional), env={})
    msg = str(ei.value)
    assert msg.endswith(f"--additional-config {right}.")
    wrong = [k for k in additional if k.lower() == "sparge" and k != "sparge"]
    assert (f"key(s) {wrong} are not 'sparge'" if wrong else "at the top level") in msg


def test_check_num_layers():
    SpargeConfig(dense_layers=(0, 3)).check_num_layers(4)
    SpargeConfig(dense_layers=40).check_num_layers(4)  # "first 40" of 4 layers: all dense
    with pytest.raises(ValueError, match=r"`dense_layers`.*layer\(s\) \[4\].*4 layers.*Fix:"):
        SpargeConfig(dense_layers=(0, 4)).check_num_layers(4)


@pytest.mark.parametrize("raw,match", [
    ({"threshold": "x"}, r"unknown key\(s\) \['threshold'\].*Fix: use only"),
    ({"min_sparse_len": 0}, r"`min_sparse_len` \(additional_config\) = 0 is not a positive"),
    ({"min_sparse_len": "16k"}, r"`min_sparse_len`.*'16k'"),
    ({"min_sparse_len": True}, r"`min_sparse_len`.*True"),
    ({"dense_layers": -1}, r"`dense_layers`.*negative"),
    ({"dense_layers": [0, "1"]}, r"`dense_layers`.*non-negative integers"),
    ({"dense_layers": "0,1"}, r"`dense_layers`.*neither an integer nor a list"),
    ({"mode": "off"}, r"`mode`.*'off' is not one of \['sparse', 'dense'\]"),
    ({"topk": 0}, r"`topk`.*not a number in \(0, 1\]"),
    ({"topk": 1.5}, r"`topk`"),
    ({"thresholds": ""}, r"`thresholds`.*not a file path"),
    ({"thresholds": 3}, r"`thresholds`.*not a file path"),
    ({"fast_launch": 1}, r"`fast_launch`.*not a boolean.*use true"),
    ({"map_budget": 0}, r"`map_budget`.*0 is not a number in \(0, 1\].*or null"),
    ({"map_budget": 2.0}, r"`map_budget`.*2.0 is not a number in \(0, 1\]"),
    ({"map_budget": True}, r"`map_budget`.*True"),
    ({"map_budget": "1%"}, r"`map_budget`.*'1%'"),
])
def test_bad_values(raw, match):
    with pytest.raises(ValueError, match=match) as ei:
        SpargeConfig.from_dict(raw, env={})
    assert "Fix:" in str(ei.value)


@pytest.mark.parametrize("env,match", [
    ({"SPARGE_MIN_SPARSE_LEN": "lots"}, r"`min_sparse_len` \(env SPARGE_MIN_SPARSE_LEN\).*"
                                         r"not an integer.*SPARGE_MIN_SPARSE_LEN=32768"),
    ({"SPARGE_MODE": "fast"}, r"`mode` \(env SPARGE_MODE\)"),
    ({"SPARGE_DENSE_LAYERS": "a,b"}, r"`dense_layers` \(env SPARGE_DENSE_LAYERS\)"),
    ({"SPARGE_DENSE_LAYERS": "-2"}, r"`dense_layers` \(env SPARGE_DENSE_LAYERS\).*negative"),
    ({"SPARGE_FAST_LAUNCH": "fast"}, r"`fast_launch` \(env SPARGE_FAST_LAUNCH\) = 'fast' is "
                                      r"not a boolean.*Fix: set SPARGE_FAST_LAUNCH=1.*yes/on"),
    ({"SPARGE_MAP_BUDGET": "half"}, r"`map_budget` \(env SPARGE_MAP_BUDGET\).*not a number.*"
                                     r"SPARGE_MAP_BUDGET=none"),
    ({"SPARGE_MAP_BUDGET": "-1"}, r"`map_budget` \(env SPARGE_MAP_BUDGET\).*-1.0"),
])
def test_bad_env(env, match):
    with pytest.raises(ValueError, match=match):
        SpargeConfig.from_dict({}, env=env)


def test_not_a_dict():
    with pytest.raises(ValueError, match=r"must be a JSON object.*Fix:"):
        SpargeConfig.from_dict(["thresholds"], env={})
    with pytest.raises(ValueError, match=r"additional_config is not a dict"):
        SpargeConfig.from_vllm_config(SimpleNamespace(additional_config="x"), env={})


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match=r"`mode` \(SpargeConfig\(\)\)"):
        SpargeConfig(mode="DENSE")


def test_thresholds_untuned_keyword(tmp_path, monkeypatch):
    """``"untuned"`` names the published untuned thresholds (no file to load), in the JSON or the
    env; a file of that name in the working directory makes it ambiguous: refused, with the
    ``./untuned`` fix."""
    monkeypatch.chdir(tmp_path)
    cfg = SpargeConfig.from_dict({}, env={"SPARGE_THRESHOLDS": "untuned"})
    assert (cfg.thresholds, cfg.thresholds_file) == ("untuned", None)
    assert SpargeConfig.from_dict({"thresholds": "t.safetensors"}, env={}).thresholds_file == (
        "t.safetensors")
    assert SpargeConfig().thresholds_file is None
    (tmp_path / "untuned").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a file of that name is in the working directory.*"
                                         r'Fix: pass "\./untuned"'):
        SpargeConfig.from_dict({"thresholds": "untuned"}, env={})
    assert SpargeConfig.from_dict({"thresholds": "./untuned"}, env={}).thresholds_file == (
        "./untuned")
