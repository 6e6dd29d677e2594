"""The baseline for ``bench/barge_in.py``: a Hydra client written the way the public docs
show it, with no audio engine of its own.

* the microphone is a ``sounddevice.InputStream`` (16 kHz mono int16, 20 ms blocks) whose
  callback queues each block; a task sends it as ``input_audio_buffer.append``;
* every ``response.output_audio.delta`` is decoded and put on a ``queue.Queue``; a
  ``sounddevice.OutputStream`` at the session's output rate pulls from that queue in its
  callback (the chunk it has started is played to its end);
* barge-in as the docs prescribe: the playback queue is drained when a ``response.created``
  arrives (a new response replaces the one playing). ``speech_started`` is only logged.

The device settings are the same as hydrad's defaults (``latency="low"``, 10 ms blocks), so
the comparison measures the barge-in handling, not a bigger device buffer.

Every event of interest is written as a JSON line (``time.monotonic()`` stamps, the same
clock as the bench) to ``--events``. Runs until SIGTERM/SIGINT or ``--duration``.

    python bench/baseline_client.py --url ws://127.0.0.1:PORT/waves/v1/s2s --events ev.jsonl
"""

from __future__ import annotations

import argparse
import base64
import json
import queue
import signal
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import sounddevice as sd
import trio
import trio_websocket


class EventLog:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, ev: str, **fields: Any) -> None:
        line = json.dumps({"t": time.monotonic(), "ev": ev, **fields})
        with self.lock:
            self.f.write(line + "\n")


class Player:
    """OutputStream fed from a queue of PCM16 chunks (the docs' playback pattern)."""

    def __init__(self, rate: int, block_ms: float, latency: Any, log: EventLog) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()
        self.cur = b""
        self.log = log
        self.stream = sd.OutputStream(samplerate=rate, channels=1, dtype="int16",
                                      blocksize=int(rate * block_ms / 1000), latency=latency, callback=self._cb)
        log("output_stream", rate=rate, latency=self.stream.latency, blocksize=self.stream.blocksize)
        self.stream.start()

    def _cb(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        need = 2 * frames
        buf = bytearray()
        while len(buf) < need:
            if not self.cur:
                try:
                    self.cur = self.q.get_nowait()
                except queue.Empty:
                    break
            take = self.cur[: need - len(buf)]
            buf += take
            self.cur = self.cur[len(take):]
        n = len(buf) // 2
        outdata[:n, 0] = np.frombuffer(bytes(buf), "<i2")
        outdata[n:] = 0

    def put(self, pcm: bytes) -> None:
        self.q.put(pcm)

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.q.get_nowait()
                n += 1
            except queue.Empty:
                return n

    def close(self) -> None:
        self.stream.abort()
        self.stream.close()


def _frame(type_: str, **fields: Any) -> str:
    return json.dumps({"type": type_, "event_id": f"evt_{uuid.uuid4().hex[:12]}", **fields})


async def run(args: argparse.Namespace, log: EventLog) -> None:
    url = f"{args.url}?model={args.model}&api_key={args.api_key}"
    mic_q: queue.Queue[bytes] = queue.Queue()
    player: Player | None = None
    mic: sd.InputStream | None = None
    configured = trio.Event()
    async with trio_websocket.open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
        token = trio.lowlevel.current_trio_token()
        send_ch, recv_ch = trio.open_memory_channel[bytes](1000)

        def forward() -> None:  # a plain thread: the audio callback itself never blocks
            while True:
                block = mic_q.get()
                if block is None:
                    return
                try:
                    trio.from_thread.run_sync(send_ch.send_nowait, block, trio_token=token)
                except (trio.RunFinishedError, trio.WouldBlock, trio.ClosedResourceError):
                    pass

        threading.Thread(target=forward, daemon=True).start()

        async def uplink() -> None:
            await configured.wait()
            async for block in recv_ch:
                await ws.send_message(_frame("input_audio_buffer.append", audio=base64.b64encode(block).decode()))

        seen_delta: set[str] = set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uplink)
            try:
                while True:
                    msg = await ws.get_message()
                    t = time.monotonic()
                    obj = json.loads(msg)
                    typ = obj.get("type")
                    if typ == "session.created":
                        await ws.send_message(_frame("session.configure", session={
                            "instructions": "You are a helpful voice assistant.", "tools": [],
                            "generate_initial_response": False}))
                    elif typ == "session.configured":
                        rate = int(obj.get("session", {}).get("output_audio_sample_rate") or 24000)
                        player = Player(rate, args.block_ms, args.latency, log)
                        mic = sd.InputStream(samplerate=16000, channels=1, dtype="int16",
                                             blocksize=320, latency=args.latency,
                                             callback=lambda indata, f, ti, st: mic_q.put(bytes(indata)))
                        mic.start()
                        configured.set()
                        log("configured", rate=rate, session_id=obj.get("session_id"))
                    elif typ == "response.created":
                        rid = (obj.get("response") or {}).get("id")
                        dropped = player.drain() if player else 0
                        log("response_created", response_id=rid, t_recv=t, drained_chunks=dropped)
                    elif typ == "response.output_audio.delta":
                        rid = obj.get("response_id")
                        if player is not None:
                            player.put(base64.b64decode(obj["delta"]))
                        if rid not in seen_delta:
                            seen_delta.add(rid)
                            log("first_delta", response_id=rid, t_recv=t)
                    elif typ == "input_audio_buffer.speech_started":
                        log("speech_started", t_recv=t)
                    elif typ == "response.done":
                        resp = obj.get("response") or {}
                        log("response_done", response_id=resp.get("id"), status=resp.get("status"))
            finally:
                mic_q.put(None)  # type: ignore[arg-type]
                if mic is not None:
                    mic.abort()
                    mic.close()
                if player is not None:
                    player.close()
                nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="hydra-v1.1")
    ap.add_argument("--api-key", default="bench-key")
    ap.add_argument("--events", required=True)
    ap.add_argument("--block-ms", type=float, default=10.0)
    ap.add_argument("--latency", default="low")
    ap.add_argument("--duration", type=float, default=3600.0)
    args = ap.parse_args(argv)
    log = EventLog(args.events)

    async def guarded() -> None:
        with trio.move_on_after(args.duration):
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async with trio.open_nursery() as n:
                    n.start_soon(run, args, log)
                    async for _ in sigs:
                        n.cancel_scope.cancel()
                        break

    try:
        trio.run(guarded)
    except trio_websocket.ConnectionClosed:
        pass
    log("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
