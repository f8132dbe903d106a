"""Drive a running longlive service from Python (longlive_client; no torch needed): a live session whose
prompt is switched once, saved to an MP4 as it plays, then a batch job of a schedule file.

Start the service first (`longlive serve`: the embedded default, tiny-random on the CPU), then
`python examples/client.py --url http://127.0.0.1:8000`. Prints a line per block of the live video (its
first frame and the prompt in force), the session's timeline, and the job's frame count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longlive_client import Client

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--seconds", type=float, default=4.0, help="the live session's video length")
    parser.add_argument("--switch-at", type=int, default=9, help="video frame at which to post the switch")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for live.mp4 and story.mp4")
    args = parser.parse_args()

    with Client(args.url) as client:
        # 1. A live session: frames come decoded (RGB arrays) with their index and the prompt in force.
        with client.sessions.create("a red robot in a rainy city", max_seconds=args.seconds) as live:
            for frame in live.frames(record=args.out / "live.mp4"):
                if frame.index == args.switch_at:
                    live.prompt("the robot walks into a forest")  # acts at the next block boundary
                if frame.index in (0, 9) or (frame.index - 9) % 12 == 0:
                    print(f"frame {frame.index:4d}  {frame.image.shape}  {frame.prompt}")
            status = live.status()
        for entry in status.prompts:
            print(f"timeline: block {entry.block}: {entry.prompt}")

        # 2. A batch job from a schedule file: queued, followed, downloaded.
        job = client.jobs.submit(HERE / "story.yaml", seconds=6)
        done = job.wait()
        path = job.download(args.out / "story.mp4")
        print(f"job {job.id}: {done.frames_total} frames -> {path}")


if __name__ == "__main__":
    main()
