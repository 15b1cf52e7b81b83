"""Flow-control plugins: saturation detectors, fairness and ordering policies.

Referenced from the EndpointPickerConfig (``saturationDetector.pluginRef``, a priority band's
``fairnessPolicyRef`` / ``orderingPolicyRef``); the interfaces are in
``epp.framework.flowcontrol``.
"""
