"""Reading, checking, preprocessing and converting datasets to TFRecords."""
