"""`caap explain-dataset` / `caap.dataset`: Parquet rows per image, failed rows, resuming after a kill,
settings kept apart, and the Ray Data path giving the same maps as the local one."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from caap.cli import main
from caap.dataset import LOCK_NAME, DatasetSettings, FolderInUse, explain_dataset, plan_dataset, read_results

NAME = "vit_tiny_patch16_224"
LAYERS = "11:11"  # one patched block per row keeps the tests fast
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / f"{NAME}.pth"
    torch.save(timm.create_model(NAME, pretrained=False).state_dict(), path)
    return path


def _photos(folder, n, corrupt=False, text=False):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((48 + 8 * i, 64, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    if text:
        (folder / "notes.txt").write_text("not an image")
    return folder


def _settings(checkpoint, **kw):
    return DatasetSettings(model=NAME, checkpoint=str(checkpoint), layers=(11, 11), context="grey", **kw)


def test_folder_rows_failed_rows_and_resume(checkpoint, tmp_path):
    photos = _photos(tmp_path / "photos", 3, corrupt=True, text=True)
    out = tmp_path / "out"
    summary = explain_dataset(photos, out, _settings(checkpoint), shard_size=2, progress=False)
    assert (summary["explained"], summary["failed"], summary["non_image_files"]) == (3, 1, 1)
    frame = read_results(out)
    assert list(frame["image_id"]) == ["broken.png", "img0.png", "img1.png", "img2.png"]
    ok = frame[frame["status"] == "ok"]
    assert (ok["target"] == ok["predicted"]).all()  # no manifest: the predicted class
    assert all(len(m) == 196 for m in ok["map"]) and (ok["grid_h"] == 14).all()
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert "could not read" in failed["error"] and failed["map"] is None
    assert frame["settings_hash"].nunique() == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = min((out / f"settings-{summary['settings_hash']}").glob("part-*.parquet"))
    kind = pq.read_schema(shard).field("map").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 196 and kind.value_type == pa.float32()
    # a second run with the same settings computes nothing and writes no shard
    again = explain_dataset(photos, out, _settings(checkpoint), shard_size=2, progress=False)
    assert (again["explained"], again["already_done"], again["shards_written"]) == (0, 4, 0)
    # other settings go to another folder; reading then needs the hash
    other = explain_dataset(photos, out, _settings(checkpoint, score="logit"), progress=False)
    assert other["settings_hash"] != summary["settings_hash"]
    with pytest.raises(ValueError, match="2 settings"):
        read_results(out)
    assert len(read_results(out, settings_hash=other["settings_hash"])) == 4


def test_the_map_is_caaps_and_the_context_score_is_reported(checkpoint, tmp_path):
    from caap import CAAP
    from caap.models import load_model

    photos = _photos(tmp_path / "photos", 1)
    explain_dataset(photos, tmp_path / "out", _settings(checkpoint, target="3"), progress=False)
    row = read_results(tmp_path / "out").iloc[0]
    model = load_model(NAME, checkpoint)
    pixels = model.preprocess(photos / "img0.png")
    method = CAAP(model, layers=(11, 11), context="grey")
    assert row["target"] == 3
    np.testing.assert_array_equal(np.asarray(row["map"], np.float32), method.attribute(pixels, 3)[0].flatten().numpy())
    assert row["context_score"] == pytest.approx(float(method.context_scores(pixels, 3)[0]), abs=1e-5)
    # another precision is another settings folder, and its map is CAAP's in that precision (bf16 run even where
    # it is not native: this test is about the maps)
    delta_settings = _settings(checkpoint, target="3", precision="bf16_delta", allow_slow_bf16=True)
    summary = explain_dataset(photos, tmp_path / "out", delta_settings, progress=False)
    assert summary["explained"] == 1 and summary["settings_hash"] != row["settings_hash"]
    with pytest.raises(ValueError, match="pass settings_hash"):  # two settings: never mixed
        read_results(tmp_path / "out")
    delta = read_results(tmp_path / "out", settings_hash=summary["settings_hash"]).iloc[0]
    expected = CAAP(model, layers=(11, 11), context="grey", precision="bf16_delta",
                    allow_slow_bf16=True).attribute(pixels, 3)[0]
    np.testing.assert_array_equal(np.asarray(delta["map"], np.float32), expected.flatten().numpy())


def test_manifest_labels_are_the_default_target(checkpoint, tmp_path):
    photos = _photos(tmp_path / "data" / "images", 2)
    (tmp_path / "data" / "manifest.csv").write_text(
        "filename,class_index,split\nimages/img0.png,7,dev\nimages/img1.png,9,heldout\n")
    explain_dataset(tmp_path / "data" / "manifest.csv", tmp_path / "out", _settings(checkpoint), split="heldout",
                    progress=False)
    frame = read_results(tmp_path / "out")
    assert list(frame["image_id"]) == ["images/img1.png"] and list(frame["target"]) == [9] and list(frame["label"]) == [9]
    assert photos.is_dir()


def test_a_killed_run_resumes_without_recomputing_or_duplicating(checkpoint, tmp_path):
    photos = _photos(tmp_path / "photos", 6)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "caap.cli", "explain-dataset", str(photos), "--out", str(out), "--model", NAME,
            "--checkpoint", str(checkpoint), "--layers", LAYERS, "--context", "grey", "--shard-size", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("settings-*/part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(list(out.glob("settings-*/part-*.parquet")))
    assert 2 <= before < 6, "the run was not killed half-way"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{6 - before} explained" in done.stdout and f"{before} already done" in done.stdout
    frame = read_results(out)
    assert sorted(frame["image_id"]) == [f"img{i}.png" for i in range(6)]
    import pandas as pd
    import pyarrow.parquet as pq

    rows = pd.concat([pq.read_table(p).to_pandas() for p in out.glob("settings-*/part-*.parquet")])
    assert len(rows) == 6  # nothing computed twice


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e '.[distributed]')")
def test_ray_data_path_equals_the_local_path(checkpoint, tmp_path):
    import ray

    photos = _photos(tmp_path / "photos", 3, corrupt=True)
    local = explain_dataset(photos, tmp_path / "local", _settings(checkpoint), progress=False)
    try:
        distributed = explain_dataset(photos, tmp_path / "ray", _settings(checkpoint), ray=True, workers=2,
                                      progress=False)
    finally:
        ray.shutdown()
    assert distributed["settings_hash"] == local["settings_hash"]
    a, b = read_results(tmp_path / "local"), read_results(tmp_path / "ray")
    assert list(a["image_id"]) == list(b["image_id"]) and list(a["status"]) == list(b["status"])
    for x, y in zip(a["map"], b["map"]):
        if x is None:
            assert y is None
        else:  # the same code, one image per call; two workers on two cores run one thread each where the
            # local process runs two, and a matrix product's float order depends on the thread count: 1e-6
            # (with the local process's thread count per worker the maps are bit for bit equal)
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    assert a["predicted"].equals(b["predicted"])  # NaN (the failed row) in the same place


@pytest.mark.parametrize("extra, message, code", [
    (["--ray-address", "127.0.0.1:1"], "does not answer", 1),
    (["--ray-address", "nonsense"], "HOST:PORT", 2),
    (["--split", "dev"], "needs a manifest folder", 2),
    (["--layers", "3:99"], "not a valid range", 2),
    (["--out", "{photos}/img0.png"], "must be a folder", 2),
])
def test_bad_input_is_one_line(checkpoint, tmp_path, capsys, extra, message, code):
    photos = _photos(tmp_path / "photos", 1)
    got = main(["explain-dataset", str(photos), "--out", str(tmp_path / "out"), "--model", NAME,
                "--checkpoint", str(checkpoint), *(e.format(photos=photos) for e in extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code and len(err) == 1 and message in err[0], err


def test_plan_refuses_a_bad_shard_size_before_any_work(checkpoint, tmp_path):
    job = plan_dataset(_photos(tmp_path / "photos", 2), tmp_path / "out", _settings(checkpoint))
    assert [i.image_id for i in job.pending()] == ["img0.png", "img1.png"] and job.non_images == 0
    with pytest.raises(ValueError, match="at least 1"):
        job.run(shard_size=0)
    assert not job.store.shards()
    assert job.run(progress=False)["explained"] == 2
    again = job.run(progress=False)  # the same job run twice: nothing redone, no duplicate rows
    assert again["explained"] == 0 and again["already_done"] == 2 and len(read_results(job.store.folder.parent)) == 2


def test_ray_missing_is_a_clear_error(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    photos = _photos(tmp_path / "photos", 1)
    got = main(["explain-dataset", str(photos), "--out", str(tmp_path / "out"), "--model", NAME,
                "--checkpoint", str(checkpoint), "--ray"])
    err = capsys.readouterr().err
    assert got == 2 and "pip install -e" in err and "distributed" in err
    assert os.listdir(tmp_path) == ["photos"]  # nothing written


# ------------------------------------------------------------------------------------------ one writer
HOLDER = """
import json, sys
from caap.dataset import DatasetSettings, plan_dataset
photos, out, name, checkpoint = sys.argv[1:]
job = plan_dataset(photos, out, DatasetSettings(model=name, checkpoint=checkpoint, layers=(11, 11), context="grey"))
print("planned", flush=True)
sys.stdin.readline()
print(json.dumps(job.run(shard_size=1, progress=False)), flush=True)
"""


def _cli(photos, out, checkpoint):
    return [sys.executable, "-m", "caap.cli", "explain-dataset", str(photos), "--out", str(out), "--model", NAME,
            "--checkpoint", str(checkpoint), "--layers", LAYERS, "--context", "grey", "--shard-size", "1"]


def _all_rows(out):
    import pandas as pd
    import pyarrow.parquet as pq

    shards = list(out.glob("settings-*/part-*.parquet"))
    return pd.concat([pq.read_table(p).to_pandas() for p in shards]) if shards else pd.DataFrame({"image_id": []})


def test_a_second_run_into_the_same_folder_is_refused_and_nothing_is_done_twice(checkpoint, tmp_path):
    """Two processes: the first plans the job (holding the folder) and waits; the command line started on
    the same folder meanwhile exits 2 with one line naming the first's pid and host, having written
    nothing; the first then runs; a third run finds everything done. Without the lock the second would
    explain every image too, and each would have two rows."""
    photos, out = _photos(tmp_path / "photos", 3), tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(photos), str(out), NAME, str(checkpoint)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "planned", first.stderr.read()
        second = subprocess.run(_cli(photos, out, checkpoint), cwd=ROOT, capture_output=True, text=True, timeout=300,
                                check=False)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr
        assert len(err) == 1 and f"another run (pid {first.pid} on host {socket.gethostname()}) is writing here" in err[0]
        assert len(_all_rows(out)) == 0
        done, _ = first.communicate("go\n", timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0
    assert json.loads(done.strip().splitlines()[-1])["explained"] == 3
    assert not list(out.glob(f"settings-*/{LOCK_NAME}"))  # released at the end of the run
    third = subprocess.run(_cli(photos, out, checkpoint), cwd=ROOT, capture_output=True, text=True, timeout=300,
                           check=False)
    assert third.returncode == 0 and "0 explained" in third.stdout and "3 already done" in third.stdout, third.stderr
    rows = _all_rows(out)
    assert len(rows) == 3 and rows["image_id"].is_unique


def _lock_of(job):
    return job.store.folder / LOCK_NAME


def _parent_start():
    from caap.dataset import _process_start

    return _process_start(os.getppid())


def test_a_lock_left_by_a_killed_run_is_taken_over(checkpoint, tmp_path):
    photos, out = _photos(tmp_path / "photos", 2), tmp_path / "out"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead = int(ended.stdout)
    job = plan_dataset(photos, out, _settings(checkpoint))
    lock = _lock_of(job)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    job.close()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "token": "gone"}))
    with pytest.warns(UserWarning, match=f"pid {dead} on host .* has ended without releasing it"):
        job = plan_dataset(photos, out, _settings(checkpoint))
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert job.run(progress=False)["explained"] == 2
    assert not lock.exists()


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/stat").exists(), reason="process start times are read from /proc")
def test_a_live_writer_is_refused_and_a_reused_pid_is_not(checkpoint, tmp_path):
    photos, out = _photos(tmp_path / "photos", 1), tmp_path / "out"
    job = plan_dataset(photos, out, _settings(checkpoint))
    lock = _lock_of(job)
    job.close()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "process_start": _parent_start(), "token": "other"}
    lock.write_text(json.dumps(live))
    with pytest.raises(FolderInUse, match=rf"another run \(pid {os.getppid()} on host .*\) is writing here"):
        plan_dataset(photos, out, _settings(checkpoint))
    assert json.loads(lock.read_text()) == live  # the other run's lock is left alone
    lock.write_text(json.dumps({**live, "process_start": "1"}))  # that pid, but a process started at another time
    with pytest.warns(UserWarning, match="has ended without releasing it"):
        plan_dataset(photos, out, _settings(checkpoint)).close()


def test_a_lock_of_another_host_is_refused_and_a_stolen_lock_stops_the_run(checkpoint, tmp_path):
    photos, out = _photos(tmp_path / "photos", 2), tmp_path / "out"
    job = plan_dataset(photos, out, _settings(checkpoint))
    lock = _lock_of(job)
    job.close()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "other"}))
    with pytest.raises(FolderInUse, match=rf"pid 1 on host elsewhere\) is writing here.*delete .*{LOCK_NAME}"):
        plan_dataset(photos, out, _settings(checkpoint))
    lock.unlink()
    job = plan_dataset(photos, out, _settings(checkpoint))
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "other"}))  # removed by hand, taken by another
    with pytest.raises(FolderInUse, match="pid 1 on host elsewhere"):
        job.run(progress=False)
    assert not job.store.shards() and json.loads(lock.read_text())["host"] == "elsewhere"


def test_the_same_process_may_plan_again(checkpoint, tmp_path):
    """A notebook cell run again plans the job again while the first plan still exists: the new plan takes
    the folder over; each job runs in turn and nothing is done twice."""
    photos, out = _photos(tmp_path / "photos", 2), tmp_path / "out"
    first = plan_dataset(photos, out, _settings(checkpoint))
    second = plan_dataset(photos, out, _settings(checkpoint))
    assert second.run(progress=False)["explained"] == 2
    assert first.run(progress=False)["explained"] == 0
    assert len(_all_rows(out)) == 2
