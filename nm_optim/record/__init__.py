"""The record: its data and file format (format.py) and streams on disk (stream.py). The recorder
that fills it is nm_optim/recorder.py."""

from nm_optim.record.format import Record, RecordError
from nm_optim.record.stream import RecordStream, load_record

__all__ = ["Record", "RecordError", "RecordStream", "load_record"]
