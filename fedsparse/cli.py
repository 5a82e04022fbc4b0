"""`fedsparse run` (a simulation on Ray), `fedsparse report` (compare finished runs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from pathlib import Path

from fedsparse.config import RESUME_CHANGEABLE, ConfigError, flatten, parse_assignments, resolve
from fedsparse.resume import CONFIG_FILE, read_saved_config
from fedsparse.simulation import APP_DIR


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    path = APP_DIR / "simulations" / "presets" / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in (APP_DIR / "simulations" / "presets").glob("*.toml"))
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(known)}")
    return path


def build_config(preset: str | None, assignments: list[str], out: str | None, resume: str | None) -> dict:
    """Preset, then --set pairs, then --out; with --resume, the saved config of that run, updated with the --set
    pairs that resume allows (RESUME_CHANGEABLE; any other key is refused by name)."""
    if resume:
        if preset or (out and Path(out).resolve() != Path(resume).resolve()):
            raise ConfigError("--resume continues the run in its folder with its own settings: it takes no "
                              "--preset, nor an --out other than that folder")
        run_dir = Path(resume).resolve()
        saved = {**read_saved_config(run_dir), "output-dir": str(run_dir), "resume": True}
        changes = flatten(parse_assignments(assignments))
        try:
            before = resolve(saved)
            cfg = resolve({**saved, **changes, "output-dir": str(run_dir), "resume": True})
        except ConfigError as err:
            raise ConfigError(f"--resume {resume}: {err} (from {run_dir / CONFIG_FILE} and --set)") from err
        refused = sorted(k for k in changes if k not in RESUME_CHANGEABLE and cfg[k] != before[k])
        if "output-dir" in changes and Path(changes["output-dir"]).resolve() != run_dir:
            refused.append("output-dir")
        if refused:
            raise ConfigError(f"--resume: {', '.join(refused)} cannot change on resume (the run so far was made "
                              f"with the saved value); only {', '.join(RESUME_CHANGEABLE)} can")
        return cfg
    overrides: dict = {}
    if preset:
        overrides.update(tomllib.loads(preset_path(preset).read_text()))
    overrides.update(parse_assignments(assignments))
    if out:
        overrides["output-dir"] = out
    cfg = resolve(overrides)
    cfg["output-dir"] = str(Path(cfg["output-dir"]).resolve())
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from fedsparse.data import DatasetNotFound
    from fedsparse.simulation import preflight, simulate

    try:
        cfg = build_config(args.preset, args.set or [], args.out, args.resume)
        preflight(cfg)
    except (ConfigError, DatasetNotFound) as err:
        print(f"fedsparse: {err}", file=sys.stderr)
        return 2
    print(f"[fedsparse] {cfg['strategy']} on {cfg['dataset']}/{cfg['model']}, {cfg['num-clients']} clients, "
          f"{cfg['num-rounds']} rounds -> {cfg['output-dir']}", file=sys.stderr, flush=True)
    try:
        simulate(cfg, ray_cpus=args.ray_cpus, client_app=args.client_app)
    except Exception as err:  # noqa: BLE001  (Flower re-raises whatever the ServerApp raised: report any)
        cause = err.__cause__ or err
        print(f"fedsparse: run failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    summary_path = Path(cfg["output-dir"]) / "summary.json"
    if not summary_path.exists():
        print("fedsparse: run ended without a summary.json: it failed (see the log above)", file=sys.stderr)
        return 1
    s = json.loads(summary_path.read_text())
    print(f"[fedsparse] final accuracy {100 * s['final_accuracy']:.2f}%  best {100 * s['best_accuracy']:.2f}%  "
          f"MB down {s['bytes_down'] / 1e6:.2f}  MB up {s['bytes_up'] / 1e6:.2f}  "
          f"ratio vs dense {s['bytes_ratio_vs_dense']:.1f}x  -> {cfg['output-dir']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsparse.results import report

    try:
        print(report([Path(d) for d in args.dirs], Path(args.plot)))
    except FileNotFoundError as err:
        print(f"fedsparse: {err}", file=sys.stderr)
        return 2
    print(f"plot: {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedsparse").addHandler(handler)
    logging.getLogger("fedsparse").propagate = False
    parser = argparse.ArgumentParser(prog="fedsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated simulation on Ray")
    run.add_argument("--preset", help="a TOML run config in simulations/presets (name or path)")
    run.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override run-config keys")
    run.add_argument("--out", help="output directory (sets output-dir)")
    run.add_argument("--resume", metavar="DIR", help="continue the run whose results are in DIR")
    run.add_argument("--ray-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    run.add_argument("--client-app", default="client.client_app:app", metavar="MODULE:ATTR",
                     help="the ClientApp to run (default: ours; tests pass tests.faults:app)")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="compare finished runs")
    rep.add_argument("dirs", nargs="+")
    rep.add_argument("--plot", default="comparison.png", help="the comparison plot (PNG; default comparison.png)")
    rep.set_defaults(func=cmd_report)
    sub.add_parser("deploy-local", add_help=False,
                   help="SuperLink (TLS + node auth) and N SuperNodes on loopback, one run; --help for options")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy-local"]:  # its options are fedsparse.deploy's own
        from fedsparse.deploy import main as deploy_main

        return deploy_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
