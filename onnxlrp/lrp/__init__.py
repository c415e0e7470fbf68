"""Layer-wise Relevance Propagation on the IR: op adapters, rules, splits, presets, the relevance graph."""
