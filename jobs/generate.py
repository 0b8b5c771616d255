"""Generate text from a checkpoint: python jobs/generate.py --checkpoint URL [--prime TEXT] ..."""
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not jobs/

import argparse  # noqa: E402

from jobs.runtime import main  # noqa: E402
from jobs.spec import StorageConfig  # noqa: E402
from train.generate import GenerateOptions, stream_text  # noqa: E402


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory: local path or storage URL")
    parser.add_argument("--prime", default="K", help="text that warms the state before sampling")
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (the seed used 2); 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// checkpoints")
    args = parser.parse_args()
    options = GenerateOptions(args.prime, args.length, args.temperature, args.top_k, args.seed)
    for piece in stream_text(args.checkpoint, options, StorageConfig(endpoint_url=args.endpoint_url)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(run)
