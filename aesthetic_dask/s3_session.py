"""The HTTP session behind every S3 request the project makes (through s3fs and aiobotocore).

aiobotocore's session bounds a request with socket connect and read timeouts, but botocore asks
for ``Expect: 100-continue`` on uploads, and aiohttp waits for that interim answer before it
writes the body with no timeout armed: a store that stops answering hangs every upload for ever
(measured here against a stopped S3 server; also marin-community/marin#6719). Without the header
the body is written at once and the read timeout bounds the wait for the answer. The header only
saves sending a body the store would refuse, which for this project's files costs little.
"""

from __future__ import annotations

from typing import Any

from aiobotocore.httpsession import AIOHTTPSession


class BoundedSession(AIOHTTPSession):
    """aiobotocore's session, never waiting for ``100 Continue``."""

    async def send(self, request: Any) -> Any:
        request.headers.pop("Expect", None)
        return await super().send(request)
