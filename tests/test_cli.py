"""The `caap` command line: outputs per image, weights lookup, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from caap.cli import main

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random ViT-Tiny weights saved as a local timm state dict (no hub needed)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / f"{NAME}.pth"
    torch.save(timm.create_model(NAME, pretrained=False, depth=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((180, 240, 4)) * 255).astype(np.uint8), mode="RGBA").save(path)
    return path


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_writes_every_output(checkpoint, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    out = tmp_path / "out"
    code, _stdout, err = _run(["explain", str(image), "--model", NAME, "--checkpoint", str(checkpoint),
                              "--layers", "0:1", "--context", "grey", "--target", "3", "--out", str(out)], capsys)
    assert code == 0, err
    for ext in ("png", "html", "npy", "json"):
        assert (out / f"photo_caap.{ext}").is_file()
    summary = json.loads((out / "photo_caap.json").read_text())
    assert summary["target"]["class"] == 3
    assert summary["settings"]["layers"] == [0, 1] and summary["settings"]["context"] == "grey"
    assert len(summary["top_classes"]) == 5 and {"class", "name", "prob"} <= set(summary["top_classes"][0])
    assert summary["seconds"] > 0
    assert np.load(out / "photo_caap.npy").shape == (14, 14)
    assert "plotly" in (out / "photo_caap.html").read_text()[:5_000_000]


def test_explain_default_image_and_checkpoint_dir(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    monkeypatch.setenv("CAAP_CHECKPOINT_DIR", str(checkpoint.parent))
    code, stdout, err = _run(["explain", "--model", NAME, "--layers", "1:1", "--context", "zero",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "chelsea_caap.png").is_file() and "chelsea" in stdout


def test_sweep_writes_layer_by_patch_grid(checkpoint, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    code, _stdout, err = _run(["sweep", str(image), "--model", NAME, "--checkpoint", str(checkpoint),
                              "--component", "mlp_out", "--context", "black", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    values = np.load(tmp_path / "photo_sweep_mlp_out.npy")
    assert values.shape == (2, 14, 14)
    assert (tmp_path / "photo_sweep_mlp_out.html").is_file() and (tmp_path / "photo_sweep_mlp_out.png").is_file()


@pytest.mark.parametrize("argv,message,code", [
    (["explain", "missing.jpg"], "image file not found", 2),
    (["explain", "--layers", "5"], "--layers must look like START:END", 2),
    (["explain", "--layers", "0:9"], "not a valid range", 2),
    (["explain", "--context", "sepia"], "unknown context", 2),
    (["explain", "--target", "99999"], "out of range", 2),
    (["explain", "--target", "not a class"], "not an ImageNet class name", 2),
    (["explain", "--target", "crane"], "ambiguous, it names 2 classes: 134 (crane", 2),
    (["explain", "--model", "vit_no_such_model"], "unknown timm model name", 2),
    (["explain", "--model", "resnet18"], "not a timm VisionTransformer", 2),
    (["explain", "NOT_AN_IMAGE"], "could not read", 1),
])
def test_bad_input_one_line_nonzero(argv, message, code, checkpoint, tmp_path, capsys, monkeypatch):
    """Argument errors exit 2 before any weights are loaded; an unreadable image exits 1."""
    if "resnet18" not in argv:
        monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    monkeypatch.setattr("caap.models.load_model", lambda *a, **k: pytest.fail("loaded weights before checking"))
    if "NOT_AN_IMAGE" in argv:
        bad = tmp_path / "bad.jpg"
        bad.write_text("this is not an image")
        argv = [str(bad) if a == "NOT_AN_IMAGE" else a for a in argv]
    if "--model" not in argv:
        argv = argv + ["--model", NAME, "--checkpoint", str(checkpoint)]
    if "--context" not in argv:
        argv = argv + ["--context", "grey"]
    got, _, err = _run(argv + ["--out", str(tmp_path / "out")], capsys)
    assert got == code, err
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("caap: error:") and message in lines[0], err


def test_no_hub_names_checkpoint(tmp_path, capsys, monkeypatch):
    """No local weights and HF_HUB_OFFLINE: one line that says what to do, at once."""
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    monkeypatch.delenv("CAAP_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("CAAP_SHARED_DIR", str(tmp_path / "no_shared"))  # the shared models folder is absent
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hooked_vit.loading._hub_cached_file", lambda *a: None)
    code, _, err = _run(["explain", "--model", NAME, "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "HF_HUB_OFFLINE" in err and "--checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_same_stem_in_two_folders_gets_two_outputs(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    paths = []
    for folder, value in (("a", 30), ("b", 220)):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "x.png")
        Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(paths[-1])
    out = tmp_path / "out"
    argv = ["explain", *map(str, paths), "--model", NAME, "--checkpoint", str(checkpoint), "--layers", "1:1",
            "--context", "zero", "--out", str(out)]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    first, second = (json.loads((out / f"{stem}_caap.json").read_text()) for stem in ("a_x", "b_x"))
    assert first["image"] == str(paths[0]) and second["image"] == str(paths[1])
    assert not np.array_equal(np.load(out / "a_x_caap.npy"), np.load(out / "b_x_caap.npy"))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}_caap.{e}" for s in ("a_x", "b_x")
                                                           for e in ("png", "html", "npy", "json"))
    # a second run does not overwrite silently; --force does
    code, _, err = _run(argv, capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = _run(argv + ["--force"], capsys)
    assert code == 0, err


def test_a_crash_while_writing_leaves_no_partial_outputs(checkpoint, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))

    def crash(fig, path):
        with open(path, "w") as f:
            f.write("<html>trunc")  # half a file, then the process dies (disk full, Ctrl-C, ...)
        raise KeyboardInterrupt

    monkeypatch.setattr("caap.plots.save_html", crash)
    out = tmp_path / "out"
    code, _, err = _run(["explain", str(image), "--model", NAME, "--checkpoint", str(checkpoint), "--layers", "1:1",
                         "--context", "zero", "--out", str(out)], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "caap: interrupted"
    assert list(out.iterdir()) == []  # no truncated HTML beside a complete PNG, no temporary files


def test_sweep_checks_its_output_before_computing(checkpoint, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("caap.models.load_model", lambda *a, **k: pytest.fail("loaded weights before checking"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    code, _, err = _run(["sweep", str(image), "--model", NAME, "--checkpoint", str(checkpoint),
                         "--out", str(a_file)], capsys)
    assert code == 2 and "is a file" in err


def test_interrupt_during_imports_is_one_line(tmp_path):
    """Ctrl-C while the command is still importing torch: exit 130 and one line, no traceback."""
    import os
    import signal
    import time

    # a background job of a shell (CI may run us so) inherits SIGINT ignored, and a child would keep it
    # ignored; a handler here becomes the default disposition in the child, as in a terminal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "caap.cli", "explain", "--out", str(tmp_path)],
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        signal.signal(signal.SIGINT, previous)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # wait until torch's library is being loaded
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "caap: interrupted"


def test_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "caap.cli", "explain", str(tmp_path / "nope.png")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("caap: error:")


def _with_depth(create_model, depth):
    """timm.create_model forced to a shallow depth, so the command line's model runs fast in tests."""
    def create(name, pretrained=False, **kwargs):
        kwargs.setdefault("depth", depth)
        return create_model(name, pretrained=pretrained, **kwargs)

    create.__wrapped__ = create_model
    return create
