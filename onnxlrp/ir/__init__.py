"""The model as onnxlrp reads it: load and validate, canonicalise, the DAG of the data path, merges."""
