"""Execute the notebooks in this folder and save them with their outputs (the committed copies).

    python notebooks/run_notebooks.py                  # every notebook, full setting, saved in place
    python notebooks/run_notebooks.py 02_caap          # one notebook
    python notebooks/run_notebooks.py --small          # the test suite's quick setting, not saved

Runs each with nbclient (kernel `python3`) from this folder, prints the time and the saved size, and
fails if a saved notebook holds an absolute path of this machine or exceeds 1.5 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
MAX_BYTES = 1_500_000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="notebook names (default: all), with or without .ipynb")
    p.add_argument("--small", action="store_true", help="CAAP_NOTEBOOK_SMALL=1, outputs not saved")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = p.parse_args(argv)
    paths = [HERE / (n if n.endswith(".ipynb") else f"{n}.ipynb") for n in args.names] or sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if args.small:
        os.environ["CAAP_NOTEBOOK_SMALL"] = "1"
    else:
        os.environ.pop("CAAP_NOTEBOOK_SMALL", None)
    local = {str(HERE.parent), str(HERE.parent.parent), str(Path.home())}
    failed = False
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        t = time.time()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        took = time.time() - t
        if args.small:
            print(f"{path.name}: ran in {took:.0f} s (small setting, not saved)")
            continue
        nbformat.write(nb, path)
        text, size = path.read_text(), path.stat().st_size
        leaks = sorted(p for p in local if len(p) > 1 and p in text)
        print(f"{path.name}: ran in {took:.0f} s, saved {size / 1e6:.2f} MB" + (f"; CONTAINS LOCAL PATHS {leaks}" if leaks else ""))
        failed |= bool(leaks) or size > MAX_BYTES
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
