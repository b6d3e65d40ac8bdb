"""A gRPC client that knows only what server reflection tells it (as grpcurl does):
list the services, Produce on the demo registry, open a Consume stream that prints messages as
they are produced. Usage: python reflection_client.py HOST:PORT"""

import queue
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "mqproxy.v1.MessagingService"
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed, failed = (passed + 1, failed) if ok else (passed, failed + 1)
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)), flush=True)


def main(target):
    channel = grpc.insecure_channel(target)
    reflection_db = ProtoReflectionDescriptorDatabase(channel)
    services = reflection_db.get_services()
    check("reflection lists " + SERVICE, SERVICE in services, services)
    check("reflection lists grpc.health.v1.Health", "grpc.health.v1.Health" in services, services)
    pool = descriptor_pool.DescriptorPool(reflection_db)
    service = pool.FindServiceByName(SERVICE)
    methods = {m.name: m for m in service.methods}
    check("service has the engine's verbs", {"Produce", "ProduceBatch", "Fetch", "Ack", "Unlock", "Consume"} <= set(methods), methods)

    def cls(desc):
        return message_factory.GetMessageClass(desc)

    produce = methods["Produce"]
    ProduceRequest, ProduceResponse = cls(produce.input_type), cls(produce.output_type)
    call_produce = channel.unary_unary(
        f"/{SERVICE}/Produce",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ProduceResponse.FromString,
    )
    reply = call_produce(json_format.ParseDict({"producer": "mqcloud-http-test-topic-producer", "body": "aGVsbG8="}, ProduceRequest()))
    check("Produce answers SEND_OK", reply.result.send_status == "SEND_OK", reply)

    consume = methods["Consume"]
    ConsumeRequest, ConsumeResponse = cls(consume.input_type), cls(consume.output_type)
    call_consume = channel.stream_stream(
        f"/{SERVICE}/Consume",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ConsumeResponse.FromString,
    )
    outbox = queue.Queue()
    outbox.put(json_format.ParseDict(
        {"subscribe": {"target": {"topic": "mqcloud-http-test-topic", "consumer": "http-clustering-consumer"}, "autoAck": True}},
        ConsumeRequest(),
    ))

    def requests():
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    responses = call_consume(requests())
    received = []

    def reader():
        try:
            for response in responses:
                for m in response.batch.messages:
                    print("  consumed:", m.body.decode(), flush=True)
                    received.append(m.body.decode())
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sent = [f"live-{i}" for i in range(3)]
    for body in sent:
        call_produce(ProduceRequest(producer="mqcloud-http-test-topic-producer", body=body.encode()))
    deadline = time.time() + 10
    while time.time() < deadline and not set(sent) <= set(received):
        time.sleep(0.05)
    check("Consume stream prints messages as they are produced", set(sent + ["hello"]) <= set(received), received)
    responses.cancel()
    outbox.put(None)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # a failure of the client itself is a failed check, not a crash
        check("reflection client", False, repr(e))
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)
