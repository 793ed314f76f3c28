"""The benchmark's report: the markdown table and the plots.

Every label states what happened, not what was asked for: whether the
strategy's reads went through the page cache comes from its reader's own
record (direct and buffered requests, fallbacks) and the bytes the process
really read (/proc/self/io); whether the disk probe was O_DIRECT from the
probe's reader.
"""

from __future__ import annotations

from typing import Any

from hetflow.memory.budget import format_bytes

GB = 1e9


def reads_label(reads: dict[str, Any] | None, proc_read_bytes: int | None = None) -> str:
  """The "page cache" cell of one row, from the reader's record of the measured run.

  Args:
    reads: as `runner.strategy_facts` returns it under "reads" (bytes,
      requests, direct_requests, buffered_requests, fallbacks); None: the
      strategy has no file reader.
    proc_read_bytes: bytes the process fetched from storage during the run
      (/proc/self/io), or None / negative if unknown.

  Returns:
    "no (O_DIRECT, N requests)", "yes: buffered (B of N requests); ..." or
    "n/a (no disk reads)".
  """
  if not reads or not reads.get("requests"):
    return "n/a (no disk reads)"
  requests, buffered = int(reads["requests"]), int(reads["buffered_requests"])
  if not buffered:
    return f"no (O_DIRECT, {requests} requests)"
  label = f"yes: buffered ({buffered} of {requests} requests)"
  if proc_read_bytes is not None and proc_read_bytes >= 0:
    label += (f"; {format_bytes(proc_read_bytes)} of {format_bytes(reads['bytes'])}"
              " from the disk")
  fallbacks = reads.get("fallbacks") or ()
  if fallbacks:
    label += f"; fallback: {fallbacks[0]}" + (f" (+{len(fallbacks) - 1})"
                                              if len(fallbacks) > 1 else "")
  return label


def disk_probe_label(disk: dict[str, Any]) -> str:
  """How the disk probes read, from their own results: O_DIRECT, or buffered after a cache drop."""
  directs = disk.get("direct_all") or [disk.get("direct")]
  if all(d is True for d in directs):
    return "cold O_DIRECT"
  return (f"BUFFERED (O_DIRECT refused; page cache dropped with {disk.get('cache_drop')},"
          " so these may be page-cache figures)")


