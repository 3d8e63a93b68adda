"""Python client and CLI for the adapter service; it needs only httpx (no torch, no server code).

    from adapter_client import AdapterServiceClient

    with AdapterServiceClient("http://127.0.0.1:8000") as client:
        client.upload_adapter(Path("my-adapter"), adapter_id="my-adapter")
        print(client.generate("Hello", adapter_id="my-adapter").text)

The CLI: `python -m adapter_client adapters upload|list|activate|delete` and `generate` (also served by
`python -m service`).
"""

from .client import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    ActiveResult,
    AdapterInfo,
    AdapterList,
    AdapterServiceClient,
    AsyncAdapterServiceClient,
    DeleteResult,
    GenerateResult,
    Health,
    ProgressCallback,
    ServiceConnectionError,
    ServiceError,
    StreamEnd,
    StreamEvent,
    TokenEvent,
    Usage,
)

__all__ = [
    "ActiveResult", "AdapterInfo", "AdapterList", "AdapterServiceClient", "AsyncAdapterServiceClient",
    "DEFAULT_TIMEOUT_S", "DEFAULT_URL", "DeleteResult", "GenerateResult", "Health", "ProgressCallback",
    "ServiceConnectionError", "ServiceError", "StreamEnd", "StreamEvent", "TokenEvent", "Usage",
]
