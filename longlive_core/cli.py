"""The core's `longlive` commands: `generate` a video to MP4, `download` weights.

The installed `longlive` (deployments/cli.py) adds the service's commands to these; the core never
imports the service.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .hub import BUILTIN_MODELS, NAMED_MODELS, MissingWeightsError
from .schedule import FPS, PromptChange, ScheduleError, load_schedule, validate_schedule

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
DEFAULT_SECONDS = 5.0
SECONDS_AFTER_LAST_SWITCH = 10.0
Command = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A problem to report in one line, with an exit code; never a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 832x480, got {text!r}") from None
    return width, height


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser with the core's commands, and its subparsers for others to add theirs."""
    parser = argparse.ArgumentParser(prog="longlive", description="Real-time long text-to-video (LongLive).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate a video to MP4",
        description="Generate a video. Give a PROMPT, a --schedule of prompt switches, or both (then the "
        "PROMPT starts the video and every schedule entry must come later).",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt the video starts with")
    gen.add_argument("--schedule", type=Path, help="YAML/JSON list of {at: seconds, prompt: text}")
    gen.add_argument(
        "--seconds",
        type=float,
        help=f"video length (default {DEFAULT_SECONDS:g} s, or {SECONDS_AFTER_LAST_SWITCH:g} s past the "
        "last switch)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--model", default="tiny-random", help="tiny-random, longlive-1.3b, a directory or a hub id"
    )
    gen.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    gen.add_argument(
        "--size", type=parse_size, default=None, help="WIDTHxHEIGHT (default 832x480; tiny 112x64)"
    )
    gen.add_argument("--decoder", choices=["wan", "tae"], default="wan", help="Wan VAE or the tiny TAEW2_1")
    gen.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT blocks (GPU: ~1.7x faster)"
    )
    gen.add_argument(
        "--low-memory",
        action="store_true",
        help="fit a 24 GB GPU: text encoder kept in host memory between prompts, VAE frame by frame",
    )
    gen.add_argument("-o", "--output", type=Path, default=Path("longlive.mp4"))

    dl = sub.add_parser("download", help="fetch and verify a model's weights into the local cache")
    dl.add_argument("model", nargs="?", default="longlive-1.3b", choices=[*NAMED_MODELS, *BUILTIN_MODELS])
    return parser, sub


def _entries(args: argparse.Namespace) -> tuple[list[PromptChange], list[str], float]:
    """The schedule (PROMPT and/or file), its entry labels, and the video length; validated."""
    entries: list[PromptChange] = []
    where: list[str] = []
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("PROMPT must not be empty")
        entries.append(PromptChange(at=0, prompt=args.prompt))
        where.append("PROMPT")
    if args.schedule is not None:
        file_entries, file_where = load_schedule(args.schedule)
        entries += file_entries
        where += file_where
    if not entries:
        raise CliError("give a PROMPT or a --schedule")
    seconds = args.seconds
    if seconds is None:
        seconds = DEFAULT_SECONDS if len(entries) == 1 else entries[-1].at + SECONDS_AFTER_LAST_SWITCH
    if seconds <= 0:
        raise CliError(f"--seconds must be > 0, got {seconds:g}")
    validate_schedule(entries, seconds, where)
    return entries, where, seconds


def generate(args: argparse.Namespace) -> int:
    entries, _, seconds = _entries(args)  # fail fast, before loading any weights

    import torch
    from tqdm import tqdm

    from .config import RuntimeConfig
    from .pipeline import LongLivePipeline, check_size
    from .video_io import Mp4Writer

    if args.size is not None:
        check_size(args.size)
    torch.manual_seed(args.seed)
    runtime = RuntimeConfig(compile=args.compile, low_memory=args.low_memory)
    pipe = LongLivePipeline.from_pretrained(
        args.model, device=args.device, decoder=args.decoder, runtime=runtime
    )
    stream = pipe.stream(
        schedule=entries, seconds=seconds, seed=args.seed, size=args.size, overlap_decode=True
    )
    width, height = pipe.check_size(args.size)
    writer = Mp4Writer(args.output, width, height, fps=FPS)
    total = stream.plan.num_frames
    start = time.perf_counter()
    bar = tqdm(total=total, unit="frame", desc="generating", dynamic_ncols=True)
    try:
        for chunk in stream:
            writer.write(chunk)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        bar.close()
        partial = writer.abort()
        print(f"interrupted: {writer.frames_written} frames kept in {partial}", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    path = writer.close()
    elapsed = time.perf_counter() - start
    print(
        f"wrote {path} ({writer.frames_written} frames, {writer.frames_written / FPS:.2f} s at {FPS} fps, "
        f"{width}x{height}, {len(stream.plan.switches)} prompt(s)) in {elapsed:.1f} s"
    )
    return 0


def download(args: argparse.Namespace) -> int:
    from .download import download_model

    if args.model in BUILTIN_MODELS:
        print(f"{args.model} is built in: nothing to download")
        return 0
    files = download_model(args.model)
    print(
        f"{args.model} is ready: DiT {files.transformer}, VAE {files.vae}, text encoder {files.text_encoder}"
    )
    return 0


def run(parser: argparse.ArgumentParser, commands: dict[str, Command], argv: list[str] | None) -> int:
    """Parse `argv` and run its command; a known failure is one line on stderr and an exit code."""
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except (
        CliError,
        ScheduleError,
        MissingWeightsError,
        FileNotFoundError,
        ValueError,
        ConnectionError,
    ) as exc:
        code = exc.code if isinstance(exc, CliError) else EXIT_USAGE
        if isinstance(exc, MissingWeightsError | OSError):
            code = EXIT_FAILURE
        print(f"longlive: error: {exc}", file=sys.stderr)
        return code


COMMANDS: dict[str, Command] = {"generate": generate, "download": download}


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
