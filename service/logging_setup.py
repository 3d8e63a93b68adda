"""Logging: plain or JSON lines, each carrying the id of the request being served (if any).

Everything the process writes goes through the one root handler: Python warnings (captured into the
`py.warnings` logger), uvicorn's loggers and transformers' (which otherwise has a handler of its own). With
JSON lines, progress bars (tqdm, Hugging Face downloads and checkpoint loading) are turned off: a bar is not a
line a log shipper can parse.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with `extra=` are kept."""

    # uvicorn adds `color_message` (its message with ANSI colour codes) to its records: not for a JSON line
    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str, json_lines: bool) -> None:
    if json_lines:
        _disable_progress_bars()
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level != "trace" else "DEBUG")
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines go through the same handler
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger, formatted like every line
    _route_transformers_logging()


def _disable_progress_bars() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # any tqdm bar (tqdm reads it when a bar is created)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub at import, if not imported yet
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # checkpoint loading; it turns off huggingface_hub's download bars too


def _route_transformers_logging() -> None:
    """transformers logs through a stream handler of its own that does not propagate: hand its lines to ours."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
