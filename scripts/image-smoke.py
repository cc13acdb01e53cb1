#!/usr/bin/env python3
"""`make image-smoke`: the image, run the way the chart runs it. Renders the chart
for an external backbone (a real nats-server -js and redis-server started here on
free loopback ports), mounts the rendered switchyard.toml and passes the rendered
environment into a gateway container and a feed container (read-only root, no
capabilities, the image's non-root user), then checks /readyz, a WebSocket
connect, a client publish received back, and a price tick from the feed.

Usage: image-smoke.py IMAGE NATS_SERVER REDIS_SERVER   (HELM, PODMAN name the tools)"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chart_render as chart  # noqa: E402

PODMAN = os.environ.get("PODMAN", "podman")
TIMEOUT = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, what, proc_check):
    deadline = time.monotonic() + TIMEOUT
    last = None
    while time.monotonic() < deadline:
        proc_check()
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return json.load(r)
        except Exception as e:  # not up yet: refused, 503 while connecting
            last = e
        time.sleep(0.2)
    raise SystemExit(f"image-smoke: {what} not ready at {url} within {TIMEOUT}s: {last}")


def podman_run(image, name, cfg, env, args, extra_env):
    cmd = [PODMAN, "run", "-d", "--name", name, "--network", "host", "--read-only",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "-v", f"{cfg}:/etc/switchyard/switchyard.toml:ro"]
    for k, v in {**env, **extra_env}.items():
        cmd += ["-e", f"{k}={v}"]
    out = subprocess.run(cmd + [image, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"image-smoke: podman run {name}: {out.stderr.strip()}")
    return name


def running(name):
    def check():
        state = subprocess.run([PODMAN, "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
        if state.stdout.strip() != "true":
            logs = subprocess.run([PODMAN, "logs", name], capture_output=True, text=True)
            raise SystemExit(f"image-smoke: container {name} stopped:\n{logs.stdout}{logs.stderr}")
    return check


async def exchange(port, token):
    uri = f"ws://127.0.0.1:{port}/ws"
    async with websockets.connect(uri, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        async def until(pred, what):
            async def read():
                while True:
                    frame = json.loads(await ws.recv())
                    if pred(frame):
                        return frame
            try:
                return await asyncio.wait_for(read(), TIMEOUT)
            except asyncio.TimeoutError:
                raise SystemExit(f"image-smoke: no {what} within {TIMEOUT}s")

        welcome = await until(lambda f: f["type"] == "welcome", "welcome")
        await ws.send(json.dumps({"type": "subscribe", "channel": "chat.room.smoke", "id": 1}))
        await until(lambda f: f["type"] == "subscribed" and f["id"] == 1, "subscribed")
        await ws.send(json.dumps({"type": "publish", "channel": "chat.room.smoke", "data": {"text": "through the image"}, "id": 2}))
        msg = await until(lambda f: f["type"] == "msg" and f["channel"] == "chat.room.smoke", "msg")
        assert msg["data"] == {"text": "through the image"}, msg
        await ws.send(json.dumps({"type": "subscribe", "channel": "prices.BTC-USDT", "id": 3}))
        tick = await until(lambda f: f["type"] == "msg" and f["channel"] == "prices.BTC-USDT", "price tick from the feed")
        return welcome, msg, tick


def main():
    image, nats_server, redis_server = sys.argv[1:4]
    procs, containers = [], []
    tag = f"sy-smoke-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            nats_port, redis_port, gw_port, feed_port = (free_port() for _ in range(4))
            procs.append(subprocess.Popen([nats_server, "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", os.path.join(tmp, "js")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            code, docs, _, err = chart.render(sets=[
                "nats.enabled=false", "valkey.enabled=false", "autoscaling.enabled=false", "replicaCount=1",
                f"externalNats.url=nats://127.0.0.1:{nats_port}", f"externalRedis.url=redis://127.0.0.1:{redis_port}",
                "auth.hmacSecret=smoke-test-hmac-secret-0123456789", "api.key=smoke-test-api-key-0123",
            ])
            if code != 0:
                raise SystemExit(f"image-smoke: helm template: {err}")
            # Paths stay /etc/switchyard/...: the containers mount the files there.
            gw_cfg, gw_env = chart.materialize(docs, "sy-switchyard", os.path.join(tmp, "gateway"), rewrite=False)
            feed_cfg, feed_env = chart.materialize(docs, "sy-switchyard-feed", os.path.join(tmp, "feed"), rewrite=False)
            for d in ("gateway", "feed"):
                os.chmod(os.path.join(tmp, d), 0o755)
                os.chmod(os.path.join(tmp, d, "switchyard.toml"), 0o644)
            os.chmod(tmp, 0o755)
            # Host networking: the ports are the only change to the rendered config.
            containers.append(podman_run(image, f"{tag}-gateway", gw_cfg, gw_env, ["serve"],
                                         {"SWITCHYARD_SERVER__LISTEN": f"127.0.0.1:{gw_port}"}))
            containers.append(podman_run(image, f"{tag}-feed", feed_cfg, feed_env, ["feed"],
                                         {"SWITCHYARD_FEED__LISTEN": f"127.0.0.1:{feed_port}"}))
            ready = wait_ready(f"http://127.0.0.1:{gw_port}/readyz", "gateway", running(containers[0]))
            wait_ready(f"http://127.0.0.1:{feed_port}/readyz", "feed", running(containers[1]))
            print(f"image-smoke: gateway ready: {ready}")
            token = subprocess.run([PODMAN, "run", "--rm", "--read-only", "-v", f"{gw_cfg}:/etc/switchyard/switchyard.toml:ro",
                                    "-e", f"SWITCHYARD_AUTH__HMAC_SECRET={gw_env['SWITCHYARD_AUTH__HMAC_SECRET']}",
                                    image, "token", "--user", "smoke", "--caps", "chat.>=sub+pub+history+presence"],
                                   capture_output=True, text=True)
            if token.returncode != 0:
                raise SystemExit(f"image-smoke: token: {token.stderr}")
            welcome, msg, tick = asyncio.run(exchange(gw_port, token.stdout.strip()))
            print(f"image-smoke: connected to node {welcome['node']}; published and received seq {msg['seq']}; "
                  f"feed tick seq {tick['seq']}: {json.dumps(tick['data'])[:80]}")
            print("image-smoke: passed")
        finally:
            for c in containers:
                subprocess.run([PODMAN, "rm", "-f", "-t", "5", c], capture_output=True)
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


if __name__ == "__main__":
    main()
