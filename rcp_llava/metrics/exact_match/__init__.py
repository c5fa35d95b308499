"""The `exact_match` evaluate module (load it with `rcp_llava.metrics.load_metric("exact_match")`)."""