def markdown(results: dict[str, Any]) -> str:
  """The results table, with the probes and the machine above it."""
  m, p, cfg = results["machine"], results["probes"], results["config"]
  lines = [
      f"# Benchmark: {cfg['model'].get('checkpoint') or cfg['model']['name']}"
      f" ({cfg['model']['dtype']}), prompt {cfg['prompt_tokens']}, {cfg['new_tokens']} new tokens",
      "",
      f"- machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {format_bytes(m.get('mem_total'))};"
      f" {m['date']}; load average {m['loadavg'][0]:.2f} before, {m['loadavg_after'][0]:.2f}"
      " after (other work on the machine makes times noisy)",
      f"- probes (same run): disk {p['disk']['bytes_per_s'] / GB:.2f} GB/s"
      f" {disk_probe_label(p['disk'])} over"
      f" layer files of the store, best of {len(p['disk']['bytes_per_s_all'])} probes (at the"
      f" start and after each row: {', '.join(f'{b / GB:.2f}' for b in p['disk']['bytes_per_s_all'])};"
      f" cache drop: {p['disk']['cache_drop']});"
      f" memory {p['memory']['bytes_per_s'] / GB:.1f} GB/s (XLA f32 matvec);"
      f" host->device {p['host_to_device']['bytes_per_s'] / GB:.2f} GB/s",
      f"- budget: {cfg.get('budget')}; memory limit: {cfg.get('memory_limit') or 'none'}",
      "- fraction_of_limit = (streamed bytes / disk or link bandwidth + resident bytes / memory"
      " bandwidth) / measured decode time per token; for sparse rows (which report their"
      " requests and the records they computed): max(disk bytes / the disk's rate at their"
      " request size, (records computed + attention and head) / the matvec rate) / measured;"
      " disk busy = fraction of"
      " decode time with one of the strategy's reads in progress (1.0: the disk never waited"
      " for hetflow)",
  ]
  if p.get("small_reads"):
    lines.append(
        "- small reads (same disk, random page-aligned requests, after the rows, best depth): "
        + "; ".join(f"{format_bytes(int(size))} {q['bytes_per_s'] / GB:.2f} GB/s (depth"
                    f" {q['depth']})" for size, q in p["small_reads"].items()))
  lines += [
      "",
      "| system | TTFT s | decode tok/s | fraction of limit | weights GB/token | disk busy |"
      " disk GB/token | h2d GB/token |"
      " read per token (proc) | peak device | peak host | peak RSS | disk GB/s achieved |"
      " disk GB/s probed after | reads via page cache (reader's record) | tokens = first |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["systems"]:
    if not r.get("ok"):
      lines.append(f"| {r['name']} | {'' if r.get('skipped') else 'failed: '}{r['error'][:120]} |"
                   + " |" * 14)
      continue
    ledger = r.get("peak_ledger") or {}
    bw = r.get("disk_bw_achieved")
    busy = "-" if r.get("disk_busy") is None else f"{r['disk_busy']:.2f}"
    lines.append(
        f"| {r['name']} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.3f} |"
        f" {r['fraction_of_limit']:.2f} | {r['touched_bytes'] / GB:.3f} |"
        f" {busy} |"
        f" {r.get('disk_bytes_per_token', 0) / GB:.3f} |"
        f" {r.get('host_to_device_bytes_per_token', 0) / GB:.3f} |"
        f" {format_bytes(r.get('proc_read_bytes', 0) / max(1, r['new_tokens']))} |"
        f" {format_bytes(ledger['device']) if 'device' in ledger else '-'} |"
        f" {format_bytes(ledger['host']) if 'host' in ledger else '-'} |"
        f" {format_bytes(r['peak_rss'])} | {f'{bw / GB:.2f}' if bw else '-'} |"
        f" {r['disk_probe_after'] / GB:.2f} |"
        f" {r.get('page_cache', '?')} | {_agreement(r)} |")
  lines += _sparse_limits(results["systems"])
  t = results.get("timeline")
  if t:
    lines += ["", f"timeline.png: {'written' if t.get('ok') else 'failed: ' + t.get('error', '')}"]
  return "\n".join(lines) + "\n"


def _sparse_limits(systems: list[dict[str, Any]]) -> list[str]:
  """The sparse rows' limits, term by term (`runner._sparse_limit`), and the serial floor:
  a layer's reads and records wait for its attention's output, so unless a guess starts
  the reads earlier, no schedule beats the fixed region's compute (attention, head) plus
  the larger of the disk's time and the records' compute. Beside them, the CPU seconds the
  generating thread spent per token (its Python, dispatches and syscalls): on a machine
  with few cores that work runs mostly in series with the device's."""
  rows = [r for r in systems if r.get("ok") and r.get("limit_kind") == "sparse"]
  if not rows:
    return []
  lines = ["", "Sparse rows: limit = max(disk, records + fixed); serial floor = fixed +"
           " max(disk, records), the fixed region (attention, head) being what a layer's"
           " reads wait for", "",
           "| system | request | disk s/token | compute s/token (records + fixed) |"
           " serial floor s/token | measured s/token | x limit | x serial floor |"
           " host thread CPU s/token |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    measured = r["decode_s_per_token"]
    host = r.get("host_cpu_s_per_token")
    lines.append(
        f"| {r['name']} | {format_bytes(r['request_bytes']) if r['request_bytes'] else '-'} |"
        f" {r['sparse_disk_s_per_token']:.3f} |"
        f" {r['sparse_compute_s_per_token']:.3f} ({r['sparse_fixed_s_per_token']:.3f} fixed) |"
        f" {r['sparse_serial_s_per_token']:.3f} | {measured:.3f} |"
        f" {measured / r['limit_s_per_token']:.2f} |"
        f" {measured / r['sparse_serial_s_per_token']:.2f} |"
        f" {'-' if host is None else f'{host:.3f}'} |")
  return lines


def _agreement(r: dict[str, Any]) -> str:
  """The "tokens = first" cell: yes, or how many tokens from the start agree."""
  if r.get("tokens_match_first") is None:
    return "?"
  if r["tokens_match_first"]:
    return "yes"
  return f"first {r.get('tokens_agree_first', 0)} of {len(r['tokens'][0])}"


def summary_line(r: dict[str, Any]) -> str:
  """One line per row for the console: its headline figures, or why it failed."""
  if not r.get("ok"):
    return f"{r['name']}: {'' if r.get('skipped') else 'FAILED '}{r['error']}"
  return (f"{r['name']}: ttft {r['ttft_s']:.2f} s, decode {r['decode_tok_s']:.3f} tok/s,"
          f" {r['fraction_of_limit']:.2f} of the limit")


def plot_decode(results: dict[str, Any], path: str) -> None:
  """A bar per system: decode tok/s, in the config's order (an ablation's steps
  read left to right). Fractions of the limit stay in the table: the limit
  assumes dense streaming, which sparse strategies beat by design."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in results["systems"] if r.get("ok")]
  fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows)), 3.2))
  bars = ax.bar([r["name"] for r in rows], [r["decode_tok_s"] for r in rows],
                color=["tab:blue" if r["kind"] == "hetflow" else "tab:gray" for r in rows])
  for bar, r in zip(bars, rows):
    ax.annotate(f"{r['decode_tok_s']:.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=7)
  ax.set_ylabel("decode tok/s")
  ax.set_title(f"{results['config']['model'].get('name', '')}: decode (grey: peers)", fontsize=9)
  ax.tick_params(axis="x", labelsize=7, rotation=20)
  ax.margins(y=0.25)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_step(events, origin: float, path: str, title: str = "") -> None:
  """One lane per kind (read, transfer, wait, compute), one labelled bar per layer.

  The engine's compute interval starts before its fetch; the part spent
  waiting for the block (the strategy's "wait" event) is drawn in its own lane.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lanes = ["read", "transfer", "wait", "compute"]
  colors = {"read": "tab:orange", "transfer": "tab:blue", "wait": "tab:red",
            "compute": "tab:green"}
  waits = {e.layer: e.end for e in events if e.kind == "wait"}
  fig, ax = plt.subplots(figsize=(14, 3.2))
  span = max((e.end for e in events), default=origin) - origin
  for e in events:
    if e.kind not in lanes:
      continue
    start = max(e.start, waits.get(e.layer, e.start)) if e.kind == "compute" else e.start
    width = (e.end - start) * 1e3
    y = lanes.index(e.kind)
    ax.barh(y, width, left=(start - origin) * 1e3, color=colors[e.kind], edgecolor="black",
            linewidth=0.3)
    if e.layer is not None and width > span * 1e3 / 60:
      ax.text((start - origin) * 1e3 + width / 2, y, str(e.layer), ha="center", va="center",
              fontsize=7)
  ax.set_yticks(range(len(lanes)), lanes)
  ax.set_xlabel("ms (bars labelled with the layer)")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
