"""Starts N processes of one command on this machine, as N hosts would run it.

  python -m hetflow.launch --processes=2 -- \\
      python -m experiments.generate --config=configs/default.py --config.mesh.model=2

Each process gets $HETFLOW_COORDINATOR (127.0.0.1 and a free port),
$HETFLOW_NUM_PROCESSES and $HETFLOW_PROCESS_ID, which hetflow.distributed.initialize
reads; its output lines are prefixed with "[p<id>] ". `--cpus=0,1` pins process
i to CPU cpus[i] (one core each, as one core per host). If one process fails,
the others are stopped. The exit status is the first nonzero one, else 0.
On several hosts, run the command once per host instead (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

from hetflow import distributed


def free_port() -> int:
  """A TCP port nobody listens on now, for the coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()


def launch(command: list[str], processes: int, cpus: list[int] | None = None,
           port: int | None = None, out=sys.stdout) -> int:
  """Runs `command` as `processes` processes of one group and waits for them.

  Args:
    command: the program and its arguments.
    processes: how many.
    cpus: CPU for each process (len == processes), or None (no pinning).
    port: the coordinator's port (default: a free one).
    out: where the prefixed output goes.

  Returns:
    The first nonzero exit status, else 0.
  """
  if not command:
    raise SystemExit("error: no command; pass it after `--`.")
  if processes < 1:
    raise SystemExit(f"error: --processes={processes}; expected >= 1.")
  if cpus is not None and len(cpus) != processes:
    raise SystemExit(f"error: --cpus names {len(cpus)} CPU(s) for {processes} processes;"
                     " give one per process.")
  coordinator = f"127.0.0.1:{port or free_port()}"
  procs, pumps = [], []
  for i in range(processes):
    env = dict(os.environ, **{distributed.ENV_COORDINATOR: coordinator,
                              distributed.ENV_NUM_PROCESSES: str(processes),
                              distributed.ENV_PROCESS_ID: str(i)})
    pin = None if cpus is None else (lambda cpu=cpus[i]: os.sched_setaffinity(0, {cpu}))
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         preexec_fn=pin)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
    t.start()
    pumps.append(t)
  status = 0
  try:
    pending = list(procs)
    while pending:
      for p in list(pending):
        try:
          rc = p.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
          continue
        pending.remove(p)
        if rc and not status:
          status = rc
          for other in pending:  # the group cannot finish without it
            other.send_signal(signal.SIGTERM)
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      p.wait()
    status = 130
  for t in pumps:
    t.join(timeout=5)
  return status


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    raise SystemExit("usage: python -m hetflow.launch --processes=N [--cpus=0,1] -- command ...")
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m hetflow.launch")
  parser.add_argument("--processes", type=int, required=True, help="processes to start")
  parser.add_argument("--cpus", default="", help="CPU per process, e.g. 0,1 (default: unpinned)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: free)")
  args = parser.parse_args(argv[:split])
  try:
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None
  except ValueError:
    raise SystemExit(f"error: --cpus={args.cpus!r}; expected CPU numbers such as 0,1.") from None
  return launch(argv[split + 1:], args.processes, cpus, args.port or None)


if __name__ == "__main__":
  sys.exit(main())
