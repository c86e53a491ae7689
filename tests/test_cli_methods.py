"""`caap explain --method` (every registered method, and several side by side), `caap methods`, `caap evaluate`
(equal to experiments/benchmark.py on the same maps), the shared flags, output folders checked before any
model loads, and the permissions of written files. On a small random ViT (7x7 patches of 32 px, no hub) and,
where ../shared has them, on the real ViT-Tiny and photos."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from caap.cli import main
from caap.data import shared_checkpoint, shared_data_dir
from caap.methods import METHODS, get_method, measured_costs

NAME = "vit_tiny_patch16_224"
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 32}
"""A narrow ViT-Tiny on a 7x7 grid: every method runs in well under a second."""
CHEAP = {
    "rise": ["n_masks=8"],
    "tis": ["n_masks=8", "kmeans_iters=5"],
    "integrated_gradients": ["n_steps=2"],
    "smoothgrad": ["n_samples=2"],
    "beyond_intuition_head": ["steps=2"],
    "beyond_intuition_token": ["steps=2"],
}
"""Cost options (`--option`) that keep each method fast in a test."""
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def _typed(name: str) -> dict:
    from caap.methods import parse_options

    return parse_options([name], CHEAP.get(name, []))[name]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Random weights with non-uniform attention saved as a timm state dict; a manifest folder of 3 random
    photos with boxes (split dev); a photo."""
    root = tmp_path_factory.mktemp("cli_methods")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, **SMALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    ckpt = root / f"{NAME}.pth"
    torch.save(model.state_dict(), ckpt)
    data = root / "data"
    (data / "images").mkdir(parents=True)
    names = ["a.png", "b.png", "c.png"]
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray((rng.random((180, 240, 3)) * 255).astype(np.uint8)).save(data / "images" / n)
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "class_index", "split"])
        w.writerows([[f"images/{n}", c, "dev"] for n, c in zip(names, (3, 17, 404))])
    with open(data / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "x0", "y0", "x1", "y1"])
        w.writerows([["images/a.png", 10, 20, 120, 150], ["images/b.png", 100, 30, 230, 170],
                     ["images/b.png", 0, 0, 40, 40], ["images/c.png", 60, 40, 180, 140]])
    return {"root": root, "ckpt": ckpt, "data": data, "photo": data / "images" / "a.png"}


def _clear_class_names() -> None:
    from caap import data

    for cached in (data.class_names, data._class_names_as_written, data._class_synonyms):
        cached.cache_clear()


@pytest.fixture(autouse=True)
def small_model(world, monkeypatch, tmp_path):
    """timm.create_model forced to the small shape; no shared folder, no checkpoint folder; class names read
    afresh (with or without the shared labels) and not left cached for other tests."""
    create = timm.create_model

    def small(name, pretrained=False, **kwargs):
        return create(name, pretrained=pretrained, **{**SMALL, **kwargs})

    monkeypatch.setattr(timm, "create_model", small)
    monkeypatch.setenv("CAAP_SHARED_DIR", str(tmp_path / "no_shared"))
    monkeypatch.setenv("CAAP_CACHE_DIR", str(world["root"] / "cache"))
    monkeypatch.delenv("CAAP_CHECKPOINT_DIR", raising=False)
    _clear_class_names()
    yield
    _clear_class_names()


def _model(world):
    from caap.models import load_model

    return load_model(NAME, world["ckpt"])


def _flags(world) -> list[str]:
    return ["--model", NAME, "--checkpoint", str(world["ckpt"])]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]


def _no_load(monkeypatch):
    monkeypatch.setattr("caap.models.load_model", lambda *a, **k: pytest.fail("loaded weights before checking"))


