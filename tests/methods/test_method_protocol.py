"""Every trainable method keeps the typed contract (methods/protocol.py), and the trainer reads it, never probes."""

import ast
import types
from pathlib import Path

import pytest

from mcti_jax import methods
from mcti_jax.methods import protocol

PACKAGE = Path(methods.__file__).parents[1]  # mcti_jax/


@pytest.mark.parametrize("name", methods.TRAINABLE)
def test_every_trainable_method_satisfies_the_protocols_of_its_capabilities(name):
  module = methods.get(name)
  caps = methods.capabilities(module)
  assert caps.name == name and hash(caps) == hash(methods.capabilities(module))  # hashable, computed once
  assert isinstance(module, protocol.Method)
  assert isinstance(module, protocol.ShotMethod) != caps.draws_items
  assert isinstance(module, protocol.DrawsItems) == caps.draws_items
  assert isinstance(module, protocol.CrossClass) == caps.cross_class
  assert isinstance(module, protocol.Stateful) == caps.stateful
  assert isinstance(module, protocol.Checks) == caps.checks
  assert isinstance(module, protocol.BuildsParts) == caps.builds_parts
  assert caps.uses_shots or caps.draws_items
  assert set(caps.needs) <= set(protocol.NEEDS)
  settings = methods.phase(name)
  assert settings.lr > 0 and set(methods.TRAINER_FIELDS) <= set(settings)
  if caps.checks:  # the same Settings bag as every other hook, and the defaults pass
    assert module.check(protocol.Settings(protocol.frozen_settings(methods.own_settings(settings)))) == []


def fake(**members) -> types.ModuleType:
  """A method module like TI's, with `members` added (None: removed)."""
  module = types.ModuleType("mcti_jax.methods.fake")
  base = dict(needs=(), cross_class=False, metric_titles={"mse": "noise MSE"}, defaults=lambda: {"lr": 1e-3},
              loss=lambda terms, cfg: terms["mse"], item_terms=lambda item, ctx, cfg: {})
  for name, value in {**base, **members}.items():
    if value is not None:
      setattr(module, name, value)
  return module


def hook(*args):
  return {}


def test_a_well_formed_fake_method_is_accepted():
  caps = methods.capabilities(fake())
  assert (caps.name, caps.uses_shots, caps.draws_items, caps.stateful) == ("fake", True, False, False)


@pytest.mark.parametrize("members, message", [
    (dict(loss=None), r"method module mcti_jax.methods.fake: every method defines .*; it lacks loss"),
    (dict(item_terms=None), "defines neither item_terms"),
    (dict(class_terms=hook, uses_shots=False), "defines both item_terms and class_terms"),
    (dict(item_terms=None, class_terms=hook, uses_shots=False, cross_class=True, cross_terms=hook),
     "cross_class = True with class_terms"),
    (dict(cross_class=True), r"cross_class = True needs cross_terms"),
    (dict(cross_terms=hook), "cross_terms but cross_class = False"),
    (dict(item_terms=None, class_terms=hook), "class_terms needs uses_shots"),
    (dict(uses_shots=False), "uses_shots = False, but item_terms learns from the trainer's shots"),
    (dict(class_state=hook), "defines class_state but not next_state, final_vectors: per-class state needs all three"),
    (dict(class_state=hook, next_state=hook), "but not final_vectors"),
    (dict(needs=("vae",)), r"needs=\('vae',\) must be a tuple of clip, classifier"),
    (dict(cross_class=1), "cross_class=1 must be True or False"),
    (dict(defaults=lambda: {}), "defaults\\(\\) must give lr"),
])
def test_a_broken_method_module_is_refused_naming_the_module_and_the_problem(members, message):
  with pytest.raises(TypeError, match=message):
    methods.capabilities(fake(**members))


def probes(source: str) -> list[str]:
  """The hasattr/getattr calls in `source` that ask a method (or a protocol member) what it has."""
  names = {name for p in (protocol.Method, protocol.ShotMethod, protocol.CrossClass, protocol.DrawsItems,
                          protocol.Stateful, protocol.Checks, protocol.BuildsParts) for name in protocol.members(p)}
  found = []
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
        and node.args):
      target = ast.unparse(node.args[0])
      attribute = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
      if "method" in target or attribute in names:
        found.append(ast.unparse(node))
  return found


def test_the_probe_finder_finds_the_probes_it_replaced():
  assert probes('hasattr(cfg.method, "class_terms")\ngetattr(p.method, "uses_shots", True)\n'
                'any(hasattr(m, "class_state") for m in ms)\ngetattr(sys.unraisablehook, "x", False)') == [
                    "hasattr(cfg.method, 'class_terms')", "getattr(p.method, 'uses_shots', True)",
                    "hasattr(m, 'class_state')"]


def test_the_trainer_reads_capabilities_and_never_probes_a_method():
  found = {str(f.relative_to(PACKAGE)): probes(f.read_text()) for f in sorted((PACKAGE / "training").glob("*.py"))}
  assert {"training/train.py", "training/step.py", "training/phases.py"} <= set(found)
  assert not {f: p for f, p in found.items() if p}
