"""Request-control plugins: the request parser (``parser.pluginRef``); the interfaces are in
``epp.framework.requestcontrol``."""
