"""bf16 only where the hardware multiplies bf16 natively (`hooked_vit.precision.bf16_support` /
`choose_precision`): the CPU flags and the timed probe mocked both ways; CAAP, dataset runs and the
command line run fp32 with one warning line where bf16 is not native, unless told to run it anyway."""

from __future__ import annotations

import warnings

import pytest
import torch

from caap import CAAP
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit import precision as P


@pytest.fixture(autouse=True)
def fresh_cache():
    P._support.cache_clear()
    yield
    P._support.cache_clear()


def _cpu(monkeypatch, flags, machine="x86_64", probe=None):
    """A CPU with these flags (None: the system lists none) and, if given, this probe ratio; returns the
    list of probe calls."""
    calls = []

    def fake_probe(*args, **kwargs):
        calls.append(1)
        if probe is None:
            raise AssertionError("the probe ran although the flags say it all")
        return probe

    monkeypatch.setattr(P, "_cpu_flags", lambda: None if flags is None else set(flags))
    monkeypatch.setattr(P.platform, "machine", lambda: machine)
    monkeypatch.setattr(P, "_bf16_probe", fake_probe)
    return calls


@pytest.mark.parametrize("flags, machine, native", [
    ({"avx2", "avx512f", "avx512_bf16"}, "x86_64", True),
    ({"avx2", "amx_bf16", "amx_tile"}, "x86_64", True),
    ({"avx2", "fma"}, "x86_64", False),
    ({"fp", "asimd", "bf16"}, "aarch64", True),
    ({"fp", "asimd"}, "aarch64", False),
])
def test_the_cpu_flags_decide(monkeypatch, flags, machine, native):
    _cpu(monkeypatch, flags, machine)
    support = P.bf16_support("cpu")
    assert support.native is native
    if machine == "x86_64" and not native:
        assert "no avx512_bf16 or amx_bf16 flag" in support.reason and "CPU capability" in support.reason


@pytest.mark.parametrize("ratio, native", [(0.6, True), (1.9, True), (40.0, False)])
def test_without_flags_a_timed_probe_decides_once(monkeypatch, ratio, native):
    calls = _cpu(monkeypatch, None, machine="arm64", probe=ratio)
    assert P.bf16_support("cpu").native is native
    assert P.bf16_support(torch.device("cpu")).native is native
    assert len(calls) == 1  # cached for the process
    assert f"{ratio:.1f}x the time of fp32" in P.bf16_support().reason


def test_choose_precision_falls_back_with_one_warning_line(monkeypatch):
    _cpu(monkeypatch, {"avx2"})
    with pytest.warns(UserWarning) as record:
        assert P.choose_precision("bf16_delta", "cpu") == "fp32"
    (w,) = record
    text = str(w.message)
    assert "\n" not in text and text.startswith("precision 'bf16_delta' runs as fp32")
    assert "no avx512_bf16 or amx_bf16 flag" in text and "allow_slow_bf16=True" in text and "--allow-slow-bf16" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all below
        assert P.choose_precision("bf16", "cpu", allow_slow_bf16=True) == "bf16"
        assert P.choose_precision("fp32", "cpu") == "fp32"


def test_choose_precision_keeps_bf16_where_native(monkeypatch):
    _cpu(monkeypatch, {"avx2", "avx512_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.choose_precision("bf16", "cpu") == "bf16"
        assert P.choose_precision("bf16_delta", "cpu") == "bf16_delta"


def _model():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, img_size=16, patch_size=8, n_classes=5)
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("precision", ["bf16", "bf16_delta"])
def test_caap_runs_fp32_where_bf16_is_not_native(monkeypatch, precision):
    model, pixels = _model(), torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fp32 = CAAP(model, layers=(0, 1), context="grey").attribute(pixels, target=2)
    _cpu(monkeypatch, {"avx2"})
    with pytest.warns(UserWarning, match=f"precision '{precision}' runs as fp32"):
        method = CAAP(model, layers=(0, 1), context="grey", precision=precision)
    assert method.precision == "fp32"
    torch.testing.assert_close(method.attribute(pixels, target=2), fp32, atol=0, rtol=0)
    forced = CAAP(model, layers=(0, 1), context="grey", precision=precision, allow_slow_bf16=True)
    assert forced.precision == precision
    assert not torch.equal(forced.attribute(pixels, target=2), fp32)  # bf16 rounding: it really ran bf16
    P._support.cache_clear()
    _cpu(monkeypatch, {"avx2", "amx_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CAAP(model, layers=(0, 1), context="grey", precision=precision).precision == precision


def test_dataset_runs_name_the_precision_that_runs(monkeypatch, tmp_path):
    import numpy as np
    from PIL import Image

    from caap.dataset import DatasetSettings, plan_dataset

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos / "a.png")
    name = "vit_tiny_patch16_224"
    fp32 = plan_dataset(photos, tmp_path / "fp32", DatasetSettings(model=name, precision="fp32"))
    _cpu(monkeypatch, {"avx2"})
    with pytest.warns(UserWarning, match="precision 'bf16' runs as fp32"):
        slow = plan_dataset(photos, tmp_path / "bf16", DatasetSettings(model=name, precision="bf16"))
    assert slow.settings.precision == "fp32" and slow.store.hash == fp32.store.hash  # fp32 maps, fp32's hash
    forced = plan_dataset(photos, tmp_path / "forced", DatasetSettings(model=name, precision="bf16", allow_slow_bf16=True))
    assert forced.settings.precision == "bf16" and forced.store.hash != fp32.store.hash
    for job in (fp32, slow, forced):
        job.close()


@pytest.mark.parametrize("extra, warned, precision", [([], True, "fp32"), (["--allow-slow-bf16"], False, "bf16")])
def test_command_line_warns_in_one_line_and_takes_allow_slow_bf16(monkeypatch, tmp_path, capsys, extra, warned,
                                                                  precision):
    import json

    import numpy as np
    import timm
    from PIL import Image

    from caap.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(photos / "a.png")
    checkpoint = tmp_path / "vit_tiny_patch16_224.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), checkpoint)
    _cpu(monkeypatch, {"avx2"})
    code = main(["explain-dataset", str(photos), "--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
                 "--layers", "11:11", "--context", "grey", "--precision", "bf16", *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("caap: warning:")]
    if warned:
        assert len(lines) == 1 and "precision 'bf16' runs as fp32" in lines[0] and "--allow-slow-bf16" in lines[0]
        assert "UserWarning" not in err and "warnings.warn" not in err
    else:
        assert not lines
    (folder,) = (tmp_path / "out").glob("settings-*")
    assert json.loads((folder / "settings.json").read_text())["precision"] == precision
