"""KEDA per model (scaler metadata ``model``) and the pool demand that includes requests held
for a load, over real gRPC, with a real ModelPlacement in front of a pool scaled to zero."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from epp.datalayer.datastore import CatalogueModel, Datastore
from epp.flowcontrol import keda_proto
from epp.flowcontrol.demand import DatastoreDemand
from epp.flowcontrol.keda import KedaScaler, start_scaler_server
from epp.framework.scheduling import LLMRequest
from epp.placement import DemandWithHeld, ModelPlacement, parse_placement_config
from tests.waiting import eventually

pb2, pb2_grpc = keda_proto.load()


def ref(**md: str) -> object:
    return pb2.ScaledObjectRef(name="vllm", namespace="default", scalerMetadata=md)


async def test_demand_per_model_wakes_only_that_models_scaler() -> None:
    ds = Datastore()  # no endpoint: scaled to zero
    ds.catalogue = {"dept-a": CatalogueModel("dept-a", "/adapters/dept-a", "llama"), "llama": CatalogueModel("llama")}
    placement = ModelPlacement(parse_placement_config("holdTimeout: 60s\n"), ds)
    demand = DemandWithHeld(DatastoreDemand(ds), placement)
    scaler = KedaScaler(demand, lambda: "default", keepalive=3600, models=placement)
    server, port = await start_scaler_server(scaler, "127.0.0.1", 0)
    held = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb2_grpc.ExternalScalerStub(ch)
            stream = stub.StreamIsActive(ref(model="dept-a"))
            assert (await stream.read()).result is False
            # an adapter request for a pool at zero is held by placement until a pod can load it
            held = asyncio.get_running_loop().create_task(
                placement.ensure(LLMRequest(request_id="1", target_model="dept-a", incoming_model="dept-a")))
            assert (await asyncio.wait_for(stream.read(), 5.0)).result is True  # pushed at once
            assert (await stub.IsActive(ref(model="dept-a"))).result is True
            assert (await stub.IsActive(ref(model="llama"))).result is False   # its pool may stay at zero
            assert (await stub.IsActive(ref())).result is True                 # the pool sees it as queued
            spec = (await stub.GetMetricSpec(ref(model="dept-a", metric="queued"))).metricSpecs[0]
            assert spec.metricName == "epp-queued-default-dept-a"
            got = await stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref(model="dept-a", metric="queued")))
            assert got.metricValues[0].metricValueFloat == 1.0
            assert demand.queued == 1

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.IsActive(ref(model="no-such-model"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            held.cancel()  # the client went away: its demand goes with it
            await eventually(lambda: demand.queued == 0)
            assert (await asyncio.wait_for(stream.read(), 5.0)).result is False
            stream.cancel()
    finally:
        if held is not None:
            held.cancel()
        await server.stop(0)


async def test_model_metadata_without_placement_is_an_invalid_argument() -> None:
    scaler = KedaScaler(DatastoreDemand(Datastore()), lambda: "default", keepalive=3600)
    server, port = await start_scaler_server(scaler, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb2_grpc.ExternalScalerStub(ch).IsActive(ref(model="dept-a"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "model placement" in (err.value.details() or "")
    finally:
        await server.stop(0)
