"""Run a real Envoy + the picker + a simulated vLLM pool on this machine (what ``make run``
starts), print a ready-to-paste curl, send one request to show the pick, and keep running
until Ctrl-C; then stop everything.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, TopologyError, port_free

SIM_MODEL = "sim-model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=4, help="simulated vLLM pods")
    p.add_argument("--pod-port", type=int, default=8001, help="first pod port (pods use N consecutive ports)")
    p.add_argument("--kv-events-port", type=int, default=5557, help="first pod KV-event port")
    p.add_argument("--listen-port", type=int, default=8081, help="Envoy listener port")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port")
    p.add_argument("--grpc-port", type=int, default=9002)
    p.add_argument("--grpc-health-port", type=int, default=9003)
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument("--config-file", help="EndpointPickerConfig for the picker (default: built-in)")
    p.add_argument("--workdir", default=".run", help="where logs and generated configs go")
    p.add_argument("--sim-arg", action="append", default=[], help="extra flag for `epp sim` (repeatable)")
    p.add_argument("--exit-after", type=float, default=0.0, help="stop after N seconds (0 = until Ctrl-C)")
    p.add_argument("--pd", action="store_true",
                   help="prefill/decode disaggregation: prefill pods, decode pods behind `epp pd-sidecar`, "
                        "the picker with the disagg profile handler (`make run-pd`)")
    p.add_argument("--prefill-replicas", type=int, default=2, help="--pd: simulated prefill pods")
    p.add_argument("--decode-replicas", type=int, default=2, help="--pd: simulated decode pods")
    p.add_argument("--sidecar-port", type=int, default=8201, help="--pd: first decode sidecar port")


def _sample_request(port: int) -> tuple[int, dict[str, str], bytes]:
    body = orjson.dumps({
        "model": SIM_MODEL, "max_tokens": 8,
        "messages": [{"role": "system", "content": "You are a helpful assistant for the city council."},
                     {"role": "user", "content": "Say hello."}],
    })
    req = urllib.request.Request(
        f"http://{HOST}:{port}/v1/chat/completions", data=body,
        headers={"content-type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, dict(resp.headers.items()), resp.read()


def _start_pd(topo: Topology, args: argparse.Namespace, workdir: Path) -> list[tuple[str, int]]:
    """--pd: prefill sims, decode sims each behind a sidecar, the P/D picker; returns the
    endpoints Envoy may route to (the decode sidecars)."""
    from epp.local.pd import pd_picker_config, pd_pool_file

    n_p, n_d = args.prefill_replicas, args.decode_replicas
    prefill = [(HOST, args.pod_port + i) for i in range(n_p)]
    engines = [args.pod_port + n_p + i for i in range(n_d)]
    sidecars = [(HOST, args.sidecar_port + i) for i in range(n_d)]
    print(f"starting {n_p} prefill pods on ports {prefill[0][1]}-{prefill[-1][1]} and {n_d} decode pods "
          f"on {engines[0]}-{engines[-1]} ...")
    topo.start_sim(n_p, args.pod_port, args.kv_events_port, extra=["--pod-name-prefix", "prefill-", *args.sim_arg],
                   name="sim-prefill")
    topo.start_sim(n_d, engines[0], args.kv_events_port + n_p,
                   extra=["--pod-name-prefix", "decode-", *args.sim_arg], name="sim-decode")
    pool_path = workdir / "pd-pool.yaml"
    pool_path.write_text(pd_pool_file(prefill, [(h, p, e) for (h, p), e in zip(sidecars, engines, strict=True)]))
    for i, ((_, sport), eport) in enumerate(zip(sidecars, engines, strict=True)):
        topo.start_sidecar(sport, eport, extra=["--allow-pool-file", str(pool_path)], name=f"sidecar-{i}")
    print(f"decode sidecars on ports {sidecars[0][1]}-{sidecars[-1][1]}; pool file {pool_path}")
    config_text = Path(args.config_file).read_text() if args.config_file else pd_picker_config()
    print(f"starting the P/D picker (ext_proc :{args.grpc_port}, health :{args.grpc_health_port}, "
          f"metrics :{args.metrics_port}) ...")
    topo.start_picker(str(pool_path), args.grpc_port, args.grpc_health_port, args.metrics_port,
                      config_text=config_text, extra=["--log-format", "json"])
    return sidecars


def run(args: argparse.Namespace) -> int:
    if args.pd:
        args.replicas = args.prefill_replicas + args.decode_replicas
    ports = {
        "pods": range(args.pod_port, args.pod_port + args.replicas),
        "kv-events": range(args.kv_events_port, args.kv_events_port + args.replicas),
        "envoy": [args.listen_port, args.admin_port],
        "picker": [args.grpc_port, args.grpc_health_port, args.metrics_port],
        "sidecars": range(args.sidecar_port, args.sidecar_port + (args.decode_replicas if args.pd else 0)),
    }
    busy = [f"{what} {p}" for what, rng in ports.items() for p in rng if not port_free(p)]
    if busy:
        print(f"epp demo: ports already in use: {', '.join(busy)} (is another demo running?)", file=sys.stderr)
        return 1
    pool = [(HOST, args.pod_port + i) for i in range(args.replicas)]
    config_text = Path(args.config_file).read_text() if args.config_file else None
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    workdir = Path(args.workdir)
    try:
        with Topology(workdir) as topo:
            if args.pd:
                pool = _start_pd(topo, args, workdir)
            else:
                print(f"starting {args.replicas} simulated vLLM pods on ports {args.pod_port}-{pool[-1][1]} ...")
                topo.start_sim(args.replicas, args.pod_port, args.kv_events_port, extra=args.sim_arg)
                print(f"starting the picker (ext_proc :{args.grpc_port}, health :{args.grpc_health_port}, "
                      f"metrics :{args.metrics_port}) ...")
                topo.start_picker(pool, args.grpc_port, args.grpc_health_port, args.metrics_port,
                                  config_text=config_text, extra=["--log-format", "json"])
            print(f"starting Envoy on {HOST}:{args.listen_port} ...")
            topo.start_envoy(EnvoySpec(
                pool=pool, pickers=[(HOST, args.grpc_port)], listen=(HOST, args.listen_port),
                admin=(HOST, args.admin_port), access_log=True,
            ))
            status, headers, body = _sample_request(args.listen_port)
            pod = headers.get("x-inference-pod", "?")
            text = orjson.loads(body)["choices"][0]["message"]["content"] if status == 200 else body.decode()
            print(f"\nready. A first request went through Envoy → picker → pod {pod} "
                  f"(HTTP {status}): {text!r}\n")
            print("Try it:\n")
            print(f"  curl -si http://{HOST}:{args.listen_port}/v1/chat/completions \\\n"
                  "    -H 'content-type: application/json' \\\n"
                  f"    -d '{{\"model\":\"{SIM_MODEL}\",\"max_tokens\":16,\"messages\":"
                  "[{\"role\":\"user\",\"content\":\"Hello!\"}]}' | grep -E 'x-inference-pod|content'\n")
            print(f"  picker metrics: curl -s http://{HOST}:{args.metrics_port}/metrics | grep inference_")
            if args.pd:
                long_prompt = "\"'\"$(printf 'lorem ipsum %.0s' {1..250})\"'\""  # bash: ~3 KB of text
                print("\n  P/D: a prompt of >= 512 tokens (~2 KB) not cached on the decode pod gets a prefill leg:\n"
                      f"  curl -s http://{HOST}:{args.listen_port}/v1/completions -H 'content-type: application/json' "
                      f"-d '{{\"model\":\"{SIM_MODEL}\",\"max_tokens\":8,\"prompt\":{long_prompt}}}'\n"
                      f"  decisions: curl -s http://{HOST}:{args.metrics_port}/metrics | grep epp_pd_")
            print(f"  logs: {workdir}/*.log\n\nCtrl-C to stop.")
            started = time.monotonic()
            while not stop:
                dead = [p.name for p in topo.processes if not p.alive()]
                if dead:
                    print(f"epp demo: {', '.join(dead)} exited; see {workdir}/*.log", file=sys.stderr)
                    return 1
                if args.exit_after and time.monotonic() - started > args.exit_after:
                    break
                time.sleep(0.2)
            print("\nstopping ...")
    except TopologyError as exc:
        print(f"epp demo: {exc}", file=sys.stderr)
        return 1
    print("stopped.")
    return 0
