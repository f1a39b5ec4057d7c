"""The touchstream services and the runtime they share."""
