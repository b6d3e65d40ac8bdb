package mqproxy.apache;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import org.apache.rocketmq.client.consumer.DefaultLitePullConsumer;
import org.apache.rocketmq.client.consumer.DefaultMQPullConsumer;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.selector.SelectMessageQueueByHash;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageClientIDSetter;
import org.apache.rocketmq.common.message.MessageConst;
import org.apache.rocketmq.common.message.MessageExt;
import org.apache.rocketmq.common.message.MessageQueue;
import org.apache.rocketmq.remoting.protocol.body.ClusterInfo;
import org.apache.rocketmq.remoting.protocol.route.BrokerData;

/**
 * The official Java client, driven by mqproxy's tests and scripts. One subcommand per call,
 * results as single-line JSON on stdout, diagnostics on stderr, exit status 0 only on success.
 */
public final class Tool {
    private Tool() {}

    public static void main(String[] args) throws Exception {
        if (args.length == 0) {
            usage();
        }
        int status;
        switch (args[0]) {
            case "wait-cluster" -> status = waitCluster(args);
            case "produce" -> status = produce(args);
            case "consume" -> status = consume(args);
            case "lmq-consume" -> status = lmqConsume(args);
            case "bench-produce" -> status = Bench.produce(args);
            case "bench-produce-proxy" -> status = Bench.produceProxy(args);
            case "bench-consume" -> status = Bench.consume(args);
            case "bench-e2e" -> status = Bench.e2e(args);
            default -> {
                usage();
                status = 2;
            }
        }
        System.exit(status);
    }

    private static void usage() {
        System.err.println("usage: Tool wait-cluster NAMESRV CLUSTER BROKERS SECONDS\n"
            + "       Tool produce NAMESRV TOPIC COUNT BODY_PREFIX TAG KEYS PROPS ORDER_ID   (PROPS: k=v,k=v or -; ORDER_ID or -)\n"
            + "       Tool consume NAMESRV TOPIC GROUP COUNT IDLE_SECONDS\n"
            + "       Tool lmq-consume NAMESRV PARENT_TOPIC LMQ_TOPIC GROUP COUNT IDLE_SECONDS");
        Bench.usage();
        System.exit(2);
    }

    /** Waits until the name server lists BROKERS brokers (masters) in CLUSTER. */
    private static int waitCluster(String[] args) throws Exception {
        if (args.length != 5) {
            usage();
        }
        String namesrv = args[1];
        String cluster = args[2];
        int want = Integer.parseInt(args[3]);
        long deadline = System.currentTimeMillis() + Long.parseLong(args[4]) * 1000;
        DefaultMQProducer producer = new DefaultMQProducer("mqproxy-tool-wait");
        producer.setNamesrvAddr(namesrv);
        producer.setInstanceName("wait-" + ProcessHandle.current().pid());
        producer.start();
        try {
            TreeSet<String> seen = new TreeSet<>();
            while (System.currentTimeMillis() < deadline) {
                try {
                    ClusterInfo info = producer.getDefaultMQProducerImpl().getMqClientFactory()
                        .getMQClientAPIImpl().getBrokerClusterInfo(3000);
                    seen.clear();
                    var names = info.getClusterAddrTable().get(cluster);
                    if (names != null) {
                        for (String name : names) {
                            BrokerData data = info.getBrokerAddrTable().get(name);
                            if (data != null && data.getBrokerAddrs().containsKey(0L)) {
                                seen.add(name);
                            }
                        }
                    }
                    if (seen.size() >= want) {
                        System.out.println("{\"cluster\":\"" + cluster + "\",\"brokers\":" + json(seen) + "}");
                        return 0;
                    }
                } catch (Exception e) {
                    // The name server is not answering yet: try again until the deadline.
                }
                Thread.sleep(100);
            }
            System.err.println("cluster " + cluster + " at " + namesrv + ": " + seen.size() + " of " + want
                + " brokers registered " + seen);
            return 1;
        } finally {
            producer.shutdown();
        }
    }

