"""A real Flask application behind the gateway, for tests/path_confusion.rs.

Served by werkzeug's own server on 127.0.0.1 and a port the OS picks; the port is the
first line on stdout. Every answer's body starts with a marker naming the handler that
produced it (PUBLIC:, ADMIN-SECRET:, OTHER:), and carries what werkzeug saw of the
request in two headers (JSON strings, so any byte survives a header):
X-Seen-Request-Uri (the raw request target) and X-Seen-Path-Info (PATH_INFO, decoded).
GET /__seen/<anything> answers the same two values as a JSON body.
"""

import json
import sys

from flask import Flask, Response, request
from werkzeug.serving import WSGIRequestHandler, make_server

app = Flask(__name__)


def _text(body, status=200):
    return Response(body, status=status, mimetype="text/plain")


def _seen():
    return {
        "request_uri": request.environ.get("REQUEST_URI", ""),
        "raw_uri": request.environ.get("RAW_URI", ""),
        "path_info": request.environ.get("PATH_INFO", ""),
        "query_string": request.environ.get("QUERY_STRING", ""),
    }


@app.after_request
def _report_what_werkzeug_saw(response):
    seen = _seen()
    response.headers["X-Seen-Request-Uri"] = json.dumps(seen["request_uri"])
    response.headers["X-Seen-Path-Info"] = json.dumps(seen["path_info"])
    return response


@app.route("/public/<path:rest>")
def public(rest):
    return _text("PUBLIC:" + rest)


@app.route("/admin")
@app.route("/admin/<path:rest>")
def admin(rest=""):
    return _text("ADMIN-SECRET:" + rest)


@app.route("/__seen/", defaults={"rest": ""})
@app.route("/__seen/<path:rest>")
def seen(rest):
    return Response(json.dumps(_seen()), mimetype="application/json")


@app.route("/", defaults={"path": ""})
@app.route("/<path:path>")
def other(path):
    return _text("OTHER:" + request.path, 404)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def main():
    server = make_server("127.0.0.1", 0, app, request_handler=_QuietHandler)
    print(server.server_port, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
