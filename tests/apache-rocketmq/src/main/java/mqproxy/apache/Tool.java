package mqproxy.apache;

import java.util.Map;
import java.util.TreeSet;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
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
            default -> {
                usage();
                status = 2;
            }
        }
        System.exit(status);
    }

    private static void usage() {
        System.err.println("usage: Tool wait-cluster NAMESRV CLUSTER BROKERS SECONDS");
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
