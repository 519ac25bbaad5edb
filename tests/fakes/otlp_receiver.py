"""A minimal OTLP/HTTP trace receiver, run as a real process by the tracing tests and benchmark.

python -m tests.fakes.otlp_receiver --port 4318 [--count-only]
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_RESPONSE = ExportTraceServiceResponse().SerializeToString()


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


class Receiver:
    """POST /v1/traces decodes an ExportTraceServiceRequest (protobuf, gzip or not) with opentelemetry-proto;
    GET /_control/spans lists the spans as JSON (hex ids, plain attribute values, service.name), GET
    /_control/stats counts them (in all and by service), POST /_control/reset forgets them. --count-only
    keeps the counts alone (for load)."""

    def __init__(self, count_only: bool) -> None:
        self.count_only = count_only
        self.reset()

    def reset(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.exports = 0
        self.span_count = 0
        self.by_service: Counter[str] = Counter()

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.exports += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.span_count += len(scope_spans.spans)
                self.by_service[str(resource.get("service.name"))] += len(scope_spans.spans)
                if self.count_only:
                    continue
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "events": [e.name for e in span.events],
                            "status": {"code": span.status.code, "message": span.status.message},
                            "service": resource.get("service.name"),
                            "scope": scope_spans.scope.name,
                        }
                    )
        return web.Response(body=_RESPONSE, content_type="application/x-protobuf")

    async def list_spans(self, _request: web.Request) -> web.Response:
        return web.json_response(self.spans)

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"exports": self.exports, "spans": self.span_count, "by_service": self.by_service})

    async def reset_handler(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def build_app(count_only: bool = False) -> web.Application:
    receiver = Receiver(count_only)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", receiver.traces)
    app.router.add_get("/_control/spans", receiver.list_spans)
    app.router.add_get("/_control/stats", receiver.stats)
    app.router.add_post("/_control/reset", receiver.reset_handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-only", action="store_true", help="keep counts, not spans")
    args = parser.parse_args()
    web.run_app(build_app(args.count_only), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