# ------------------------------------------------------------------------------------------- explain --method
@pytest.mark.parametrize("name", list(METHODS))
def test_explain_every_method(name, world, tmp_path, capsys):
    """Each registered method from the command line: the four files, and the map is the library's."""
    out = tmp_path / "out"
    options = [a for o in CHEAP.get(name, []) for a in ("--option", o)]
    code, _, err = _run(["explain", world["photo"], "--method", name, *options, "--target", "7",
                         "--out", out, *_flags(world)], capsys)
    assert code == 0, err
    for ext in ("png", "html", "npy", "json"):
        assert (out / f"a_{name}.{ext}").is_file()
    summary = json.loads((out / f"a_{name}.json").read_text())
    assert summary["method"] == name and summary["target"]["class"] == 7
    for key, value in _typed(name).items():
        assert summary["settings"][key] == value
    got = np.load(out / f"a_{name}.npy")
    model = _model(world)
    x = model.preprocess([str(world["photo"])])
    expected = get_method(name, model, **_typed(name)).attribute(x, target=7)[0].detach().float().numpy()
    assert got.shape == expected.shape == ((7, 7) if METHODS[name].resolution == "patch" else (224, 224))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_compare_methods_side_by_side(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(["explain", world["photo"], "--method", "caap,gae,rise", "--option", "n_masks=8",
                         "--layers", "1:1", "--out", out, *_flags(world)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"a_{m}.npy" for m in ("caap", "gae", "rise")] + [f"a_compare.{e}" for e in ("png", "html", "json")])
    summary = json.loads((out / "a_compare.json").read_text())
    assert list(summary["methods"]) == ["caap", "gae", "rise"]
    assert summary["methods"]["caap"]["settings"]["layers"] == [1, 1]
    assert summary["methods"]["rise"]["settings"]["n_masks"] == 8
    assert all(summary["methods"][m]["seconds"] > 0 for m in summary["methods"])
    assert summary["methods"]["rise"]["shape"] == [224, 224] and summary["methods"]["gae"]["shape"] == [7, 7]
    png = Image.open(out / "a_compare.png")
    assert png.size[0] > 3 * png.size[1]  # the photo and three overlays in a row
    html = (out / "a_compare.html").read_text()
    assert "plotly" in html[:5_000_000]
    for m in ("caap", "gae", "rise"):  # one button per method
        assert f'"label":"{m}"' in html
    model = _model(world)  # the same maps as one method at a time
    x = model.preprocess([str(world["photo"])])
    cls = int(model(x)[0].argmax())
    np.testing.assert_allclose(np.load(out / "a_gae.npy"), get_method("gae", model).attribute(x, cls)[0].numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--method", "caap,nope"], "unknown method 'nope'; accepted: caap, random, rollout"),
    (["--method", "rise", "--option", "n_mask=8"], "no chosen method takes 'n_mask'; rise takes: n_masks"),
    (["--method", "rise", "--option", "n_masks=many"], "rise's n_masks must be a whole number; got 'many'"),
    (["--method", "rise", "--option", "gae.score=prob"], "names method 'gae', which is not among the chosen"),
    (["--method", "gae", "--option", "score=best"], "gae's score must be one of logit, prob"),
    (["--method", "gae", "--option", "readout"], "must look like KEY=VALUE"),
    (["--method", "rise", "--option", "internal_batch_size=4"], "set by the command line (its flag --batch-size)"),
    (["--method", "gae", "--layers", "1:1"], "--layers is a setting of CAAP, which is not among --method gae"),
    (["--method", "gae", "--precision", "bf16"], "--precision bf16: gae run only in fp32"),
    (["--method", "caap", "--option", "layers=0:5"], "not a valid range"),
    (["--method", "caap", "--option", "context=sepia"], "unknown context"),
    (["--method", "caap", "--option", "score=accuracy"], "CAAP's score 'accuracy' is not accepted"),
    (["--target", "label"], "--target label means the manifest's class"),
    (["--target", "cat"], "classes whose names contain it: tabby cat (281), tiger cat (282), Persian cat (283)"),
])
def test_bad_method_input_is_one_line_before_loading(argv, message, world, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    code, _, err = _run(["explain", world["photo"], *argv, "--out", tmp_path / "out", *_flags(world)], capsys)
    lines = _errors(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("caap: error:") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_sweep_and_dataset_share_the_flags(world, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    code, _, err = _run(["sweep", world["photo"], "--precision", "bf16_delta", "--out", tmp_path, *_flags(world)],
                        capsys)
    assert code == 2 and "sweep accepts fp32, bf16" in err
    code, _, err = _run(["sweep", world["photo"], "--target", "label", "--out", tmp_path, *_flags(world)], capsys)
    assert code == 2 and "--target label" in err
    code, _, err = _run(["explain-dataset", world["data"], "--method", "gae,rise", "--out", tmp_path / "d",
                         *_flags(world)], capsys)
    assert code == 2 and "takes one method" in err


def test_dataset_rows_name_the_method_and_its_settings(world, tmp_path, capsys):
    from caap.dataset import read_results

    out = tmp_path / "maps"
    for seed in ("1", "2"):
        code, _, err = _run(["explain-dataset", world["data"], "--method", "random", "--option", f"seed={seed}",
                             "--out", out, *_flags(world)], capsys)
        assert code == 0, err
    folders = sorted(out.glob("settings-*"))
    assert len(folders) == 2  # another option value: another settings hash
    for folder in folders:
        rows = read_results(folder)
        settings = json.loads(rows["settings"].iloc[0])
        assert settings["method"] == "random" and settings["options"]["seed"] in (1, 2)
        assert rows["context_score"].isna().all() and len(rows) == 3
    code, _, err = _run(["evaluate", out, "--data", world["data"], "--out", tmp_path / "s", *_flags(world)], capsys)
    assert code == 2 and "holds the maps of 2 settings" in err and folders[0].name in err
    code, stdout, err = _run(["explain-dataset", world["data"], "--method", "random", "--option", "seed=1",
                              "--force", "--out", out, *_flags(world)], capsys)
    assert code == 0 and "3 explained, 0 failed, 0 already done" in stdout, err  # --force: every image again


# ------------------------------------------------------------------------------------------- methods
def test_methods_lists_every_method_with_its_measured_cost(capsys):
    code, stdout, _ = _run(["methods"], capsys)
    assert code == 0
    costs = measured_costs()
    lines = stdout.splitlines()
    for name, cls in METHODS.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert cls.paper in row and cls.summary in stdout
        assert costs[name].describe() in row
    assert "2 CPU cores" in stdout and "results/benchmark_v2/all_32" in stdout
    code, stdout, _ = _run(["methods", "rise"], capsys)
    assert code == 0 and "n_masks (a whole number, default 4000)" in stdout and "Petsiuk" in stdout


def test_method_costs_are_the_committed_measurement(tmp_path):
    """caap/method_costs.csv is what experiments/method_costs.py reads off the benchmark run: the mean maps
    seconds per image of each method in per_image.csv."""
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location("experiments_method_costs", EXPERIMENTS / "method_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "costs.csv")]) == 0
    assert (tmp_path / "costs.csv").read_text() == (ROOT / "caap" / "method_costs.csv").read_text()
    per_method: dict[str, list[float]] = {}
    with open(ROOT / "results" / "benchmark_v2" / "all_32" / "per_image.csv", newline="") as f:
        for row in csv.DictReader(f):
            per_method.setdefault(row["method"], []).append(float(row["runtime_s"]))
    costs = measured_costs()
    assert set(costs) == set(per_method) == set(METHODS)
    for name, values in per_method.items():
        assert costs[name].seconds == pytest.approx(np.mean(values), abs=1e-4)
    assert costs["rise"].settings == {"n_masks": 500}


def test_a_method_without_a_measurement_says_so(capsys, monkeypatch):
    costs = {k: v for k, v in measured_costs().items() if k != "atman"}
    monkeypatch.setattr("caap.methods.measured_costs", lambda: costs)
    _, stdout, _ = _run(["methods"], capsys)
    assert "not measured" in next(line for line in stdout.splitlines() if line.startswith("atman "))


# ------------------------------------------------------------------------------------------- output folders
@pytest.mark.parametrize("command", ["explain", "sweep", "explain-dataset", "evaluate"])
def test_an_output_folder_under_a_file_is_refused_before_loading(command, world, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    a_file = tmp_path / "somefile"
    a_file.write_text("")
    argv = {"explain": ["explain", world["photo"]], "sweep": ["sweep", world["photo"]],
            "explain-dataset": ["explain-dataset", world["data"]],
            "evaluate": ["evaluate", tmp_path, "--data", world["data"]]}[command]
    code, _, err = _run([*argv, "--out", a_file / "sub", *_flags(world)], capsys)
    lines = _errors(err)
    assert code == 2 and len(lines) == 1, err
    assert f"--out {a_file / 'sub'} cannot be created: {a_file} is a file, not a folder" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_an_output_folder_without_permission_is_refused(world, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = _run(["explain", world["photo"], "--out", locked / "sub", *_flags(world)], capsys)
    assert code == 2 and "permission denied" in err


# ------------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_umasks_mode(umask, mode, tmp_path):
    from caap.files import atomic_path, atomic_paths

    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "one.txt") as tmp:
            tmp.write_text("x")
        with atomic_paths([tmp_path / "a.npy", tmp_path / "b.json"]) as (a, b):
            np.save(a, np.zeros(2))
            b.write_text("{}")
    finally:
        os.umask(old)
    for name in ("one.txt", "a.npy", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def test_a_replaced_file_keeps_its_mode(tmp_path):
    from caap.files import atomic_path

    path = tmp_path / "shared.txt"
    path.write_text("old")
    path.chmod(0o664)
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o664


def test_every_file_the_command_line_writes_follows_the_umask(world, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = _run(["explain", world["photo"], "--method", "gae,rollout", "--out", tmp_path / "cmp",
                             *_flags(world)], capsys)
        assert code == 0, err
        code, _, err = _run(["explain-dataset", world["data"], "--method", "gae", "--out", tmp_path / "ds",
                             *_flags(world)], capsys)
        assert code == 0, err
        code, _, err = _run(["evaluate", tmp_path / "cmp", "--data", world["data"], "--limit", "1", "--metrics",
                             "box_energy", "--out", tmp_path / "scores", *_flags(world)], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o640} == {}


# ------------------------------------------------------------------------------------------- evaluate
def _load_experiment(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiments_{name}_cli", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _benchmark_maps(bench_out: Path, maps_dir: Path, methods: list[str]) -> None:
    """The benchmark's cached maps written as explain writes them: <image stem>_<method>.npy."""
    maps_dir.mkdir(parents=True, exist_ok=True)
    (model_cache,) = (bench_out / "cache").glob(f"{NAME}*")
    for method in methods:
        (tag,) = (model_cache / "maps").glob(f"{method}-*")
        for chunk in tag.glob("*.npz"):
            data = np.load(chunk)
            for f, m in zip(data["files"], data["maps"]):
                np.save(maps_dir / f"{Path(str(f)).stem}_{method}.npy", m)


def _assert_same_scores(bench_csv: Path, eval_csv: Path, metrics: list[str], methods: list[str]) -> None:
    bench = {(r["method"], r["image"]): r for r in _rows(bench_csv)}
    got = {(r["method"], Path(r["image"]).name): r for r in _rows(eval_csv)}
    assert set(got) == {k for k in bench if k[0] in methods}
    for key, row in got.items():
        for metric in metrics:
            b, e = float(bench[key][metric]), float(row[metric])
            assert (np.isnan(b) and np.isnan(e)) or e == pytest.approx(b, rel=1e-4, abs=1e-5), (key, metric, b, e)


EVAL_METRICS = ["pointing_game", "box_energy", "iou", "f1", "insertion", "deletion", "morf", "lerf",
                "positive_perturbation", "negative_perturbation", "token_deletion", "token_insertion"]
"""Every metric but ROAD's two (a sparse solve per image and fraction; on the real model below)."""


@pytest.fixture(scope="module")
def bench(world, tmp_path_factory):
    """One benchmark run on the synthetic manifest, and its maps as a folder of .npy files."""
    out = tmp_path_factory.mktemp("bench")
    benchmark = _load_experiment("benchmark")
    with pytest.MonkeyPatch.context() as mp:
        create = timm.create_model
        mp.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, pretrained=pretrained,
                                                                                     **{**SMALL, **kw}))
        mp.setenv("CAAP_SHARED_DIR", str(out / "no_shared"))
        assert benchmark.main(["--data", str(world["data"]), "--split", "dev", "--model", NAME, "--checkpoint",
                               str(world["ckpt"]), "--methods", "rollout,gae,random", "--metrics",
                               ",".join(EVAL_METRICS), "--steps", "7", "--aopc-steps", "4", "--batch-size", "2",
                               "--grid-images", "0", "--out", str(out)]) == 0
    _benchmark_maps(out, out / "npy", ["rollout", "gae", "random"])
    return out


def _evaluate(world, maps, out, capsys, *extra):
    return _run(["evaluate", maps, "--data", world["data"], "--split", "dev", "--metrics", ",".join(EVAL_METRICS),
                 "--steps", "7", "--aopc-steps", "4", "--out", out, *_flags(world), *extra], capsys)


def test_evaluate_equals_the_benchmark_on_the_same_maps(world, bench, tmp_path, capsys, monkeypatch):
    out = tmp_path / "scores"
    code, stdout, err = _evaluate(world, bench / "npy", out, capsys)
    assert code == 0, err
    _assert_same_scores(bench / "per_image.csv", out / "per_image.csv", EVAL_METRICS, ["rollout", "gae", "random"])
    summary = (out / "summary.md").read_text()
    assert "deletion ↓" in summary and "| gae |" in summary and "± " in summary and summary in stdout + "\n"
    stats = _rows(out / "summary.csv")
    assert len(stats) == 3 * len(EVAL_METRICS) and {"mean", "ci95_half_width", "n"} <= set(stats[0])

    # resumed: nothing computed again, the same rows
    from caap.metrics import Evaluator

    before = (out / "per_image.csv").read_text()
    monkeypatch.setattr(Evaluator, "evaluate", lambda *a, **k: pytest.fail("computed again"))
    code, stdout, err = _evaluate(world, bench / "npy", out, capsys)
    assert code == 0 and (out / "per_image.csv").read_text() == before and "9 kept" in stdout


def test_evaluate_reads_an_explain_dataset_output(world, bench, tmp_path, capsys):
    code, _, err = _run(["explain-dataset", world["data"], "--split", "dev", "--method", "rollout", "--out",
                         tmp_path / "ds", *_flags(world)], capsys)
    assert code == 0, err
    code, _, err = _evaluate(world, tmp_path / "ds", tmp_path / "scores", capsys)
    assert code == 0, err
    _assert_same_scores(bench / "per_image.csv", tmp_path / "scores" / "per_image.csv", EVAL_METRICS, ["rollout"])


def test_evaluate_with_missing_maps_scores_the_rest_and_exits_nonzero(world, bench, tmp_path, capsys):
    maps = tmp_path / "maps"
    shutil.copytree(bench / "npy", maps)
    (maps / "b_gae.npy").unlink()
    code, _, err = _run(["evaluate", maps, "--data", world["data"], "--metrics", "box_energy,deletion", "--steps",
                         "7", "--out", tmp_path / "scores", *_flags(world)], capsys)
    assert code == 1
    warnings = [line for line in _errors(err) if line.startswith("caap: warning:")]
    assert warnings == [(f"caap: warning: 1 of 3 images have no gae map in {maps} (first: images/b.png); the other "
                         f"2 are scored")]
    rows = _rows(tmp_path / "scores" / "per_image.csv")
    assert len(rows) == 3 * 3 - 1 and ("gae", "images/b.png") not in {(r["method"], r["image"]) for r in rows}


def test_evaluate_scores_the_target_asked_for(world, bench, tmp_path, capsys):
    code, _, err = _run(["evaluate", bench / "npy", "--data", world["data"], "--metrics", "deletion", "--steps", "7",
                         "--target", "predicted", "--out", tmp_path / "p", *_flags(world)], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "p" / "per_image.csv")
    assert all(r["target"] == r["predicted"] for r in rows)
    code, _, err = _run(["evaluate", bench / "npy", "--data", world["data"], "--metrics", "deletion", "--steps", "7",
                         "--target", "5", "--out", tmp_path / "c", *_flags(world)], capsys)
    assert code == 0 and {r["target"] for r in _rows(tmp_path / "c" / "per_image.csv")} == {"5"}


def test_evaluate_refuses_bad_input_before_loading(world, bench, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    maps = tmp_path / "maps"
    maps.mkdir()
    np.save(maps / "a_mine.npy", np.zeros((5, 5), np.float32))
    code, _, err = _run(["evaluate", maps, "--data", world["data"], "--out", tmp_path / "s", *_flags(world)], capsys)
    assert code == 2 and "the mine map of images/a.png is 5x5; vit_tiny_patch16_224 takes maps on its 7x7 patch " \
                          "grid or at its 224x224 input size" in err
    no_boxes = tmp_path / "no_boxes"
    shutil.copytree(world["data"], no_boxes)
    (no_boxes / "boxes.csv").unlink()
    code, _, err = _run(["evaluate", bench / "npy", "--data", no_boxes, "--metrics", "deletion,box_energy",
                         "--out", tmp_path / "s", *_flags(world)], capsys)
    assert code == 2 and "--metrics box_energy need boxes" in err
    code, _, err = _run(["evaluate", bench / "npy", "--data", world["data"], "--metrics", "deletion,nope",
                         "--out", tmp_path / "s", *_flags(world)], capsys)
    assert code == 2 and "unknown metric 'nope'; accepted: insertion, deletion" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["evaluate", empty, "--data", world["data"], "--out", tmp_path / "s", *_flags(world)], capsys)
    assert code == 2 and "no map in" in err and "a_caap.npy" in err
    assert len(_errors(err)) == 1


# ------------------------------------------------------------------------------------------- the real ViT-Tiny
_ORIGINAL_CREATE = timm.create_model
REAL = shared_checkpoint() is not None and shared_data_dir() is not None


@pytest.fixture
def real(monkeypatch):
    """The real model and photos: the small shape and the absent shared folder of `small_model` undone."""
    if not REAL:
        pytest.skip("needs ../shared (the ViT-Tiny weights and the ImageNet photos)")
    monkeypatch.setattr(timm, "create_model", _ORIGINAL_CREATE)
    monkeypatch.delenv("CAAP_SHARED_DIR", raising=False)
    return shared_data_dir()


@pytest.mark.shared_data
def test_real_model_compare_and_evaluate_equal_the_benchmark(real, tmp_path, capsys, monkeypatch):
    """On the real ViT-Tiny and one real heldout photo: explain --method gae,attnlrp, then caap evaluate of the
    benchmark's own maps gives the benchmark's numbers (ROAD included)."""
    from caap.data import load_manifest

    (sample,) = load_manifest(real, split="heldout", limit=1)
    out = tmp_path / "cmp"
    code, _, err = _run(["explain", sample.path, "--method", "gae,attnlrp", "--out", out], capsys)
    assert code == 0, err
    assert np.load(out / f"{sample.path.stem}_gae.npy").shape == (14, 14)
    metrics = "box_energy,deletion,token_insertion,road_morf"
    bench_out = tmp_path / "bench"
    benchmark = _load_experiment("benchmark")
    assert benchmark.main(["--split", "heldout", "--limit", "1", "--methods", "gae", "--metrics", metrics,
                           "--steps", "7", "--grid-images", "0", "--out", str(bench_out)]) == 0
    _benchmark_maps(bench_out, tmp_path / "npy", ["gae"])
    code, _, err = _run(["evaluate", tmp_path / "npy", "--data", real, "--split", "heldout", "--limit", "1",
                         "--metrics", metrics, "--steps", "7", "--out", tmp_path / "scores"], capsys)
    assert code == 0, err
    _assert_same_scores(bench_out / "per_image.csv", tmp_path / "scores" / "per_image.csv", metrics.split(","),
                        ["gae"])
