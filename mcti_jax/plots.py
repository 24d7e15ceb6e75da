"""Pictures a person would rather look at than read. Headless (Agg) matplotlib."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def loss_curves(metrics_path: str | Path, out_png: str | Path, ti_steps: int | None = None) -> Path:
  """MSE, regulariser and its train accuracy against the step, the TI -> MC-TI switch marked."""
  rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  panels = (("mse", "noise MSE"), ("reg", "MC-TI regulariser (CE)"), ("reg_acc", "train accuracy of the regulariser"))
  for ax, (key, title) in zip(axes, panels):
    for phase, color in (("ti", "tab:blue"), ("mcti", "tab:red")):
      pts = [(r["step"], r[key]) for r in rows if r["phase"] == phase]
      if pts and not (key != "mse" and phase == "ti"):
        ax.plot(*zip(*pts), color=color, label=phase.upper().replace("MCTI", "MC-TI"))
    if ti_steps and rows and rows[-1]["step"] > ti_steps:
      ax.axvline(ti_steps, color="grey", linestyle=":", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png
