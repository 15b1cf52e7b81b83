"""The extension points of the picker: interfaces and the shared types they speak in.

One module per layer, as in GIE / llm-d's ``framework/interface/<layer>``; implementations
live elsewhere (``epp/plugins/<layer>/``, ``epp/flowcontrol``, ``epp/datalayer``):

* ``plugin``: ``Plugin``, ``PluginParams``, ``PluginContext``, the lifecycle protocol and
  typed state (``StateKey``) that replaces string-keyed dictionaries between plugins;
* ``datalayer``: ``Endpoint`` / ``EndpointMetrics``, the read-only pool view plugins get,
  data-source plugin interfaces, the endpoint label names shared by picker and P/D sidecar;
* ``scheduling``: ``LLMRequest`` and the scheduling results; ``Filter``, ``Scorer``,
  ``Picker``, ``ProfileHandler``, ``SchedulerProfile``;
* ``requestcontrol``: ``Parser``, ``PreRequest``, ``ResponseComplete``, ``ResponseInfo``,
  ``Admission`` and ``Demand``;
* ``flowcontrol``: ``SaturationDetector``, ``FlowQueue``, ``OrderingPolicy``,
  ``FairnessPolicy``;
* ``errors``: ``RequestError``, the failure every layer of the request path may raise.

This package imports nothing of ours except ``epp.metrics`` (for types), so every layer may
import it and none can create a cycle through it (checked by import-linter, ``make lint``).
"""
