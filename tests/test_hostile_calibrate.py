"""``sparge-calibrate`` against hostile outputs and inputs: nothing lost, nothing silent.

Every case drives ``main`` on the committed tiny model (models/sparge-tiny-code, CPU) and checks
that the message names the cause, that no file the tool did not make is touched, and that computed
thresholds are never lost. Cases that end in argument checking exit before any model work; the
threshold search is a dense stand-in throughout, so each run takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

import sparge_calibrate.allocate as allocate_mod
import sparge_calibrate.search as search_mod
import sparge_calibrate.summary as summary_mod
import sparge_serve.thresholds as thresholds_mod
from sparge_calibrate.cli import main
from sparge_calibrate.search import LayerResult
from sparge_serve.thresholds import Thresholds, load_thresholds, save_thresholds

MODEL = Path(__file__).resolve().parent.parent / "models" / "sparge-tiny-code"
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 8, 2, 128
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(),
                                reason="models/sparge-tiny-code is not in this checkout")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts" / "calib.jsonl"
    path.parent.mkdir()
    ids = torch.randint(4, 4096, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    path.write_text(json.dumps({"prompt_token_ids": ids}) + "\n")
    return path


@pytest.fixture(autouse=True)
def fast_search(monkeypatch):
    """Replace the threshold search (either allocation's) by one that calls
    ``fast_search.during`` (if set), then marks every head dense: the run reaches the writes in
    seconds (and a case meant to stop at argument checking fails fast where it does not)."""

    class Hook:
        during = None

    def search_layer(samples, scale, evaluator, budget, config=None, on_step=None, prepared=None):
        if Hook.during is not None:
            Hook.during()
        h = samples[0].q.shape[1]
        return LayerResult(
            simthreshd1=torch.ones(h), cdfthreshd=torch.ones(h), pvthreshd=torch.full((h,), 50.0),
            is_sparse=torch.zeros(h, dtype=torch.bool), sparsity=torch.zeros(h), pv_skip=None,
            error=torch.zeros(h), sample_errors=torch.zeros(len(samples), h), budget=budget,
            rule=config.rule)

    def layer_curves(samples, scale, evaluator, config, on_step=None, prepared=None):
        if Hook.during is not None:
            Hook.during()
        h = samples[0].q.shape[1]
        return allocate_mod.LayerCurves(
            sim=torch.ones(1), cdf=torch.ones(1), sparsity=torch.zeros(1, h),
            error=torch.zeros(1, h), sample_errors=torch.zeros(1, len(samples), h))

    monkeypatch.setattr(search_mod, "search_layer", search_layer)
    monkeypatch.setattr(allocate_mod, "layer_curves", layer_curves)
    return Hook


def _run(prompts, out, *extra, capsys) -> tuple[int, str, str]:
    argv = [str(MODEL), "--prompts", str(prompts), "--out", str(out), "--device", "cpu", "--quiet",
            *map(str, extra)]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _old_thresholds(path: Path) -> bytes:
    save_thresholds(path, Thresholds.defaults(LAYERS, HEADS, KV_HEADS, HEAD_DIM, model="previous"))
    return path.read_bytes()


def _png(path: Path, text: dict[str, str] | None = None) -> bytes:
    """A 1x1 PNG with the given text chunks (a photo, say, or an older heatmap)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    for key, value in (text or {}).items():
        body += chunk(b"tEXt", key.encode() + b"\0" + value.encode())
    body += chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")
    path.write_bytes(body)
    return body


def _one_line(err: str) -> str:
    """The tool's one message on stderr (progress logs aside), and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("sparge-calibrate")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# argument time: refused before any model work
# ------------------------------------------------------------------------------------------------

def test_out_refuses_to_replace_model_weights(prompts, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(weights),
              metadata={"format": "pt"})
    before = weights.read_bytes()
    rc, _, err = _run(prompts, weights, capsys=capsys)
    assert rc == 2
    assert f"--out: {weights} exists and is not a sparge thresholds file" in err, err
    assert "model.embed_tokens.weight" in err and "model weights" in err
    assert "choose another --out path" in err and f"remove {weights} yourself" in err
    assert weights.read_bytes() == before


def test_keep_candidates_refuses_to_replace_other_files(prompts, tmp_path, capsys):
    """Every file ``--keep-candidates`` would write is checked like ``--out``, before any work."""
    other = tmp_path / "th.l1_0.02.safetensors"
    other.write_bytes(b"someone's notes\n")
    rc, _, err = _run(prompts, tmp_path / "th.safetensors", "--ppl-target", "0.005", "--report",
                      prompts, "--budgets", "0.01", "0.02", "--keep-candidates", capsys=capsys)
    assert rc == 2
    assert f"--keep-candidates: {other} exists and is not a sparge thresholds file" in err, err
    assert other.read_bytes() == b"someone's notes\n"
    assert not (tmp_path / "th.safetensors").exists()


@pytest.mark.parametrize("content,cause", [
    (b"", "it is empty"),
    (b"not a tensor file at all\n", "it is not a safetensors file"),
    (struct.pack("<Q", 2**40) + b"{}", "it is not a safetensors file"),
    (struct.pack("<Q", 3) + b"\xff\xfe{", "it is not a safetensors file"),
])
def test_out_refuses_to_replace_other_files(content, cause, prompts, tmp_path, capsys):
    other = tmp_path / "notes.safetensors"
    other.write_bytes(content)
    rc, _, err = _run(prompts, other, capsys=capsys)
    assert rc == 2
    assert f"{other} exists and is not a sparge thresholds file: {cause}" in err, err
    assert other.read_bytes() == content


def test_out_through_a_link_checks_the_linked_file(prompts, tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(weights))
    before = weights.read_bytes()
    link = tmp_path / "th.safetensors"
    link.symlink_to(weights)
    rc, _, err = _run(prompts, link, capsys=capsys)
    assert rc == 2
    assert f"{link} (a link to {weights}) exists and is not a sparge thresholds file" in err, err
    assert weights.read_bytes() == before and link.is_symlink()


def test_out_folder_must_take_new_files(prompts, capsys):
    folder = "/sys"
    if not os.path.isdir(folder):
        pytest.skip("needs Linux sysfs, a folder nobody can create files in")
    rc, _, err = _run(prompts, f"{folder}/th.safetensors", capsys=capsys)
    assert rc == 2
    assert f"--out: cannot create files in directory {folder} (Permission denied)" in err, err
    assert "choose a folder you can write to" in err


def test_out_folder_that_is_a_file(prompts, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(prompts, tmp_path / "file" / "th.safetensors", capsys=capsys)
    assert rc == 2
    assert f"--out: {tmp_path / 'file'} is not a directory" in err, err


@pytest.mark.parametrize("text,cause", [
    (None, "it is a PNG file that sparge-calibrate did not write"),
    ({"Software": "Matplotlib version3.10"}, "it is a PNG file that sparge-calibrate did not write"),
    ("jpeg", "it is not a PNG file"),
])
def test_plot_refuses_to_replace_other_pictures(text, cause, prompts, tmp_path, capsys):
    photo = tmp_path / "holiday.png"
    if text == "jpeg":
        photo.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
        before = photo.read_bytes()
    else:
        before = _png(photo, text)
    rc, _, err = _run(prompts, tmp_path / "th.safetensors", "--plot", photo, capsys=capsys)
    assert rc == 2
    assert f"--plot: {photo} exists and is not a sparge-calibrate heatmap: {cause}" in err, err
    assert "choose another --plot path" in err
    assert photo.read_bytes() == before and not (tmp_path / "th.safetensors").exists()


@pytest.mark.parametrize("ext", ["txt", "jsonl"])
def test_prompts_that_are_not_utf8(ext, tmp_path, capsys):
    bad = tmp_path / f"latin1.{ext}"
    first = '{"text": "ok"}\n' if ext == "jsonl" else "fine\n\n"
    bad.write_bytes(first.encode() + "caf\u00e9".encode("latin-1") + b"\n")
    offset, line_no = len(first) + 3, first.count("\n") + 1
    rc, _, err = _run(bad, tmp_path / "th.safetensors", capsys=capsys)
    assert rc == 2
    line = _one_line(err)
    assert (f"--prompts: prompt file {bad} is not UTF-8 text: byte 0xe9 at offset {offset} "
            f"(line {line_no})") in line, line
    assert "save the file as UTF-8" in line


# ------------------------------------------------------------------------------------------------
# end of the run: atomic writes, results kept when the write fails, Ctrl-C
# ------------------------------------------------------------------------------------------------

def test_previous_outputs_are_replaced_keeping_their_mode(prompts, fast_search, tmp_path, capsys):
    out, png = tmp_path / "th.safetensors", tmp_path / "sparsity.png"
    _old_thresholds(out)
    out.chmod(0o640)
    _png(png, {"Software": "sparge-calibrate"})
    rc, stdout, err = _run(prompts, out, "--plot", png, capsys=capsys)
    assert rc == 0, err
    assert f"wrote {out} (replaced the previous file)" in stdout
    assert f"wrote {png} (replaced the previous file)" in stdout
    th = load_thresholds(out)
    assert th.model == str(MODEL) and th.num_prompts == 1
    assert out.stat().st_mode & 0o777 == 0o640
    assert png.stat().st_size > 1000  # the new heatmap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts", "sparsity.png",
                                                          "th.safetensors"]
    # a heatmap this run wrote is recognised by the next run
    rc, stdout, err = _run(prompts, out, "--plot", png, capsys=capsys)
    assert rc == 0, err


def test_new_outputs_get_the_mode_open_gives(prompts, fast_search, tmp_path, capsys):
    out = tmp_path / "th.safetensors"
    rc, _, err = _run(prompts, out, capsys=capsys)
    assert rc == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def _failing_save(monkeypatch, fails):
    """save_thresholds raising ENOSPC for the paths ``fails(path)`` selects."""
    real = thresholds_mod.save_thresholds

    def save(path, th):
        if fails(os.fspath(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, th)

    monkeypatch.setattr(thresholds_mod, "save_thresholds", save)


def test_failed_write_keeps_the_results_next_to_the_target(prompts, fast_search, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "th.safetensors"
    before = _old_thresholds(out)
    _failing_save(monkeypatch, lambda p: os.path.basename(p).startswith("."))
    rc, _, err = _run(prompts, out, capsys=capsys)
    assert rc == 1
    line = _one_line(err)
    copy = tmp_path / f"th.partial-{os.getpid()}.safetensors"
    assert line == (f"sparge-calibrate: error: cannot write --out {out} (No space left on device); "
                    f"the calibrated thresholds are saved in {copy} instead; move it into place "
                    f"with `mv {copy} {out}`")
    assert load_thresholds(copy).model == str(MODEL)
    assert out.read_bytes() == before  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prompts", out.name, copy.name])


def test_folder_removed_during_the_run(prompts, fast_search, tmp_path, monkeypatch, capsys):
    folder, spare = tmp_path / "results", tmp_path / "tmpdir"
    folder.mkdir()
    spare.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spare))
    fast_search.during = lambda: shutil.rmtree(folder, ignore_errors=True)
    rc, _, err = _run(prompts, folder / "th.safetensors", capsys=capsys)
    assert rc == 1
    line = _one_line(err)
    copy = spare / f"th.partial-{os.getpid()}.safetensors"
    assert f"cannot write --out {folder / 'th.safetensors'} (No such file or directory)" in line
    assert f"the calibrated thresholds are saved in {copy} instead" in line
    assert load_thresholds(copy).num_prompts == 1


def test_nowhere_to_write(prompts, fast_search, tmp_path, monkeypatch, capsys):
    out = tmp_path / "th.safetensors"
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    _failing_save(monkeypatch, lambda p: True)
    rc, _, err = _run(prompts, out, capsys=capsys)
    assert rc == 1
    line = _one_line(err)
    assert f"cannot write --out {out} (No space left on device)" in line
    assert "the calibrated thresholds are lost; free space or fix the folder and run again" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]  # nothing half-written


def test_file_appearing_at_out_during_the_run_is_kept(prompts, fast_search, tmp_path, capsys):
    out = tmp_path / "th.safetensors"
    fast_search.during = lambda: out.write_text("someone else's file")
    rc, _, err = _run(prompts, out, capsys=capsys)
    assert rc == 1
    line = _one_line(err)
    assert f"{out} exists and is not a sparge thresholds file: it is not a safetensors file" in line
    copy = tmp_path / f"th.partial-{os.getpid()}.safetensors"
    assert f"saved in {copy} instead" in line and copy.exists()
    assert out.read_text() == "someone else's file"


def test_failed_plot_keeps_the_thresholds(prompts, fast_search, tmp_path, monkeypatch, capsys):
    out, png = tmp_path / "th.safetensors", tmp_path / "sparsity.png"
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    def plot(results, path, title):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(summary_mod, "plot_heatmap", plot)
    rc, stdout, err = _run(prompts, out, "--plot", png, capsys=capsys)
    assert rc == 1
    line = _one_line(err)
    assert f"cannot write --plot {png} (No space left on device)" in line
    assert f"wrote {out}" in stdout and load_thresholds(out).num_prompts == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts", "th.safetensors"]


def test_ctrl_c_during_the_search(prompts, fast_search, tmp_path, capsys):
    out = tmp_path / "th.safetensors"
    before = _old_thresholds(out)

    def interrupt():
        raise KeyboardInterrupt

    fast_search.during = interrupt
    rc, _, err = _run(prompts, out, capsys=capsys)
    assert rc == 130
    line = _one_line(err)
    assert line == f"sparge-calibrate: interrupted; nothing was written; the existing {out} is " \
                   "unchanged"
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts", "th.safetensors"]


def test_ctrl_c_while_writing_leaves_no_half_file(prompts, fast_search, tmp_path, monkeypatch,
                                                  capsys):
    out = tmp_path / "th.safetensors"
    before = _old_thresholds(out)

    def save(path, th):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(thresholds_mod, "save_thresholds", save)
    rc, _, err = _run(prompts, out, capsys=capsys)
    assert rc == 130
    assert "interrupted; nothing was written; the existing" in _one_line(err)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts", "th.safetensors"]


def test_ctrl_c_after_the_write_says_where_the_thresholds_are(prompts, fast_search, tmp_path,
                                                              monkeypatch, capsys):
    out, png = tmp_path / "th.safetensors", tmp_path / "sparsity.png"

    def plot(results, path, title):
        raise KeyboardInterrupt

    monkeypatch.setattr(summary_mod, "plot_heatmap", plot)
    rc, _, err = _run(prompts, out, "--plot", png, capsys=capsys)
    assert rc == 130
    assert _one_line(err) == f"sparge-calibrate: interrupted; the thresholds are in {out}"
    assert load_thresholds(out).num_prompts == 1 and not png.exists()
