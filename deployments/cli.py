"""The installed `longlive` command: the core's `generate` and `download` (longlive_core/cli.py), the
service's `serve` and `status`, and the client's `live` and `job` (longlive_client/cli.py), registered
here so that the core never imports the service or the client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longlive_client.cli import add_client_commands
from longlive_core.cli import COMMANDS, EXIT_INTERRUPTED, CliError, Command, build_parser, run


def add_service_commands(sub: argparse._SubParsersAction) -> dict[str, Command]:
    srv = sub.add_parser("serve", help="run the session service on this machine (Ray Serve)")
    srv.add_argument("--config", type=Path, default=Path("serve_config.yaml"), help="Ray Serve config file")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    srv.add_argument(
        "--host",
        default=None,
        help="HTTP host (default 127.0.0.1; 0.0.0.0 serves the network: set an API key)",
    )
    srv.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    srv.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Redis data, job results (default ~/.local/share/longlive)",
    )
    srv.add_argument(
        "--drain", type=float, default=None, help="seconds replicas drain on SIGTERM / Ctrl-C (default 10)"
    )

    st = sub.add_parser("status", help="the running service's Generator replicas, sessions and load")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    st.add_argument("--api-key", default=None, help="X-API-Key (default: the env LONGLIVE_API_KEY)")
    st.add_argument("--json", action="store_true", help="print the admin endpoint's JSON")
    return {"serve": serve, "status": status}


def serve(args: argparse.Namespace) -> int:
    from .local import serve_forever

    try:
        serve_forever(args.config, args.port, args.host, args.ray_address, args.data_dir, args.drain)
    except ModuleNotFoundError as exc:  # ray, redis: what the serve extra installs
        raise CliError(f"the service needs the serve extra: pip install 'longlive[serve]' ({exc})") from None
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def status(args: argparse.Namespace) -> int:
    """GET /v1/admin/replicas of a running service and print it as a table."""
    import json
    import os
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{args.url.rstrip('/')}/v1/admin/replicas")
    key = args.api_key or os.environ.get("LONGLIVE_API_KEY")
    if key:
        request.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            info = json.load(response)
    except urllib.error.HTTPError as exc:
        raise CliError(f"{args.url} answered {exc.code}: {exc.read().decode(errors='replace')}", 1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"{args.url} does not answer: {exc}", 1) from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{'replica':<34} {'load':>9} {'fps':>7} {'job':<24} sessions")
    for r in info["replicas"]:
        load = f"{r.get('load', 0)}/{r.get('capacity', 0)}"
        job = r.get("job") or "-"
        sessions = ", ".join(r.get("sessions", [])) or "-"
        print(f"{r.get('replica', '?'):<34} {load:>9} {r.get('fps', 0):>7.1f} {job:<24} {sessions}")
    print(
        f"{len(info['replicas'])} replica(s), {info['sessions']} live session(s) of {info['capacity']} "
        f"slots, {info['jobs_queued']} job(s) queued"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, sub = build_parser()
    return run(parser, {**COMMANDS, **add_service_commands(sub), **add_client_commands(sub)}, argv)


if __name__ == "__main__":
    sys.exit(main())
