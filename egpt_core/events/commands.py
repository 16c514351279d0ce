"""`egpt render-events FILE --frames N --out DIR [--sensor-size H W]`."""

from __future__ import annotations

import argparse
import posixpath
import sys

from egpt_core import cliargs
from egpt_core.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "render-events",
        help="render an event file (.npy / .h5) to PNG event frames",
        description="Split the events into N equal-count slices and write <out>/<stem>_<k>.png per slice.",
    )
    p.add_argument("file", help="event file URL or path (.npy EventGPT dict or DSEC HDF5)")
    p.add_argument("--frames", type=int, default=1, help="number of frames (equal event-count slices)")
    p.add_argument("--out", required=True, help="output directory URL or path")
    p.add_argument(
        "--sensor-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="fixed canvas (height width); default: data-dependent per slice",
    )
    cliargs.add_storage_option_argument(p)
    p.set_defaults(func=_render_events)


def _render_events(args: argparse.Namespace) -> int:
    from egpt_core.events.io import load_events
    from egpt_core.events.render import render_event_frames, save_frames_png

    if args.frames < 1:
        raise ConfigError("--frames must be >= 1")
    if args.sensor_size and min(args.sensor_size) < 1:
        raise ConfigError("--sensor-size H W must be positive")
    stem = posixpath.splitext(posixpath.basename(str(args.file).rstrip("/")))[0]
    storage_options = cliargs.parse_storage_options(args.storage_option) or None
    events = load_events(args.file, storage_options)  # BadInputError names the file and the problem
    n_frames = args.frames
    if len(events.x) and n_frames > len(events.x):  # one frame per event at most: no empty canvases
        n_frames = len(events.x)
        print(f"egpt render-events: --frames {args.frames} capped to {n_frames} (the file holds "
              f"{len(events.x)} event{'s' if n_frames > 1 else ''})", file=sys.stderr)
    frames = render_event_frames(events, n_frames, tuple(args.sensor_size) if args.sensor_size else None)
    for url in save_frames_png(frames, args.out, stem, storage_options):
        print(url)
    return 0
