"""Reading TensorBoard event files back in tests, with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def events(logdir: Path | str) -> EventAccumulator:
    """The accumulator of the newest run directory under ``logdir``, everything kept."""
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    acc = EventAccumulator(str(files[-1].parent), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> list[str]:
    """The text entries logged under ``tag`` (``add_text``), in step order."""
    return [b"".join(e.tensor_proto.string_val).decode() for e in acc.Tensors(f"{tag}/text_summary")]
