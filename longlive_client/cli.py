"""`longlive live` and `longlive job ...`: the service from a terminal, on the client (no torch; also
`python -m longlive_client`). A refusal or an unreachable service is one line on stderr, never a
traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .client import DEFAULT_URL, Client, LiveSession
from .errors import LongliveError
from .schemas import SessionStatus
from .video import Frame

EXIT_FAILURE, EXIT_INTERRUPTED = 1, 130
STATUS_EVERY_S = 0.25
FPS_WINDOW_S = 2.0
Command = Callable[[argparse.Namespace], int]


def add_client_commands(sub: argparse._SubParsersAction) -> dict[str, Command]:
    live_parser = sub.add_parser(
        "live",
        help="a live session in the terminal: each line typed is the next prompt",
        description="Open a live session, write its video to an MP4 as it plays and show FPS, latency and "
        "the current prompt. Each line typed becomes the next prompt; Ctrl-D or Ctrl-C ends the session.",
    )
    live_parser.add_argument("prompt", help="the prompt the video starts with")
    live_parser.add_argument("-o", "--output", type=Path, default=Path("live.mp4"))
    live_parser.add_argument("--max-seconds", type=float, default=None, help="end after this much video")
    live_parser.add_argument("--seed", type=int, default=0)
    connection(live_parser)

    job_parser = sub.add_parser("job", help="batch jobs: submit a schedule, follow, cancel")
    jobs = job_parser.add_subparsers(dest="job_command", required=True)
    submit = jobs.add_parser("submit", help="queue a schedule file as a job")
    submit.add_argument("schedule", type=Path, help="YAML/JSON list of {at: seconds, prompt: text}")
    submit.add_argument("--seconds", type=float, required=True, help="video length")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--wait", action="store_true", help="follow it to the end (a progress bar)")
    submit.add_argument("-o", "--output", type=Path, default=None, help="with --wait: download the MP4 here")
    connection(submit)
    for name, what in (("status", "a job's state and progress"), ("cancel", "cancel a job")):
        one = jobs.add_parser(name, help=what)
        one.add_argument("job_id")
        one.add_argument("--token", default=None, help="the job's token (default: the one `submit` kept)")
        connection(one)
    return {"live": guarded(live), "job": guarded(job)}


def connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the service's base URL (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help="X-API-Key (default: the env LONGLIVE_API_KEY)")


def guarded(command: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except LongliveError as err:
            print(f"longlive: error: {err}", file=sys.stderr)
            return EXIT_FAILURE

    return run


# -- live --------------------------------------------------------------------------------------------
class LiveView:
    """The status line: received FPS, prompt-to-pixel latency of the last typed prompt, current prompt."""

    def __init__(self) -> None:
        self.arrivals: deque[float] = deque()
        self.frames = 0
        self.posted: dict[str, float] = {}  # typed prompt -> when it was posted
        self.latency_s: float | None = None
        self.prompt: str | None = None
        self._shown_at = 0.0
        self._lock = threading.Lock()

    def posted_now(self, text: str) -> None:
        with self._lock:
            self.posted[text] = time.monotonic()

    def frame(self, frame: Frame) -> None:
        now = time.monotonic()
        self.frames += 1
        self.arrivals.append(now)
        while self.arrivals[0] < now - FPS_WINDOW_S:
            self.arrivals.popleft()
        with self._lock:
            if frame.prompt in self.posted:  # the first frame under a typed prompt
                self.latency_s = now - self.posted.pop(frame.prompt)
        self.prompt = frame.prompt
        if now - self._shown_at >= STATUS_EVERY_S:
            self._shown_at = now
            self.show(frame.index)

    def show(self, index: int) -> None:
        latency = "-" if self.latency_s is None else f"{self.latency_s:.2f} s"
        fps = len(self.arrivals) / FPS_WINDOW_S
        line = f"frame {index}  {fps:4.1f} fps  latency {latency}  prompt: {self.prompt or '-'}"
        width = max(20, os.get_terminal_size(sys.stderr.fileno()).columns - 1) if sys.stderr.isatty() else 200
        print(f"\r\x1b[K{line[:width]}", end="", file=sys.stderr, flush=True)


def live(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key) as client:
        session = client.sessions.create(args.prompt, max_seconds=args.max_seconds, seed=args.seed)
        print(
            f"session {session.id}: writing {args.output}; type a prompt and Enter to switch, "
            "Ctrl-D or Ctrl-C to end",
            file=sys.stderr,
        )
        view = LiveView()
        final: list[SessionStatus] = []
        reader = threading.Thread(target=read_prompts, args=(session, view, final), daemon=True)
        reader.start()
        interrupted = False
        try:
            for frame in session.frames(record=args.output):
                view.frame(frame)
        except KeyboardInterrupt:  # the file holds every complete fragment: playable as it is
            interrupted = True
            final.append(session.status())
            session.close()
        print(file=sys.stderr)
        timeline = final[0] if final else session.status()
    print(f"wrote {args.output}: {view.frames} frames of session {session.id}")
    for entry in timeline.prompts:
        block = {None: "pending", -1: "superseded"}.get(entry.block, f"block {entry.block}")
        print(f"  {block}: {entry.prompt}")
    return EXIT_INTERRUPTED if interrupted else 0


def read_prompts(session: LiveSession, view: LiveView, final: list[SessionStatus]) -> None:
    """Each line typed is the next prompt; at end of input the session is ended (its stream then ends)."""
    try:
        for line in sys.stdin:
            if text := line.strip():
                view.posted_now(text)
                session.prompt(text)
        final.append(session.status())  # before the end: the timeline as the session had it
        session.close()
    except LongliveError as err:  # e.g. the session ended on its own meanwhile: the stream ends too
        print(f"\nlonglive: {err}", file=sys.stderr)


# -- jobs --------------------------------------------------------------------------------------------
def tokens_file() -> Path:
    """Where `job submit` keeps its jobs' tokens (0600), so `job status ID` needs no --token."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "longlive" / "job_tokens.json"


