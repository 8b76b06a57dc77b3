"""An S3-compatible server on 127.0.0.1 for tests and benches: moto's ThreadedMotoServer, optionally with a
delay on every request (as a real bucket has), and the environment that points clients at it.

    with s3_server(latency_s=0.03) as server:          # http://127.0.0.1:<port>
        server.create_bucket("genrecal-test")
        os.environ.update(server.env())                 # endpoint, credentials, no metadata service

Nothing here reaches another address: the endpoint is 127.0.0.1, the credentials are set (so no client looks
them up elsewhere), and the instance-metadata endpoint is pointed at 127.0.0.1 too.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from contextlib import contextmanager

from moto.server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

ACCESS_KEY = "genrecal-test-key"
SECRET_KEY = "genrecal-test-secret"
REGION = "us-east-1"


class LatencyMotoServer(ThreadedMotoServer):
    """moto's in-process server; `latency_s` is slept before every request is served (threads overlap it)."""

    def __init__(self, latency_s: float = 0.0):
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.latency_s = latency_s
        self.requests = 0

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def delayed(environ, start_response):
            self.requests += 1
            if self.latency_s:
                time.sleep(self.latency_s)
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, delayed, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        return client_env(self.endpoint, access_key, secret_key)

    def create_bucket(self, name: str) -> None:
        create_bucket(self.endpoint, name)


def client_env(endpoint: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
    """What points the clients at `endpoint`: credentials set (so none is looked up elsewhere), the
    instance-metadata endpoint on 127.0.0.1, no proxy."""
    return {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION, "AWS_ALLOW_HTTP": "true",
        "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9", "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    }


def create_bucket(endpoint: str, name: str) -> None:
    """S3's CreateBucket (a PUT on the bucket's URL): obstore has none, and moto takes it unsigned unless its
    IAM authentication is on. No proxy: the request goes to the endpoint (127.0.0.1) only."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(f"{endpoint}/{name}", method="PUT")) as reply:
        reply.read()


@contextmanager
def s3_server(latency_s: float = 0.0):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = LatencyMotoServer(latency_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str]) -> None:
    """python tests/s3_server.py [LATENCY_S]: serve until killed (a process of its own, for benches), printing
    the endpoint on the first line."""
    import sys

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = LatencyMotoServer(float(argv[0]) if argv else 0.0)
    server.start()
    print(server.endpoint, flush=True)
    sys.stdout.close()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
