"""The `vqa_accuracy` evaluate module (load it with `rcp_llava.metrics.load_metric("vqa_accuracy")`)."""
