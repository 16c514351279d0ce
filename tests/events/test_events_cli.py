"""`egpt render-events` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from egpt_core.cli import main
from egpt_core.events.io import load_events
from egpt_core.events.render import load_event_image, render_event_frames

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eventgpt_sample1.npy"


def test_render_events_writes_n_pngs(tmp_path, capsys):
    out = tmp_path / "frames"
    rc = main(["render-events", str(SAMPLE), "--frames", "5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    expected = [str(out / f"eventgpt_sample1_{k}.png") for k in range(5)]
    assert printed == expected
    assert sorted(p.name for p in out.iterdir()) == [Path(p).name for p in expected]
    reference = render_event_frames(load_events(str(SAMPLE)), 5)
    for path, frame in zip(expected, reference):
        np.testing.assert_array_equal(load_event_image(path), frame)


def test_render_events_with_sensor_size(tmp_path, capsys):
    rc = main(
        ["render-events", str(SAMPLE), "--frames", "1", "--out", str(tmp_path), "--sensor-size", "500", "640"]
    )
    assert rc == 0
    (path,) = capsys.readouterr().out.split()
    assert load_event_image(path).shape == (500, 640, 3)


def test_render_events_bad_input_exits_nonzero_without_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.npy"
    bad.write_bytes(SAMPLE.read_bytes()[:1000])
    rc = main(["render-events", str(bad), "--frames", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0
    assert str(bad) in err and "truncated" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    rc = main(
        ["render-events", str(SAMPLE), "--frames", "1", "--out", str(tmp_path), "--sensor-size", "100", "100"]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "outside the sensor size 100x100" in err
