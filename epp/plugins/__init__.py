"""Plugin implementations, grouped by the layer they plug into (``scheduling``,
``flowcontrol``, ``requestcontrol``, ``datalayer``), one module per plugin type, and the
registry that finds them by GIE type name."""
