"""Structured logs: JSON lines with their context, secrets redacted."""

from __future__ import annotations

import json
import logging

from bot.logs import JsonFormatter, log_context


def test_log_lines_are_json_with_context_and_no_secrets():
    formatter = JsonFormatter(["hunter2-webhook-secret", "line of a\\pem"])
    logger = logging.getLogger("deploybot.test")
    record = logger.makeRecord("deploybot.test", logging.ERROR, __file__, 1,
                               'bad token %s near "line of a\\pem"', ("hunter2-webhook-secret",), None)
    with log_context(delivery="d-1", repo="acme/infra", pr=7, run=None):
        line = formatter.format(record)
    entry = json.loads(line)
    assert entry["delivery"] == "d-1" and entry["repo"] == "acme/infra" and entry["pr"] == 7
    assert "run" not in entry
    assert "hunter2" not in line and "pem" not in line
    assert entry["msg"].startswith("bad token ***")
    outside = json.loads(formatter.format(record))
    assert "delivery" not in outside
