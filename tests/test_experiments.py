"""experiments/benchmark.py and experiments/ablation.py end to end, in-process, on a tiny synthetic manifest
folder and a random 3-block ViT-Tiny (no hub, no shared data): outputs, directions, resume, one-line errors."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from caap.metrics import Evaluator

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NAME = "vit_tiny_patch16_224"
SMALL = {"depth": 3, "embed_dim": 64, "num_heads": 2, "patch_size": 32}
"""A narrow ViT-Tiny with 7x7 patches of 32 px (fast); 3 blocks is the smallest depth whose early / mid / late
ranges are all non-empty."""


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load("benchmark")
ablation = _load("ablation")
caap_defaults = _load("caap_defaults")
sanity = _load("sanity")
metric_steps = _load("metric_steps")
common = sys.modules["_common"]


def _images(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray((rng.random((180, 240, 3)) * 255).astype(np.uint8)).save(folder / "images" / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A manifest folder of 3 random PNGs (split dev) with boxes, a shared folder whose one-per-class
    sample feeds CAAP's default "mean" context, and random weights saved as a timm state dict."""
    root = tmp_path_factory.mktemp("experiments")
    data = root / "data"
    names = ["a.png", "b.png", "c.png"]
    _images(data, names, 0)
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "class_index", "split"])
        w.writerows([[f"images/{n}", c, "dev"] for n, c in zip(names, (3, 17, 404))])
    with open(data / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "x0", "y0", "x1", "y1"])
        w.writerows([["images/a.png", 10, 20, 120, 150], ["images/b.png", 100, 30, 230, 170],
                     ["images/b.png", 0, 0, 40, 40], ["images/c.png", 60, 40, 180, 140]])
    shared = root / "shared"
    sample = shared / "data" / "imagenet_sample_1k"
    _images(sample, ["r0.png", "r1.png"], 1)
    (sample / "manifest.csv").write_text("filename,class_index\nimages/r0.png,0\nimages/r1.png,1\n")
    torch.manual_seed(0)
    ckpt = root / f"{NAME}.pth"
    torch.save(timm.create_model(NAME, pretrained=False, **SMALL).state_dict(), ckpt)
    return {"data": data, "shared": shared, "ckpt": ckpt, "root": root, "cache": root / "cache"}


def _offline(mp: pytest.MonkeyPatch, world) -> None:
    """timm.create_model forced to the small shape (see tests/test_cli.py), CAAP's mean context read from
    the synthetic shared folder and cached in tmp, no checkpoint folder."""
    create = timm.create_model

    def small(name, pretrained=False, **kwargs):
        return create(name, pretrained=pretrained, **{**SMALL, **kwargs})

    mp.setattr(timm, "create_model", small)
    mp.setenv("CAAP_SHARED_DIR", str(world["shared"]))
    mp.setenv("CAAP_CACHE_DIR", str(world["cache"]))
    mp.delenv("CAAP_CHECKPOINT_DIR", raising=False)


@pytest.fixture(autouse=True)
def offline(world, monkeypatch):
    from caap.data import class_names

    _offline(monkeypatch, world)
    class_names.cache_clear()  # class names read without the shared labels must not leak into other tests
    yield
    class_names.cache_clear()


def _common_flags(world) -> list[str]:
    return ["--data", str(world["data"]), "--split", "dev", "--model", NAME, "--checkpoint", str(world["ckpt"])]


def _bench_flags(world, out: Path, metrics: str = "pointing_game,box_energy,deletion") -> list[str]:
    return [*_common_flags(world), "--methods", "caap,random,rollout", "--metrics", metrics, "--out", str(out),
            "--batch-size", "2", "--grid-images", "2"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _boom(*args, **kwargs):
    raise AssertionError("finished work was computed again")


@pytest.fixture(scope="module")
def bench_out(world, tmp_path_factory):
    """One benchmark run, shared by the tests that read its outputs."""
    from caap.data import class_names

    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, world)
        class_names.cache_clear()  # built before the autouse `offline` fixture runs: names of another test's shared folder
        assert benchmark.main(_bench_flags(world, out)) == 0
        class_names.cache_clear()
    return out


