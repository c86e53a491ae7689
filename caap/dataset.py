"""Explain a whole dataset: a map for every image of a folder, a manifest or a list file (CAAP by default,
or any method of `caap.methods`), written as Parquet shards that pandas and pyarrow read directly;
resumable; in one process, or on Ray Data.

    from caap.dataset import explain_dataset, read_results
    summary = explain_dataset("photos/", "maps/")              # one process
    summary = explain_dataset("photos/", "maps/", ray=True, workers=2)   # Ray Data, two actors
    table = read_results("maps/")                              # a pandas DataFrame, one row per image

Layout of the output folder: one subfolder per settings hash, `<out>/settings-<hash>/`, holding
`settings.json` and shards `part-<n>-<id>.parquet`. Runs with other settings (another model, method,
layer range, context, method option, ...) go to another subfolder, so results of different settings
never mix. A shard is written to a temporary name and renamed into place (`caap.files`), so it is
complete or absent.

One row per image: `image_id` (the path relative to the input, unique), `path`, `status` ("ok" or
"failed"), `error` (why it failed), `label` (the manifest's class, or null), `predicted`, `target` (the
class explained), `context_score` (CAAP's: the target logit of the unpatched context run, what the
default score `logit_diff` subtracts; null for other methods), `map` (a fixed-size list of grid_h *
grid_w float32 values, row-major patches, or pixels for a pixel-level method), `grid_h`, `grid_w`,
`seconds`, `settings_hash`, `settings` (JSON: the model, the weights' digest, the target mode, `method`
and its settings).

Resuming: a run with the same settings first reads the shards already there and skips every image with
a row (ok or failed; `retry_failed=True` explains the failed ones again, and `read_results` keeps one row
per image, an ok row before a failed one). A run killed half-way therefore loses at most the images of
the shard in progress. Images are explained one at a time in both paths (one method call per image), so the
Ray path gives the same maps as the local one: bit for bit where each Ray worker runs as many torch
threads as the local process, and to float rounding otherwise (two workers on two cores run one thread
each, and a matrix product's summation order depends on its thread count: differences of a few 1e-6 on
the real ViT-Tiny's maps; tests/test_dataset.py, experiments/dataset_throughput.py).

One writer per settings folder: `plan_dataset` takes the folder's lock (`WriterLock`: the file
`writer.lock`, holding the writer's pid and host) and `DatasetJob.run` releases it when it ends, so two
runs of the same settings into one folder (a job restarted while the first still runs, two shells)
never explain an image twice nor write a row twice: the second is refused before any work with
`FolderInUse` ("another run (pid N on host H) is writing here: ..."), a ValueError; the command line
prints that line and exits 2, before the model loads. A lock left by a run that was killed (its pid is
no longer alive on this host) is taken over, with a warning that says so. Runs of other settings write
other folders and never wait for each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetJob",
    "DatasetSettings",
    "FolderInUse",
    "Item",
    "ShardStore",
    "WriterLock",
    "explain_dataset",
    "list_items",
    "plan_dataset",
    "read_results",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""Files of a plain folder that count as images (others are skipped and counted, not failed)."""

TARGET_MODES = ("auto", "label", "predicted")


@dataclass(frozen=True)
class Item:
    """One image to explain: a unique id (its path relative to the input), its path, and its class in the
    manifest, if any."""

    image_id: str
    path: str
    label: int | None = None


