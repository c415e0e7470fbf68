"""Running compiled explainers: onnxruntime sessions and batching, the compiled-explainer cache."""
