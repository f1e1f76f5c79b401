"""A small blocking HTTP client for the management API (stdlib only, so the CLI starts fast)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ApiError(Exception):
    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but sends the bearer token only to the origin it was meant for:
    urllib copies every header onto the redirected request."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_TokenStaysHome)


class ApiClient:
    def __init__(self, base_url: str, timeout: float = 120.0, *, token: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.token = token

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with _opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                message = err["message"]
                if e.code == 401:
                    hint = "use --token-file FILE, or set BLOCKVIRT_API_TOKEN or BLOCKVIRT_API_TOKEN_FILE"
                    message = (
                        f"{message} ({hint})" if not self.token else f"{message} (the token was refused)"
                    )
                raise ApiError(message, e.code, err.get("code", "")) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(f"HTTP {e.code}: {raw[:200].decode(errors='replace')}", e.code) from None
        except urllib.error.URLError as e:
            raise ApiError(
                f"cannot reach the blockvirt API at {self.base}: {e.reason} (is `blockvirt serve` running?)"
            ) from None
        except TimeoutError:
            # Sent, and no answer in time: the server took the request and may still run it.
            raise ApiError(
                f"the blockvirt API at {self.base} did not answer within {self.timeout:g} s; "
                "the request may still be running there (see the server's log)"
            ) from None
        except ConnectionError as e:
            raise ApiError(f"cannot reach the blockvirt API at {self.base}: {e}") from None
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
