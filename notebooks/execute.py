"""Runs notebooks top to bottom as a user would (from notebooks/, one CPU device, their full
step counts) and saves them with their outputs, so GitHub shows the plots:

  python notebooks/execute.py                      # all of them, in order
  python notebooks/execute.py 04_inference.ipynb   # one

Cells carry no timing metadata, so a rerun changes only what the run itself changed.
"""

import argparse
import os

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("names", nargs="*", help="notebook file names in notebooks/; default: all")
  ap.add_argument("--timeout", type=int, default=1800, help="seconds a cell may take")
  args = ap.parse_args()
  names = args.names or sorted(n for n in os.listdir(HERE) if n.endswith(".ipynb"))
  missing = [n for n in names if not os.path.isfile(os.path.join(HERE, n))]
  if missing:
    raise SystemExit(f"no such notebook in {HERE}: {', '.join(missing)}")
  # The kernel inherits this environment: no simulated devices, no shortened runs.
  for var in ("XLA_FLAGS", "JAXLLM_NOTEBOOK_STEPS"):
    os.environ.pop(var, None)
  for name in names:
    path = os.path.join(HERE, name)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=args.timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": HERE}}).execute()
    nbformat.write(nb, path)
    print(f"{name}: {os.path.getsize(path) / 1e3:.0f} kB")


if __name__ == "__main__":
  main()
