"""plots.image_grid, the one renderer of generation grids: layout computed by hand, upscaling, refusals."""

import numpy as np
import pytest

from mcti_jax import plots


def _images(rows=2, cols=3, size=16, channels=3, seed=0):
  """uint8 [rows, cols, size, size, channels], no pure-white pixel (so a cell never looks like a gap)."""
  return np.random.default_rng(seed).integers(0, 250, (rows, cols, size, size, channels), dtype=np.uint8)


def test_grid_without_labels_has_the_size_and_cells_computed_by_hand():
  images = _images()
  out = plots.image_grid(images, cell=64, gap=5)
  # 16 px images at cell 64: factor 4, cells 64 x 64; a 5-px margin round the block, 5 px between cells.
  assert out.dtype == np.uint8 and out.shape == (5 + 2 * 64 + 5 + 5, 5 + 3 * 64 + 2 * 5 + 5, 3)
  white = np.ones_like(out, bool)
  for r in range(2):
    for c in range(3):
      y, x = 5 + r * 69, 5 + c * 69
      np.testing.assert_array_equal(out[y:y + 64, x:x + 64], images[r, c].repeat(4, 0).repeat(4, 1))
      white[y:y + 64, x:x + 64] = False
  assert (out[white] == 255).all()  # margins and gaps


def test_labels_sit_left_and_above_the_cells_which_stay_bottom_right():
  images = _images()
  plain = plots.image_grid(images, cell=64, gap=5)
  out = plots.image_grid(images, ["zero", "seven"], ["1", "2", "3"], "a title", cell=64, gap=5)
  assert out.shape[0] > plain.shape[0] and out.shape[1] > plain.shape[1]
  # The block of cells keeps its place counted from the bottom-right corner.
  np.testing.assert_array_equal(out[-plain.shape[0]:, -plain.shape[1]:][5:-5, 5:-5], plain[5:-5, 5:-5])
  block_y, block_x = out.shape[0] - 5 - (2 * 64 + 5), out.shape[1] - 5 - (3 * 64 + 2 * 5)
  left, top = out[block_y:, :block_x], out[:block_y, block_x:]
  for name, region in (("row labels", left), ("column labels and title", top)):
    assert (region < 128).any(), f"no text in the {name}' region"
  for r in range(2):  # each row label's ink lies beside its row
    y = block_y + r * 69
    assert (out[y:y + 64, :block_x] < 128).any()
  for c in range(3):  # each column label's ink lies above its column
    x = block_x + c * 69
    assert (out[:block_y, x:x + 64] < 128).any()
  gaps = out[block_y:block_y + 2 * 64 + 5, block_x:][64:69]  # the white band between the rows
  assert (gaps == 255).all()


def test_nearest_upscaling_is_np_repeat_and_grey_and_float_images_work():
  images = _images(1, 1, size=5, channels=1)
  out = plots.image_grid(images, cell=20, gap=2)  # factor ceil(20 / 5) = 4
  np.testing.assert_array_equal(out[2:22, 2:22], np.repeat(np.repeat(images[0, 0], 4, 0), 4, 1).repeat(3, -1))
  floats = images.astype(np.float64) / 255
  np.testing.assert_array_equal(plots.image_grid(floats, cell=20, gap=2), out)
  big = _images(1, 2, size=100)  # already bigger than a cell: drawn as they are
  assert plots.image_grid(big, cell=64, gap=3).shape == (3 + 100 + 3, 3 + 2 * 100 + 3 + 3, 3)


def test_the_grid_is_written_as_a_png(tmp_path):
  from PIL import Image
  out = plots.image_grid(_images(), ["a", "b"], None, cell=32, out_png=tmp_path / "sub" / "grid.png")
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "grid.png")), out)
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]


@pytest.mark.parametrize("images, kwargs, message", [
    (np.zeros((2, 16, 16, 3), np.uint8), {}, r"images must be \[rows, cols, h, w, c\].*\(2, 16, 16, 3\)"),
    (np.zeros((1, 2, 16, 16, 4), np.uint8), {}, r"images must be \[rows, cols, h, w, c\] with c 1 or 3"),
    (np.zeros((2, 3, 16, 16, 3), np.uint8), {"row_labels": ["a"]}, "row_labels: 1 labels for 2 rows"),
    (np.zeros((2, 3, 16, 16, 3), np.uint8), {"col_labels": ["a", "b"]}, "col_labels: 2 labels for 3 columns"),
    (np.full((1, 1, 4, 4, 3), 2.0), {}, r"float images must lie in \[0, 1\]"),
    (np.zeros((1, 1, 4, 4, 3), np.int32), {}, "uint8 or floats in \\[0, 1\\]; got dtype int32"),
])
def test_bad_input_is_refused_naming_what_is_wrong(images, kwargs, message):
  with pytest.raises(ValueError, match=message):
    plots.image_grid(images, **kwargs)
