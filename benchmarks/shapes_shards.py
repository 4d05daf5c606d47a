"""Write captioned-shapes samples as webdataset tar shards (``NNNNN.png`` + ``NNNNN.txt``), so
that the shard-reading configs (``gpu1.yaml``, ``gpu8.yaml``) can be run end to end on a
machine without a data set (``benchmarks/gpu_check.sh`` does).

    python benchmarks/shapes_shards.py OUT_DIR [--shards 4] [--per-shard 512] [--image-size 64]

Writes ``OUT_DIR/train-00000.tar`` ... (N shards, five-digit numbers; training combinations) and ``OUT_DIR/val-00000.tar``
(held-out combinations); refuses a non-empty ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import _no_shadow  # noqa: F401  (first: keeps benchmarks/diffusion.py from shadowing the package)

from train.shapes import IMAGE_SIZES, generate


def write_shard(path: Path, split: str, start: int, count: int, image_size: int, seed: int) -> None:
    with tarfile.open(path, "w") as tar:
        for index in range(start, start + count):
            image, caption, _ = generate(seed, split, index, image_size)
            png = io.BytesIO()
            image.save(png, format="PNG")
            for ext, data in (("png", png.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{index:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must be empty or absent)")
    parser.add_argument("--shards", type=int, default=4, help="training shards (default 4)")
    parser.add_argument("--per-shard", type=int, default=512, help="samples per shard (default 512)")
    parser.add_argument("--image-size", type=int, default=64, choices=IMAGE_SIZES, help="rendered size; loaders resize (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.shards < 1 or args.per_shard < 1:
        parser.error("--shards and --per-shard must be at least 1")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"{args.out} exists and is not an empty folder: give a new one")
    args.out.mkdir(parents=True, exist_ok=True)
    for shard in range(args.shards):
        write_shard(args.out / f"train-{shard:05d}.tar", "train", shard * args.per_shard, args.per_shard, args.image_size, args.seed)
    write_shard(args.out / "val-00000.tar", "val", 0, args.per_shard, args.image_size, args.seed)
    last = f"{args.shards - 1:05d}"
    print(f"wrote {args.shards} x {args.per_shard} training samples and {args.per_shard} validation samples: "
          f"--data.path '{args.out}/train-{{00000..{last}}}.tar' --data.val_path {args.out}/val-00000.tar")


if __name__ == "__main__":
    main()
