"""moto's S3 server, with the writes that carry a condition decided one at a time, as S3 decides them.

moto checks ``If-None-Match: *`` or ``If-Match`` and then stores the object, in a thread per
request: two create-only writes racing for one key can both succeed.  tests/test_registry.py's
race on S3 saw that under load (both writers created the same version file).  S3 itself admits
one; so does this server, which holds one lock across every conditional write.

    python tests/support/atomic_moto.py PORT
"""
from __future__ import annotations

import os
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


class ConditionalWritesInTurn:
    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("HTTP_IF_NONE_MATCH") or environ.get("HTTP_IF_MATCH"):
            with self.lock:
                return list(self.app(environ, start_response))  # the check and the write, whole
        return self.app(environ, start_response)


def main() -> None:
    (port,) = sys.argv[1:]
    os.environ.setdefault("MOTO_PORT", port)  # as moto_server sets it: moto builds some URLs from it
    app = ConditionalWritesInTurn(DomainDispatcherApplication(create_backend_app))
    run_simple("127.0.0.1", int(port), app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
