"""The benchmark's answer checks: a 200 with a wrong body fails the run (ab alone would count it a success)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench import check


def _ours(body: dict, ok: bool = True) -> bytes:
    return json.dumps({"header": {"resultCode": 0, "resultMessage": "SUCCESS", "isSuccessful": ok},
                       "body": body}).encode()


def test_checks_accept_the_right_answer_and_name_what_is_wrong():
    c = check.Client()
    secret = check.ours_value("secret", "s" * 1024)
    assert secret(c, 200, _ours({"secret": "s" * 1024})) is None
    assert "secret differs" in secret(c, 200, _ours({"secret": "s" * 1023 + "t"}))
    assert "s" * 20 not in secret(c, 200, _ours({"secret": "x" * 1024}))       # no value in the reason
    assert secret(c, 200, _ours({"secret": "s" * 1024}, ok=False)) is not None
    assert secret(c, 500, b"oops") == "HTTP 500"
    assert "not JSON" in secret(c, 200, b"<html>")
    assert "shape" in secret(c, 200, _ours({"value": "s"}))
    bao = check.bao_secret("v")
    assert bao(c, 200, json.dumps({"data": {"data": {"value": "v"}}}).encode()) is None
    assert bao(c, 200, json.dumps({"data": {"data": {"value": "w"}}}).encode()) is not None


class _Wrong(BaseHTTPRequestHandler):
    """Answers every request 200 with a body that is not the expected one."""
    body = _ours({"secret": "not the secret"})

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_a_sampler_counts_wrong_answers_from_a_real_server():
    from bench.load import Request
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Wrong)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/secrets/x"
        s = check.Sampler(check.Client(), Request(url), check.ours_value("secret", "the secret"), 0.2,
                          samples=3).start()
        s.join()
        assert s.attempted == s.checked == 3 and len(s.failures) == 3
        assert all("secret differs" in f for f in s.failures)
        _Wrong.body = _ours({"secret": "the secret"})
        s = check.Sampler(check.Client(), Request(url), check.ours_value("secret", "the secret"), 0.2,
                          samples=3).start()
        s.join()
        assert s.checked == 3 and s.failures == []
    finally:
        srv.shutdown()
        srv.server_close()
