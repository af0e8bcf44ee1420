"""Aggregate generation throughput of ``mlx-openelm serve`` against ``mlx_lm.server`` on the same converted folder
(a random OpenELM-270M, bfloat16), at 1, 4 and 8 concurrent clients, in one run.

Both servers run at once on localhost ports (the idle one waits); for each concurrency the two are driven in
alternating rounds: every client sends greedy ``/v1/completions`` requests of ``--tokens`` tokens back to back,
and the figure is generated tokens (from each response's ``usage``) over the wall time of the round.

    python benchmarks/serve_load.py [--tokens 32] [--requests 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_openelm import random_model, save
from mlx_openelm.bench import write_json
from mlx_openelm.device import device_info
from mlx_openelm.tokenizer_fetch import ensure_tokenizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
            try:
                complete(port, 2)
                return proc
            except urllib.error.HTTPError as e:  # up but failing: no point waiting
                raise RuntimeError(f"{cmd[0]} answered {e.code}: {log.read_text()[-2000:]}") from None
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def complete(port: int, tokens: int) -> int:
    """One greedy completion; the tokens it generated."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": tokens,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def load_round(port: int, clients: int, requests: int, tokens: int) -> float:
    """Generated tokens per second over ``clients`` clients sending ``requests`` requests each."""
    tic = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        counts = list(pool.map(lambda _: sum(complete(port, tokens) for _ in range(requests)), range(clients)))
    return sum(counts) / (time.perf_counter() - tic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", default="1,4,8")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = save(random_model("OpenELM-270M", dtype="bfloat16"), tmp / "model")
        # Both servers need OpenELM's own tokenizer (32000 pieces, every id the model can emit): Meta's file as
        # `convert` gets it (the user cache, else rebuilt from a public package), with tokenizer.json for mlx-lm.
        ensure_tokenizer(folder)
        ours_port, theirs_port = free_port(), free_port()
        commands = {
            "mlx-openelm": ([str(BIN / "mlx-openelm"), "serve", "-m", str(folder), "--port", str(ours_port),
                             "--max-batch", "8"], ours_port),
            "mlx_lm.server": ([str(BIN / "mlx_lm.server"), "--model", str(folder), "--port", str(theirs_port)],
                              theirs_port),
        }
        record: dict = {"model": "random OpenELM-270M bfloat16", "tokens_per_request": args.tokens,
                        "requests_per_client": args.requests, "rounds": args.rounds, "device": device_info(),
                        "runs": {}}
        servers: dict = {}
        try:
            for name, (cmd, port) in commands.items():
                servers[name] = (start(cmd, port, tmp / f"{name}.log"), port)
            for clients in (int(c) for c in args.clients.split(",")):
                rates = {name: [] for name in servers}
                for r in range(args.rounds):
                    for name in list(servers)[:: 1 if r % 2 == 0 else -1]:
                        rates[name].append(load_round(servers[name][1], clients, args.requests, args.tokens))
                median = {name: statistics.median(v) for name, v in rates.items()}
                record["runs"][str(clients)] = {"tokens_per_second": rates, "median": median,
                                                "ratio": median["mlx-openelm"] / median["mlx_lm.server"]}
                print(f"{clients} clients: ours {median['mlx-openelm']:.2f} tok/s, mlx_lm.server "
                      f"{median['mlx_lm.server']:.2f} tok/s, ratio {record['runs'][str(clients)]['ratio']:.2f}",
                      flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    print(f"wrote {write_json(RESULTS / 'serve_load.json', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
