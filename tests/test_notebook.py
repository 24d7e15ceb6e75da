"""colab/mcti_jax.ipynb as committed: valid, stripped of outputs, with its settings cell. It is not executed here
(`make notebook` executes it, colab/execute.py)."""

import ast
import copy
import importlib.util

import nbformat
import pytest
from conftest import ROOT

NOTEBOOK = ROOT / "colab" / "mcti_jax.ipynb"


@pytest.fixture(scope="module")
def notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]


def assigned(source: str) -> dict:
  """name -> value of the module-level `NAME = literal` lines of a cell."""
  out = {}
  for node in ast.parse(source).body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
      out[node.targets[0].id] = ast.literal_eval(node.value)
  return out


def test_notebook_is_valid_nbformat_4(notebook):
  assert notebook.nbformat == 4
  nbformat.validate(notebook)


def test_notebook_is_stripped(notebook):
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"cell {i} holds outputs: strip them before committing"
      assert cell.execution_count is None, f"cell {i} has an execution count: strip it before committing"
    assert "attachments" not in cell, f"cell {i} holds attachments"
  assert "widgets" not in notebook.metadata, "widget state in the notebook metadata: strip it"


def test_notebook_has_one_parameters_cell_with_the_cpu_setting(notebook):
  cells = parameters_cells(notebook)
  assert len(cells) == 1, "exactly one code cell tagged 'parameters' (papermill; colab/execute.py injects after it)"
  values = assigned(cells[0].source)
  assert values["SETTING"] == "cpu"  # the default must run anywhere, with no network
  assert values["N_SHOTS"] == 5
  assert isinstance(values["WORKDIR"], str)
  first_code = next(c for c in notebook.cells if c.cell_type == "code")
  assert first_code is cells[0], "the settings come first: the install cell reads SETTING"


def test_code_cells_are_python(notebook):
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      ast.parse(cell.source, filename=f"cell {i}")  # no shell escapes or magics: it runs as plain Python too


def test_execute_injects_the_settings_after_the_parameters_cell(notebook):
  spec = importlib.util.spec_from_file_location("colab_execute", ROOT / "colab" / "execute.py")
  execute = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(execute)
  nb = copy.deepcopy(notebook)
  at = nb.cells.index(parameters_cells(nb)[0])
  assert execute.inject_parameters(nb, {"SETTING": "cpu", "WORKDIR": "/tmp/x"}) == at + 1
  injected = nb.cells[at + 1]
  assert injected.metadata["tags"] == ["injected-parameters"]
  assert assigned(injected.source) == {"SETTING": "cpu", "WORKDIR": "/tmp/x"}
  nbformat.validate(nb)
