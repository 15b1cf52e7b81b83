"""Plugin discovery (``registry``): built-ins under ``epp.scheduling.plugins`` and third-party
plugins from the ``epp.plugins`` entry-point group."""
