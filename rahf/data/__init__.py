"""RichHF-18K data: TFRecord framing, tf.train.Example coding and typed examples, without TensorFlow."""

from rahf.data.richhf import Annotation, RichHFExample, RichHFFormatError, consolidate, read_richhf, write_richhf
from rahf.data.tfrecord import TFRecordError, read_records, write_records

__all__ = [
    "Annotation",
    "RichHFExample",
    "RichHFFormatError",
    "TFRecordError",
    "consolidate",
    "read_records",
    "read_richhf",
    "write_records",
    "write_richhf",
]
