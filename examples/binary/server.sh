#!/usr/bin/env bash
# A web server with no build step: netcat-openbsd answers each connection
# with a fixed response. Pushed with a Procfile, it stages with the binary
# buildpack.
set -u
body="hello from binary"
while true; do
	printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s\n' \
		$((${#body} + 1)) "$body" | nc -l -N 0.0.0.0 "$PORT" >/dev/null || sleep 0.1
done
