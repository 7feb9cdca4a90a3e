"""Progress of pulls and pushes: a redrawn bar on a terminal, a line per layer elsewhere."""

from __future__ import annotations

import io

from sandboxd.images.progress import Transfer


def _transfer(interactive: bool) -> tuple[Transfer, io.StringIO]:
    out = io.StringIO()
    transfer = Transfer(out, "pull", interactive)
    first = transfer.layer("sha256:" + "a" * 64, 2_000_000)
    second = transfer.layer("sha256:" + "b" * 64, 1000)
    first.start()
    first.advance(1_000_000)
    second.done("already in the store")
    first.advance(1_000_000)
    first.done()
    transfer.finish()
    return transfer, out


def test_without_a_terminal_each_layer_gets_a_line_when_it_starts_and_ends():
    transfer, out = _transfer(interactive=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "aaaaaaaaaaaa: pulling 2.0 MB"
    assert lines[1] == "bbbbbbbbbbbb: already in the store"
    assert lines[2].startswith("aaaaaaaaaaaa: pulled 2.0 MB in ")
    assert "\r" not in out.getvalue()
    assert (transfer.done_bytes, transfer.layers_done) == (2_001_000, 2)


def test_on_a_terminal_a_bar_is_redrawn_in_place_and_cleared_at_the_end():
    _, out = _transfer(interactive=True)
    text = out.getvalue()
    assert "] 1/2 layers, 1.0 MB / 2.0 MB" in text  # drawn when the small layer was done
    assert "] 2/2 layers, 2.0 MB / 2.0 MB" in text
    assert text.endswith("\r\x1b[K")
    assert "pulling 2.0 MB" not in text  # start lines are the bar's job on a terminal
