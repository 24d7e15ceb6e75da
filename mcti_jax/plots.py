"""Pictures a person would rather look at than read. Headless (Agg) matplotlib."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


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
  _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
  fig, axes = plt.subplots(1, len(features), figsize=(5 * len(features), 4.4), squeeze=False)
  cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for ax, (phase, f) in zip(axes[0], features.items()):
    k, t, _ = f.shape
    xy = (f.reshape(-1, f.shape[-1]) - mean) @ vt[:2].T
    for c in range(k):
      ax.scatter(*xy[c * t:(c + 1) * t].T, s=12, color=cmap(c % cmap.N), label=str(class_names[c]))
    ax.set_title({"ti": "TI tokens", "mcti": "MC-TI tokens"}.get(phase, phase))
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
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
  fig, ax = plt.subplots(figsize=(1.2 + 0.35 * k, 1 + 0.35 * k))
  ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
  if k <= 40:
    ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=7)
    ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title, fontsize=9)
  return _save(fig, plt, out_png)
