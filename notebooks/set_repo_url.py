"""Points every notebook at the repository named by setup.cfg's [metadata] url: the URL its
first cell clones on Colab (`REPO_URL = "..."`) and its "Open in Colab" badge (the first line
of its first cell). For a fork:

  python notebooks/set_repo_url.py https://github.com/me/jaxllm   # sets setup.cfg's url too
  python notebooks/set_repo_url.py                                # after editing setup.cfg

tests/test_notebooks.py fails, naming the notebooks, while any of them disagrees.
"""

import argparse
import configparser
import glob
import os
import re

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_CFG = os.path.join(ROOT, "setup.cfg")
GITHUB_URL = re.compile(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?")
REPO_LINE = re.compile(r'^REPO_URL = "[^"\n]*"', re.M)
BADGE_LINE = re.compile(r"^\[!\[Open In Colab\]\S*\n")


def repo_url() -> str:
  parser = configparser.ConfigParser()
  parser.read(SETUP_CFG)
  return parser["metadata"]["url"]


def badge(url: str, name: str) -> str:
  """The markdown badge that opens notebooks/`name` of the GitHub repository `url` in Colab."""
  match = GITHUB_URL.fullmatch(url)
  if match is None:
    raise ValueError(f"url {url!r}: expected https://github.com/OWNER/REPO (Colab opens "
                     "notebooks from GitHub)")
  return ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"(https://colab.research.google.com/github/{match.group(1)}/blob/main/notebooks/{name})")


def point_at(nb: nbformat.NotebookNode, url: str, name: str) -> None:
  """Rewrites the badge and the first code cell's REPO_URL line of notebook `nb` in place."""
  first_code = next(c for c in nb.cells if c.cell_type == "code")
  if not REPO_LINE.search(first_code.source):
    raise ValueError(f"notebooks/{name}: its first code cell has no `REPO_URL = \"...\"` line")
  first_code.source = REPO_LINE.sub(f'REPO_URL = "{url}"', first_code.source, count=1)
  head = nb.cells[0]
  if head.cell_type != "markdown":
    raise ValueError(f"notebooks/{name}: its first cell should be markdown, for the badge")
  head.source = badge(url, name) + "\n\n" + BADGE_LINE.sub("", head.source, count=1).lstrip("\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("url", nargs="?", help="https://github.com/OWNER/REPO; default: setup.cfg's")
  args = ap.parse_args()
  url = args.url or repo_url()
  changed = {}  # every notebook is rewritten in memory first: an error writes nothing
  for path in sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))):
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    try:
      point_at(nb, url, os.path.basename(path))
    except ValueError as e:
      raise SystemExit(f"error: {e}; nothing written") from None
    if nbformat.writes(nb) != before:
      changed[path] = nb
  if args.url:
    with open(SETUP_CFG) as f:
      text = f.read()
    with open(SETUP_CFG, "w") as f:
      f.write(re.sub(r"^url = .*$", f"url = {url}", text, count=1, flags=re.M))
  for path, nb in changed.items():
    nbformat.write(nb, path)
    print("updated", os.path.relpath(path, ROOT))


if __name__ == "__main__":
  main()
