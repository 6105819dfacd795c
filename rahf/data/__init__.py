"""RichHF-18K data: TFRecord reading and writing without TensorFlow."""
