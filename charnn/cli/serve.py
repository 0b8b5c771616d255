"""Serve a published model over HTTP: python -m charnn.cli.serve --model NAME [--storage ROOT] [--port 8000] ...

Deploys charnn.serve's application on the embedded Ray (and serves until stopped: Ctrl-C or
SIGTERM), or on RAY_ADDRESS's cluster (and returns: the application lives on the cluster until
`serve shutdown`).  HTTP listens on 127.0.0.1 unless --host says otherwise.
"""
import argparse
import threading

from charnn.cli.runtime import execute, init_ray, interrupt_on_sigterm
from charnn.config import RunConfig, ServeConfig
from charnn.spec_loader import check_value, expand_path
from charnn.registry import ModelRegistry, RegistryError
from charnn.storage import Store, join
from charnn.train.metrics import say


def arguments() -> argparse.Namespace:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a registered model's name: its published version is served")
    parser.add_argument("--storage", default=RunConfig.storage,
                        help="run.storage that holds models/ (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--poll-s", type=float, default=defaults.poll_s, help="serve.poll_s: how often to look "
                        "for a newly published version (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="serve.max_length")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// storage")
    return parser.parse_args()


def run() -> dict | None:
    from ray import serve

    from charnn.serve import app

    args = arguments()
    check_value("retrain.model", args.model, "--model")
    for key in ("replicas", "poll_s", "max_length"):
        check_value(f"serve.{key}", getattr(args, key), f"--{key.replace('_', '-')}")
    store = Store(endpoint_url=args.endpoint_url)
    registry = ModelRegistry(join(expand_path(args.storage), "models", args.model), store)
    published = registry.published()
    if published is None:  # before Ray starts: one line, exit 2
        raise RegistryError(f"model {args.model!r} has no published version in {registry.url}; run jobs/retrain.py "
                            f"or check --storage")
    embedded = init_ray()
    interrupt_on_sigterm()  # ray.init installed its own SIGTERM handler, which would only die
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app({"model": args.model, "storage": expand_path(args.storage), "endpoint_url": args.endpoint_url,
                   "replicas": args.replicas, "poll_s": args.poll_s, "max_length": args.max_length}),
              name="charnn", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    say(f"charnn: serving {args.model} {published.name} at {url} (POST /generate, GET /model, GET /healthz)")
    result = {"model": args.model, "version": published.name, "url": url}
    if not embedded:
        return result
    try:
        threading.Event().wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop serving, then Ray
        serve.shutdown()
    return {**result, "stopped": True}


def main() -> None:
    execute(run)


if __name__ == "__main__":
    main()
