"""Event streams (EventGPT .npy dicts, DSEC-style HDF5) -> event frames."""

from egpt_core.events.io import EventStream, load_events
from egpt_core.events.render import load_event_image, render_event_frames, save_frames_png

__all__ = ["EventStream", "load_events", "load_event_image", "render_event_frames", "save_frames_png"]
