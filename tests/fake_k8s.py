"""A loopback HTTP server that answers the few Kubernetes API calls `cmevlm submit` makes:
create ConfigMaps, ServiceAccounts, Roles, RoleBindings, NetworkPolicies and RayJobs (201, or
409 when the name exists), get a RayJob (its status moves RUNNING -> SUCCEEDED), and can
pretend the CRD is missing (404) or access is denied (403)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CM = re.compile(r"^/(api/v1|apis/rbac\.authorization\.k8s\.io/v1|apis/networking\.k8s\.io/v1)/namespaces/(?P<ns>[^/]+)/"
                r"(configmaps|serviceaccounts|roles|rolebindings|networkpolicies)$")
RJ = re.compile(r"^/apis/ray\.io/v1/namespaces/(?P<ns>[^/]+)/rayjobs(?:/(?P<name>[^/?]+))?$")


class FakeK8s:
    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.mode = "ok"  # ok | no-crd | forbidden
        self.polls: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code, reason):
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                path = self.path.split("?")[0]
                fake.requests.append(("POST", path))
                m = CM.match(path) or RJ.match(path)
                if not m:
                    return self._status(404, "NotFound")
                if fake.mode == "forbidden":
                    return self._status(403, "Forbidden")
                if fake.mode == "no-crd" and RJ.match(path):
                    return self._status(404, "NotFound")
                key = (path, body["metadata"]["name"])
                if key in fake.objects:
                    return self._status(409, "AlreadyExists")
                fake.objects[key] = body
                self._send(201, body)

            def do_GET(self):
                path = self.path.split("?")[0]
                fake.requests.append(("GET", path))
                m = RJ.match(path)
                if not m or not m["name"]:
                    return self._status(404, "NotFound")
                coll = path.rsplit("/", 1)[0]
                obj = fake.objects.get((coll, m["name"]))
                if obj is None:
                    return self._status(404, "NotFound")
                n = fake.polls[m["name"]] = fake.polls.get(m["name"], 0) + 1
                status = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"} if n < 3 else {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
                self._send(200, {**obj, "status": status})

        return H
