"""The `pope` evaluate module (load it with `rcp_llava.metrics.load_metric("pope")`)."""
