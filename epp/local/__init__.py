"""Local process topologies on one machine: simulated pods, pickers and a real Envoy started
as subprocesses, for `epp demo` (`make run`), the integration tests and the benchmarks."""
