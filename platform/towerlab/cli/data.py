"""`towerlab data prepare`: a built-in source (digits, synthetic...) or your own folder of images and captions
(`images`), written as verified shards with a manifest; prints what was written and, for images, the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from towerlab.cli import console, err
from towerlab.config import ConfigError


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from towerlab.data import SOURCES, prepare

    if args.source == "images":
        if not args.images or not args.captions:
            raise ConfigError("`towerlab data prepare images` needs --images DIR and --captions FILE.csv|.jsonl")
        return cmd_prepare_images(args)
    if args.source not in SOURCES:
        raise ConfigError(SOURCES.unknown_message(args.source))
    if args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: give 1 or more shards")
    if args.size is not None and args.size < 2:
        raise ConfigError(f"--size {args.size}: give 2 or more rows (a contrastive batch needs at least 2)")
    m = prepare(args.source, args.out, shards=args.shards, seed=args.seed, size=args.size, key="--out")
    counts = ", ".join(f"{k}: {v}" for k, v in m.counts.items())
    console.print(f"wrote {args.source} to {m.root} ({counts}; {len(m.files('train'))} train shards; "
                  f"fingerprint {m.fingerprint[:12]})")
    return 0


def cmd_prepare_images(args) -> int:
    """Prepare a folder of images with its captions file, then print the report and where the shards are."""
    from towerlab.data.folder import prepare_images

    m, r = prepare_images(args.images, args.captions, args.out, fmt=args.format, shard_size=args.shard_size,
                          strict=args.strict, heldout=args.heldout, prompt=args.prompt)
    t = Table("check", "count", title=f"{args.captions}: {r.records} records")
    t.add_row("valid", str(r.valid))
    for kind, n in r.problems.items():
        t.add_row(kind, str(n))
    t.add_row("duplicate images (same bytes)", str(r.duplicate_images))
    t.add_row("captions shared by several images", str(r.duplicate_captions))
    t.add_row("records with several captions", f"{r.multi_caption_records} (up to {r.max_captions})")
    console.print(t)
    for line in r.examples:
        console.print(f"  skipped: {line}", highlight=False, soft_wrap=True)
    for group in r.duplicate_image_examples:
        console.print(f"  same image: {', '.join(group)}", highlight=False)
    counts = ", ".join(f"{k}: {v}" for k, v in m.counts.items())
    console.print(f"wrote {m.shard_format} shards to {m.root} ({counts}; {r.shards_written} shards written, "
                  f"{r.shards_reused} kept from an earlier run; fingerprint {m.fingerprint[:12]})", highlight=False,
                  soft_wrap=True)
    return 0


def register(sub) -> None:
    """`data prepare` under the top-level parser's subcommands."""
    d = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    dp = d.add_parser("prepare", help="write a built-in source as Parquet shards with a manifest")
    dp.add_argument("source", help="digits | synthetic | images (your own folder: --images, --captions)")
    dp.add_argument("--out", required=True, help="output directory")
    dp.add_argument("--shards", type=int, default=4)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--size", type=int, default=None, help="rows (synthetic only)")
    dp.add_argument("--images", help="images: the image folder (paths in the captions file are relative to it)")
    dp.add_argument("--captions", help="images: a .csv (image, caption[, caption_2..., label]) or .jsonl file")
    dp.add_argument("--format", choices=["parquet", "webdataset"], default="parquet", help="images: shard format")
    dp.add_argument("--shard-size", type=int, default=1000, help="images: records per shard")
    dp.add_argument("--strict", action="store_true", help="images: fail on the first bad records instead of "
                    "skipping and counting them")
    dp.add_argument("--heldout", type=float, default=0.1, help="images: held-out fraction for evaluation")
    dp.add_argument("--prompt", default="a photo of a {}.", help="images: zero-shot prompt per label")
    dp.set_defaults(func=cmd_data_prepare)
