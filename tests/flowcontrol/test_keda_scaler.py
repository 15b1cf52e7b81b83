"""The KEDA external scaler over real gRPC (grpcio aio client against the picker's service)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from epp.flowcontrol import keda_proto
from epp.flowcontrol.keda import KedaScaler, start_scaler_server
from epp.runner.admission import build_admission

from .test_controller import make, request, settle

pb2, pb2_grpc = keda_proto.load()


async def test_scaler_reports_demand_and_pushes_activation_at_once() -> None:
    ctl, pool, _ = make(capacity=100, with_endpoint=False)
    await ctl.start()
    scaler = KedaScaler(ctl, lambda: "default", keepalive=3600)  # any push below is an event
    server, port = await start_scaler_server(scaler, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb2_grpc.ExternalScalerStub(ch)
            ref = pb2.ScaledObjectRef(name="vllm", namespace="default",
                                      scalerMetadata={"pool": "default", "targetRequestsPerReplica": "4"})
            assert (await stub.IsActive(ref)).result is False
            spec = (await stub.GetMetricSpec(ref)).metricSpecs[0]
            assert spec.targetSizeFloat == 4.0 and spec.metricName == "epp-demand-default"

            stream = stub.StreamIsActive(ref)
            assert (await stream.read()).result is False
            for i in range(6):
                pool.submit(request("tenant", n=i))  # held: the pool is scaled to zero
            # pushed by the hold itself (how fast: benchmarks.flowcontrol --only keda-push)
            assert (await asyncio.wait_for(stream.read(), 5.0)).result is True
            assert (await stub.IsActive(ref)).result is True
            got = await stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName))
            assert got.metricValues[0].metricValueFloat == 6.0

            ctl.datastore.replace_endpoints([pool.ep])  # scaled up: all six dispatched, now in flight
            await settle(100)
            assert len(pool.order) == 6
            got = await stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName))
            assert got.metricValues[0].metricValueFloat == 6.0
            queued_ref = pb2.ScaledObjectRef(name="vllm", scalerMetadata={"metric": "queued"})
            got = await stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=queued_ref))
            assert got.metricValues[0].metricValueFloat == 0.0

            await pool.complete(6)
            assert (await asyncio.wait_for(stream.read(), 5.0)).result is False  # demand gone
            stream.cancel()

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.IsActive(pb2.ScaledObjectRef(scalerMetadata={"pool": "other-pool"}))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetMetricSpec(pb2.ScaledObjectRef(scalerMetadata={"targetRequestsPerReplica": "x"}))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(0)
        await ctl.stop()


async def test_without_the_gate_an_empty_pool_still_holds_requests() -> None:
    """The user-friendly default: --empty-pool-wait > 0 holds even with flowControl off."""
    from epp.config.loader import build_scheduling, load_config
    from epp.datalayer.datastore import Datastore
    from epp.framework.datalayer import Endpoint
    from epp.framework.plugin import PluginContext

    ds = Datastore()
    cfg = load_config(None)
    ctx = PluginContext(datastore=ds)
    setup = build_admission(cfg, build_scheduling(cfg, ctx), ctx, ds, None, empty_pool_wait=5)
    adm = setup.admission
    req = request("a")
    task = asyncio.get_running_loop().create_task(adm.admit(req, ds.endpoints))
    await settle()
    assert setup.demand.queued == 1 and not task.done()
    ep = Endpoint("pod", "10.0.0.1", 8000)
    ds.replace_endpoints([ep])
    assert list(await asyncio.wait_for(task, 5)) == [ep]
    assert setup.demand.queued == 0
