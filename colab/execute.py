"""Execute colab/mcti_jax.ipynb on CPU, top to bottom, as CI does (`make notebook`).

  python colab/execute.py                      # the "cpu" setting, everything under a temporary folder
  python colab/execute.py --output run.ipynb   # also keep the executed notebook

The kernel is this Python's (python3 with ipykernel, from the same venv), started in the repository root; the
notebook's WORKDIR is a temporary folder, removed afterwards, so nothing is left in the repository. The settings are injected after the cell tagged "parameters", papermill's way. Compiled programs
are kept where the notebook (and `mcti`) keep them, ~/.cache/mcti_jax/jit or $JAX_COMPILATION_CACHE_DIR, so a
second run skips the compiles; --cold compiles everything in a fresh cache, as on a new machine.
Prints each cell's wall time and the total; on an error, which cell failed and its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "mcti_jax.ipynb"


def inject_parameters(nb, values: dict) -> int:
  """Insert a cell setting `values` right after the cell tagged "parameters" (papermill's "injected-parameters");
  returns its index."""
  import nbformat
  index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
  if index is None:
    raise SystemExit(f"{NOTEBOOK} has no cell tagged 'parameters'")
  source = "# Parameters injected by colab/execute.py\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return index + 1


def kernel_dir(tmp: Path) -> Path:
  """A jupyter data folder whose kernels/python3 runs this interpreter, so the kernel is this venv's python."""
  spec = tmp / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (mcti-jax)", "language": "python"}))
  return tmp / "jupyter"


def summary_of(cell) -> str:
  first = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
  return first[:70]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--setting", default="cpu", help="the notebook's SETTING (default cpu)")
  p.add_argument("--timeout", type=int, default=300, help="seconds one cell may run (default 300)")
  p.add_argument("--output", type=Path, help="write the executed notebook here")
  p.add_argument("--cold", action="store_true", help="compile in a fresh JAX compilation cache (removed afterwards)")
  args = p.parse_args()

  import nbformat
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

  nb = nbformat.read(NOTEBOOK, as_version=4)
  with tempfile.TemporaryDirectory(prefix="mcti_notebook_") as tmp:
    tmp = Path(tmp)
    injected = inject_parameters(nb, {"SETTING": args.setting, "WORKDIR": str(tmp / "work")})

    def name(index: int) -> str:  # cells are numbered as in the committed notebook (from 0, markdown included)
      return "injected" if index == injected else f"cell {index - (index > injected)}"

    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(kernel_dir(tmp)), os.environ.get("JUPYTER_PATH")]))
    if args.cold:
      os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "jit_cache")
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    start = time.time()
    failed = None
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/mcti_jax/jit")
    print(f"executing {NOTEBOOK.relative_to(ROOT)} (SETTING={args.setting!r}, per-cell timeout {args.timeout} s, "
          f"compilation cache {cache})", flush=True)
    with client.setup_kernel():
      for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
          continue
        t = time.time()
        try:
          client.execute_cell(cell, index)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
          failed = (index, cell, e)
          break
        print(f"  {name(index):>8}  {time.time() - t:6.1f} s  {summary_of(cell)}", flush=True)
    total = time.time() - start
    if args.output:
      nbformat.write(nb, args.output)
  if failed:
    index, cell, error = failed
    print(f"\nFAILED: {name(index)} ({summary_of(cell)}) after {total:.1f} s in all:\n", file=sys.stderr)
    print(re.sub(r"\x1b\[[0-9;]*m", "", str(error)), file=sys.stderr)  # the traceback, without its colours
    return 1
  print(f"notebook executed in {total:.1f} s (wall, kernel start included)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
