"""`python -m fedsparse.deploy` (= `fedsparse deploy-local`): a real Flower deployment of this repository on loopback,
one run, and a report.

    python -m fedsparse.deploy --nodes 3 --set num-rounds=3 sparse.sparsity=0.9

starts a `LocalDeployment` (SuperLink with TLS and SuperNode authentication, N SuperNodes with registered keys, the
SuperExecs; `--edge-proxy`: nginx in front, as in docker-compose.yml), submits an SSFL run on `digits` with
`flwr run`, follows it, prints the final status taken from `flwr ls --format json` (never from `flwr run`'s exit
code, which is 0 for failed runs too), compares the bytes our accounting counted with the network totals Flower
reports, stops every process it started by PID (also on Ctrl-C and SIGTERM), and exits non-zero unless the run
ended `finished:completed`.

The pieces live in their own modules: `fedsparse.local_deployment` (the deployment), `fedsparse.flower_cli` (the
`flwr` calls), `fedsparse.certificates` (secrets, made once per deployment), `fedsparse.deploy_processes` (ports,
starting and stopping processes). This module only adds the command line and the report.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from fedsparse.config import ConfigError, flatten, parse_assignments, resolve
from fedsparse.deploy_processes import DeploymentError
from fedsparse.flower_cli import FINISHED_OK
from fedsparse.local_deployment import DEFAULT_RUN, LocalDeployment

# ------------------------------------------------------------------------------------------ reporting


def compare_bytes(summary: dict[str, Any], status: dict[str, Any]) -> dict[str, float]:
    """Our counted payload bytes against Flower's per-run network totals (SuperNode <-> SuperLink).

    Ours: count_bytes() of every record of every message and reply (rounds + one-off saliency/mask exchange).
    Flower's: the serialized messages and objects its Fleet API moved, i.e. ours plus protocol framing,
    metadata and message headers. overhead = Flower / ours - 1.
    """
    down = summary["bytes_down"] + summary.get("oneoff_down", 0)
    up = summary["bytes_up"] + summary.get("oneoff_up", 0)
    traffic = status.get("network-traffic", {})
    out_b, in_b = int(traffic.get("outbound-bytes", 0)), int(traffic.get("inbound-bytes", 0))
    counted = down + up
    return {"counted_down": down, "counted_up": up, "counted_total": counted,
            "flower_outbound": out_b, "flower_inbound": in_b, "flower_total": out_b + in_b,
            "overhead_down": out_b / down - 1 if down else float("nan"),
            "overhead_up": in_b / up - 1 if up else float("nan"),
            "overhead": (out_b + in_b) / counted - 1 if counted else float("nan")}


def report(dep: LocalDeployment, run_id: int, status: dict[str, Any]) -> str:
    """What the command prints about a finished run: status, accuracy, bytes against Flower's, seconds per round."""
    lines = [f"run {run_id}: {status['status']}"
             + (f" ({status['status-details']})" if status.get("status-details", "N/A") != "N/A" else "")]
    summary = dep.summary(run_id)
    if summary is None:
        lines.append(f"no summary.json in {dep.runs[run_id].output_dir}")
        return "\n".join(lines)
    if summary.get("final_accuracy") is not None:
        lines.append(f"final accuracy {100 * summary['final_accuracy']:.2f}%  rounds {summary['rounds']}  "
                     f"failures {len(summary.get('failures', []))}")
    b = compare_bytes(summary, status)
    lines.append(f"bytes counted by fedsparse: down {b['counted_down']:,}  up {b['counted_up']:,}  "
                 f"total {b['counted_total']:,}")
    lines.append(f"Flower network-traffic:     out  {b['flower_outbound']:,}  in {b['flower_inbound']:,}  "
                 f"total {b['flower_total']:,}")
    lines.append(f"overhead of the wire over our count: {100 * b['overhead']:+.2f}% "
                 f"(down {100 * b['overhead_down']:+.2f}%, up {100 * b['overhead_up']:+.2f}%)")
    secs = [row["seconds"] for row in dep.round_rows(run_id)]
    if secs:
        later = secs[1:] or secs
        lines.append(f"seconds per round: {', '.join(f'{s:.1f}' for s in secs)} "
                     f"(round 1 includes the one-off exchange; mean of later rounds {sum(later) / len(later):.1f})")
    for f in summary.get("failures", []):
        lines.append(f"failure: round {f.get('round')} node {f['node_id']}: {f['reason']} ({f['message']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); the exit code: 0 for a completed run, 1 otherwise, 2 for bad
    arguments."""
    parser = argparse.ArgumentParser(prog="python -m fedsparse.deploy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes = num-clients (default 3)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"run-config overrides (defaults: {' '.join(f'{k}={v}' for k, v in DEFAULT_RUN.items())})")
    parser.add_argument("--workdir", help="folder for certificates, keys, logs and results (default: a new "
                                          "temporary folder, kept afterwards)")
    parser.add_argument("--isolation", choices=("process", "subprocess"), default="process",
                        help="process: SuperExecs are separate processes, as in docker-compose.yml (default)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (local trials only, like docker-compose.insecure.yml)")
    parser.add_argument("--edge-proxy", action="store_true",
                        help="nginx in front of the SuperLink: nodes dial its Fleet-only port, the CLI its "
                             "Control-only port (as the compose `edge` service; needs nginx and TLS)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run (default 1800)")
    args = parser.parse_args(argv)
    if args.edge_proxy and args.insecure:
        parser.error("--edge-proxy terminates TLS: it cannot be combined with --insecure")
    try:
        overrides = flatten(parse_assignments(args.set))
        if "output-dir" in overrides:
            overrides["output-dir"] = str(Path(overrides["output-dir"]).resolve())
        cfg = resolve({**DEFAULT_RUN, "num-clients": args.nodes, **overrides})
        if cfg["num-clients"] != args.nodes:
            raise ConfigError(f"num-clients={cfg['num-clients']} must equal --nodes {args.nodes}: one partition "
                              "per SuperNode")
    except ConfigError as err:
        print(f"fedsparse.deploy: {err}", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks, which stop every process

    signal.signal(signal.SIGTERM, on_term)
    dep = LocalDeployment(nodes=args.nodes, workdir=args.workdir, isolation=args.isolation, tls=not args.insecure,
                          edge_proxy=args.edge_proxy)
    try:
        with dep:
            run_id = dep.submit(overrides)
            status = dep.wait(run_id, timeout=args.timeout)
            print(report(dep, run_id, status))
            print(f"logs and results in {dep.workdir}")
    except DeploymentError as err:
        print(f"fedsparse.deploy: {err}", file=sys.stderr)
        print(f"logs in {dep.logs}", file=sys.stderr)
        return 1
    return 0 if status["status"] == FINISHED_OK else 1


if __name__ == "__main__":
    sys.exit(main())