    /**
     * Sends COUNT messages (bodies BODY_PREFIX0, BODY_PREFIX1, ...) with a tag, keys and user properties,
     * synchronously; with an ORDER_ID through SelectMessageQueueByHash over all the topic's queues.
     * One line per message: its msgId (the unique key) and where it was stored.
     */
    private static int produce(String[] args) throws Exception {
        if (args.length != 9) {
            usage();
        }
        String topic = args[2];
        int count = Integer.parseInt(args[3]);
        DefaultMQProducer producer = new DefaultMQProducer("mqproxy-tool-producer");
        producer.setNamesrvAddr(args[1]);
        producer.setInstanceName("produce-" + ProcessHandle.current().pid());
        // The default 3 s covers the first send's route lookup too: not always enough on a
        // busy 2-core CI machine (seen once). This tool is a peer, not what is measured.
        producer.setSendMsgTimeout(15_000);
        producer.start();
        try {
            for (int i = 0; i < count; i++) {
                Message message = new Message(topic, args[5], args[6], (args[4] + i).getBytes(StandardCharsets.UTF_8));
                if (!args[7].equals("-")) {
                    for (String pair : args[7].split(",")) {
                        String[] kv = pair.split("=", 2);
                        message.putUserProperty(kv[0], kv[1]);
                    }
                }
                SendResult sent = args[8].equals("-")
                    ? producer.send(message)
                    : producer.send(message, new SelectMessageQueueByHash(), args[8]);
                Map<String, Object> line = new LinkedHashMap<>();
                line.put("msgId", sent.getMsgId());
                line.put("status", sent.getSendStatus().name());
                line.put("brokerName", sent.getMessageQueue().getBrokerName());
                line.put("queueId", sent.getMessageQueue().getQueueId());
                line.put("queueOffset", sent.getQueueOffset());
                System.out.println(object(line));
            }
            return 0;
        } finally {
            producer.shutdown();
        }
    }

    /**
     * Consumes TOPIC as consumer group GROUP (a lite pull consumer assigned every queue, from the
     * group's committed offsets, else the first offset), printing "ready" once assigned and then
     * one line per message with the time it arrived, until COUNT messages came or none for
     * IDLE_SECONDS (counted from "ready", then from the last message).
     * Offsets are committed to the brokers before it exits.
     */
    private static int consume(String[] args) throws Exception {
        if (args.length != 6) {
            usage();
        }
        String topic = args[2];
        int count = Integer.parseInt(args[4]);
        long idle = Long.parseLong(args[5]) * 1000;
        DefaultLitePullConsumer consumer = new DefaultLitePullConsumer(args[3]);
        consumer.setNamesrvAddr(args[1]);
        consumer.setInstanceName("consume-" + ProcessHandle.current().pid());
        consumer.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        consumer.setPollTimeoutMillis(100);
        consumer.setAutoCommit(false);
        consumer.start();
        try {
            Collection<MessageQueue> queues = consumer.fetchMessageQueues(topic);
            consumer.assign(new ArrayList<>(queues));
            Map<String, Object> ready = new LinkedHashMap<>();
            ready.put("ready", true);
            ready.put("queues", queues.size());
            System.out.println(object(ready));
            System.out.flush();
            int seen = 0;
            // Per queue, the offset after the last message read: what the group's committed
            // offset must be on the brokers when this exits.
            Map<MessageQueue, Long> next = new LinkedHashMap<>();
            long deadline = System.currentTimeMillis() + idle;
            while (seen < count && System.currentTimeMillis() < deadline) {
                List<MessageExt> batch = consumer.poll(100);
                long now = System.currentTimeMillis();
                for (MessageExt m : batch) {
                    seen++;
                    next.merge(new MessageQueue(m.getTopic(), m.getBrokerName(), m.getQueueId()),
                        m.getQueueOffset() + 1, Math::max);
                    Map<String, Object> line = new LinkedHashMap<>();
                    line.put("msgId", MessageClientIDSetter.getUniqID(m));
                    line.put("body", new String(m.getBody(), StandardCharsets.UTF_8));
                    line.put("keys", m.getKeys());
                    line.put("tags", m.getTags());
                    line.put("bornTimestamp", m.getBornTimestamp());
                    line.put("storeTimestamp", m.getStoreTimestamp());
                    line.put("arrivedAt", now);
                    line.put("brokerName", m.getBrokerName());
                    line.put("queueId", m.getQueueId());
                    line.put("queueOffset", m.getQueueOffset());
                    Map<String, Object> user = new LinkedHashMap<>();
                    m.getProperties().forEach((k, v) -> {
                        if (!MessageConst.STRING_HASH_SET.contains(k)) {
                            user.put(k, v);
                        }
                    });
                    line.put("userProperties", user);
                    System.out.println(object(line));
                }
                System.out.flush();
                if (!batch.isEmpty()) {
                    consumer.commitSync();
                    deadline = now + idle;
                }
            }
            consumer.commitSync();
            // commitSync keeps the offsets in memory, and persisting sends them with one-way
            // requests that a busy machine can lose; this consumer's committed() answers from
            // that memory. So a second client of the group, whose memory is empty, reads them
            // from the brokers, and they are sent again until the brokers hold them.
            if (!next.isEmpty() && !brokersHold(args[1], args[3], consumer, next)) {
                return 1;
            }
            return 0;
        } finally {
            consumer.shutdown();
        }
    }

