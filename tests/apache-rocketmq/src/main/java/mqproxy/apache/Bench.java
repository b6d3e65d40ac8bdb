package mqproxy.apache;

import java.io.BufferedWriter;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import org.apache.rocketmq.client.apis.ClientConfiguration;
import org.apache.rocketmq.client.apis.ClientServiceProvider;
import org.apache.rocketmq.client.apis.producer.Producer;
import org.apache.rocketmq.client.consumer.DefaultLitePullConsumer;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;

/**
 * The official Java clients as the peers of mqproxy's benchmarks (`mqproxy-bench apache`).
 * Each subcommand prints one JSON line {count, seconds, rate} on stdout and writes its
 * latencies (microseconds, one per line) to LATENCY_FILE for the Rust side's histograms.
 */
final class Bench {
    private Bench() {}

    static void usage() {
        System.err.println("       Tool bench-produce NAMESRV TOPIC THREADS WARMUP_S SECONDS SIZE LATENCY_FILE\n"
            + "       Tool bench-produce-proxy ENDPOINT TOPIC THREADS WARMUP_S SECONDS SIZE LATENCY_FILE\n"
            + "       Tool bench-consume NAMESRV TOPIC GROUP COUNT BATCH LATENCY_FILE\n"
            + "       Tool bench-e2e NAMESRV TOPIC GROUP COUNT SIZE LATENCY_FILE");
    }

    /** One sender thread's loop: `send` is one synchronous send. */
    interface Send {
        void send() throws Exception;
    }

    /**
     * THREADS closed-loop senders for WARMUP_S + SECONDS; only sends that start after the
     * warm-up are counted and timed.
     */
    private static int closedLoop(int threads, double warmup, double seconds, Path latencyFile, Send send)
        throws Exception {
        long measureFrom = System.nanoTime() + (long) (warmup * 1e9);
        long end = measureFrom + (long) (seconds * 1e9);
        List<long[]> perThread = new ArrayList<>();
        long[] counts = new long[threads];
        Exception[] failures = new Exception[threads];
        Thread[] workers = new Thread[threads];
        for (int t = 0; t < threads; t++) {
            final int index = t;
            long[][] samples = {new long[1024]};
            perThread.add(null);
            workers[t] = new Thread(() -> {
                int n = 0;
                try {
                    while (true) {
                        long sent = System.nanoTime();
                        if (sent >= end) {
                            break;
                        }
                        send.send();
                        if (sent >= measureFrom) {
                            if (n == samples[0].length) {
                                samples[0] = Arrays.copyOf(samples[0], n * 2);
                            }
                            samples[0][n++] = (System.nanoTime() - sent) / 1000;
                        }
                    }
                } catch (Exception e) {
                    failures[index] = e;
                }
                counts[index] = n;
                synchronized (perThread) {
                    perThread.set(index, Arrays.copyOf(samples[0], n));
                }
            });
            workers[t].start();
        }
        for (Thread w : workers) {
            w.join();
        }
        for (Exception e : failures) {
            if (e != null) {
                e.printStackTrace();
                return 1;
            }
        }
        long total = Arrays.stream(counts).sum();
        writeLatencies(latencyFile, perThread);
        report(total, seconds);
        return 0;
    }

    private static void writeLatencies(Path file, List<long[]> samples) throws IOException {
        try (BufferedWriter out = Files.newBufferedWriter(file)) {
            for (long[] part : samples) {
                for (long v : part) {
                    out.write(Long.toString(v));
                    out.write('\n');
                }
            }
        }
    }

    private static void report(long count, double seconds) {
        Map<String, Object> line = new LinkedHashMap<>();
        line.put("count", count);
        line.put("seconds", seconds);
        line.put("rate", count / seconds);
        System.out.println(Tool.object(line));
    }

    /** The remoting client's DefaultMQProducer, synchronous sends of SIZE-byte bodies. */
    static int produce(String[] args) throws Exception {
        if (args.length != 8) {
            return usageError();
        }
        String topic = args[2];
        int threads = Integer.parseInt(args[3]);
        byte[] body = body(args[6]);
        DefaultMQProducer producer = producer(args[1], "mqproxy-bench-java");
        try {
            return closedLoop(threads, Double.parseDouble(args[4]), Double.parseDouble(args[5]), Path.of(args[7]),
                () -> producer.send(new Message(topic, body), 3000));
        } finally {
            producer.shutdown();
        }
    }

    /** The 5.x gRPC client through the RocketMQ 5 proxy at ENDPOINT, synchronous sends. */
    static int produceProxy(String[] args) throws Exception {
        if (args.length != 8) {
            return usageError();
        }
        String topic = args[2];
        int threads = Integer.parseInt(args[3]);
        byte[] body = body(args[6]);
        ClientServiceProvider provider = ClientServiceProvider.loadService();
        ClientConfiguration configuration = ClientConfiguration.newBuilder()
            .setEndpoints(args[1])
            .enableSsl(false)
            .setRequestTimeout(Duration.ofSeconds(3))
            .build();
        try (Producer producer = provider.newProducerBuilder()
            .setClientConfiguration(configuration)
            .setTopics(topic)
            .build()) {
            return closedLoop(threads, Double.parseDouble(args[4]), Double.parseDouble(args[5]), Path.of(args[7]),
                () -> producer.send(provider.newMessageBuilder().setTopic(topic).setBody(body).build()));
        }
    }

