"""setup.cfg holds the package's metadata; this file adds jaxllm-lm-eval.pth to what it installs.

The .pth, at the top of site-packages, lets lm-eval's command line find the model `jaxllm`
(train/lm_eval_plugin.py says how). A regular wheel (`pip install .`) takes it from build_lib
like any module. An editable one (PEP 660, `pip install -e .`) keeps nothing of build_lib: it
holds what setuptools' editable_wheel writes into the install command's install_lib, the
unpacked wheel (scripts and data files go there too), so in editable mode the .pth goes there.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "jaxllm-lm-eval.pth"
# site reads .pth files in name order: this one after setuptools' __editable__.jaxllm-*.pth,
# whose finder is what makes `train` importable in an editable install.
PTH_LINE = "import train.lm_eval_plugin; train.lm_eval_plugin.install()\n"


class BuildPyWithPth(build_py):
  """build_py, plus the .pth at the top of the wheel."""

  def run(self):
    super().run()
    folder = (self.get_finalized_command("install").install_lib if self.editable_mode
              else self.build_lib)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, PTH), "w", encoding="utf-8") as f:
      f.write(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth})