    /** Persists NEXT (per queue, the offset to commit) until the brokers answer it back. */
    /**
     * Reads an LMQ (RocketMQ's light message queue, RIP-28) as RocketMQ's LMQ pull example does:
     * queue 0 of the LMQ topic on each broker of its parent topic, from its first offset. One
     * JSON line per message (msgId, body, brokerName, queueOffset: the message's offset in the
     * LMQ), until COUNT messages or IDLE_SECONDS without one.
     */
    @SuppressWarnings("deprecation")
    private static int lmqConsume(String[] args) throws Exception {
        if (args.length != 7) {
            usage();
        }
        String parent = args[2];
        String lmq = args[3];
        int count = Integer.parseInt(args[5]);
        long idle = Long.parseLong(args[6]) * 1000;
        DefaultMQPullConsumer consumer = new DefaultMQPullConsumer(args[4]);
        consumer.setNamesrvAddr(args[1]);
        consumer.setInstanceName("lmq-" + ProcessHandle.current().pid());
        consumer.start();
        try {
            // The parent's route names the brokers (and fills the client's broker addresses).
            TreeSet<String> brokers = new TreeSet<>();
            for (MessageQueue q : consumer.fetchSubscribeMessageQueues(parent)) {
                brokers.add(q.getBrokerName());
            }
            // The broker addresses the LMQ's calls need come from the parent's route.
            consumer.getDefaultMQPullConsumerImpl().getRebalanceImpl().getmQClientFactory()
                .updateTopicRouteInfoFromNameServer(parent);
            Map<String, Long> next = new LinkedHashMap<>();
            for (String broker : brokers) {
                next.put(broker, consumer.minOffset(new MessageQueue(lmq, broker, 0)));
            }
            int seen = 0;
            long deadline = System.currentTimeMillis() + idle;
            while (seen < count && System.currentTimeMillis() < deadline) {
                boolean any = false;
                for (String broker : brokers) {
                    MessageQueue queue = new MessageQueue(lmq, broker, 0);
                    var result = consumer.pull(queue, "*", next.get(broker), 32);
                    next.put(broker, result.getNextBeginOffset());
                    if (result.getMsgFoundList() == null) {
                        continue;
                    }
                    for (MessageExt m : result.getMsgFoundList()) {
                        any = true;
                        seen++;
                        Map<String, Object> line = new LinkedHashMap<>();
                        line.put("msgId", MessageClientIDSetter.getUniqID(m));
                        line.put("body", new String(m.getBody(), StandardCharsets.UTF_8));
                        line.put("brokerName", broker);
                        line.put("dispatch", m.getProperty(MessageConst.PROPERTY_INNER_MULTI_DISPATCH));
                        line.put("lmqOffsets", m.getProperty(MessageConst.PROPERTY_INNER_MULTI_QUEUE_OFFSET));
                        System.out.println(object(line));
                    }
                }
                System.out.flush();
                if (any) {
                    deadline = System.currentTimeMillis() + idle;
                } else {
                    Thread.sleep(100);
                }
            }
            return seen >= count ? 0 : 1;
        } finally {
            consumer.shutdown();
        }
    }

    @SuppressWarnings("deprecation")
    private static boolean brokersHold(String namesrv, String group, DefaultLitePullConsumer consumer,
        Map<MessageQueue, Long> next) throws Exception {
        DefaultMQPullConsumer reader = new DefaultMQPullConsumer(group);
        reader.setNamesrvAddr(namesrv);
        reader.setInstanceName("offsets-" + ProcessHandle.current().pid());
        reader.start();
        try {
            long persistBy = System.currentTimeMillis() + 15_000;
            for (Map.Entry<MessageQueue, Long> q : next.entrySet()) {
                while (reader.fetchConsumeOffset(q.getKey(), true) < q.getValue()) {
                    if (System.currentTimeMillis() > persistBy) {
                        System.err.println("offset of " + q.getKey() + " not on the broker: " + q.getValue());
                        return false;
                    }
                    consumer.commitSync(Map.of(q.getKey(), q.getValue()), true);
                    Thread.sleep(50);
                }
            }
            return true;
        } finally {
            reader.shutdown();
        }
    }

    static String object(Map<String, Object> fields) {
        StringBuilder out = new StringBuilder("{");
        for (Map.Entry<String, Object> field : fields.entrySet()) {
            if (out.length() > 1) {
                out.append(',');
            }
            out.append(string(field.getKey())).append(':').append(value(field.getValue()));
        }
        return out.append('}').toString();
    }

    @SuppressWarnings("unchecked")
    private static String value(Object v) {
        if (v == null) {
            return "null";
        }
        if (v instanceof Number || v instanceof Boolean) {
            return v.toString();
        }
        if (v instanceof Map<?, ?> map) {
            return object((Map<String, Object>) map);
        }
        return string(v.toString());
    }

    private static String string(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }

    private static String json(Iterable<String> items) {
        StringBuilder out = new StringBuilder("[");
        for (String item : items) {
            if (out.length() > 1) {
                out.append(',');
            }
            out.append('"').append(item.replace("\\", "\\\\").replace("\"", "\\\"")).append('"');
        }
        return out.append(']').toString();
    }
}
