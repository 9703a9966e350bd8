"""One conditional GET of a provider's URL: the only code that talks to upstreams, and the only
place httpx errors exist (they become ``UpstreamError`` here).

Redirects are followed by hand: configured headers (API keys) go to the configured origin only,
and https is never downgraded to http. The body is decoded while it streams and cut at
``max_bytes``; the whole fetch runs under one deadline, ``provider.timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import httpx

from .decoding import BodyDecoder
from .errors import UpstreamError
from .provider_settings import ProviderSettings

__all__ = ["Fetched", "fetch", "parse_retry_after", "read_body"]

MAX_RETRY_AFTER = 3600.0
MAX_REDIRECTS = 5

# (body, content type, the document's URL without its query, (ETag, Last-Modified)), or None for 304.
Fetched = tuple[bytes, str | None, str, tuple[str | None, str | None]] | None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), capped at 1 hour."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


async def read_body(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, refusing more than ``limit`` decoded bytes without ever holding more."""
    decoder = BodyDecoder(response.headers.get("content-encoding", "identity"), limit)
    declared = response.headers.get("content-length", "")
    if decoder.encoding == "identity" and declared.isdigit() and int(declared) > limit:
        raise UpstreamError("too_large", f"body of {declared} bytes is over max_bytes ({limit})")
    parts = [decoder.feed(raw) async for raw in response.aiter_raw()]
    decoder.finish()
    return b"".join(parts)


async def fetch(
    client: httpx.AsyncClient,
    provider: ProviderSettings,
    url: str,
    validators: tuple[str | None, str | None],
    clock: Callable[[], float],
    clean: Callable[[str], str],
) -> Fetched:
    """GET ``url`` with the provider's headers and the validators of the last good body;
    ``clean`` removes secrets from any message that could carry them."""
    try:
        async with asyncio.timeout(provider.timeout):
            return await _get(client, provider, url, validators, clock)
    except TimeoutError:
        raise UpstreamError("timeout", f"no complete answer within {provider.timeout:g} s") from None
    except httpx.TimeoutException as exc:
        raise UpstreamError("timeout", f"timed out ({type(exc).__name__})") from None
    except httpx.ConnectError as exc:
        raise UpstreamError("connect", f"cannot connect ({clean(str(exc)) or 'refused'})") from None
    except httpx.HTTPError as exc:
        raise UpstreamError("connect", f"{type(exc).__name__}: {clean(str(exc))}") from None


async def _get(
    client: httpx.AsyncClient,
    provider: ProviderSettings,
    url_text: str,
    validators: tuple[str | None, str | None],
    clock: Callable[[], float],
) -> Fetched:
    """GET with conditional headers, following redirects by hand: configured headers (API
    keys) go to the configured origin only, and https is never downgraded to http."""
    url = httpx.URL(url_text).copy_merge_params(dict(provider.params))  # the query in `url` stays; params add to it
    origin = (url.scheme, url.host, url.port)
    for _ in range(MAX_REDIRECTS + 1):
        headers = {"Accept-Encoding": "gzip, deflate"}
        if (url.scheme, url.host, url.port) == origin:
            headers.update(provider.headers)
            etag, last_modified = validators
            if etag:
                headers["If-None-Match"] = etag
            if last_modified:
                headers["If-Modified-Since"] = last_modified
        async with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if response.has_redirect_location:
                target = url.join(response.headers.get("location", ""))
                if url.scheme == "https" and target.scheme != "https":
                    raise UpstreamError("status", f"HTTP {status}: refusing a redirect from https to {target.scheme}")
                url = target
                continue
            if status == 304:
                return None
            if status in (429, 503):
                wait = parse_retry_after(response.headers.get("retry-after"), clock())
                kind = "rate_limited" if status == 429 else "status"
                said = f", Retry-After {wait:.0f} s" if wait is not None else ""
                raise UpstreamError(kind, f"HTTP {status}{said}", retry_after=wait)
            if not 200 <= status < 300:
                raise UpstreamError("status", f"HTTP {status} {response.reason_phrase}".strip())
            body = await read_body(response, provider.max_bytes)
            found = (response.headers.get("etag"), response.headers.get("last-modified"))
            # Relative links resolve against the document's URL, never with its query (keys).
            location = str(url.copy_with(query=None, fragment=None))
            return body, response.headers.get("content-type"), location, found
    raise UpstreamError("status", f"more than {MAX_REDIRECTS} redirects")

