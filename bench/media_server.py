"""A stand-in for Twilio's recording media endpoint, as its own process, for benchmarks.

    python bench/media_server.py PORT ACCOUNT_SID AUTH_TOKEN

Serves every recording of the account as a small mp3, behind HTTP Basic auth.
"""

from __future__ import annotations

import base64
import sys

from aiohttp import web

AUDIO = b"ID3\x04\x00\x00\x00\x00\x00\x00" + (b"\xff\xfb\x90\x00" + bytes(413)) * 4


def main() -> None:
    port, account, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    expected = "Basic " + base64.b64encode(f"{account}:{token}".encode()).decode()

    async def recording(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            return web.json_response({"code": 20003}, status=401)
        return web.Response(body=AUDIO, content_type="audio/mpeg")

    app = web.Application()
    app.router.add_get(f"/2010-04-01/Accounts/{account}/Recordings/{{sid}}.mp3", recording)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