def test_benchmark_writes_every_output(bench_out, capsys):
    rows = _rows(bench_out / "per_image.csv")
    assert len(rows) == 3 * 3  # images x methods x one model
    assert {r["method"] for r in rows} == {"caap", "random", "rollout"}
    assert {"model", "method", "image", "class_index", "runtime_s", "pointing_game", "box_energy",
            "deletion"} <= set(rows[0])
    assert all(float(r["runtime_s"]) >= 0 for r in rows)
    assert {r["class_index"] for r in rows} == {"3", "17", "404"}  # target = the true class
    summary = (bench_out / "summary.md").read_text()
    assert "deletion ↓" in summary and "pointing_game ↑" in summary and "box_energy ↑" in summary
    assert all(f"| {m} |" in summary for m in ("caap", "random", "rollout"))
    assert "± " in summary
    assert "caap" in (bench_out / "runtime.md").read_text()
    for metric in ("pointing_game", "box_energy", "deletion"):
        assert (bench_out / f"bar_{metric}.png").stat().st_size > 1000
    assert "plotly" in (bench_out / "bars.html").read_text()[:5_000_000]
    grid = Image.open(bench_out / f"examples_{NAME}.png")
    assert grid.size[0] > 2 * 224 and grid.size[1] > 3 * 224  # 2 images across, 3 methods down
    tag = common.method_tag("caap", benchmark.settings_of(benchmark.parse_args([])))
    (folder,) = (bench_out / "cache").glob(f"{NAME}-weights*")  # the cache is per model and weights
    maps = sorted((folder / "maps" / tag).glob("*.npz"))
    assert [p.name for p in maps] == ["dev_00000-00002.npz", "dev_00002-00003.npz"]


def test_paired_table_known_answers():
    """CAAP minus each method per image: a constant +0.1 on a higher-is-better metric is '+', the same on
    a lower-is-better one is '-', differences that cancel out are '='."""
    from caap.metrics import get_metric

    metrics = {"pointing_game": get_metric("pointing_game"), "deletion": get_metric("deletion")}
    rows = []
    for i in range(6):
        rows.append({"model": "m", "method": "caap", "image": f"{i}", "pointing_game": 0.5 + 0.01 * i,
                     "deletion": 0.5 + 0.01 * i})
        rows.append({"model": "m", "method": "a", "image": f"{i}", "pointing_game": 0.4 + 0.01 * i,
                     "deletion": 0.4 + 0.01 * i})
        rows.append({"model": "m", "method": "b", "image": f"{i}", "pointing_game": 0.5 + 0.01 * i + (-1) ** i * 0.05,
                     "deletion": float("nan") if i == 0 else 0.5 + 0.01 * i})
    table = benchmark.paired_table(rows, ["caap", "a", "b"], metrics, "m")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert lines["a"] == ["+ +0.100 ± 0.000", "- +0.100 ± 0.000"]
    assert lines["b"][0].startswith("= ") and lines["b"][1] == "= +0.000 ± 0.000"  # the NaN image is left out
    assert "caap" not in lines


def test_leaders_known_answers():
    """The best mean per metric, and the methods whose paired interval to it holds 0."""
    from caap.metrics import get_metric

    metrics = {"pointing_game": get_metric("pointing_game"), "deletion": get_metric("deletion")}
    rows = []
    for i in range(6):
        rows.append({"model": "m", "method": "caap", "image": f"{i}", "pointing_game": 0.5 + 0.01 * i,
                     "deletion": 0.5 + 0.01 * i})
        rows.append({"model": "m", "method": "a", "image": f"{i}", "pointing_game": 0.4 + 0.01 * i,
                     "deletion": 0.4 + 0.01 * i})
        rows.append({"model": "m", "method": "b", "image": f"{i}", "pointing_game": 0.5 + 0.01 * i + (-1) ** i * 0.05,
                     "deletion": 0.41 + 0.01 * i + (-1) ** i * 0.05})
    lead = benchmark.leaders(rows, ["caap", "a", "b"], metrics, "m")
    assert lead["pointing_game"] in ({"caap": "best", "b": "tied"}, {"b": "best", "caap": "tied"})
    assert lead["deletion"] == {"a": "best", "b": "tied"}  # lower is better; caap is 0.1 worse on every image
    table = benchmark.leaders_table(rows, ["caap", "a", "b"], metrics, "m")
    counts = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table.splitlines()[2:]}
    assert counts == {"caap": "1", "a": "1", "b": "2"}


