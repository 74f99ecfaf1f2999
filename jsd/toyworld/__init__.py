"""The toy world of Japanese-captioned shapes and the toy checkpoint trained on it (docs/toy-world.md).

:mod:`jsd.toyworld.world` generates the pictures and captions, :mod:`jsd.toyworld.judge` reads what a
picture shows from its pixels, :mod:`jsd.toyworld.build` trains the toy checkpoint with jsd's own recipe.
"""

from pathlib import Path

# The start of the manifest `source` of the toy checkpoint: how scripts tell it from rinna's weights.
TOY_SOURCE_PREFIX = "jsd.toyworld"
# Where the committed toy checkpoint and its training log live, relative to the repository root.
TOY_DIR = Path("toy")
TOY_WEIGHTS = TOY_DIR / "weights"
TOY_NOTE = "a toy model of shapes trained here (docs/toy-world.md), not rinna's Japanese Stable Diffusion"
TOY_PROMPT = "白い背景、左に大きい赤い丸"  # a caption of the toy world (jsd.toyworld.world.Scene.prompt())
