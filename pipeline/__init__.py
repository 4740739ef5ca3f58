"""Apache Beam pipeline: raw interactions or logged lists -> candidate-list TFRecords."""