    /**
     * A lite pull consumer (the Java client's pull consumer) assigned every queue of TOPIC,
     * from the first offset, pulling BATCH messages per request, until COUNT messages came.
     * Latencies: the gaps between non-empty polls.
     */
    static int consume(String[] args) throws Exception {
        if (args.length != 7) {
            return usageError();
        }
        String topic = args[2];
        long count = Long.parseLong(args[4]);
        DefaultLitePullConsumer consumer = new DefaultLitePullConsumer(args[3]);
        consumer.setNamesrvAddr(args[1]);
        consumer.setInstanceName("bench-consume-" + ProcessHandle.current().pid());
        consumer.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        consumer.setPullBatchSize(Integer.parseInt(args[5]));
        consumer.setPollTimeoutMillis(100);
        consumer.start();
        try {
            consumer.assign(new ArrayList<>(consumer.fetchMessageQueues(topic)));
            long[] gaps = new long[1024];
            int n = 0;
            long seen = 0;
            long started = System.nanoTime();
            long last = started;
            long deadline = started + TimeUnit.SECONDS.toNanos(600);
            while (seen < count) {
                if (System.nanoTime() > deadline) {
                    System.err.println("bench-consume: " + seen + " of " + count + " in 600 s");
                    return 1;
                }
                List<MessageExt> batch = consumer.poll(100);
                if (batch.isEmpty()) {
                    continue;
                }
                long now = System.nanoTime();
                if (n == gaps.length) {
                    gaps = Arrays.copyOf(gaps, n * 2);
                }
                gaps[n++] = (now - last) / 1000;
                last = now;
                seen += batch.size();
            }
            double seconds = (System.nanoTime() - started) / 1e9;
            writeLatencies(Path.of(args[6]), List.of(Arrays.copyOf(gaps, n)));
            report(seen, seconds);
            return 0;
        } finally {
            consumer.shutdown();
        }
    }

    /**
     * Produce -> deliver with the Java clients alone: one DefaultMQProducer sends a message at a
     * time, a push consumer (long polling) of GROUP receives it; the latency is from before the
     * send to the arrival. Waits first until the consumer receives (its rebalance is done).
     */
    static int e2e(String[] args) throws Exception {
        if (args.length != 7) {
            return usageError();
        }
        String topic = args[2];
        int count = Integer.parseInt(args[4]);
        byte[] body = body(args[5]);
        LinkedBlockingQueue<Long> arrivals = new LinkedBlockingQueue<>();
        DefaultMQPushConsumer consumer = new DefaultMQPushConsumer(args[3]);
        consumer.setNamesrvAddr(args[1]);
        consumer.setInstanceName("bench-e2e-" + ProcessHandle.current().pid());
        consumer.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_LAST_OFFSET);
        consumer.subscribe(topic, "*");
        consumer.registerMessageListener((MessageListenerConcurrently) (messages, context) -> {
            long now = System.nanoTime();
            for (int i = 0; i < messages.size(); i++) {
                arrivals.add(now);
            }
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        consumer.start();
        DefaultMQProducer producer = producer(args[1], "mqproxy-bench-java-e2e");
        try {
            // Until a message arrives: the consumer has its queues.
            long readyBy = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
            while (arrivals.poll(200, TimeUnit.MILLISECONDS) == null) {
                if (System.nanoTime() > readyBy) {
                    System.err.println("bench-e2e: the push consumer received nothing in 60 s");
                    return 1;
                }
                producer.send(new Message(topic, body), 3000);
            }
            // Late arrivals of the warm-up sends.
            while (arrivals.poll(500, TimeUnit.MILLISECONDS) != null) {
                // drained
            }
            long[] latencies = new long[count];
            long started = System.nanoTime();
            for (int i = 0; i < count; i++) {
                long sent = System.nanoTime();
                producer.send(new Message(topic, body), 3000);
                Long arrived = arrivals.poll(10, TimeUnit.SECONDS);
                if (arrived == null) {
                    System.err.println("bench-e2e: message " + i + " not delivered in 10 s");
                    return 1;
                }
                latencies[i] = (arrived - sent) / 1000;
            }
            double seconds = (System.nanoTime() - started) / 1e9;
            writeLatencies(Path.of(args[6]), List.of(latencies));
            report(count, seconds);
            return 0;
        } finally {
            producer.shutdown();
            consumer.shutdown();
        }
    }

    /** A started DefaultMQProducer of GROUP that does not retry (a failed send fails the run). */
    private static DefaultMQProducer producer(String namesrv, String group) throws Exception {
        DefaultMQProducer producer = new DefaultMQProducer(group);
        producer.setNamesrvAddr(namesrv);
        producer.setInstanceName(group + "-" + ProcessHandle.current().pid());
        producer.setRetryTimesWhenSendFailed(0);
        producer.start();
        return producer;
    }

    /** A body of SIZE bytes. */
    private static byte[] body(String size) {
        byte[] body = new byte[Integer.parseInt(size)];
        Arrays.fill(body, (byte) 'x');
        return body;
    }

    private static int usageError() {
        usage();
        return 2;
    }
}
