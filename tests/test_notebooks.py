"""The notebooks in notebooks/: each runs end to end, and the saved copies are commit-ready.

`test_notebook_runs` executes every notebook with nbclient (kernel `python3`) in a temporary copy, with
`CAAP_NOTEBOOK_SMALL=1`: the notebooks then use fewer photos, fewer layers in sweeps and fewer training
steps (about 3-4 minutes for all of them on 2 CPU cores). Notebooks that need the shared ViT weights and
photos, or SmolLM2's, are skipped where `caap.data` finds none; `04_language_models` trains its own model and
runs everywhere (its SmolLM2 cell runs where the weights are present).

`test_saved_notebook_is_clean` checks the saved notebooks as committed (executed in the full setting):
outputs present, no errors, below 1.5 MB, and no absolute path of the machine that ran them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
NEEDS_SHARED = {"01_hooked_vit_tour", "02_caap", "03_patching_circuits"}
MAX_BYTES = 1_500_000


def _skip_without_shared(path: Path) -> None:
    if path.stem == "05_persuasion_smollm2":
        from caap.data import shared_dir

        root = shared_dir()
        if root is None or not (root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
            pytest.skip("05_persuasion_smollm2 needs ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf (or CAAP_SHARED_DIR)")
    if path.stem in NEEDS_SHARED:
        from caap.data import shared_checkpoint, shared_data_dir

        if shared_checkpoint() is None or shared_data_dir() is None:
            pytest.skip(f"{path.name} needs the shared ViT-Tiny weights and ImageNet photos (../shared or CAAP_SHARED_DIR)")


def _check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel: run `python -m ipykernel install --user --name python3`")


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_hooked_vit_tour", "02_caap", "03_patching_circuits", "04_language_models", "05_persuasion_smollm2",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without_shared(path)
    _check_kernel()
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    monkeypatch.setenv("CAAP_NOTEBOOK_SMALL", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def _local_paths() -> list[str]:
    """Absolute paths of this machine that must not appear in saved outputs."""
    root = Path(__file__).resolve().parents[1]
    paths = {str(root), str(root.parent), str(Path.home())}
    from caap.data import shared_dir

    if shared_dir() is not None:
        paths.add(str(Path(shared_dir()).resolve()))
    return sorted(p for p in paths if len(p) > 1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_notebook_is_clean(path: Path) -> None:
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size / 1e6:.2f} MB; keep saved notebooks below {MAX_BYTES / 1e6} MB"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name} is not fully executed: save it with outputs"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{path.name} has error outputs"
    text = path.read_text()  # sources, outputs and metadata
    for p in _local_paths() + ["/tmp/", "ipykernel_"]:
        assert p not in text, f"{path.name} contains a local path ({p!r})"
