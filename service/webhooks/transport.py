"""One webhook POST, connected to the address the destination check resolved.

The URL's host is replaced by that address, and the request still names the host: the
`Host` header, and for https the TLS server name (SNI) and the certificate check
(httpcore's `sni_hostname` extension). No second DNS lookup happens, so a name that
rebinds between the check and the connection cannot move it. Redirects are not followed
(a 3xx is a failed attempt), proxies from the environment are ignored (the proxy, not
this check, would choose the address), and the response body is never read.
"""

from __future__ import annotations

import httpx

from service.webhooks.destination import Destination


def post(destination: Destination, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `body` to `destination`, pinned to its checked address; the status code.
    Raises httpx.HTTPError when no response came back (refused, timed out, TLS)."""
    url = httpx.URL(destination.url)
    pinned = url.copy_with(host=destination.address)
    extensions = {"sni_hostname": url.host} if destination.scheme == "https" else {}
    request_headers = {**headers, "Host": url.netloc.decode("ascii")}
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        request = client.build_request(
            "POST", pinned, content=body, headers=request_headers, extensions=extensions
        )
        response = client.send(request, stream=True)
        response.close()
        return response.status_code
