"""Convert a timm/torchvision checkpoint once into an orbax checkpoint for fast reuse.

    python scripts/convert_timm.py --model resnet101 --num-classes 260 \
        --checkpoint timm:resnet101 --out checkpoints/resnet101_imagenet

`--checkpoint` is a local .pth/.pt/.bin/.safetensors file or `timm:<name>` (downloads, needs
internet). The output directory then works as `config.model.pretrained` without torch or timm,
for any class count and head: the backbone loads exactly; the stored classifier loads only into
a linear head of `--num-classes` classes, and any other head keeps its initialisation (a logged
message says so). Here too, a checkpoint classifier of another class count than `--num-classes`
(ImageNet's 1000) is skipped and the saved head is the model's random init.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from annotate.convert import load_pretrained, save_weights
from annotate.models import MODEL_NAMES, count_params, create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: model name, class count, source checkpoint, output directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=MODEL_NAMES, help="backbone name")
    parser.add_argument("--num-classes", type=int, required=True, help="classifier outputs")
    parser.add_argument("--checkpoint", required=True,
                        help="local .pth/.pt/.bin/.safetensors file or timm:<name>")
    parser.add_argument("--out", type=Path, required=True, help="orbax output directory (new)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Build the model, load the checkpoint into it and save its weights with orbax."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.out.exists():
        raise FileExistsError(f"--out {args.out} already exists; choose a new directory")
    model = create_model(args.model, args.num_classes)
    load_pretrained(model, args.checkpoint)
    out = save_weights(model, args.out)
    logging.info("saved %s (%d parameters) from %s to %s", args.model, count_params(model),
                 args.checkpoint, out)
    return out


if __name__ == "__main__":
    main()
