"""Generate text: python -m charnn.cli.generate (--checkpoint URL | --model NAME [--storage ROOT]) [--prime TEXT] ...

--model uses the version that jobs/retrain.py published in <ROOT>/models/NAME/.
"""
import argparse
import sys

from charnn.cli.runtime import execute
from charnn.config import RunConfig
from charnn.spec_loader import check_value, expand_path
from charnn.storage import Store, join
from charnn.registry import ModelRegistry, RegistryError
from charnn.sample import GenerateOptions, stream_text


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory: local path or storage URL")
    source.add_argument("--model", help="a registered model's name: its published version")
    parser.add_argument("--storage", default=RunConfig.storage, help="run.storage that holds models/ (default: %(default)s)")
    parser.add_argument("--prime", default="K", help="text that warms the state before sampling")
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (the seed used 2); 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// checkpoints")
    args = parser.parse_args()
    options = GenerateOptions(args.prime, args.length, args.temperature, args.top_k, args.seed)
    store = Store(endpoint_url=args.endpoint_url)
    url = args.checkpoint
    if args.model is not None:  # "" too must meet the rule
        check_value("retrain.model", args.model, "--model")  # a storage path segment, as in a spec
        registry = ModelRegistry(join(expand_path(args.storage), "models", args.model), store)
        published = registry.published()
        if published is None:
            raise RegistryError(f"model {args.model!r} has no published version in {registry.url}; "
                                f"run jobs/retrain.py or check --storage")
        url = published.url
    for piece in stream_text(url, options, store):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