def list_items(source: str | os.PathLike, split: str | None = None, limit: int | None = None) -> tuple[list[Item], int]:
    """The images of `source` and the number of files skipped as non-images.

    `source` is a manifest folder (holding `manifest.csv`, the `../shared/data` format) or that CSV file;
    a plain folder (every file with an image extension, recursively, sorted); or a list file (`.txt`,
    one path per line, relative to the list's folder; `#` starts a comment). `split` selects a
    manifest's split; `limit` keeps the first images."""
    from caap.data import load_manifest
    from hooked_vit.checks import check_positive_int

    if limit is not None:
        limit = check_positive_int(limit, "limit")
    path = Path(source)
    skipped = 0
    if path.is_file() and path.suffix.lower() == ".csv":
        path = path.parent if path.name == "manifest.csv" else path
    if path.is_dir() and (path / "manifest.csv").is_file():
        samples = load_manifest(path, split=split, limit=limit)
        items = [Item(str(s.path.relative_to(path)), str(s.path), s.class_index) for s in samples]
    elif split is not None:
        raise ValueError(f"--split needs a manifest folder (with manifest.csv); {source} has none")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped = len(files) - len(images)
        items = [Item(str(p.relative_to(path)), str(p)) for p in images]
    elif path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        items = []
        for line in filter(None, lines):
            p = Path(line) if Path(line).is_absolute() else path.parent / line
            items.append(Item(line, str(p)))
    else:
        raise FileNotFoundError(f"no such folder or file: {source}; give a folder of images, a manifest folder or "
                                f"its manifest.csv, or a list file (.txt, one path per line)")
    ids = [i.image_id for i in items]
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"image {twice!r} is listed twice in {source}; each image once")
    if not items:
        raise ValueError(f"{source} holds no images (extensions accepted: {', '.join(IMAGE_EXTENSIONS)})")
    return (items[:limit] if limit is not None else items), skipped


CAAP_FIELDS = ("layers", "context", "component", "score", "precision")
"""DatasetSettings fields that are CAAP's settings (another method takes its settings in `options`)."""