def test_chunk_stores_continue_without_cache(bench_out, world, monkeypatch, tmp_path):
    """The committed per-chunk scores alone (no maps, no cache) give the same table; --import-table fills a
    new run's stores from a finished run's per_image.csv with nothing computed."""
    before = _rows(bench_out / "per_image.csv")
    fresh = tmp_path / "fresh"
    shutil.copytree(bench_out / "chunks", fresh / "chunks")
    monkeypatch.setattr(benchmark, "make_method", _boom)
    monkeypatch.setattr(Evaluator, "evaluate", _boom)
    assert benchmark.main(_bench_flags(world, fresh)) == 0
    assert _rows(fresh / "per_image.csv") == before
    imported = tmp_path / "imported"
    assert benchmark.main([*_bench_flags(world, imported), "--import-table", str(bench_out)]) == 0
    got = _rows(imported / "per_image.csv")
    assert [(r["method"], r["image"], r["deletion"], r["box_energy"]) for r in got] == [
        (r["method"], r["image"], r["deletion"], r["box_energy"]) for r in before]


def test_chunk_store_recovers_from_a_bad_file(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("image,maps_s\ncut short")
    assert common.ChunkScores.load(path, ["a.png"]).scores == {}
    store = common.ChunkScores(path, ["a.png", "b.png"], {"X()": [0.25, float("nan")]}, 2.0, 1.0, 10)
    store.save()
    back = common.ChunkScores.load(path, ["a.png", "b.png"])
    assert back.scores["X()"][0] == 0.25 and np.isnan(back.scores["X()"][1]) and back.maps_s == 2.0
    assert common.ChunkScores.load(path, ["b.png", "a.png"]).scores == {}  # other images: recomputed


def test_benchmark_resumes_without_recomputing(bench_out, world, monkeypatch, capsys):
    before = _rows(bench_out / "per_image.csv")
    monkeypatch.setattr(benchmark, "make_method", _boom)
    monkeypatch.setattr(Evaluator, "evaluate", _boom)
    assert benchmark.main(_bench_flags(world, bench_out)) == 0
    after = _rows(bench_out / "per_image.csv")
    assert [r["deletion"] for r in after] == [r["deletion"] for r in before]
    assert "deletion ↓" in capsys.readouterr().out  # the table is printed


def test_benchmark_adds_a_metric_to_cached_maps(bench_out, world, monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "make_method", _boom)  # maps come from the cache
    assert benchmark.main(_bench_flags(world, bench_out, "pointing_game,deletion,insertion")) == 0
    rows = _rows(bench_out / "per_image.csv")
    assert "insertion" in rows[0] and all(0 <= float(r["insertion"]) <= 1 for r in rows)
    assert "insertion ↑" in (bench_out / "summary.md").read_text()


def test_shared_forward_passes_equal_the_metrics(world):
    """`caap.metrics.Evaluator` shares forward passes between the metrics; its values equal each metric's own."""
    from caap.metrics import METRICS
    from hooked_vit import HookedViT

    torch.manual_seed(0)
    model = HookedViT.from_timm(timm.create_model(NAME, pretrained=False, **{**SMALL, "depth": 1}))
    pixels, targets, maps = torch.randn(2, 3, 224, 224), torch.tensor([5, 9]), torch.randn(2, 14, 14)
    # ROAD shares nothing (its fill-in depends on the map; the Evaluator calls it as is) and costs a sparse
    # solve per image and fraction: tested in test_metrics_substrate_free.py
    names = [n for n, cls in METRICS.items() if cls.kind == "faithfulness" and not n.startswith("road")]
    metrics = common.build_metrics(names, batch_size=32, steps=7, aopc_steps=5)
    got = Evaluator(model, pixels, targets, batch_size=32).evaluate(maps, metrics)
    for name, metric in metrics.items():
        torch.testing.assert_close(got[name], metric(model, pixels, maps, targets=targets), atol=1e-5, rtol=1e-4)


def test_benchmark_shards_then_writes_the_tables(world, tmp_path, monkeypatch, capsys):
    """Two shards fill the cache (no table); the run without --shard computes nothing and writes the tables
    with the token metrics."""
    flags = [*_common_flags(world), "--methods", "random,rollout", "--metrics", "token_deletion,token_insertion",
             "--steps", "7", "--out", str(tmp_path), "--batch-size", "1", "--grid-images", "0"]
    assert benchmark.main([*flags, "--shard", "1/2"]) == 0
    assert "shard 1/2: 2 of 3 chunks" in capsys.readouterr().out
    assert not (tmp_path / "per_image.csv").exists()
    assert benchmark.main([*flags, "--shard", "2/2"]) == 0
    monkeypatch.setattr(benchmark, "make_method", _boom)
    monkeypatch.setattr(Evaluator, "evaluate", _boom)
    assert benchmark.main(flags) == 0
    rows = _rows(tmp_path / "per_image.csv")
    assert len(rows) == 3 * 2 and all(0 <= float(r[m]) <= 1 for r in rows for m in ("token_deletion", "token_insertion"))
    summary = (tmp_path / "summary.md").read_text()
    assert "token_deletion ↓" in summary and "token_insertion ↑" in summary


def test_sanity_script_flags_the_model_free_maps(world, tmp_path, capsys):
    out = tmp_path / "sanity"
    assert sanity.main([*_common_flags(world), "--methods", "random,edge,gae", "--out", str(out)]) == 0
    text = (out / "sanity.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "**flagged**" in lines["random"] and "**flagged**" in lines["edge"]
    assert {"head", "block 2", "block 0", "embed"} <= {c.strip() for c in text.splitlines()[2].split("|")}
    rows = _rows(out / "sanity.csv")
    assert len(rows) == 3 * 6 * 3  # methods x stages (trained, head, blocks 2, 1, 0, embed) x images
    assert (out / "sanity.png").stat().st_size > 1000 and "plotly" in (out / "sanity.html").read_text()[:5_000_000]
    assert "Cascading randomisation" in capsys.readouterr().out


def test_sanity_script_resumes_from_its_cache(world, tmp_path, monkeypatch):
    out = tmp_path / "sanity"
    flags = [*_common_flags(world), "--methods", "random,gae", "--out", str(out)]
    assert sanity.main(flags) == 0
    first = (out / "sanity.csv").read_text()
    gae = next(p for p in (out / "cache").iterdir() if p.name.startswith("gae-"))
    gae.write_bytes(gae.read_bytes()[:100])  # a file cut short: computed again
    calls = []
    real = sanity.cascading_randomisation
    monkeypatch.setattr(sanity, "cascading_randomisation", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert sanity.main(flags) == 0
    assert len(calls) == 1 and (out / "sanity.csv").read_text() == first  # random reused, gae recomputed
    assert sanity.main([*flags, "--seed", "1"]) == 0 and len(calls) == 3  # another seed: nothing reused
    other = tmp_path / "other.pth"  # other weights under the same model name: nothing reused either
    torch.save(timm.create_model(NAME, pretrained=False, **SMALL).state_dict(), other)
    assert sanity.main([*flags[:-2], "--checkpoint", str(other), "--out", str(out)]) == 0 and len(calls) == 5


def test_metric_steps_script(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "steps"
    flags = [*_common_flags(world), "--methods", "random", "--steps", "7,16", "--out", str(out), "--batch-size", "2"]
    assert metric_steps.main(flags) == 0
    rows = _rows(out / "metric_steps.csv")
    assert len(rows) == 3 * 4 and {"7", "16", "49"} <= set(rows[0])  # 49 = one patch a step on the 7x7 grid
    text = capsys.readouterr().out
    assert "| token_deletion | 7 |" in text and "49 (reference)" in text
    monkeypatch.setattr(Evaluator, "evaluate", _boom)  # resumed from the chunk cache
    assert metric_steps.main(flags) == 0
    assert metric_steps.main([*flags[:-4], "--steps", "49", "--out", str(out)]) == 2
    assert "between 1 and 48" in capsys.readouterr().err


def test_benchmark_estimate(world, tmp_path, capsys):
    assert benchmark.main(_bench_flags(world, tmp_path) + ["--estimate", "1"]) == 0
    text = (tmp_path / "estimate.md").read_text()
    assert "caap" in text and "deletion ↓" in text and "Whole run" in text
    assert not (tmp_path / "per_image.csv").exists()


@pytest.mark.parametrize("script,argv,message", [
    ("benchmark", ["--methods", "caap,nope"], "unknown method 'nope'"),
    ("benchmark", ["--metrics", "insertion,accuracy"], "unknown metric 'accuracy'"),
    ("benchmark", ["--data", "MISSING"], "data folder not found"),
    ("benchmark", ["--limit", "0"], "must be at least 1"),
    ("benchmark", ["--split", "train"], "split 'train' is not in"),
    ("benchmark", ["--metrics", "token_deletion,road"], "unknown metric 'road'; accepted: insertion, deletion"),
    ("benchmark", ["--metrics", "token_deletion", "--steps", "50"], "more than the 49 patches"),
    ("benchmark", ["--shard", "3/2"], "I must be between 1 and N"),
    ("benchmark", ["--shard", "half"], "is not I/N"),
    ("ablation", ["--contexts", "sepia"], "unknown context 'sepia'"),
    ("ablation", ["--ranges", "middle"], "unknown range 'middle'"),
    ("ablation", ["--metrics", "nope"], "unknown metric 'nope'"),
    ("ablation", ["--data", "MISSING"], "data folder not found"),
    ("ablation", ["--baselines-csv", "MISSING.csv", "--ranges", "late", "--contexts", "zero"], "not found"),
])
def test_bad_flags_one_line_nonzero(script, argv, message, world, tmp_path, capsys):
    argv = [str(tmp_path / a) if a.startswith("MISSING") else a for a in argv]
    base = _common_flags(world) + ["--out", str(tmp_path / "out")]
    for i in range(0, len(argv), 2):  # a flag given in argv replaces the default one
        if argv[i] in base:
            j = base.index(argv[i])
            del base[j : j + 2]
    code = {"benchmark": benchmark, "ablation": ablation}[script].main(base + argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:") and message in lines[0], err


def test_ablation_ranks_caap_against_baselines(world, bench_out, tmp_path, capsys):
    maps_dir = tmp_path / "caap_defaults"
    assert caap_defaults.main([*_common_flags(world), "--limit", "3", "--contexts", "zero", "--ranges", "late",
                               "--out", str(maps_dir)]) == 0
    out = tmp_path / "ablation"
    flags = [*_common_flags(world), "--contexts", "zero,grey", "--ranges", "mid,late", "--metrics",
             "pointing_game,deletion", "--maps-dir", str(maps_dir), "--out", str(out)]
    capsys.readouterr()
    assert ablation.main(flags + ["--baselines", "random,rollout"]) == 0
    stdout = capsys.readouterr().out
    assert "1 setting(s) reused" in stdout and "3 computed" in stdout  # caap_defaults' maps are not recomputed
    assert (maps_dir / "maps_grey_late_dev_3.npz").is_file()  # new maps use caap_defaults' names
    assert "Does the choice of neutral context or layer range change the ranking" in stdout
    rows = _rows(out / "ablation.csv")
    assert len(rows) == 2 * 2 * 2  # contexts x ranges x metrics
    assert {r["n_methods"] for r in rows} == {"3"} and all(1 <= int(r["rank"]) <= 3 for r in rows)
    assert len(_rows(out / "ablation_per_image.csv")) == 3 * 4
    for metric in ("pointing_game", "deletion"):
        assert (out / f"heatmap_{metric}.png").stat().st_size > 1000
    figure = Image.open(out / "ablation.png")
    assert figure.size[0] > figure.size[1] > 200  # two panels side by side
    assert "plotly" in (out / "heatmaps.html").read_text()[:5_000_000]
    assert "deletion ↓" in (out / "ablation.md").read_text()

    # the baselines of a benchmark run on the same images; nothing of CAAP is computed again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evaluator, "evaluate", _boom)
        mp.setattr(ablation, "CAAP", _boom)
        assert ablation.main(flags + ["--baselines-csv", str(bench_out / "per_image.csv")]) == 0
    assert "4 setting(s) reused" in capsys.readouterr().out
    assert {r["n_methods"] for r in _rows(out / "ablation.csv")} == {"3"}  # random, rollout + CAAP


def test_map_caches_are_keyed_by_the_method_settings():
    args = benchmark.parse_args([])
    fewer = benchmark.parse_args(["--rise-masks", "8"])
    tags = {common.method_tag("rise", benchmark.settings_of(a)) for a in (args, fewer)}
    assert len(tags) == 2 and all(t.startswith("rise-") for t in tags)
    speed_only = benchmark.parse_args(["--forward-batch", "8"])
    assert common.method_tag("caap", benchmark.settings_of(args)) == common.method_tag("caap", benchmark.settings_of(speed_only))


def test_ablation_cache_names_follow_caap_defaults(tmp_path):
    assert ablation.map_file(tmp_path, "mean", "mid", "resid_pre", "dev", 64).name == "maps_mean_mid_dev_64.npz"
    assert ablation.map_file(tmp_path, "zero", "late", "mlp_out", "dev", 8).name == "maps_zero_late_mlp_out_dev_8.npz"

