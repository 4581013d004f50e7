"""Built-in plugins, one per module, registered by name and overridable (``trylast``)."""
