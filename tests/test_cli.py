"""The `caap` command line: outputs per image, weights lookup, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.parametrize("argv,message", [
    (["explain", "missing.jpg"], "image file not found"),
    (["explain", "--layers", "5"], "--layers must look like START:END"),
    (["explain", "--layers", "0:9"], "not a valid range"),
    (["explain", "--context", "sepia"], "unknown context"),
    (["explain", "--target", "99999"], "out of range"),
    (["explain", "--target", "not a class"], "neither a class index"),
    (["explain", "--model", "vit_no_such_model"], "unknown timm model name"),
    (["explain", "NOT_AN_IMAGE"], "could not read"),
])
def test_bad_input_one_line_nonzero(argv, message, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timm, "create_model", _with_depth(timm.create_model, 2))
    if "NOT_AN_IMAGE" in argv:
        bad = tmp_path / "bad.jpg"
        bad.write_text("this is not an image")
        argv = [str(bad) if a == "NOT_AN_IMAGE" else a for a in argv]
    if "--model" not in argv:
        argv = argv + ["--model", NAME, "--checkpoint", str(checkpoint)]
    if "--context" not in argv:
        argv = argv + ["--context", "grey"]
    code, _, err = _run(argv + ["--out", str(tmp_path)], capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("caap: error:") and message in lines[0], err


def test_no_hub_names_checkpoint(tmp_path, capsys, monkeypatch):
    def no_hub(name, pretrained=False, **kw):
        if pretrained:
            raise ConnectionError("no network")
        return _with_depth(timm.create_model.__wrapped__ if hasattr(timm.create_model, "__wrapped__") else
                           timm.create_model, 2)(name, pretrained=False, **kw)

    monkeypatch.delenv("CAAP_CHECKPOINT_DIR", raising=False)
    monkeypatch.setattr(timm, "create_model", no_hub)
    code, _, err = _run(["explain", "--model", NAME, "--out", str(tmp_path)], capsys)
    assert code != 0 and "--checkpoint" in err and "Traceback" not in err


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