@dataclass(frozen=True)
class DatasetSettings:
    """Everything that changes a map: the settings hash is computed from these (and the weights' digest).

    `method` is any name of `caap.methods.METHODS` (default CAAP); CAAP's settings are the fields
    `layers`, `context`, `component`, `score` and `precision`; another method's are `options` (its
    constructor's keyword arguments, e.g. {"n_masks": 1000} for RISE). `batch_size` (rows per forward
    pass) and `device` change only the speed, so they are not part of the hash."""

    model: str
    checkpoint: str | None = None
    layers: tuple[int, int] | None = None
    context: str = "blur"
    component: str = "resid_pre"
    score: str = "logit_diff"
    target: str = "auto"
    precision: str = "fp32"
    device: str = "cpu"
    method: str = "caap"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    allow_slow_bf16: bool = False
    """Run a bf16 precision even where the device has no native bf16 products (`plan_dataset` otherwise
    runs fp32 there, and the settings hash says fp32)."""

    def __post_init__(self) -> None:
        from hooked_vit.checks import as_int, describe

        if self.layers is not None:  # checked against the model's depth in `resolved`
            if not isinstance(self.layers, (tuple, list)) or len(self.layers) != 2:
                raise ValueError(f"layers must be a pair (start, end) of block indices, got {describe(self.layers)}")
            object.__setattr__(self, "layers", (as_int(self.layers[0], "layers[0] (start)"),
                                                as_int(self.layers[1], "layers[1] (end)")))
        if self.target not in TARGET_MODES and not self.target.isdigit():
            raise ValueError(f"target must be one of {', '.join(TARGET_MODES)} or a class index, got {self.target!r}")
        from caap.attribution.caap import PRECISIONS
        from caap.methods import COMMAND_LINE_FLAGS, canonical_name, method_class

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        method_class(self.method)  # a ValueError naming the accepted methods
        object.__setattr__(self, "method", canonical_name(self.method))
        if self.method != "caap":
            defaults = DatasetSettings(model=self.model)
            changed = [f for f in CAAP_FIELDS if getattr(self, f) != getattr(defaults, f)]
            if changed:
                raise ValueError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} CAAP's setting"
                                 f"{'' if len(changed) == 1 else 's'}; {self.method}'s settings go in options=")
        unknown = [k for k in self.options if k in COMMAND_LINE_FLAGS or k not in _parameters(self.method)]
        if unknown:
            raise ValueError(f"{self.method} takes no option {unknown[0]!r}; it takes: "
                             f"{', '.join(k for k in _parameters(self.method) if k not in COMMAND_LINE_FLAGS) or 'none'}")

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the method is built with (`caap.methods.get_method`)."""
        kwargs = dict(self.options)
        params = _parameters(self.method)
        if self.method == "caap":
            kwargs.update(layers=self.layers, context=self.context, component=self.component, score=self.score,
                          precision=self.precision)
        for name in ("batch_size", "internal_batch_size"):
            if self.batch_size is not None and name in params:
                kwargs[name] = self.batch_size
        return kwargs

    def resolved(self) -> dict[str, Any]:
        """The settings as stored with every row: the checkpoint replaced by a digest of its bytes, the
        method's defaults made explicit (two runs that mean the same thing get one hash): for CAAP the
        layer range, for another method every constructor setting."""
        from caap.attribution.caap import default_layers
        from caap.files import file_digest
        from caap.methods import COMMAND_LINE_FLAGS
        from caap.models import find_checkpoint, model_config
        from hooked_vit.checks import check_layer_range

        cfg, _ = model_config(self.model)
        layers = list(default_layers(cfg.n_layers) if self.layers is None else check_layer_range(self.layers, cfg.n_layers))
        path = find_checkpoint(self.model, self.checkpoint)
        weights = f"sha256:{file_digest(path)}" if path is not None else f"hub:{self.model}"
        out = {k: v for k, v in asdict(self).items() if k not in ("device", "batch_size", "options", "allow_slow_bf16")}
        out["checkpoint"] = weights
        if self.method == "caap":  # the keys of CAAP runs before other methods were offered, plus "method"
            out["layers"] = layers
            if self.options:
                out["options"] = json.loads(json.dumps(self.options, default=repr))
        else:
            for f in CAAP_FIELDS:
                out.pop(f)
            spec = {k: v for k, v in _parameters(self.method).items() if k not in COMMAND_LINE_FLAGS}
            spec.update(self.options)
            out["options"] = json.loads(json.dumps(spec, sort_keys=True, default=repr))
        return out


def _parameters(method: str) -> dict[str, Any]:
    """{keyword: default} of a method's constructor (after the model)."""
    import inspect

    from caap.methods import method_class

    params = list(inspect.signature(method_class(method).__init__).parameters.values())[2:]
    return {p.name: None if p.default is inspect.Parameter.empty else p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------- lock
LOCK_NAME = "writer.lock"
"""The lock file of a settings folder (`WriterLock`)."""


class FolderInUse(ValueError):
    """Another run is writing into this settings folder (its `WriterLock` is held by a live process). A
    ValueError, raised by `plan_dataset` before any work: the command line exits 2 with this one line."""


_RUNNING: set[str] = set()  # tokens of this process's locks whose job is inside DatasetJob.run


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux's /proc), to tell a live process from a
    later one that reuses a dead run's pid; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5): after the command name, the 20th


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


class WriterLock:
    """One writer per settings folder: the lock file `<folder>/writer.lock`, created with O_CREAT | O_EXCL
    (one process wins), holds the writer's pid, host, process start time and a token.

    A lock whose process is gone (same host, pid not alive, or alive but started at another time: a
    reused pid) is stale: it is taken over with a warning that says so. A lock of a live process, or of
    another host (whose processes this one cannot see), raises `FolderInUse`. Within one process, a
    new plan takes over a lock of this process whose job is not running (a notebook cell run again);
    a job that is running keeps it. `release` removes the file if it is still this lock's."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.token: str | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _in_use(self, holder: dict[str, Any]) -> str | None:
        """Why `holder`'s run still counts as writing here (a message), or None if its lock is stale."""
        pid, host = holder.get("pid"), holder.get("host")
        where = f"another run (pid {pid} on host {host}) is writing here: {self.folder}"
        if host != socket.gethostname():
            return f"{where}; if that run has ended without releasing the folder, delete {self.path}"
        if not isinstance(pid, int) or not _pid_alive(pid):
            return None
        start = _process_start(pid)
        if start is not None and holder.get("process_start") not in (None, start):
            return None  # the pid now belongs to another process
        if pid == os.getpid() and holder.get("token") not in _RUNNING:
            return None  # this process's own lock, of a job that is not running
        return f"{where}; wait for it to end (or stop it: its finished shards are kept), or pass another output folder"

    def acquire(self) -> None:
        """Hold the lock (again, if this object held it before), or raise `FolderInUse`."""
        for _ in range(5):
            holder = self._read()
            if holder and holder.get("token") == self.token:
                return
            if holder is None:  # being written this instant, or a broken file
                try:
                    age = time.time() - self.path.stat().st_mtime
                except OSError:
                    age = 0.0
                if age < 10:
                    time.sleep(0.2)
                    continue
                warnings.warn(f"{self.path} cannot be read; taking it over", stacklevel=3)
                self._remove_if(None)
            elif holder:
                why = self._in_use(holder)
                if why is not None:
                    raise FolderInUse(why)
                if holder.get("pid") != os.getpid():
                    warnings.warn(f"{self.folder}: the run that held it (pid {holder.get('pid')} on host "
                                  f"{holder.get('host')}) has ended without releasing it; its finished shards are "
                                  f"kept and this run goes on from them", stacklevel=3)
                self._remove_if(holder)
            token = uuid.uuid4().hex
            me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                  "token": token, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another process was faster: look again
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.token = token
            return
        raise FolderInUse(f"another run is taking the lock of {self.folder} at this moment; try again")

    def _remove_if(self, holder: dict[str, Any] | None) -> None:
        """Remove the lock file if it still holds `holder` (None: an unreadable file): it is renamed
        aside first, so that a lock another process has just created in its place is put back."""
        aside = self.path.with_name(f".{LOCK_NAME}.{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder and moved is not None:
            try:
                os.link(aside, self.path)  # not ours to remove: back in place, unless a new one is there
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise `FolderInUse` if the lock file is no longer this lock's (removed by hand and taken by
        another run): called before every shard is written."""
        holder = self._read()
        if not holder or holder.get("token") != self.token:
            who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "no run"
            raise FolderInUse(f"the lock of {self.folder} is no longer this run's (it names {who}); this run stops "
                              f"without writing its last rows")

    def release(self) -> None:
        """Remove the lock file if it is still this lock's."""
        if self.token is None:
            return
        holder = self._read()
        if holder and holder.get("token") == self.token:
            self._remove_if(holder)
        _RUNNING.discard(self.token)
        self.token = None

    def __del__(self) -> None:  # a planned job dropped without running: the folder is free again
        try:
            self.release()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------- shards
class ShardStore:
    """The shards of one settings hash under `out`: what is done, and atomic writes of new shards; `lock`
    (`WriterLock`) keeps a second run from writing the same folder."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]) -> None:
        from caap.files import atomic_path

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output {out} is a file; it must be a folder (created if missing)")
        self.settings, self.hash = settings, settings_hash(settings)
        self.folder = out / f"settings-{self.hash}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(self.folder)
        meta = self.folder / "settings.json"
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None
            if stored is not None and stored != settings:
                raise ValueError(f"{meta} holds other settings than this run's under the same hash; remove the folder")
        if not meta.is_file() or stored is None:
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done(self, retry_failed: bool = False) -> set[str]:
        """Image ids with a row already (ok rows only, if `retry_failed`). A shard that cannot be read
        (it cannot be half-written, but a disk can fail) is renamed `*.unreadable` with a warning, and
        its images are explained again."""
        import pyarrow.parquet as pq

        done: set[str] = set()
        for shard in self.shards():
            try:
                table = pq.read_table(shard, columns=["image_id", "status"])
            except Exception as e:
                warnings.warn(f"{shard} cannot be read ({type(e).__name__}: {e}); its images are explained again",
                              stacklevel=2)
                shard.rename(shard.with_suffix(".unreadable"))
                continue
            for image_id, status in zip(table["image_id"].to_pylist(), table["status"].to_pylist()):
                if status == "ok" or not retry_failed:
                    done.add(image_id)
        return done

    def write(self, rows: list[dict[str, Any]]) -> Path | None:
        """One new shard with `rows` (atomic)."""
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        from caap.files import atomic_path

        sizes = {len(r["map"]) for r in rows if r["map"] is not None}
        if len(sizes) > 1:
            raise ValueError(f"maps of several sizes in one run ({sorted(sizes)}); a dataset run needs one image size")
        n = sizes.pop() if sizes else 0
        schema = pa.schema([
            ("image_id", pa.string()), ("path", pa.string()), ("status", pa.string()), ("error", pa.string()),
            ("label", pa.int32()), ("predicted", pa.int32()), ("target", pa.int32()),
            ("context_score", pa.float32()), ("map", pa.list_(pa.float32(), n) if n else pa.list_(pa.float32())),
            ("grid_h", pa.int16()), ("grid_w", pa.int16()), ("seconds", pa.float32()),
            ("settings_hash", pa.string()), ("settings", pa.string()),
        ], metadata={"caap_settings": json.dumps(self.settings, sort_keys=True)})
        settings = json.dumps(self.settings, sort_keys=True)
        table = pa.Table.from_pylist([{**r, "settings_hash": self.hash, "settings": settings} for r in rows], schema)
        path = self.folder / f"part-{len(self.shards()):05d}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path


def read_results(out: str | os.PathLike, settings_hash: str | None = None):
    """The rows of a dataset run as a pandas DataFrame, one per image (an ok row wins over a failed one of
    the same image). `out` is the run's output folder or one of its `settings-<hash>` subfolders; with
    several settings in `out`, pass `settings_hash`."""
    import pandas as pd
    import pyarrow.parquet as pq

    out = Path(out)
    folders = [out] if out.name.startswith("settings-") else sorted(out.glob("settings-*"))
    if settings_hash is not None:
        folders = [f for f in folders if f.name == f"settings-{settings_hash}"]
    if len(folders) != 1:
        found = ", ".join(f.name.removeprefix("settings-") for f in folders) or "none"
        raise ValueError(f"{out} holds results of {len(folders)} settings ({found}); pass settings_hash=")
    shards = sorted(folders[0].glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no shards in {folders[0]}")
    frame = pd.concat([pq.read_table(s).to_pandas() for s in shards], ignore_index=True)
    frame = frame.sort_values("status", key=lambda s: s.ne("ok"), kind="stable")
    return frame.drop_duplicates("image_id", keep="first").sort_values("image_id").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ explaining
class Explainer:
    """Loads the model once and explains one image at a time (the unit of work of both paths)."""

    def __init__(self, settings: DatasetSettings, num_threads: int | None = None) -> None:
        import torch

        from caap.cpu import keep_freed_memory
        from caap.models import load_model

        keep_freed_memory()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model = load_model(settings.model, settings.checkpoint, device=settings.device)
        from caap.methods import get_method

        kwargs = settings.method_kwargs()
        if settings.method == "caap":
            kwargs["allow_slow_bf16"] = settings.allow_slow_bf16
        self.method = get_method(settings.method, self.model, **kwargs)
        self.target = settings.target

    def __call__(self, item: Item, pixels: Any) -> dict[str, Any]:
        import torch

        t0 = time.perf_counter()
        x = torch.as_tensor(pixels)[None].to(self.model.device)
        with torch.inference_mode():
            predicted = int(self.model(x)[0].argmax())
        if self.target.isdigit():
            target = int(self.target)
        elif self.target == "label" or (self.target == "auto" and item.label is not None):
            if item.label is None:
                raise ValueError("target 'label' needs a class for every image (a manifest); this image has none")
            target = item.label
        else:
            target = predicted
        amap = self.method.attribute(x, target=target)[0].detach().float().cpu()
        context_scores = getattr(self.method, "context_scores", None)  # CAAP's: what logit_diff subtracts
        context_score = float(context_scores(x, target=target)[0]) if context_scores is not None else None
        return {
            **_row_base(item), "status": "ok", "error": None, "predicted": predicted, "target": target,
            "context_score": context_score, "map": amap.flatten().tolist(), "grid_h": amap.shape[0],
            "grid_w": amap.shape[1], "seconds": time.perf_counter() - t0,
        }


def _row_base(item: Item) -> dict[str, Any]:
    return {"image_id": item.image_id, "path": item.path, "label": item.label}


def failed_row(item: Item, reason: str) -> dict[str, Any]:
    return {**_row_base(item), "status": "failed", "error": reason, "predicted": None, "target": None,
            "context_score": None, "map": None, "grid_h": None, "grid_w": None, "seconds": None}


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def read_pixels(item: Item, data_config: dict[str, Any]) -> tuple[Any, str]:
    """(pixels [3, H, W] as a numpy array, "") or (None, why the image cannot be read): both paths' reading."""
    from hooked_vit.preprocess import preprocess

    try:
        return preprocess(item.path, data_config)[0].numpy(), ""
    except (OSError, ValueError, TypeError) as e:
        return None, _reason(e)


def explain_or_fail(explainer: Explainer, item: Item, pixels: Any, error: str) -> dict[str, Any]:
    """The row of one image in both paths: a failed row where it could not be read or explained."""
    if error:
        return failed_row(item, error)
    try:
        return explainer(item, pixels)
    except (ValueError, RuntimeError) as e:  # e.g. an image size this model does not take
        return failed_row(item, _reason(e))


def _explain_local(items: list[Item], settings: DatasetSettings, data_config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    explainer = Explainer(settings)
    for item in items:
        yield explain_or_fail(explainer, item, *read_pixels(item, data_config))


# ------------------------------------------------------------------------------------------------- Ray
def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a cluster address does not answer (ray.init would wait far longer)."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address must look like HOST:PORT or ray://HOST:PORT (or 'auto'), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(f"the Ray cluster at {address} does not answer ({e}); check the address, or drop "
                           f"--ray-address to start Ray on this machine") from None


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RuntimeError(f"--ray needs Ray Data ({e}); install the extra: pip install -e \".[distributed]\"") from None
    return ray


class _RayExplainer:
    """A Ray Data actor: the model is loaded once per actor."""

    def __init__(self, settings: DatasetSettings, num_threads: int) -> None:
        self.explainer = Explainer(settings, num_threads=num_threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for i in range(len(batch["image_id"])):
            item = Item(str(batch["image_id"][i]), str(batch["path"][i]),
                        None if batch["label"][i] is None or batch["label"][i] < 0 else int(batch["label"][i]))
            rows.append(explain_or_fail(self.explainer, item, batch["pixels"][i], str(batch["error"][i])))
        return {"row": [json.dumps(r) for r in rows]}


def _ray_read(row: dict[str, Any], data_config: dict[str, Any]) -> dict[str, Any]:
    item = Item(row["image_id"], row["path"], None if row["label"] < 0 else row["label"])
    pixels, error = read_pixels(item, data_config)
    return {**row, "pixels": pixels, "error": error}


def _explain_ray(
    items: list[Item], settings: DatasetSettings, data_config: dict[str, Any], workers: int, address: str | None,
) -> Iterator[dict[str, Any]]:
    ray = _import_ray()
    import torch

    if address:
        check_ray_address(address)
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's execution notices; our bar shows progress
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        ray.init(address=address, **kwargs) if address else ray.init(num_cpus=os.cpu_count(), **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    gpus = 1 if settings.device.startswith("cuda") and torch.cuda.is_available() else 0
    cpus = 1 if gpus else max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)) // workers)
    records = [{"image_id": i.image_id, "path": i.path, "label": -1 if i.label is None else i.label} for i in items]
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 4 * workers)))
    # reading and preprocessing is light: it takes no CPU slot, so it never waits behind the actors that hold them
    ds = ds.map(_ray_read, fn_kwargs={"data_config": data_config}, num_cpus=0)
    ds = ds.map_batches(_RayExplainer, fn_constructor_kwargs={"settings": settings, "num_threads": cpus},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        for row in batch["row"]:
            yield json.loads(row)


# ------------------------------------------------------------------------------------------------- driver
@dataclass
class DatasetJob:
    """A dataset run, checked before any image is explained (`plan_dataset`): the images, the non-image
    files skipped and the shard store of these settings; `pending()` says which images are still to do."""

    settings: DatasetSettings
    items: list[Item]
    non_images: int
    store: ShardStore
    data_config: dict[str, Any]
    retry_failed: bool = False

    def pending(self) -> list[Item]:
        """The images without a row in the store yet (read from the store now, so it is never stale)."""
        done = self.store.done(retry_failed=self.retry_failed)
        return [i for i in self.items if i.image_id not in done]

    def close(self) -> None:
        """Let another run write this settings folder (a job that will not run; `run` does it when it ends)."""
        self.store.lock.release()

    def run(self, shard_size: int = 32, ray: bool = False, ray_address: str | None = None, workers: int = 1,
            progress: bool = True) -> dict[str, Any]:
        """Explain the pending images, a shard every `shard_size` rows (see the module docstring); returns
        a summary: the settings folder, images explained / skipped as done / failed / non-image files,
        shards written, seconds, images per second. Holds the folder's `WriterLock` while it runs and
        releases it at the end (`FolderInUse` if another run holds it)."""
        from hooked_vit.checks import check_positive_int

        shard_size, workers = check_positive_int(shard_size, "shard_size"), check_positive_int(workers, "workers")
        store = self.store
        store.lock.acquire()  # held since plan_dataset; again after an earlier run() released it
        _RUNNING.add(store.lock.token)
        try:
            return self._run(shard_size, ray, ray_address, workers, progress)
        finally:
            store.lock.release()

    def _run(self, shard_size: int, ray: bool, ray_address: str | None, workers: int, progress: bool) -> dict[str, Any]:
        from tqdm.auto import tqdm

        store = self.store
        pending = self.pending()  # read under the lock: what an earlier run wrote is never redone
        rows: list[dict[str, Any]] = []
        counts = {"ok": 0, "failed": 0}
        written: list[Path] = []
        t0 = time.perf_counter()
        stream: Iterable[dict[str, Any]] = (
            _explain_ray(pending, self.settings, self.data_config, workers, ray_address) if ray and pending
            else _explain_local(pending, self.settings, self.data_config) if pending else []
        )
        bar = tqdm(total=len(pending), desc="explain-dataset", unit="img", disable=not progress)
        try:
            for row in stream:
                rows.append(row)
                counts[row["status"]] += 1
                bar.update(1)
                if len(rows) >= shard_size:
                    store.lock.check()
                    written.append(store.write(rows))
                    rows = []
        finally:  # an interrupted run keeps every complete row it computed (unless the folder is no longer its own)
            try:
                if rows:
                    store.lock.check()
                    written.append(store.write(rows))
            finally:
                bar.close()
        seconds = time.perf_counter() - t0
        return {
            "folder": str(store.folder), "settings_hash": store.hash, "images": len(self.items),
            "explained": counts["ok"], "failed": counts["failed"], "already_done": len(self.items) - len(pending),
            "non_image_files": self.non_images, "shards_written": len(written), "seconds": round(seconds, 2),
            "images_per_second": round(len(pending) / seconds, 3) if pending and seconds > 0 else None,
        }


def plan_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    settings: DatasetSettings,
    split: str | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
) -> DatasetJob:
    """List `source` (`list_items`), open the shard store of these settings under `out` and take its
    `WriterLock` (what is left to do is read from the store by `DatasetJob.pending` / `run`); raises
    ValueError / FileNotFoundError on a bad source, split or output, and `FolderInUse` (a ValueError)
    when another run is writing the same settings folder, all before any work. The lock is released when
    `run` ends, by `DatasetJob.close()`, or when the job is dropped. A bf16 precision on a device without
    native bf16 products runs fp32, with a warning, unless `settings.allow_slow_bf16`
    (`hooked_vit.precision.choose_precision`): the job's settings and hash name the precision that runs."""
    from caap.models import model_config
    from hooked_vit.precision import choose_precision

    items, non_images = list_items(source, split=split, limit=limit)
    _, data_config = model_config(settings.model)
    # bf16 without native bf16 products runs fp32 (with a warning): the settings, and their hash, say so
    settings = replace(settings, precision=choose_precision(settings.precision, settings.device,
                                                            settings.allow_slow_bf16))
    store = ShardStore(out, settings.resolved())
    store.lock.acquire()
    return DatasetJob(settings, items, non_images, store, data_config, retry_failed)


def explain_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    settings: DatasetSettings,
    split: str | None = None,
    limit: int | None = None,
    shard_size: int = 32,
    ray: bool = False,
    ray_address: str | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain every image of `source` not yet in `out` (see the module docstring):
    `plan_dataset(...).run(...)`; returns the summary of `DatasetJob.run`."""
    job = plan_dataset(source, out, settings, split=split, limit=limit, retry_failed=retry_failed)
    return job.run(shard_size=shard_size, ray=ray, ray_address=ray_address, workers=workers, progress=progress)
