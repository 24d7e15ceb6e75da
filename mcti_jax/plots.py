"""Pictures a person would rather look at than read. Headless (Agg) matplotlib."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def image_grid(images, row_labels=None, col_labels=None, title: str = "", *, cell: int = 64, gap: int | None = None,
               font_size: int | None = None, out_png: str | Path | None = None):
  """Images [rows, cols, h, w, c] -> one labelled picture, uint8 [H, W, 3] (also written to `out_png` if given).

  Every generation grid goes through here. images: uint8, or floats in [0, 1]; c is 1 (grey) or 3. Each image is
  upscaled by nearest neighbour by the whole factor s = ceil(cell / max(h, w)) (1 for images already that big): a
  cell is [h*s, w*s], image pixel (y, x) filling its block [y*s:(y+1)*s, x*s:(x+1)*s]. Cells sit `gap` white pixels
  apart (default: a tenth of the cell side, at least 2), and the block of cells sits `gap` pixels from the picture's
  right and bottom edges. Left of it: `row_labels` (one per row, right-aligned, vertically centred); above it:
  `col_labels` (one per column, centred), and above those `title` (bold). Long texts wrap; None or "" leaves the
  label out. font_size (default: a quarter of the cell side, 14 to 48 px) is in the picture's own pixels, so text
  is as legible as the images at any display size that shows the images well.
  """
  import numpy as np
  from PIL import Image, ImageDraw
  images = np.asarray(images)
  if images.ndim != 5 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [rows, cols, h, w, c] with c 1 or 3; got shape {images.shape}")
  rows, cols, h, w, _ = images.shape
  for name, labels, count, what in (("row_labels", row_labels, rows, "rows"), ("col_labels", col_labels, cols,
                                                                               "columns")):
    if labels is not None and len(labels) != count:
      raise ValueError(f"{name}: {len(labels)} labels for {count} {what} of images {images.shape}")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images must be uint8 or floats in [0, 1]; got dtype {images.dtype}")
    if images.size and not (np.nanmin(images) >= 0 and np.nanmax(images) <= 1):
      raise ValueError(f"float images must lie in [0, 1]; got [{np.nanmin(images)}, {np.nanmax(images)}]")
    images = np.round(np.nan_to_num(images) * 255).astype(np.uint8)
  scale = max(1, -(-cell // max(h, w, 1)))
  ch, cw = h * scale, w * scale
  gap = max(2, min(ch, cw) // 10) if gap is None else gap
  font_size = font_size or int(np.clip(min(ch, cw) // 4, 14, 48))
  font, bold = _font(font_size), _font(font_size, bold=True)
  pad = font_size // 2
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

  def wrap(text, width, f=font):  # greedy word wrap to `width` pixels (a longer word keeps its own line)
    lines = []
    for paragraph in str(text).split("\n"):
      line = ""
      for word in paragraph.split(" "):
        if line and f.getlength(f"{line} {word}") > width:
          lines.append(line)
          line = word
        else:
          line = f"{line} {word}" if line else word
      lines.append(line)
    return "\n".join(lines)

  def size(text, f=font):  # drawn from its top-left corner (anchor "la")
    if not text:
      return 0, 0
    _, _, right, bottom = probe.multiline_textbbox((0, 0), text, font=f, anchor="la", spacing=pad // 2)
    return right, bottom

  grid_w, grid_h = cols * cw + (cols - 1) * gap, rows * ch + (rows - 1) * gap
  rl = [wrap(t, max(cw, 14 * font_size)) for t in row_labels] if row_labels is not None else []
  cl = [wrap(t, cw + gap) for t in col_labels] if col_labels is not None else []
  label_w = max([size(t)[0] for t in rl] + [0])
  label_w += pad if label_w else 0
  top_h = max([size(t)[1] for t in cl] + [0])
  top_h += pad if top_h else 0
  title = wrap((title or "").strip(), label_w + grid_w, bold)
  title_h = size(title, bold)[1]
  title_h += pad if title_h else 0
  width, height = gap + label_w + grid_w + gap, gap + title_h + top_h + grid_h + gap
  x0, y0 = width - gap - grid_w, height - gap - grid_h  # the block of cells, bottom-right
  canvas = np.full((height, width, 3), 255, np.uint8)
  for r in range(rows):
    for c in range(cols):
      y, x = y0 + r * (ch + gap), x0 + c * (cw + gap)
      canvas[y:y + ch, x:x + cw] = images[r, c].repeat(scale, 0).repeat(scale, 1)  # c=1 broadcasts to grey
  picture = Image.fromarray(canvas)
  draw = ImageDraw.Draw(picture)
  ink = (20, 20, 20)
  for r, text in enumerate(rl):
    if text:
      draw.multiline_text((x0 - pad, y0 + r * (ch + gap) + ch // 2), text, fill=ink, font=font, anchor="rm",
                          align="right", spacing=pad // 2)
  for c, text in enumerate(cl):
    if text:
      draw.multiline_text((x0 + c * (cw + gap) + cw // 2, y0 - pad // 2), text, fill=ink, font=font, anchor="md",
                          align="center", spacing=pad // 2)
  if title:
    draw.multiline_text((gap, gap), title, fill=ink, font=bold, anchor="la", spacing=pad // 2)
  out = np.asarray(picture)
  if out_png is not None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    partial = out_png.with_name(f".{out_png.name}.partial")
    picture.save(partial, format="PNG")
    partial.replace(out_png)  # the file appears whole or not at all
  return out


def _font(size: int, bold: bool = False):
  """DejaVu Sans (matplotlib ships it) at `size` px, for PIL."""
  import matplotlib
  from PIL import ImageFont
  name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
  return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def loss_curves(metrics_path: str | Path, out_png: str | Path, boundaries: list[int] = (),
                titles: dict[str, str] | None = None) -> Path:
  """One panel per logged metric (titled by `titles`) against the step, a line per phase, phase switches marked."""
  rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
  keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("step", "phase", "elapsed_s", "per_class")))
  phase_names = list(dict.fromkeys(r["phase"] for r in rows))
  plt = _pyplot()
  fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.4 * max(len(keys), 1), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, phase in enumerate(phase_names):
      pts = [(r["step"], r[key]) for r in rows if r["phase"] == phase and key in r]
      if pts:
        ax.plot(*zip(*pts), color=f"C{i}", label=phase)
    for b in boundaries:
      if rows and rows[-1]["step"] > b:
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
    ax.set_title((titles or {}).get(key, key))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend()
  return _save(fig, plt, out_png)


def class_curves(metrics_path: str | Path, out_png: str | Path, class_names, titles: dict[str, str] | None = None
                 ) -> Path:
  """One panel per per-class metric (a method's "per_class" log rows), a line per class, against the step."""
  rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
  rows = [r for r in rows if "per_class" in r]
  keys = list(dict.fromkeys(k for r in rows for k in r["per_class"]))
  plt = _pyplot()
  fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.4 * max(len(keys), 1), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    steps = [r["step"] for r in rows]
    values = [r["per_class"][key] for r in rows]
    for k, name in enumerate(class_names):
      ax.plot(steps, [v[k] for v in values], color=f"C{k % 10}", label=name,
              linestyle="-" if k < 10 else "--")
    ax.set_title((titles or {}).get(key, key) + " (per class)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if len(class_names) <= 20:
    axes[0][-1].legend(fontsize=7)
  return _save(fig, plt, out_png)


def accuracy_vs_shots(summary: dict, method_names: dict, out_png: str | Path, metric: str = "top1") -> Path:
  """Top-1 accuracy against N-shot per method, mean ± std over seeds (MC-TI Fig. 5)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, name in method_names.items():
    pts = sorted((n, mean, std) for (m, n, k), (mean, std, _) in summary.items() if m == method and k == metric)
    if pts:
      n, mean, std = (list(v) for v in zip(*pts))
      ax.errorbar(n, [100 * x for x in mean], yerr=[100 * x for x in std], marker="o", capsize=3, label=name)
  ax.set_xscale("log", base=2)
  shots = sorted({n for (_, n, _) in summary})
  ax.set_xticks(shots, [str(n) for n in shots])
  ax.set_xlabel("shots per class")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, plt, out_png)


def token_pca(features: dict, class_names, out_png: str | Path) -> Path:
  """2-D PCA of the text features [K, T, P] of each class's tokens under many templates (MC-TI Fig. 4).

  One projection (fit on all methods together) so the panels are comparable.
  """
  import numpy as np
  plt = _pyplot()
  stacked = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features.values()])
  mean = stacked.mean(0)
  _, s, vt = np.linalg.svd(stacked - mean, full_matrices=False)
  share = 100 * s ** 2 / max(float((s ** 2).sum()), 1e-30)  # % of the variance along each principal component
  fig, axes = plt.subplots(1, len(features), figsize=(5 * len(features), 4.8), squeeze=False)
  cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for ax, (phase, f) in zip(axes[0], features.items()):
    k, t, _ = f.shape
    xy = (f.reshape(-1, f.shape[-1]) - mean) @ vt[:2].T
    for c in range(k):
      ax.scatter(*xy[c * t:(c + 1) * t].T, s=12, color=cmap(c % cmap.N), label=str(class_names[c]))
    ax.set_title({"ti": "TI tokens", "mcti": "MC-TI tokens"}.get(phase, phase))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"PC 1 ({share[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({share[1] if len(share) > 1 else 0:.0f}% of variance)")
  t = next(iter(features.values())).shape[1]
  fig.suptitle(f"CLIP text features of each class's token in {t} prompt templates (a dot each); one PCA fit on "
               "all panels together", fontsize=9)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), title="class", title_fontsize=8)
  return _save(fig, plt, out_png)


def init_convergence(steps, curves: dict, out_png: str | Path, window: int = 50, title: str = "",
                     reference: str | None = "star") -> Path:
  """Noise MSE against the step, one line per token start (Fig. 3): the logged rows faint, their running mean over
  `window` steps bold. With a `reference` start, a second panel shows each start's MSE minus the reference's:
  runs that share their draws (same seed) differ only through the tokens, which the first panel's common ups and
  downs hide."""
  import numpy as np
  plt = _pyplot()
  steps = np.asarray(steps)
  running = {name: np.asarray([np.mean(np.asarray(v)[(steps > s - window) & (steps <= s)]) for s in steps])
             for name, v in curves.items()}
  panels = 2 if reference in curves else 1
  fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.2), squeeze=False)
  for i, (name, values) in enumerate(curves.items()):
    axes[0][0].plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=1)
    axes[0][0].plot(steps, running[name], color=f"C{i}", linewidth=2, label=name)
    if panels == 2:
      axes[0][1].plot(steps, running[name] - running[reference], color=f"C{i}", linewidth=2, label=name)
  axes[0][0].set_ylabel(f"noise MSE (running mean over {window} steps)")
  axes[0][0].set_title(title, fontsize=9)
  if panels == 2:
    axes[0][1].set_ylabel(f"noise MSE minus {reference}'s")
    axes[0][1].axhline(0, color="grey", linewidth=1)
    axes[0][1].set_title(f"the same, minus {reference}'s (same draws)", fontsize=9)
  for ax in axes[0]:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  return _save(fig, plt, out_png)


def _save(fig, plt, out_png) -> Path:
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def confusion(matrix, class_names, out_png: str | Path, title: str = "") -> Path:
  """A confusion matrix (rows: true class, columns: predicted), row-normalised."""
  import numpy as np
  plt = _pyplot()
  m = np.asarray(matrix, np.float64)
  m = m / np.maximum(m.sum(1, keepdims=True), 1)
  k = len(class_names)
  fig, ax = plt.subplots(figsize=(2.4 + 0.35 * k, 1.4 + 0.35 * k))
  shown = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
  if k <= 40:
    ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=7)
    ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=7)
  if k <= 12:  # few enough cells to print each one's share
    for (i, j), v in np.ndenumerate(m):
      ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(title, fontsize=9)
  bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
  bar.set_label("fraction of the true class's images (numbers: %)" if k <= 12 else
                "fraction of the true class's images", fontsize=7)
  bar.ax.tick_params(labelsize=7)
  return _save(fig, plt, out_png)
