"""schemathesis hooks for scripts/contract-test: make generated requests reach the handlers.

The spec says what a name, a requestId or a msgId looks like; it cannot say which ones exist
on the server under test. So most generated cases (REAL_SHARE) get the names registered by
contract-test's config, and the calls that need state the server made get it made first:
a requestId from a real pull (ack, unlock), a msgId from a real produce (retryMsgId), and an
entry to delete (the admin deletes). The remaining cases keep their generated values, so the
refusals stay tested too.

Reads MQPROXY_CONTRACT_BASE (the server's base URL) and MQPROXY_CONTRACT_TOKEN (admin token).
"""

import json
import os
import random
import urllib.error
import urllib.parse
import urllib.request

import schemathesis

REAL_SHARE = 0.9
TOPIC = "mqcloud-http-test-topic"
PRODUCER = "mqcloud-http-test-topic-producer"
CLUSTERING = "http-clustering-consumer"
BROADCAST = "http-broadcast-consumer"
# Operations naming a consumer of either mode (with a clientId for broadcast).
CONSUMER_PATHS = {
    "/mq/message",
    "/mq/ack",
    "/mq/unlock",
    "/admin/consumer/config",
    "/admin/consumer/offsets",
    "/admin/consumer/offsets/reset",
}
# A few clientIds only: every new one is state the server keeps (max_broadcast_clients).
CLIENT_IDS = ["contract-client-1", "contract-client-2", "contract-client-3"]


def _call(path, **params):
    """One request to the server under test; the envelope as a dict."""
    base = os.environ["MQPROXY_CONTRACT_BASE"].rstrip("/")
    body = urllib.parse.urlencode(params).encode()
    req = urllib.request.Request(
        base + path,
        data=body,
        headers={
            "Authorization": "Bearer " + os.environ["MQPROXY_CONTRACT_TOKEN"],
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as refused:  # [http] status = "mirror": the envelope still says why
        return json.loads(refused.read())


def _params(case):
    """A copy of the case's parameters (the form body of a POST, else the query), put back in
    place of the drawn ones: schemathesis keeps the drawn values to mutate and shrink them."""
    if isinstance(case.body, dict):
        case.body = dict(case.body)
        return case.body
    case.query = dict(case.query or {})
    return case.query


def _use_consumer(params, consumer):
    params["consumer"] = consumer
    if "topic" in params:
        params["topic"] = TOPIC
    if consumer == CLUSTERING:
        params.pop("clientId", None)
    else:
        params["clientId"] = random.choice(CLIENT_IDS)


def _scratch(path):
    """A fresh entry for an admin delete to remove."""
    name = "contract-scratch-%d" % random.randrange(1_000_000)
    if path == "/admin/topic/delete":
        _call("/admin/topic", name=name, queues=1)
    else:
        _call(path.removesuffix("/delete"), name=name, topic=TOPIC)
    return name


# requestIds handed to cases, per context: a case that does not ack its batch (a refused or
# unmapped one) leaves the queue locked for the consumer's lock time.
ISSUED = {}


def _request_id(params):
    """The requestId of a real pull by the case's consumer. When every queue of the context is
    held by an earlier case's batch, those batches are unlocked first (blank, read as absent,
    if that still yields none)."""
    _call("/mq/produce", producer=PRODUCER, message="contract")
    pull = {"topic": TOPIC, "consumer": params["consumer"]}
    if "clientId" in params:
        pull["clientId"] = params["clientId"]
    issued = ISSUED.setdefault((pull["consumer"], pull.get("clientId")), [])
    for attempt in range(3):
        # A context left consuming with pop=true by earlier cases refuses pulls without it.
        result = _call("/mq/message", **pull).get("result") or {}
        if not result and attempt == 0:
            pull["pop"] = "true"
            result = _call("/mq/message", **pull).get("result") or {}
        if result.get("requestId"):
            issued.append(result["requestId"])
            return result["requestId"]
        if result.get("status") in ("PAUSED", "RATE_LIMITED"):  # an earlier config case did it
            _call("/admin/consumer/config", consumer=pull["consumer"], pause="false", rateLimitEnabled="false")
        while issued:
            _call("/mq/unlock", requestId=issued.pop(), **pull)
    return ""


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Runs on the case as it is sent (after every phase's mutation), so the state it names is
    made right before the call that uses it."""
    if random.random() >= REAL_SHARE:
        return
    path = ctx.operation.path
    params = _params(case)
    if path.startswith("/mq/produce"):
        params["producer"] = PRODUCER
        messages = params.get("messages")
        if path == "/mq/produce/batch" and isinstance(messages, str):
            try:
                is_array = isinstance(json.loads(messages), list)
            except ValueError:
                is_array = False
            if not is_array:
                params["messages"] = json.dumps([messages])
    elif path == "/mq/clustering/queue/offset":
        params["consumer"] = CLUSTERING
    elif path == "/mq/broadcast/queue/offset":
        params["consumer"] = BROADCAST
    elif path in ("/admin/producer", "/admin/consumer"):
        params["topic"] = TOPIC
    elif path.endswith("/delete"):
        params["name"] = _scratch(path)
    elif path in CONSUMER_PATHS:
        _use_consumer(params, random.choice([CLUSTERING, BROADCAST]))
        # Long polls answer at once when something is there, else wait all of waitMs: keep
        # the run short (every value up to 30000 is still the contract; refusals stay as drawn).
        if isinstance(params.get("waitMs"), int) and 1000 < params["waitMs"] <= 30000:
            params["waitMs"] = random.randrange(1000)
        if path in ("/mq/ack", "/mq/unlock"):
            params["requestId"] = _request_id(params)
            if params.get("useCookie") is True:  # the cookie jar is empty: read the parameter
                params["useCookie"] = False
        if path == "/admin/consumer/config" and "retryMsgId" in params:
            produced = _call("/mq/produce", producer=PRODUCER, message="retry").get("result") or {}
            params["retryMsgId"] = produced.get("msgId", "")


@schemathesis.hook
def after_call(ctx, case, response):
    """Remembers the batches that pull cases took (each holds a queue for the lock time), so
    _request_id can release them; with MQPROXY_CONTRACT_DEBUG=FILE, logs every call there."""
    params = case.body if isinstance(case.body, dict) else (case.query or {})
    if ctx.operation.path == "/mq/message":
        try:
            request_id = (response.json().get("result") or {}).get("requestId")
        except (ValueError, AttributeError):
            request_id = None
        if request_id:
            ISSUED.setdefault((params.get("consumer"), params.get("clientId")), []).append(request_id)
    log = os.environ.get("MQPROXY_CONTRACT_DEBUG")
    if log:
        with open(log, "a") as f:
            f.write("%s %s %s %s %s\n" % (case.method, ctx.operation.path, response.status_code, response.text[:150], params))
