"""Lets a plain `lm_eval --model jaxllm` find train/harness.py's model.

lm-eval 0.4.13 looks a model up in its registry (lm_eval.api.registry.model_registry), which
holds only what imported modules registered: it reads no entry point through which an installed
package could add a model. Its own models are lazy placeholders ("module:Class") that
lm_eval/models/__init__.py registers when imported, and get_model imports lm_eval.models only
while the registry is empty.

So the package installs jaxllm-lm-eval.pth into site-packages (setup.py), whose one line calls
install() at interpreter startup: a sys.meta_path finder that answers for `lm_eval.models`
alone. When that module has run, the finder registers the placeholder `jaxllm` ->
`train.harness:JaxLM` beside lm-eval's own and steps out of sys.meta_path. The `lm_eval` and
`python -m lm_eval` command lines and `lm_eval.simple_evaluate(model="jaxllm", ...)` then find
the model, train.harness (and jax) load only once it is asked for, and where lm_eval is absent
nothing changes. Registering as soon as lm_eval.api.registry is imported would fill the registry
early, and get_model would never import lm-eval's own models.

Startup imports this module and nothing else: no importlib.abc or importlib.util, whose own
imports would cost more than the rest of the work.
"""

import sys

WATCHED = "lm_eval.models"
NAME = "jaxllm"  # train.harness.NAME, which this module may not import (it brings jax)
TARGET = "train.harness:JaxLM"


def register() -> None:
  """Adds the placeholder for `jaxllm` to lm-eval's model registry, unless a model of that
  name is there already (train.harness imported first registers the class itself)."""
  from lm_eval.api.registry import model_registry
  if NAME not in model_registry:
    model_registry.register(NAME, target=TARGET)


class _RegisterAfterLoad:
  """The loader of lm_eval.models, and then register()."""

  def __init__(self, loader, finder):
    self._loader, self._finder = loader, finder

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    # The module keeps its own loader (get_source, resources), not this wrapper.
    module.__loader__ = module.__spec__.loader = self._loader
    self._loader.exec_module(module)
    if self._finder in sys.meta_path:
      sys.meta_path.remove(self._finder)
    register()


class LmEvalModelsFinder:
  """A sys.meta_path finder for WATCHED only: the spec the finders after it find, with its
  loader wrapped so that register() runs once the module has."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != WATCHED or self not in sys.meta_path:
      return None
    for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
      find_spec = getattr(finder, "find_spec", None)
      spec = find_spec(fullname, path, target) if find_spec else None
      if spec is not None:
        if hasattr(spec.loader, "exec_module"):
          spec.loader = _RegisterAfterLoad(spec.loader, self)
        return spec
    return None


def install() -> None:
  """Puts LmEvalModelsFinder first in sys.meta_path (once): jaxllm-lm-eval.pth's call."""
  if not any(isinstance(f, LmEvalModelsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, LmEvalModelsFinder())
