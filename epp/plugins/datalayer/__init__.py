"""Data-layer plugins: where endpoint metrics come from and how they are read
(``dataLayer.sources[]``); the interfaces are in ``epp.framework.datalayer``."""
