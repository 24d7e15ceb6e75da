"""`mcti export`: re-export a finished run's tokens in every format this version writes (reexport.py).

  mcti export runs/pets                            # every phase of the run, in place
  mcti export runs/pets/export/mcti --out ~/tokens # one phase, elsewhere

The flags are parsed before anything heavy is imported, so --help answers at once.
"""

from __future__ import annotations

import argparse
import json


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="mcti export", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Re-export a finished run's tokens in every format this version writes:\n"
                  "  tokens.safetensors                          all classes [K, V, D] and their vector counts\n"
                  "  manifest.json                               classes, files, prompt words, the run's info\n"
                  "  classes/<k>/learned_embeds.safetensors      diffusers: pipe.load_textual_inversion(file)\n"
                  "  a1111/<word>.safetensors                    AUTOMATIC1111 webui (embeddings/) and kohya\n"
                  "                                              sd-scripts; the file name is the prompt word\n"
                  "The vectors are copied bit for bit from tokens.safetensors; an older export gains the\n"
                  "formats it lacks.",
      epilog="examples:\n  mcti export runs/pets\n  mcti export runs/pets/export/mcti --out ~/tokens/pets")
  p.add_argument("path", help="a run's workdir (runs/<name>: every phase under its export/), or one export "
                              "folder (runs/<name>/export/<phase>, holding manifest.json)")
  p.add_argument("--trust-manifest", action="store_true",
                 help="rewrite an export whose manifest records no digest (made before mcti-jax recorded one), "
                      "taking its class names as they are; the rewritten export records one")
  p.add_argument("--out", metavar="DIR", help="write here instead of in place; for a workdir DIR gets one folder "
                                              "per phase (like export/). DIR must be new, empty or this run's own "
                                              "export (the same tokens and names): it is replaced whole")
  return p


def parse(argv: list[str]) -> argparse.Namespace:
  """The flags (argv without the program name); --help and a bad flag exit here."""
  return parser().parse_args(argv)


def run(args: argparse.Namespace) -> None:
  from mcti_jax.tokens import export
  from mcti_jax.tokens.reexport import reexport
  for phase, folder in reexport(args.path, args.out, args.trust_manifest).items():
    manifest = json.loads((folder / export.MANIFEST).read_text())
    words = ", ".join(c["a1111_word"] for c in manifest["classes"][:3]) + (", ..." if manifest["num_classes"] > 3
                                                                          else "")
    print(f"{folder}: {manifest['num_classes']} classes ({phase or manifest.get('phase', 'tokens')}); "
          f"A1111/kohya words: {words}")


def main(argv: list[str]) -> None:
  run(parse(argv))