def kept_tokens() -> dict[str, str]:
    path = tokens_file()
    return json.loads(path.read_text()) if path.is_file() else {}


def keep_token(job_id: str, token: str) -> None:
    path = tokens_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {**kept_tokens(), job_id: token}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(tokens, out)


def job(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key) as client:
        if args.job_command == "submit":
            return submit_job(client, args)
        token = args.token or kept_tokens().get(args.job_id)
        if token is None:
            raise LongliveError(f"no token for job {args.job_id}: give --token")
        handle = client.jobs.attach(args.job_id, token)
        if args.job_command == "cancel":
            print(f"job {args.job_id}: {'cancelled' if handle.cancel() else 'had ended already'}")
            return 0
        status = handle.status()
        progress = f"{status.frames_done}/{status.frames_total} frames"
        eta = f", ETA {status.eta_s:.0f} s" if status.eta_s is not None else ""
        print(f"job {args.job_id}: {status.state}, {progress}, {status.fps:.1f} fps{eta}")
        if status.error:
            print(f"  error: {status.error}")
        if status.result_url:
            print(f"  video: {status.result_url}")
        return 0


def submit_job(client: Client, args: argparse.Namespace) -> int:
    handle = client.jobs.submit(args.schedule, seconds=args.seconds, seed=args.seed)
    keep_token(handle.id, handle.token)
    print(f"job {handle.id} queued (token kept in {tokens_file()})")
    if not args.wait:
        return 0
    status = handle.wait(progress=True)
    if args.output is None:
        print(f"job {handle.id} done: {status.result_url}")
        return 0
    handle.download(args.output)
    print(f"wrote {args.output}: {status.frames_total} frames")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m longlive_client live|job ...`: the same commands without the library's (no torch)."""
    parser = argparse.ArgumentParser(prog="longlive", description="The longlive service from a terminal.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = add_client_commands(sub)
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except ValueError as err:  # a bad schedule file (its line), a bad prompt
        print(f"longlive: error: {err}", file=sys.stderr)
        return 2
